"""All quantization arithmetic: scales, ranges, int8 weights, int32 bias, requantize.

Passes never compute a scale themselves; they call this module.  The
conventions below are the ones TensorFlow 2.21's int8 kernels use (read from
its oneDNN kernel sources and checked bit-exactly by tests/test_quant_math.py
and tests/test_int8_ops.py, with oneDNN off and on).

Activations (``QuantizeV2`` / ``Dequantize``, mode ``SCALED``)
    Every activation tensor is described by one positive number ``R``, the
    largest magnitude kept.  Unsigned (quint8) tensors cover ``[0, R]`` with
    step ``R/255``; signed (qint8) tensors cover ``[-R, R]`` with step
    ``R/127`` and use the narrow range -127..127:

        quint8:  q = clip(rint(x * (255/R)), 0, 255)      x = q * (R/255)
        qint8:   q = clip(rint(x * (127/R)), -127, 127)   x = q * (R/127)

    ``rint`` rounds half to even (``round_mode=HALF_TO_EVEN``).  Three
    attributes of the ops matter and :func:`quantize_v2_attrs` sets them:

    * qint8 needs ``narrow_range=True``: without it the oneDNN QuantizeV2
      (used when ``TF_ENABLE_ONEDNN_OPTS=1``) maps negative numbers with
      ``128/R`` and the reference kernel reports a ``-128/127*R`` minimum, so
      results change with the environment;
    * quint8 needs ``min_range=0``: the reference kernel scales by ``max_range``
      only, the oneDNN one by ``max(|min_range|, |max_range|)``;
    * ``ensure_minimum_range=0``: the default 0.01 silently widens any range
      smaller than 0.01.

Weights (``qint8`` Const, always symmetric)
    The fused conv / matmul kernels derive the weight step from the declared
    range as ``max(|min_filter[c]|, |max_filter[c]|) / 127`` -- the divisor is
    127 whatever integers are stored.  A weight tensor is quantized with a
    *max level* L and a *multiple* M (every stored integer a multiple of M):

        step[c]   = max|w[..., c]| / L
        q         = M * rint(w / (M * step[c])),  clipped to [-L, L]
        declared  = +-step[c] * 127          (min_filter[c], max_filter[c])

    so the float range the kernel reconstructs (q * declared/127) is the
    weights' own range for any L.  Which (L, M) is exact depends on the CPU
    and the op (measured, see graphquant.target.weight_format): on CPUs
    without VNNI u8 x s8 products are added pairwise in saturating 16 bits, so
    convs with u8 input and matmuls need L=63; convs with s8 input have their
    weights halved by oneDNN (round(w/2)), so they need even weights, L=126,
    M=2; depthwise convs are exact with L=127.  Channel ``c`` is the output channel: the
    last axis of a Conv2D filter [h, w, in, out], ``in*mult`` positions of a
    depthwise filter [h, w, in, mult] flattened as ``i*mult + m``, the output
    axis of a MatMul weight (axis 1, or 0 with ``transpose_b``).

Accumulator, bias and requantize (``_FusedQuantizedConv2D`` & co.)
    With ``s_in = R_in/255`` (quint8 input) or ``R_in/127`` (qint8 input) and
    ``s_w[c] = declared[c]/127`` the kernel computes, per output channel c,

        acc   = sum(q_in * q_w)                                  (int32)
        y     = acc * s_in * s_w[c] + bias[c]   [+ s_sum * q_summand]
        y     = relu(y)                                          (if fused)
        q_out = saturate(rint(y / s_out))       s_out = R_out/255 (quint8) or R_out/127 (qint8)

    where ``R_out = max(|min_freezed_output|, |max_freezed_output|)`` and the
    op reports exactly the given freezed min/max as its output range.
    ``Tbias=float`` adds the fp32 bias unchanged (nothing to quantize).
    ``Tbias=qint32`` is turned back into float by the kernel as
    ``bias_int32 / scale[c]`` with ``scale[c] = (255 or 127)*127 /
    (R_in * declared[c])`` -- i.e. ``bias_int32 = round(bias / (s_in*s_w[c]))``,
    valid only for the R_in the bias was made with (a fixed, calibrated input
    range).  A summand (Sum fusion, qint8 or quint8) contributes
    ``q_summand * R_sum/127`` or ``R_sum/255``.  Without Requantize (qint32
    output) the op divides ``y`` by ``s_in * max_c(s_w[c])`` -- one scale for
    all channels -- while it *reports* per-channel ranges
    ``+-s_in*s_w[c]*2**31``; see :func:`int32_output_scale`.

Requantize / Relu6
    There is no fused Relu6: a quint8 output whose range R_out is at most 6
    saturates at 255 = R_out, so ``Relu + Requantize`` with ``R_out <= 6`` is
    Relu6 exactly (:func:`relu6_output_range`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np

QUINT8_LEVELS = 255
QINT8_LEVELS = 127
#: weight max level on CPUs with VNNI/AMX (exact int32 accumulation)
WEIGHT_LEVEL_VNNI = 127
#: weight max level on AVX2 CPUs without VNNI (7-bit weights avoid 16-bit saturation)
WEIGHT_LEVEL_AVX2 = 63
#: the divisor the kernels use to turn a declared filter range into a step
KERNEL_WEIGHT_DIVISOR = 127.0
#: smallest range ever declared; keeps scales finite for all-zero tensors
MIN_RANGE = 1e-6
RELU6_CAP = 6.0

INT32_MIN, INT32_MAX = -(2 ** 31), 2 ** 31 - 1


# --------------------------------------------------------------------------- activations
def levels(signed: bool) -> int:
    """Largest integer level of an activation: 127 (qint8) or 255 (quint8)."""
    return QINT8_LEVELS if signed else QUINT8_LEVELS


def activation_range(min_value: float, max_value: float, signed: bool) -> Tuple[float, float]:
    """The (min_range, max_range) to declare for a tensor whose values lie in
    ``[min_value, max_value]``: ``(0, R)`` unsigned, ``(-R, R)`` signed, with
    ``R = max(|min_value|, |max_value|)`` (at least :data:`MIN_RANGE`)."""
    r = max(abs(float(min_value)), abs(float(max_value)), MIN_RANGE)
    r = float(np.float32(r))
    return (-r, r) if signed else (0.0, r)


def needs_signed(min_value: float) -> bool:
    """Whether a tensor with this calibrated minimum must be quantized as qint8."""
    return float(min_value) < 0.0


def activation_scale(range_max: float, signed: bool) -> np.float32:
    """Float value of one step: ``R/255`` (quint8) or ``R/127`` (qint8), in float32."""
    return np.float32(range_max) / np.float32(levels(signed))


def quantize_activation(x, range_max: float, signed: bool) -> np.ndarray:
    """What ``QuantizeV2`` (attributes from :func:`quantize_v2_attrs`) returns.

    float32 arithmetic ``rint(x * (L/R))``, clipped to 0..255 or -127..127.
    """
    x = np.asarray(x, np.float32)
    factor = np.float32(levels(signed)) / np.float32(range_max)
    q = np.rint(x * factor)
    if signed:
        return np.clip(q, -QINT8_LEVELS, QINT8_LEVELS).astype(np.int8)
    return np.clip(q, 0, QUINT8_LEVELS).astype(np.uint8)


def dequantize_activation(q, range_max: float, signed: bool) -> np.ndarray:
    """What ``Dequantize`` (SCALED; narrow_range for qint8) returns: ``q * R/L``."""
    return np.asarray(q, np.float32) * activation_scale(range_max, signed)


def quantize_v2_attrs(signed: bool) -> dict:
    """Attributes that make ``QuantizeV2`` follow this module's convention in
    both TensorFlow code paths (reference and oneDNN)."""
    return dict(mode="SCALED", round_mode="HALF_TO_EVEN", narrow_range=bool(signed),
                ensure_minimum_range=0.0, axis=-1)


def dequantize_attrs(signed: bool) -> dict:
    """Attributes for the matching ``Dequantize``."""
    return dict(mode="SCALED", narrow_range=bool(signed), axis=-1)


def relu6_output_range(calibrated_max: float) -> float:
    """Output range R_out for a Relu6 realised by quint8 saturation: never above 6."""
    return float(min(max(float(calibrated_max), MIN_RANGE), RELU6_CAP))


# --------------------------------------------------------------------------- weights
@dataclass
class QuantizedWeights:
    """Symmetric int8 weights and the range to declare to the kernel.

    ``values`` has the float tensor's shape (dtype int8); ``step`` is the float
    value of one integer step per channel (shape [channels], or [] per-tensor);
    ``min_range``/``max_range`` are what goes into min_filter/max_filter
    (``-+step*127``); ``max_level`` is L.
    """

    values: np.ndarray
    step: np.ndarray
    min_range: np.ndarray
    max_range: np.ndarray
    max_level: int
    multiple: int = 1

    @property
    def per_channel(self) -> bool:
        return self.step.ndim == 1

    def dequantize(self) -> np.ndarray:
        """The float weights the kernel effectively uses (for error estimates)."""
        return self.values.astype(np.float32) * self.step


def weight_channel_view(w: np.ndarray, kind: str, transpose_b: bool = False) -> np.ndarray:
    """``w`` reshaped to [..., channels] with the output channel last.

    ``kind``: ``conv`` ([h, w, in, out]), ``depthwise`` ([h, w, in, mult]; the
    channel of (i, m) is ``i*mult + m``), ``matmul`` ([in, out], or [out, in]
    with ``transpose_b``).
    """
    w = np.asarray(w)
    if kind == "conv":
        return w
    if kind == "depthwise":
        h, kw, cin, mult = w.shape
        return w.reshape(h, kw, cin * mult)
    if kind == "matmul":
        return w.T if transpose_b else w
    raise ValueError(f"unknown weight kind {kind!r} (conv, depthwise or matmul)")


def quantize_weights(w, kind: str = "conv", per_channel: bool = True,
                     max_level: int = WEIGHT_LEVEL_VNNI, transpose_b: bool = False,
                     multiple: int = 1) -> QuantizedWeights:
    """Symmetric int8 quantization of a float weight tensor (see module docstring).

    ``max_level`` L and ``multiple`` M come from
    :func:`graphquant.target.weight_format`; the declared range is
    ``step*127`` so the float range is the same for every L.
    """
    if not 1 <= int(max_level) <= 127:
        raise ValueError(f"max_level must be in 1..127, got {max_level}")
    if multiple < 1 or max_level % multiple:
        raise ValueError(f"max_level {max_level} must be a multiple of {multiple}")
    w = np.asarray(w, np.float32)
    view = weight_channel_view(w, kind, transpose_b)
    if per_channel:
        absmax = np.abs(view).reshape(-1, view.shape[-1]).max(axis=0)
    else:
        absmax = np.array(np.abs(w).max() if w.size else 0.0)
    absmax = np.maximum(absmax.astype(np.float64), MIN_RANGE)
    step = absmax / float(max_level)
    q_view = multiple * np.rint(view.astype(np.float64) / (step * multiple))
    q_view = np.clip(q_view, -max_level, max_level)
    q = q_view.astype(np.int8)
    if kind == "depthwise":
        q = q.reshape(w.shape)
    elif kind == "matmul" and transpose_b:
        q = q.T
    declared = (step * KERNEL_WEIGHT_DIVISOR).astype(np.float32)
    return QuantizedWeights(values=np.ascontiguousarray(q), step=step.astype(np.float32),
                            min_range=-declared, max_range=declared, max_level=int(max_level),
                            multiple=int(multiple))


def kernel_weight_step(min_filter, max_filter) -> np.ndarray:
    """The weight step the kernels derive from declared ranges: max(|min|,|max|)/127."""
    return (np.maximum(np.abs(np.asarray(min_filter, np.float32)),
                       np.abs(np.asarray(max_filter, np.float32)))
            / np.float32(KERNEL_WEIGHT_DIVISOR)).astype(np.float32)


# --------------------------------------------------------------------------- bias / output
def bias_scale(input_range: float, signed_input: bool, min_filter, max_filter) -> np.ndarray:
    """Per-channel factor the kernels use to turn a qint32 bias back into float
    (they compute ``bias_float = bias_int32 / factor``):
    ``L_in * 127 / (R_in * max(|min_filter|, |max_filter|))`` in float32."""
    filt = np.maximum(np.abs(np.asarray(min_filter, np.float32)),
                      np.abs(np.asarray(max_filter, np.float32)))
    num = np.float32(levels(signed_input) * KERNEL_WEIGHT_DIVISOR)
    return (num / (np.float32(input_range) * filt)).astype(np.float32)


def quantize_bias(bias, input_range: float, signed_input: bool, min_filter, max_filter
                  ) -> np.ndarray:
    """int32 bias for ``Tbias=qint32``: ``round(bias / (s_in * s_w[c]))``, saturated.

    Only valid while the input range is the one given (a frozen, calibrated
    range); ``Tbias=float`` needs no quantization at all.
    """
    scale = bias_scale(input_range, signed_input, min_filter, max_filter).astype(np.float64)
    q = np.rint(np.asarray(bias, np.float64) * scale)
    return np.clip(q, INT32_MIN, INT32_MAX).astype(np.int32)


def dequantize_bias(bias_int32, input_range: float, signed_input: bool, min_filter, max_filter
                    ) -> np.ndarray:
    """The float bias the kernel adds for a qint32 bias (float32, as it computes it)."""
    return (np.asarray(bias_int32).astype(np.float32)
            / bias_scale(input_range, signed_input, min_filter, max_filter)).astype(np.float32)


def output_scale(range_max: float, out_signed: bool) -> np.float32:
    """Step of a requantized output: R_out/255 (quint8) or R_out/127 (qint8)."""
    return activation_scale(range_max, out_signed)


def int32_output_scale(input_range: float, signed_input: bool, min_filter, max_filter
                       ) -> np.float32:
    """Float value of one unit of a fused conv's qint32 output (no Requantize).

    The kernel uses a single scale ``s_in * max_c(s_w[c])`` for all channels
    (with per-tensor weights this is ``s_in * s_w``).
    """
    s_w = kernel_weight_step(min_filter, max_filter)
    return np.float32(activation_scale(input_range, signed_input) * np.float32(np.max(s_w)))


def int32_reported_range(input_range: float, signed_input: bool, min_filter, max_filter
                         ) -> Tuple[np.ndarray, np.ndarray]:
    """The (min, max) outputs a fused conv reports for qint32 output:
    ``-+ s_in*s_w[c] * 2**31`` (vectors for per-channel filters) -- note this is
    per channel while the data uses :func:`int32_output_scale`."""
    step = activation_scale(input_range, signed_input) * kernel_weight_step(min_filter,
                                                                             max_filter)
    return (step * np.float32(INT32_MIN)).astype(np.float32), \
        (step * np.float32(2 ** 31 - 1)).astype(np.float32)


def requantize_reference(acc, input_range: float, signed_input: bool, min_filter, max_filter,
                         bias=None, relu: bool = False, output_range: Optional[float] = None,
                         out_signed: bool = False, summand=None, summand_range: float = 0.0,
                         summand_signed: bool = False) -> np.ndarray:
    """Exact-arithmetic model of the fused kernels' epilogue (module docstring).

    ``acc`` is the int32 accumulator [..., channels].  Returns the float value
    ``y`` when ``output_range`` is None, else the requantized integers.
    Computed in float64: the kernel's float32 rounding can differ by one step
    at exact ties, which tests allow for.
    """
    s_in = float(activation_scale(input_range, signed_input))
    s_w = kernel_weight_step(min_filter, max_filter).astype(np.float64)
    y = np.asarray(acc, np.float64) * s_in * s_w
    if bias is not None:
        y = y + np.asarray(bias, np.float64)
    if summand is not None:
        y = y + np.asarray(summand, np.float64) * float(activation_scale(summand_range,
                                                                         summand_signed))
    if relu:
        y = np.maximum(y, 0.0)
    if output_range is None:
        return y
    q = np.rint(y / float(output_scale(output_range, out_signed)))
    if out_signed:
        return np.clip(q, -128, 127).astype(np.int8)
    return np.clip(q, 0, 255).astype(np.uint8)


def merge_ranges(ranges: Sequence[Tuple[float, float]]) -> Tuple[float, float]:
    """One (min, max) covering several tensors (ConcatV2 inputs re-ranged to one)."""
    mins, maxs = zip(*ranges)
    return float(min(mins)), float(max(maxs))
