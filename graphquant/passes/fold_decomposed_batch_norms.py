"""fold_decomposed_batch_norms: fold batch norm written out as Mul/Add/Rsqrt/Sub.

Keras 3, tf.keras layers that do not use the fused kernel and TF-slim write an
inference batch norm the way ``tf.nn.batch_normalization`` computes it::

    s = Rsqrt(variance + epsilon) [* gamma]       (TF-slim default: no gamma)
    y = x * s + (beta - mean * s)                 (no beta: Neg(mean * s))

so the graph holds a per-channel affine map whose operands are constant
subgraphs (Consts once ``fold_constants`` ran)::

    x -----------------------------------> Mul ----> Add|AddV2 ---> y
    variance, eps -> AddV2 -> Rsqrt -> Mul(gamma) -'  (s)   ^
    beta, mean, s ----------> Mul -> Sub ------------------'   (o)

Before (after a conv or matmul)::       After::

    Conv2D | Depthwise... | MatMul(x, w)    Conv2D | ... (x, w * s)   same name
    [BiasAdd | Add | AddV2 (b)]             BiasAdd(b * s + o)        named like the Add
    Mul(s)
    Add | AddV2(o)

``s``, ``o`` and ``b`` may be Consts or constant subgraphs (Rsqrt, Mul, Sub,
Neg, Reshape, Squeeze... as Keras 3 routes a conv bias through
Reshape/Squeeze); they are evaluated here with numpy, so the pass works with or
without ``fold_constants`` before it.  After anything else (a Relu, a Reshape,
a conv read elsewhere) the constant subgraphs are replaced by their values, so
no Rsqrt is left::

    x -> Mul(s:Const) -> Add|AddV2(o:Const)
"""

from __future__ import annotations

from functools import partial

from graphquant.folding import (
    CONV_OPS, ConstExpr, channel_layout, channel_vector, const_expr_value, conv_bias,
    folded_conv_nodes, float_weights, note_once, output_channels, prune_dead_constants)
from graphquant.graph import const_value, data_inputs, make_const
from graphquant.pattern import Any, Const, OpTypePattern, Replacement, rewrite
from graphquant.pipeline import register_pass

PASS = "fold_decomposed_batch_norms"


def affine(producer):
    # Add|AddV2(Mul(producer, scale), offset), each in either order
    return OpTypePattern("Add|AddV2", name="add", commutative=True, inputs=[
        OpTypePattern("Mul", name="mul", commutative=True, inputs=[producer, ConstExpr("scale")]),
        ConstExpr("offset")])


# Conv2D | DepthwiseConv2dNative | MatMul (x, weights:Const)
CONV = OpTypePattern(CONV_OPS, name="conv", inputs=[Any("x"), Const("weights")])
# BiasAdd(conv, bias) or Add|AddV2(conv, bias) in either order
BIASED_CONV = [
    OpTypePattern("BiasAdd", name="bias_add", inputs=[CONV, ConstExpr("bias")]),
    OpTypePattern("Add|AddV2", name="bias_add", commutative=True,
                  inputs=[CONV, ConstExpr("bias")]),
]
AFTER_CONV = [affine(producer) for producer in (*BIASED_CONV, CONV)]
STANDALONE = affine(Any("x"))


def fold_into_conv(ctx, seeds, match, rctx):
    add, conv, weights = match["add"], match["conv"], match["weights"]
    if not float_weights(weights):
        return None
    rank, axis = channel_layout(conv)
    channels = output_channels(conv, const_value(weights))
    scale, why_s = channel_vector(rctx.index, match.tensor("scale"), rank, axis, channels)
    offset, why_o = channel_vector(rctx.index, match.tensor("offset"), rank, axis, channels)
    bias, why_b = conv_bias(rctx.index, match, channels)
    for why in (why_s, why_o, why_b):
        if why:
            note_once(ctx, PASS, add.name, f"not folded into '{conv.name}': {why}")
    if scale is None or offset is None or bias is None:
        return None
    seeds.update(match[k].name for k in ("scale", "offset", "bias") if k in match)
    return Replacement(folded_conv_nodes(rctx, conv, weights, scale, bias * scale + offset,
                                         add.name))


def with_constant_operands(seeds, match, rctx):
    """Mul(x, s) + o with s, o constant subgraphs -> Mul(x, s:Const) + o:Const."""
    mul, add = match["mul"], match["add"]
    ins = data_inputs(mul)
    values = [const_expr_value(rctx.index, i) for i in ins]
    if (values[1] is None) == (values[0] is None):
        return None  # no constant side, or all constant (fold_constants' job)
    k = 1 if values[1] is not None else 0
    offset = const_expr_value(rctx.index, match.tensor("offset"))
    s_node, o_node = rctx.index.node(ins[k]), match["offset"]
    if offset is None or (s_node.op == "Const" and o_node.op == "Const"):
        return None  # not constant, or already in the final form
    s = make_const(rctx.fresh_name(f"{mul.name}/value"), values[k])
    o = make_const(rctx.fresh_name(f"{add.name}/value"), offset)
    new_mul, new_add = type(mul)(), type(add)()
    new_mul.CopyFrom(mul)
    new_add.CopyFrom(add)
    new_mul.input[list(mul.input).index(ins[k])] = s.name
    new_add.input[list(add.input).index(match.tensor("offset"))] = o.name
    seeds.update((s_node.name, o_node.name))
    return Replacement([s, o, new_mul, new_add])


@register_pass(PASS)
def fold_decomposed_batch_norms(graph_def, ctx):
    seeds = set()
    for pattern in AFTER_CONV:
        graph_def, _ = rewrite(graph_def, pattern, partial(fold_into_conv, ctx, seeds),
                               ctx.protected)
    graph_def, _ = rewrite(graph_def, STANDALONE, partial(with_constant_operands, seeds),
                           ctx.protected)
    return prune_dead_constants(graph_def, seeds, ctx.protected)
