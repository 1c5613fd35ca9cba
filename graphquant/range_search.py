"""Range selection per tensor: the data range or a clipped one, whichever has less expected error.

``convert(..., calibration="auto")`` chooses, per calibrated tensor, between
its exact data range (``minmax``) and the clip range of least expected
squared error (``mse``, :func:`graphquant.calibrate.mse_threshold`)::

    Before:  every tensor  [min, max]           a tail of rare large values leaves
                                                the bulk of the data few steps
    After:   per tensor    [min, max] or [min', T] (T < max), the one of least
                           expected error on the calibration histogram

Expected error (:func:`expected_mse`) is computed for the grid the int8
kernels use: 255 steps over ``[0, R]`` for a non-negative tensor, 127 a side
over ``[-R, R]`` for a signed one (:mod:`graphquant.quant_math`); in-range
values cost ``step**2 / 12``, values beyond the range their distance to it
squared, exact zeros of a one-signed tensor (after Relu) nothing.  ``auto<g>``
(e.g. ``auto2``) clips only where that lowers the expected error ``g`` times.

Measured (tools/accuracy_table.py, /work/notes/accuracy.md): ``auto`` chose
the clipped range for almost every tensor and gave the same outputs as
``mse`` on fer_mini_xception, mtcnn_rnet and musicnn -- lower output error
than ``minmax`` on all three; ``auto2`` clipped 0-2 tensors per model and
changed nothing.
"""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

from graphquant.calibrate import CalibrationStats, TensorStats, tensor_range

Range = Tuple[float, float]
DEFAULT_GAIN = 1.0


def expected_mse(stats: TensorStats, lo: float, hi: float) -> float:
    """Expected squared quantization error per value of ``stats``' tensor over ``[lo, hi]``
    (``lo >= 0``: quint8 over ``[0, hi]``; else qint8 over ``[-R, R]``, ``R = max(-lo, hi)``)."""
    if not stats.count:
        return 0.0
    counts = stats.counts.astype(np.float64)
    width = stats.bin_width
    centres = stats.edges[:-1] + width / 2
    if lo >= 0:
        r_lo, r_hi, step = 0.0, float(hi), float(hi) / 255.0
    else:
        r = max(-float(lo), float(hi))
        r_lo, r_hi, step = -r, r, r / 127.0
    spread = width * width / 12.0
    cost = np.full_like(centres, step * step / 12.0)
    cost = np.where(centres > r_hi, (centres - r_hi) ** 2 + spread, cost)
    cost = np.where(centres < r_lo, (centres - r_lo) ** 2 + spread, cost)
    zeros = (np.abs(centres) < width) & (counts > 0)
    # the two bins touching 0 hold the exact zeros; assume they are all exact zeros
    # when the tensor is one-signed (Relu): they quantize without error
    if stats.one_signed:
        cost = np.where(zeros, 0.0, cost)
    return float((cost * counts).sum() / counts.sum())


def auto_range(stats: TensorStats, gain: float = DEFAULT_GAIN) -> Tuple[Range, str]:
    """(range, method) for one tensor: ``mse`` when it lowers :func:`expected_mse` by
    ``gain`` or more, else ``minmax``."""
    full = tensor_range(stats, "minmax")
    if not stats.count or not stats.has_histogram:
        return full, "minmax"
    clipped = tensor_range(stats, "mse")
    if clipped == full or clipped[1] <= clipped[0]:
        return full, "minmax"
    lo_full = min(full[0], 0.0) if full[0] < 0 else 0.0
    lo_clip = min(clipped[0], 0.0) if full[0] < 0 else 0.0
    e_full = expected_mse(stats, lo_full, max(full[1], 0.0))
    e_clip = expected_mse(stats, lo_clip, max(clipped[1], 0.0))
    if e_clip * gain <= e_full:
        return clipped, "mse"
    return full, "minmax"


def gain_of(method: str) -> float:
    """``auto`` -> the default gain, ``auto1.5`` -> 1.5."""
    return float(method[4:]) if method.startswith("auto") and method[4:] else DEFAULT_GAIN


def auto_ranges(stats: CalibrationStats, gain: float = DEFAULT_GAIN
                ) -> Tuple[Dict[str, Range], Dict[str, str]]:
    """({tensor: range}, {tensor: chosen method}) for every calibrated tensor."""
    ranges, methods = {}, {}
    for name, s in stats.tensors.items():
        ranges[name], methods[name] = auto_range(s, gain)
    return ranges, methods
