"""Exact numpy integer references for the int8 kernels, and a tiny graph runner.

Used by tests/test_int8_ops.py and tests/test_saturation_avx2.py (and usable by
pass tests): convolutions and matmuls accumulate in int64, so any difference
from TensorFlow is the kernel's, not the reference's.
"""

from __future__ import annotations

from typing import Dict, Sequence

import numpy as np
from tensorflow.core.framework import graph_pb2

from graphquant.execute import run_graph


def run_nodes(nodes, fetches: Sequence[str], feeds: Dict[str, np.ndarray] = None):
    """Run a list of NodeDefs as a graph; ``feeds`` maps tensor names to arrays."""
    gd = graph_pb2.GraphDef()
    gd.node.extend(nodes)
    return run_graph(gd, feeds or {}, list(fetches))


def _pad_amounts(size, k, stride, dilation, padding):
    eff = (k - 1) * dilation + 1
    if padding == "VALID":
        out = (size - eff) // stride + 1
        return out, 0, 0
    out = -(-size // stride)
    total = max((out - 1) * stride + eff - size, 0)
    return out, total // 2, total - total // 2


def _windows(x, kh, kw, strides, dilations, padding, explicit):
    """Yield (i, j, patch) with patch [N, OH, OW, C] for each kernel position."""
    n, h, w, c = x.shape
    sh, sw = strides
    dh, dw = dilations
    if padding == "EXPLICIT":
        pt, pb, pl, pr = explicit
        oh = (h + pt + pb - ((kh - 1) * dh + 1)) // sh + 1
        ow = (w + pl + pr - ((kw - 1) * dw + 1)) // sw + 1
    else:
        oh, pt, pb = _pad_amounts(h, kh, sh, dh, padding)
        ow, pl, pr = _pad_amounts(w, kw, sw, dw, padding)
    xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    for i in range(kh):
        for j in range(kw):
            yield i, j, xp[:, i * dh: i * dh + (oh - 1) * sh + 1: sh,
                           j * dw: j * dw + (ow - 1) * sw + 1: sw, :]


def conv2d_int(x, w, strides=(1, 1), dilations=(1, 1), padding="SAME", explicit=(0, 0, 0, 0)):
    """int64 NHWC convolution of integer arrays x [N,H,W,C] and w [kh,kw,C,K]."""
    x = np.asarray(x, np.int64)
    w = np.asarray(w, np.int64)
    acc = None
    for i, j, patch in _windows(x, w.shape[0], w.shape[1], strides, dilations, padding,
                                explicit):
        term = np.tensordot(patch, w[i, j], axes=([3], [0]))
        acc = term if acc is None else acc + term
    return acc


def depthwise_int(x, w, strides=(1, 1), dilations=(1, 1), padding="SAME"):
    """int64 depthwise conv: w [kh,kw,C,M] -> output channel c*M+m."""
    x = np.asarray(x, np.int64)
    w = np.asarray(w, np.int64)
    acc = None
    for i, j, patch in _windows(x, w.shape[0], w.shape[1], strides, dilations, padding, None):
        term = patch[..., :, None] * w[i, j][None, None, None]
        term = term.reshape(term.shape[:3] + (-1,))
        acc = term if acc is None else acc + term
    return acc


def matmul_int(a, b, transpose_b=False):
    a = np.asarray(a, np.int64)
    b = np.asarray(b, np.int64)
    return a @ (b.T if transpose_b else b)


def pairwise_saturated_conv2d(x, w, padding="SAME"):
    """What a u8 x s8 kernel without VNNI computes (vpmaddubsw): products summed
    in pairs of adjacent input channels, each pair sum saturated to int16, then
    accumulated in int32.  Only a model: oneDNN's pairing order is its own."""
    x = np.asarray(x, np.int64)
    w = np.asarray(w, np.int64)
    acc = None
    for i, j, patch in _windows(x, w.shape[0], w.shape[1], (1, 1), (1, 1), padding, None):
        prod = patch[..., :, None] * w[i, j][None, None, None]  # N,OH,OW,C,K
        c = prod.shape[3]
        pairs = prod[..., 0:c - c % 2:2, :] + prod[..., 1:c - c % 2:2, :]
        pairs = np.clip(pairs, -32768, 32767)
        term = pairs.sum(axis=3)
        if c % 2:
            term = term + prod[..., -1, :]
        acc = term if acc is None else acc + term
    return acc
