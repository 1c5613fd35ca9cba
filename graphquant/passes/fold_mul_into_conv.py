"""fold_mul_into_conv: fold a constant per-channel multiply or add after a conv into it.

Before::                                   After::

    Conv2D | Depthwise... | MatMul(x, w)       Conv2D | ... (x, w * s)   named like the Mul
    Mul(s)

    Conv2D | ... (x, w)                        Conv2D | ... (x, w * s)   same name
    BiasAdd | Add | AddV2 (b)                  BiasAdd(b * s)           named like the Mul
    Mul(s)

    Conv2D | ... (x, w)                        Conv2D | ... (x, w)
    Add | AddV2 (b)                            BiasAdd(b)               named like the Add

    Conv2D | ... (x, w)                        Conv2D | ... (x, w)
    BiasAdd | Add | AddV2 (b)                  BiasAdd(b + c)           named like the outer Add
    Add | AddV2 (c)

``s``, ``b`` and ``c`` are scalars or one value per output channel (``[C]``,
``[1, 1, 1, C]``, ``[1, C, 1, 1]`` for NCHW...), Consts or small constant
subgraphs.  Graphs converted from ONNX (onnx2tf) carry batch norm this way, as
Conv2D -> Mul -> AddV2.  The rewrites repeat until none applies, so a chain
``conv -> Mul -> Add -> Mul`` ends as one conv and one BiasAdd.  A constant of
another shape (varying over height or width) is left, with a note.
"""

from __future__ import annotations

from functools import partial

from graphquant.folding import (
    CONV_OPS, ConstExpr, channel_layout, channel_vector, conv_bias, folded_conv_nodes,
    float_weights, note_once, output_channels, prune_dead_constants)
from graphquant.graph import const_value
from graphquant.pattern import Any, Const, OpTypePattern, Replacement, rewrite
from graphquant.pipeline import register_pass

PASS = "fold_mul_into_conv"
MAX_ROUNDS = 20

# Conv2D | DepthwiseConv2dNative | MatMul (x, weights:Const)
CONV = OpTypePattern(CONV_OPS, name="conv", inputs=[Any("x"), Const("weights")])
# Add|AddV2(conv, bias) in either order: also a pattern of its own (-> BiasAdd)
ADD_BIAS = OpTypePattern("Add|AddV2", name="bias_add", commutative=True,
                         inputs=[CONV, ConstExpr("bias")])
BIASED_CONV = [OpTypePattern("BiasAdd", name="bias_add", inputs=[CONV, ConstExpr("bias")]),
               ADD_BIAS]
PATTERNS = [
    # Mul(BiasAdd|Add(conv, bias), scale)
    *(OpTypePattern("Mul", name="mul", commutative=True, inputs=[biased, ConstExpr("scale")])
      for biased in BIASED_CONV),
    # Mul(conv, scale)
    OpTypePattern("Mul", name="mul", commutative=True, inputs=[CONV, ConstExpr("scale")]),
    # Add|AddV2(BiasAdd|Add(conv, bias), extra)
    *(OpTypePattern("Add|AddV2", name="add", commutative=True,
                    inputs=[biased, ConstExpr("extra")]) for biased in BIASED_CONV),
    # Add|AddV2(conv, bias)
    ADD_BIAS,
]


def fold(ctx, seeds, match, rctx):
    root, conv, weights = match.root, match["conv"], match["weights"]
    if not float_weights(weights):
        return None
    rank, axis = channel_layout(conv)
    channels = output_channels(conv, const_value(weights))

    def vector(key, absent):
        if key not in match:
            return absent, ""
        return channel_vector(rctx.index, match.tensor(key), rank, axis, channels)

    bias, why_b = conv_bias(rctx.index, match, channels)   # zeros without a bias
    scale, why_s = vector("scale", None)                  # None: weights unchanged
    extra, why_e = vector("extra", 0.0)
    for why in (why_s, why_e, why_b):
        if why:
            note_once(ctx, PASS, root.name, f"not folded into '{conv.name}': {why}")
    if bias is None or extra is None or ("scale" in match and scale is None):
        return None
    new_bias = None
    if "bias_add" in match or "extra" in match:
        new_bias = bias * (1.0 if scale is None else scale) + extra
    seeds.update(match[k].name for k in ("scale", "bias", "extra") if k in match)
    return Replacement(folded_conv_nodes(rctx, conv, weights, scale, new_bias, root.name))


@register_pass(PASS)
def fold_mul_into_conv(graph_def, ctx):
    seeds = set()
    for _ in range(MAX_ROUNDS):
        total = 0
        for pattern in PATTERNS:
            graph_def, count = rewrite(graph_def, pattern, partial(fold, ctx, seeds),
                                       ctx.protected)
            total += count
        if not total:
            break
    return prune_dead_constants(graph_def, seeds, ctx.protected)
