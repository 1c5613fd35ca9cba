"""quantize_concat: ConcatV2 of int8 tensors -> ConcatV2 on the integers, one shared range.

Before::

    a ─┐
    b ─┼─► ConcatV2(axis) ─► y          (a, b... produced by int8 ops)
    c ─┘

After::

    a ─► QuantizeV2 ─┐
    b ─► QuantizeV2 ─┼─► ConcatV2(axis) on quint8/qint8 ─► Dequantize (named y)
    c ─► QuantizeV2 ─┘

The planned ranges give every input and the output one range (the union,
:mod:`graphquant.ranges`; a concat whose inputs' ranges differ too much gets
none and stays fp32), so each producer requantizes straight into it, the
QuantizeV2s disappear in ``remove_dequantize_quantize_pairs`` and the concat
copies integers.  A plain ConcatV2 does that for quantized types with default
TensorFlow settings; QuantizedConcatV2 would need oneDNN switched on.
Rewritten only when at least half of the inputs come from int8 ops (each fp32
input costs a QuantizeV2); the axis must be a Const.
"""

from __future__ import annotations

from graphquant import quant_math
from graphquant.graph import const_value, data_inputs
from graphquant.int8_ops import concat_same_range
from graphquant.int8_rewrite import Island, excluded, planned_range
from graphquant.pattern import OpTypePattern, Replacement, rewrite
from graphquant.pipeline import register_pass

PASS = "quantize_concat"

# ConcatV2(values..., axis) with float values (arity varies: inputs checked in the callback)
CONCAT = OpTypePattern("ConcatV2", name="concat", where=lambda n: n.attr["T"].type == 1)


def _quantize(match, rctx, ctx):
    concat = match["concat"]
    index = rctx.index
    *values, axis = data_inputs(concat)
    axis_node = index.node(axis)
    why = excluded(ctx, match)
    if why:
        ctx.note(PASS, concat.name, why, kind="fp32", op="ConcatV2")
        return None
    if axis_node.op != "Const":
        return None
    rngs = [planned_range(ctx, v) for v in values]
    out_rng = planned_range(ctx, concat.name)
    if out_rng is None or any(r is None for r in rngs):
        return None
    if any(r != out_rng for r in rngs):
        ctx.note(PASS, concat.name, "its inputs' ranges differ too much to share one int8 range",
                 kind="fp32", op="ConcatV2")
        return None
    from_int8 = sum(index.node(v).op == "Dequantize" for v in values)
    if 2 * from_int8 < len(values):
        return None
    signed = quant_math.needs_signed(out_rng[0])
    isl = Island(rctx, concat.name)
    # every input is quantized with the output's (shared) range and signedness
    qs = [isl.quantize(f"input_{i}", v, out_rng) for i, v in enumerate(values)]
    axis_const = isl.const("axis", int(const_value(axis_node)), dtype="int32")
    op = concat_same_range(isl.name("int8"), [q.data for q in qs], axis_const,
                           t="qint8" if signed else "quint8")
    isl.nodes.append(op)
    lo, hi = quant_math.activation_range(out_rng[0], out_rng[1], signed)
    min_out, max_out = isl.const("min_output", lo), isl.const("max_output", hi)
    isl.dequantize(op.name, min_out, max_out, signed)
    ctx.note(PASS, concat.name, "quantized", kind="int8", op="ConcatV2", int8_op=op.op,
             output_range=[lo, hi], nodes=[concat.name])
    return Replacement(nodes=isl.nodes)


@register_pass(PASS)
def quantize_concat(graph_def, ctx):
    graph_def, _ = rewrite(graph_def, CONCAT, lambda m, r: _quantize(m, r, ctx),
                           protected=ctx.protected)
    return graph_def
