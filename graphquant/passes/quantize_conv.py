"""quantize_conv: Conv2D / DepthwiseConv2dNative (+BiasAdd)(+Relu|Relu6)(+residual Add) -> int8.

Before::

    x ─► Conv2D(w) ─► BiasAdd(b) ─► [Relu | Relu6] ─► y
    x ─► Conv2D(w) ─► BiasAdd(b) ─► Add(·, s) ─► Relu ─► y        (residual)

After (one island; ``remove_dequantize_quantize_pairs`` later joins islands)::

    x ─► QuantizeV2 ─► _FusedQuantizedConv2D ─► Dequantize (named y) ─► readers of y
                         w: qint8 Const, per output channel (or per tensor)
                         b: qint32 Const = round(b / (s_in * s_w[c]))
                         fused_ops: [BiasAdd, (Sum,) (Relu,) Requantize]
    s ─► QuantizeV2 ─► summand (residual form)

* Activations are quint8 when the planned range is non-negative, else qint8
  (the attribute-driven kernels take both).
* Weights use the target's format (``ctx.options['target']``): 7-bit on AVX2
  CPUs without VNNI, where larger products saturate, 8-bit with VNNI/AMX.
* Relu6 is Relu with a quint8 output whose range is capped at 6 (saturation).
* The residual form needs Relu (the kernel has no Sum without it) and a
  non-negative (quint8) summand (a qint8 one makes the kernel clip at 127),
  and writes its output into the summand's buffer, so every other reader of
  the summand must run before the conv (be one of its ancestors); otherwise
  the Add stays fp32 and the conv is quantized without it.
* ``ctx.options['fuse_residual'] = False`` leaves residual Adds to fp32
  (sensitivity measurements use it: see :mod:`graphquant.sensitivity`).
* NCHW convs, grouped convs, non-constant weights and tensors without a
  calibrated range stay fp32, each with a line in the report.
"""

from __future__ import annotations

import numpy as np

from graphquant import quant_math
from graphquant.graph import const_value, node_name
from graphquant.int8_ops import fused_quantized_conv
from graphquant.int8_rewrite import (Island, corrected_bias, excluded, note_weighted_int8,
                                     planned_range, quantize_weights)
from graphquant.pattern import Any, Const, OpTypePattern, Replacement, rewrite
from graphquant.pipeline import register_pass

PASS = "quantize_conv"


def _conv():
    # Conv2D|DepthwiseConv2dNative(x, weights:Const)
    return OpTypePattern("Conv2D|DepthwiseConv2dNative", name="conv",
                         inputs=[Any("x"), Const("weights")])


def _conv_maybe_bias(with_bias: bool):
    # BiasAdd(conv, bias:Const)  or just conv
    if not with_bias:
        return _conv()
    return OpTypePattern("BiasAdd", name="bias_add", inputs=[_conv(), Const("bias")])


def _residual(with_bias: bool):
    # Relu(Add|AddV2(conv [+bias], summand))
    return OpTypePattern("Relu", name="act", inputs=[
        OpTypePattern("Add|AddV2", name="add", commutative=True,
                      inputs=[_conv_maybe_bias(with_bias), Any("summand")])])


def _activated(with_bias: bool):
    # Relu|Relu6(conv [+bias])
    return OpTypePattern("Relu|Relu6", name="act", inputs=[_conv_maybe_bias(with_bias)])


# Most specific first: a residual block must not be split by a shorter match.
PATTERNS = [_residual(True), _residual(False), _activated(True), _activated(False),
            _conv_maybe_bias(True), _conv_maybe_bias(False)]


def _fp32(ctx, match, why):
    ctx.note(PASS, match["conv"].name, why, kind="fp32", op=match["conv"].op)
    return None


def _unsupported(conv, weights, ctx):
    if conv.attr["data_format"].s not in (b"", b"NHWC"):
        return "NCHW conv: the int8 conv kernels take NHWC only"
    if conv.attr["T"].type != 1:  # DT_FLOAT
        return "not a float32 conv"
    if conv.op == "Conv2D":
        shapes = ctx.options.get("shapes") or {}
        x_shape = shapes.get(node_name(conv.input[0]))
        if x_shape and x_shape[-1] and x_shape[-1] != weights.shape[2]:
            return (f"grouped conv ({x_shape[-1]} input channels, filter takes "
                    f"{weights.shape[2]}): the int8 conv kernels have no groups")
    return None


def _summand_safe(match, rctx):
    """Every other reader of the summand must finish before the conv overwrites it."""
    summand = match["summand"]
    if summand.op == "Const":
        return False
    before = rctx.ancestors(match["conv"].name)
    readers = {c.name for c in rctx.index.consumer_nodes(summand.name)} - {match["add"].name}
    return readers <= before


def _quantize(match, rctx, ctx):
    conv, root = match["conv"], match.root
    why = excluded(ctx, match)
    if why:
        return _fp32(ctx, match, why)
    weights = const_value(match["weights"]).astype(np.float32)
    why = _unsupported(conv, weights, ctx)
    if why:
        return _fp32(ctx, match, why)
    x_range = planned_range(ctx, match.tensor("x"))
    y_range = planned_range(ctx, root.name)
    if x_range is None or y_range is None:
        return _fp32(ctx, match, "no calibrated range for its input or output")
    act = match["act"].op if "act" in match else None
    residual = "add" in match
    if residual and not ctx.options.get("fuse_residual", True):
        return None
    if residual:
        s_range = planned_range(ctx, match.tensor("summand"))
        if s_range is None or quant_math.needs_signed(s_range[0]) or not _summand_safe(
                match, rctx):
            return None  # the shorter patterns quantize the conv; the Add stays fp32

    depthwise = conv.op == "DepthwiseConv2dNative"
    qw = quantize_weights(ctx, weights, "depthwise" if depthwise else "conv",
                          signed_input=quant_math.needs_signed(x_range[0]))
    channels = qw.max_range.shape[0] if qw.per_channel else (
        weights.shape[2] * weights.shape[3] if depthwise else weights.shape[3])
    bias = (const_value(match["bias"]).astype(np.float32) if "bias" in match
            else np.zeros([channels], np.float32))
    bias = corrected_bias(ctx, conv.name, bias)   # issue 6: graphquant/bias_correction.py

    isl = Island(rctx, root.name)
    qx = isl.quantize("input", match.tensor("x"), x_range)
    w = isl.qconst("weights", qw.values, "qint8")
    min_w, max_w = isl.weight_range_consts("filter_bound", qw)
    b = isl.qconst("bias", quant_math.quantize_bias(bias, qx.range_max, qx.signed,
                                                   qw.min_range, qw.max_range), "qint32")
    if act == "Relu6":
        out_signed, out_max = False, quant_math.relu6_output_range(y_range[1])
        out_lo, out_hi = quant_math.activation_range(0.0, out_max, False)
    else:
        out_signed = act is None and quant_math.needs_signed(y_range[0])
        out_lo, out_hi = quant_math.activation_range(y_range[0], y_range[1], out_signed)
    min_out, max_out = isl.const("min_output", out_lo), isl.const("max_output", out_hi)

    fused = ["BiasAdd"] + (["Sum"] if residual else []) + (["Relu"] if act else []) + ["Requantize"]
    summand = {}
    if residual:
        qs = isl.quantize("summand", match.tensor("summand"),
                          planned_range(ctx, match.tensor("summand")))
        summand = dict(summand=qs.data, tsummand=qs.type_name, min_summand=qs.min,
                       max_summand=qs.max)
    padding = conv.attr["padding"].s.decode()
    op = fused_quantized_conv(
        isl.name("int8"), qx.data, w, qx.min, qx.max, min_w, max_w, bias=b,
        tinput=qx.type_name, tbias="qint32", out_type="qint8" if out_signed else "quint8",
        fused_ops=fused, strides=list(conv.attr["strides"].list.i), padding=padding,
        explicit_paddings=list(conv.attr["explicit_paddings"].list.i),
        dilations=list(conv.attr["dilations"].list.i) or [1, 1, 1, 1],
        min_freezed_output=min_out, max_freezed_output=max_out, depthwise=depthwise, **summand)
    isl.nodes.append(op)
    isl.dequantize(op.name, min_out, max_out, out_signed)
    note_weighted_int8(ctx, PASS, match, op, conv.op, fused, x_range, [out_lo, out_hi], qw,
                       {"values": w, "min": min_w, "max": max_w})
    return Replacement(nodes=isl.nodes)


@register_pass(PASS)
def quantize_conv(graph_def, ctx):
    for pattern in PATTERNS:
        graph_def, _ = rewrite(graph_def, pattern, lambda m, r: _quantize(m, r, ctx),
                               protected=ctx.protected)
    return graph_def
