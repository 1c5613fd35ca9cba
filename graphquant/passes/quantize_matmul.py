"""quantize_matmul: MatMul (+BiasAdd | Add of a constant)(+Relu | Relu6) -> _QuantizedMatMul.

Before::

    x ─► MatMul(w) ─► [BiasAdd(b) | Add(b)] ─► [Relu | Relu6] ─► y

After::

    x ─► QuantizeV2 ─► _QuantizedMatMul ─► Dequantize (named y)
                         w: qint8 Const per output column (or per tensor)
                         b: float Const (see below)
                         fused_ops: [BiasAdd, (Relu | Relu6,) Requantize]

The bias stays float: with a qint32 bias made like the conv's, the outputs
of a 32x10 test matmul collapsed to 0 or the range maximum (measured on TF
2.21 while writing this pass), while a float bias is added exactly as given.
``transpose_a``
and non-constant weights stay fp32 with a line in the report.
"""

from __future__ import annotations

import numpy as np

from graphquant import quant_math
from graphquant.graph import const_value
from graphquant.int8_ops import quantized_matmul
from graphquant.int8_rewrite import (Island, corrected_bias, excluded, note_weighted_int8,
                                     planned_range, quantize_weights)
from graphquant.pattern import Any, Const, OpTypePattern, Replacement, rewrite
from graphquant.pipeline import register_pass

PASS = "quantize_matmul"


def _matmul():
    # MatMul(x, weights:Const), float, no transpose of x
    return OpTypePattern("MatMul", name="matmul", inputs=[Any("x"), Const("weights")],
                         where=lambda n: not n.attr["transpose_a"].b and n.attr["T"].type == 1)


def _with_bias(inner):
    # BiasAdd(inner, bias:Const) | Add(inner, bias:Const)
    return OpTypePattern("BiasAdd|Add|AddV2", name="bias_add", commutative=True,
                         inputs=[inner, Const("bias", where=lambda n: len(
                             n.attr["value"].tensor.tensor_shape.dim) <= 1)])


def _activated(inner):
    return OpTypePattern("Relu|Relu6", name="act", inputs=[inner])


PATTERNS = [_activated(_with_bias(_matmul())), _activated(_matmul()),
            _with_bias(_matmul()), _matmul()]


def _quantize(match, rctx, ctx):
    matmul, root = match["matmul"], match.root
    why = excluded(ctx, match)
    if why:
        ctx.note(PASS, matmul.name, why, kind="fp32", op="MatMul")
        return None
    x_range = planned_range(ctx, match.tensor("x"))
    y_range = planned_range(ctx, root.name)
    if x_range is None or y_range is None:
        ctx.note(PASS, matmul.name, "no calibrated range for its input or output", kind="fp32",
                 op="MatMul")
        return None
    transpose_b = matmul.attr["transpose_b"].b
    weights = const_value(match["weights"]).astype(np.float32)
    columns = weights.shape[0] if transpose_b else weights.shape[1]
    bias = np.zeros([columns], np.float32)
    if "bias" in match:
        bias = bias + const_value(match["bias"]).astype(np.float32).reshape(-1)
        if bias.shape != (columns,):
            return None
    bias = corrected_bias(ctx, matmul.name, bias)   # issue 6: graphquant/bias_correction.py
    qw = quantize_weights(ctx, weights, "matmul", quant_math.needs_signed(x_range[0]),
                          transpose_b=transpose_b)
    act = match["act"].op if "act" in match else None

    isl = Island(rctx, root.name)
    qx = isl.quantize("input", match.tensor("x"), x_range)
    w = isl.qconst("weights", qw.values, "qint8")
    min_w, max_w = isl.weight_range_consts("weights_bound", qw)
    b = isl.const("bias", bias)
    if act == "Relu6":
        out_signed, (lo, hi) = False, (0.0, quant_math.relu6_output_range(y_range[1]))
    else:
        out_signed = act is None and quant_math.needs_signed(y_range[0])
        lo, hi = quant_math.activation_range(y_range[0], y_range[1], out_signed)
    min_out, max_out = isl.const("min_output", lo), isl.const("max_output", hi)
    fused = ["BiasAdd"] + ([act] if act else []) + ["Requantize"]
    op = quantized_matmul(isl.name("int8"), qx.data, w, b, qx.min, qx.max, min_w, max_w,
                          t1=qx.type_name, tbias="float",
                          tout="qint8" if out_signed else "quint8", fused_ops=fused,
                          transpose_b=transpose_b, min_freezed_output=min_out,
                          max_freezed_output=max_out)
    isl.nodes.append(op)
    isl.dequantize(op.name, min_out, max_out, out_signed)
    note_weighted_int8(ctx, PASS, match, op, "MatMul", fused, x_range, [lo, hi], qw,
                       {"values": w, "min": min_w, "max": max_w})
    return Replacement(nodes=isl.nodes)


@register_pass(PASS)
def quantize_matmul(graph_def, ctx):
    for pattern in PATTERNS:
        graph_def, _ = rewrite(graph_def, pattern, lambda m, r: _quantize(m, r, ctx),
                               protected=ctx.protected)
    return graph_def
