"""fold_batch_norms: fold inference batch-norm ops into the conv before them.

Before::                                          After::

    x    w:Const                                      x    w*s:Const
     \\   /                                             \\   /
    Conv2D | DepthwiseConv2dNative                    Conv2D | ... (same op and name)
      |                                                 |
    [BiasAdd | Add | AddV2 (b)]     (optional)        BiasAdd ((b - mean) * s + beta)
      |                                                 named like the batch norm
    FusedBatchNorm[V2|V3](., gamma, beta, mean, var)
    BatchNormWithGlobalNormalization(., mean, var, beta, gamma)

with ``s = gamma / sqrt(var + epsilon)`` per output channel (no gamma in
BatchNormWithGlobalNormalization without ``scale_after_normalization``).
These ops take 4-D (or 5-D) inputs only, so a MatMul never feeds them
directly; Keras writes batch norm after Dense in the decomposed form
(``fold_decomposed_batch_norms``).

A batch norm after anything else (a Relu, an ExpandDims, a conv read
elsewhere) cannot go into weights; it becomes the same per-channel affine map
with constant operands, so no batch-norm op is left::

    x -> FusedBatchNorm (channels last)    x -> Mul(s:Const) -> BiasAdd(beta - mean*s)
    x -> FusedBatchNorm (NCHW)             x -> Mul(s[C,1,1]) -> AddV2(o[C,1,1])

Declined, with a note: training-mode batch norms, ones whose batch-statistics
outputs are read, parameters that are not per channel, data-format mismatches.
"""

from __future__ import annotations

from functools import partial

import numpy as np
from tensorflow.python.framework import dtypes

from graphquant.folding import (
    ConstExpr, channel_layout, const_expr_value, conv_bias, data_format,
    folded_conv_nodes, float_weights, get_attr, note_once, output_channels,
    prune_dead_constants)
from graphquant.graph import const_value, make_const, make_node, parse_tensor_name
from graphquant.pattern import Any, Const, OpTypePattern, Replacement, rewrite
from graphquant.pipeline import register_pass

PASS = "fold_batch_norms"
FUSED_BN = "FusedBatchNorm|FusedBatchNormV2|FusedBatchNormV3"
GLOBAL_BN = "BatchNormWithGlobalNormalization"
PARAMS = ("gamma", "beta", "mean", "variance")


def fused_bn(producer):
    # FusedBatchNorm*(producer, gamma, beta, mean, variance)
    return OpTypePattern(FUSED_BN, name="bn", inputs=[
        producer, ConstExpr("gamma"), ConstExpr("beta"), ConstExpr("mean"),
        ConstExpr("variance")])


def global_bn(producer):
    # BatchNormWithGlobalNormalization(producer, mean, variance, beta, gamma)
    return OpTypePattern(GLOBAL_BN, name="bn", inputs=[
        producer, ConstExpr("mean"), ConstExpr("variance"), ConstExpr("beta"),
        ConstExpr("gamma")])


# Conv2D | DepthwiseConv2dNative (x, weights:Const)
CONV = OpTypePattern("Conv2D|DepthwiseConv2dNative", name="conv",
                     inputs=[Any("x"), Const("weights")])
# BiasAdd(conv, bias) or Add|AddV2(conv, bias) in either order
BIASED_CONV = [
    OpTypePattern("BiasAdd", name="bias_add", inputs=[CONV, ConstExpr("bias")]),
    OpTypePattern("Add|AddV2", name="bias_add", commutative=True,
                  inputs=[CONV, ConstExpr("bias")]),
]
AFTER_CONV = [bn(producer) for bn in (fused_bn, global_bn) for producer in (*BIASED_CONV, CONV)]
STANDALONE = [fused_bn(Any("x")), global_bn(Any("x"))]


def bn_affine(ctx, match, rctx):
    """(scale, offset) vectors of the matched batch norm, or None (with a note
    when the user should know why)."""
    bn = match["bn"]
    if bn.op != GLOBAL_BN and get_attr(bn, "is_training").b:
        note_once(ctx, PASS, bn.name, "not folded: is_training=true (batch statistics); "
                  "freeze the model in inference mode")
        return None
    if any(parse_tensor_name(c.input[i]).port != 0 for c, i in rctx.index.consumers(bn.name)):
        note_once(ctx, PASS, bn.name, "not folded: its batch mean/variance outputs are read")
        return None
    values = {k: const_expr_value(rctx.index, match.tensor(k)) for k in PARAMS}
    if any(v is None for v in values.values()):
        note_once(ctx, PASS, bn.name, "not folded: its parameters are not constants")
        return None
    gamma, beta, mean, var = (values[k].astype(np.float64) for k in PARAMS)
    if len({v.shape for v in values.values()}) != 1 or gamma.ndim != 1:
        note_once(ctx, PASS, bn.name, "not folded: parameters are not vectors of one size: "
                  + str({k: v.shape for k, v in values.items()}))
        return None
    if bn.op == GLOBAL_BN:
        eps = get_attr(bn, "variance_epsilon").f
        if not get_attr(bn, "scale_after_normalization").b:
            gamma = np.ones_like(gamma)
    else:
        eps = get_attr(bn, "epsilon").f
    scale = gamma / np.sqrt(var + eps)
    return scale, beta - mean * scale


def bn_channel_axis(bn) -> int:
    """Channel axis of a 4-D batch norm input."""
    return 1 if bn.op != GLOBAL_BN and data_format(bn).startswith("NC") else 3


def fold_into_conv(ctx, seeds, match, rctx):
    bn, conv, weights = match["bn"], match["conv"], match["weights"]
    if not float_weights(weights):
        return None
    if bn_channel_axis(bn) != channel_layout(conv)[1]:
        note_once(ctx, PASS, bn.name, f"not folded into '{conv.name}': data formats differ "
                  f"({data_format(bn)} vs {data_format(conv)})")
        return None
    affine = bn_affine(ctx, match, rctx)
    if affine is None:
        return None
    scale, offset = affine
    channels = output_channels(conv, const_value(weights))
    bias, why = conv_bias(rctx.index, match, channels)
    if why:
        note_once(ctx, PASS, bn.name, f"not folded into '{conv.name}': bias {why}")
    if bias is None or scale.shape != (channels,):
        return None
    seeds.update(match[k].name for k in (*PARAMS, "bias") if k in match)
    return Replacement(folded_conv_nodes(rctx, conv, weights, scale, bias * scale + offset,
                                         bn.name))


def as_mul_add(ctx, seeds, match, rctx):
    bn = match["bn"]
    affine = bn_affine(ctx, match, rctx)
    if affine is None:
        return None
    scale, offset = affine
    t = bn.attr["T"]
    dtype = dtypes.as_dtype(t.type).as_numpy_dtype
    fmt = "NHWC" if bn.op == GLOBAL_BN else data_format(bn)
    first = fmt.startswith("NC")                     # channels first: broadcast as [C, 1, 1(, 1)]
    shape = (-1,) + (1,) * (len(fmt) - 2) if first else (-1,)
    s = make_const(rctx.fresh_name(f"{bn.name}/scale"), scale.astype(dtype).reshape(shape))
    o = make_const(rctx.fresh_name(f"{bn.name}/offset"), offset.astype(dtype).reshape(shape))
    mul = make_node("Mul", rctx.fresh_name(f"{bn.name}/mul"), [match.tensor("x"), s.name], T=t)
    if first:
        add = make_node("AddV2", bn.name, [mul.name, o.name], T=t)
    else:
        add = make_node("BiasAdd", bn.name, [mul.name, o.name], T=t, data_format="NHWC")
    note_once(ctx, PASS, bn.name, f"not after a conv it could fold into: rewritten as "
              f"Mul + {add.op}")
    seeds.update(match[k].name for k in PARAMS)
    return Replacement([s, o, mul, add])


@register_pass(PASS)
def fold_batch_norms(graph_def, ctx):
    seeds = set()
    for pattern in AFTER_CONV:
        graph_def, _ = rewrite(graph_def, pattern, partial(fold_into_conv, ctx, seeds),
                               ctx.protected)
    for pattern in STANDALONE:
        graph_def, _ = rewrite(graph_def, pattern, partial(as_mul_add, ctx, seeds),
                               ctx.protected)
    return prune_dead_constants(graph_def, seeds, ctx.protected)
