"""How much a quantized graph changed the answers: fidelity and accuracy metrics.

All functions take the *reference* (fp32) output first and the *candidate*
(int8) output second, as arrays whose first axis is the sample axis, and
compute in float64.

* :func:`relative_l2`   ``||c - r|| / ||r||`` over the whole array;
* :func:`sqnr_db`       ``10 log10(sum r^2 / sum (r - c)^2)``, = ``-20 log10(relative_l2)``;
  ``inf`` when the candidate equals the reference;
* :func:`cosine_similarity` per sample (flattened), then :func:`cosine_summary`;
* :func:`topk_agreement` the fraction of samples whose reference top-1 class
  is among the candidate's top-k classes (k=1: "same top-1");
* :func:`topk_accuracy` against integer labels.

Used by tools/evaluate.py, the conversion report and the accuracy work.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import numpy as np


def _pair(reference, candidate):
    r = np.asarray(reference, np.float64)
    c = np.asarray(candidate, np.float64)
    if r.shape != c.shape:
        raise ValueError(f"reference shape {r.shape} differs from candidate shape {c.shape}")
    return r, c


def relative_l2(reference, candidate) -> float:
    """``||candidate - reference|| / ||reference||`` (inf: zero reference, nonzero error)."""
    r, c = _pair(reference, candidate)
    noise = float(np.linalg.norm((c - r).ravel()))
    signal = float(np.linalg.norm(r.ravel()))
    if signal == 0.0:
        return 0.0 if noise == 0.0 else math.inf
    return noise / signal


def sqnr_db(reference, candidate) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10 log10(sum r^2 / sum (c - r)^2)``."""
    r, c = _pair(reference, candidate)
    signal = float(np.sum(r * r))
    noise = float(np.sum((c - r) ** 2))
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def cosine_similarity(reference, candidate) -> np.ndarray:
    """Cosine similarity of each sample's flattened outputs, shape (N,).

    A sample where both are all zeros counts as 1; where only one is, as 0.
    """
    r, c = _pair(reference, candidate)
    r = r.reshape(r.shape[0], -1) if r.ndim else r.reshape(1, 1)
    c = c.reshape(c.shape[0], -1) if c.ndim else c.reshape(1, 1)
    dot = np.sum(r * c, axis=1)
    norms = np.linalg.norm(r, axis=1) * np.linalg.norm(c, axis=1)
    both_zero = (np.linalg.norm(r, axis=1) == 0) & (np.linalg.norm(c, axis=1) == 0)
    out = np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), 0.0)
    return np.where(both_zero, 1.0, out)


def cosine_summary(reference, candidate) -> Dict[str, float]:
    """Mean and minimum per-sample cosine similarity."""
    cos = cosine_similarity(reference, candidate)
    return {"mean": float(np.mean(cos)), "min": float(np.min(cos))}


def _scores(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 2:
        raise ValueError(f"class scores must be (samples, classes), got shape {x.shape}")
    return x


def topk_indices(scores, k: int) -> np.ndarray:
    """(N, k) class indices of the k largest scores, best first (ties: lower index first)."""
    s = _scores(scores)
    k = min(k, s.shape[1])
    order = np.argsort(-s, axis=1, kind="stable")
    return order[:, :k]


def topk_agreement(reference, candidate, k: int = 1) -> float:
    """Fraction of samples whose reference top-1 class is in the candidate's top-k."""
    r, c = _scores(reference), _scores(candidate)
    if r.shape != c.shape:
        raise ValueError(f"reference shape {r.shape} differs from candidate shape {c.shape}")
    ref_top1 = topk_indices(r, 1)[:, 0]
    hits = np.any(topk_indices(c, k) == ref_top1[:, None], axis=1)
    return float(np.mean(hits)) if len(hits) else math.nan


def topk_accuracy(scores, labels, k: int = 1) -> float:
    """Fraction of samples whose label is among the top-k scores."""
    s = _scores(scores)
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != s.shape[0]:
        raise ValueError(f"{len(labels)} labels for {s.shape[0]} samples")
    hits = np.any(topk_indices(s, k) == labels[:, None], axis=1)
    return float(np.mean(hits)) if len(hits) else math.nan


def is_classification(output) -> bool:
    """Whether an output looks like class scores: (samples, classes) with classes > 1."""
    shape = np.shape(output)
    return len(shape) == 2 and shape[1] > 1


def compare_outputs(reference, candidate, labels: Optional[np.ndarray] = None) -> Dict:
    """Every fidelity metric for one output (and accuracy when ``labels`` are given)."""
    result = {
        "shape": list(np.shape(reference)),
        "relative_l2": relative_l2(reference, candidate),
        "sqnr_db": sqnr_db(reference, candidate),
        "cosine": cosine_summary(reference, candidate),
        "max_abs_diff": float(np.max(np.abs(np.asarray(candidate, np.float64)
                                            - np.asarray(reference, np.float64))))
        if np.size(reference) else 0.0,
    }
    if is_classification(reference):
        result["top1_agreement"] = topk_agreement(reference, candidate, 1)
        result["top5_agreement"] = topk_agreement(reference, candidate, 5)
        if labels is not None:
            result["reference_top1_accuracy"] = topk_accuracy(reference, labels, 1)
            result["candidate_top1_accuracy"] = topk_accuracy(candidate, labels, 1)
            result["reference_top5_accuracy"] = topk_accuracy(reference, labels, 5)
            result["candidate_top5_accuracy"] = topk_accuracy(candidate, labels, 5)
    return result
