"""8-bit weights that stay exact on AVX2 CPUs without VNNI: limit input-channel *pairs*, not values.

Without VNNI, oneDNN multiplies u8 activations by s8 weights with
``vpmaddubsw``, which adds the products of two *adjacent input channels*
(``2k`` and ``2k+1``, for the same output channel and kernel position) in
saturating 16 bits.  With u8 inputs up to 255 the pair sum cannot saturate
when, for every such pair of integer weights,

    |q[2k] + q[2k+1]| <= 128         (255 * 128 = 32640 <= 32767)

(with opposite signs the sum is at most ``255 * max(|q|)``, always safe).
:mod:`graphquant.target` instead limits every weight to ``|q| <= 63``, which
satisfies this for any pairing but throws away one bit.  Before/after, for a
u8-input conv or matmul on ``--target=avx2``::

    before:  step[c] = max|w[..., c]| / 63                       (7-bit weights)
    after:   step[c] = max(max|w| / 127, max|w[2k] + w[2k+1]| / 128)   (~8-bit)
             q = rint(w / step), then a pair rounded to |sum| = 129 moves its
             tied element one step toward zero

On Gaussian weights (3x3x64 per channel) the pair limit binds: the step is
0.54-0.81 of the 7-bit one, the weight error 0.65 of it.  A search over
smaller steps that moves the few pairs above the limit back onto it (see
:func:`quantize_weights`) gains little there (0.653 instead of 0.656).  Measured
bit-exact against an exact integer reference (tests/test_pair_weights.py; by
hand for 1x1/3x3/5x5 convs with 1..512 input channels, strides 1/2,
SAME/VALID, and matmuls with K up to 1280, oneDNN on and off): adjacent input
channels are the pairs.  Not for qint8 inputs: oneDNN then halves the weights
itself (its +128 input shift), so 7 bits are all a signed-input conv gets;
depthwise convs are exact with 8 bits anyway.

Layouts: conv filters ``[h, w, in, out]`` pair along ``in``; matmul weights
``[K, N]`` along ``K`` (``[N, K]`` with ``transpose_b``).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import List

import numpy as np

from graphquant.quant_math import KERNEL_WEIGHT_DIVISOR, MIN_RANGE, QuantizedWeights

MAX_LEVEL = 127
MAX_PAIR_SUM = 128
SEARCH_STEPS = 16     # steps tried between the safe step and max|w|/127
KINDS = ("conv", "matmul")


def _in_out_view(w: np.ndarray, kind: str, transpose_b: bool) -> np.ndarray:
    """``w`` as [..., in, out] (input channels on axis -2, output channels last)."""
    if kind == "conv":
        return w
    if kind == "matmul":
        return w.T if transpose_b else w
    raise ValueError(f"paired weights exist for {KINDS}, not {kind!r}")


def _pairs(v: np.ndarray) -> np.ndarray:
    """[..., in, out] -> [..., in/2, 2, out], a zero channel appended when ``in`` is odd."""
    if v.shape[-2] % 2:
        pad = [(0, 0)] * v.ndim
        pad[-2] = (0, 1)
        v = np.pad(v, pad)
    return v.reshape(v.shape[:-2] + (v.shape[-2] // 2, 2, v.shape[-1]))


def pair_sums_ok(q: np.ndarray, kind: str = "conv", transpose_b: bool = False) -> bool:
    """Whether integer weights ``q`` satisfy ``|q| <= 127`` and ``|q[2k]+q[2k+1]| <= 128``."""
    p = _pairs(_in_out_view(np.asarray(q, np.int64), kind, transpose_b))
    return bool(np.abs(p).max(initial=0) <= MAX_LEVEL
                and np.abs(p.sum(axis=-2)).max(initial=0) <= MAX_PAIR_SUM)


def _round_pairs(pairs: np.ndarray, step: np.ndarray, scaled: np.ndarray = None,
                 rounded: np.ndarray = None) -> np.ndarray:
    """Integers for ``pairs / step`` within the limits: values clipped to 127, pairs whose
    sum is above 128 moved back evenly (the nearest point on the limit), then rounded; a
    pair rounded to 129 (two ties) moves its element that rounded outward more.
    ``scaled``, ``rounded``: float64 arrays shaped like ``pairs`` to compute in (the
    search reuses them; the result may be ``rounded``)."""
    scaled = np.divide(pairs, step, out=scaled)
    np.clip(scaled, -MAX_LEVEL, MAX_LEVEL, out=scaled)
    total = _pair_sums(scaled)
    if _beyond(total):   # else the shift below moves nothing
        excess = np.maximum(np.abs(total) - MAX_PAIR_SUM, 0.0)
        scaled -= np.sign(total) * excess / 2
    q = np.rint(scaled, out=rounded)
    total = _pair_sums(q)
    if _beyond(total):
        over = np.abs(total) > MAX_PAIR_SUM
        direction = np.sign(total)
        overshoot = (q - scaled) * direction
        first = overshoot[..., :1, :] >= overshoot[..., 1:, :]
        q = q - np.concatenate([first, ~first], axis=-2) * over * direction
    return q


def _pair_sums(v: np.ndarray) -> np.ndarray:
    """``v[..., 0, :] + v[..., 1, :]`` of a [..., pairs, 2, out] array, keeping the pair axis
    (what ``v.sum(axis=-2, keepdims=True)`` gives, in one addition)."""
    return np.add(v[..., :1, :], v[..., 1:, :])


def _beyond(total: np.ndarray) -> bool:
    """Whether any pair sum in ``total`` is above the limit in magnitude."""
    return bool(total.size) and (total.max() > MAX_PAIR_SUM or total.min() < -MAX_PAIR_SUM)


def _squared_error(q: np.ndarray, step, pairs: np.ndarray, axes, buffer: np.ndarray):
    """``((q * step - pairs) ** 2).sum(axis=axes)``, computed in ``buffer``."""
    np.multiply(q, step, out=buffer)
    buffer -= pairs
    np.square(buffer, out=buffer)
    return buffer.sum(axis=axes)


def quantize_weights(w, kind: str = "conv", per_channel: bool = True,
                     transpose_b: bool = False, search: int = SEARCH_STEPS) -> QuantizedWeights:
    """Symmetric int8 weights with the pair limit (module docstring); the same
    :class:`~graphquant.quant_math.QuantizedWeights` as
    :func:`graphquant.quant_math.quantize_weights` (declared range ``step*127``).

    ``search`` > 1 also tries that many smaller steps, down to ``max|w|/127``,
    where the few pairs above the limit are moved back onto it, and keeps per
    channel the step of least squared weight error.  Per channel, blocks of
    output channels are searched in parallel threads (:func:`_channel_blocks`;
    every operation is elementwise or per channel, so the result is the same
    as searching the whole tensor at once).
    """
    w = np.asarray(w, np.float32)
    view = _in_out_view(w, kind, transpose_b).astype(np.float64)
    pairs = _pairs(view)
    out = view.shape[-1]
    value_max = np.abs(view).reshape(-1, out).max(axis=0, initial=0.0)
    pair_max = np.abs(_pair_sums(pairs)).reshape(-1, out).max(axis=0, initial=0.0)
    if not per_channel:
        value_max, pair_max = value_max.max(initial=0.0), pair_max.max(initial=0.0)
    floor = MIN_RANGE / MAX_LEVEL
    safe = np.maximum(np.maximum(value_max / MAX_LEVEL, pair_max / MAX_PAIR_SUM), floor)
    smallest = np.maximum(value_max / MAX_LEVEL, floor)
    if per_channel:
        best_step, best_q = _search_blocks(pairs, safe, smallest, search)
    else:
        best_step, best_q = _search(pairs, safe, smallest, search, per_channel=False)
    q = best_q.reshape(best_q.shape[:-3] + (-1, out))[..., :view.shape[-2], :]
    values = q.T if kind == "matmul" and transpose_b else q
    step = np.asarray(best_step, np.float64)
    declared = (step * KERNEL_WEIGHT_DIVISOR).astype(np.float32)
    return QuantizedWeights(values=np.ascontiguousarray(values), step=step.astype(np.float32),
                            min_range=-declared, max_range=declared, max_level=MAX_LEVEL)


#: float64 values per block of output channels searched by one thread
BLOCK_VALUES = 1 << 17
#: at least this many channels per block: each block then reduces its leading
#: axes in the same order as the whole array would
_MIN_BLOCK_CHANNELS = 8
_THREADS = max(1, min(4, os.cpu_count() or 1))


def _channel_blocks(shape) -> List[slice]:
    """Slices of the last axis of a ``shape``-d array, about :data:`BLOCK_VALUES` values each."""
    out = shape[-1]
    per_channel = max(1, int(np.prod(shape[:-1])))
    width = max(_MIN_BLOCK_CHANNELS, BLOCK_VALUES // per_channel)
    return [slice(start, min(start + width, out)) for start in range(0, out, width)]


def _search_blocks(pairs: np.ndarray, safe: np.ndarray, smallest: np.ndarray, search: int):
    """:func:`_search` per channel, on blocks of output channels in parallel threads
    (numpy releases the GIL in its array loops)."""
    blocks = _channel_blocks(pairs.shape)
    if len(blocks) == 1:
        return _search(pairs, safe, smallest, search, per_channel=True)

    def run(block):
        return _search(np.ascontiguousarray(pairs[..., block]), safe[block], smallest[block],
                       search, per_channel=True)

    best_step = np.empty(pairs.shape[-1])
    best_q = np.empty(pairs.shape, np.int8)
    with ThreadPoolExecutor(max_workers=min(_THREADS, len(blocks))) as pool:
        for block, (step, q) in zip(blocks, pool.map(run, blocks)):
            best_step[block], best_q[..., block] = step, q
    return best_step, best_q


def _search(pairs: np.ndarray, safe, smallest, search: int, per_channel: bool):
    """(step, int8 values) of least squared error among ``search`` steps from ``safe``
    down towards ``smallest`` (per channel, or one for the tensor)."""
    buffer, rounded = np.empty_like(pairs), np.empty_like(pairs)
    best_step, q = safe, _round_pairs(pairs, safe, buffer, rounded)
    best_q = q.astype(np.int8)      # whole numbers within +-127: exact in int8
    if search > 1:
        axes = tuple(range(pairs.ndim - 1)) if per_channel else None
        best_err = _squared_error(q, best_step, pairs, axes, buffer)
        for f in np.linspace(0.0, 1.0, search, endpoint=False)[1:]:
            step = smallest + (safe - smallest) * f
            q = _round_pairs(pairs, step, buffer, rounded)
            err = _squared_error(q, step, pairs, axes, buffer)
            better = err < best_err
            if better.any():
                best_err = np.where(better, err, best_err)
                best_step = np.where(better, step, best_step)
                np.copyto(best_q, q, casting="unsafe", where=better)
    return best_step, best_q
