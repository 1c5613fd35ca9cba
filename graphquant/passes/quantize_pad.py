"""quantize_pad: a zero Pad between int8 neighbours pads the integers.

Before::

    … ─► Dequantize ─► Pad(paddings) ─► y            (an int8 op feeds the Pad)

After::

    … ─► Dequantize ─► QuantizeV2 ─► ConcatV2(0s, ·, 0s) per padded axis ─► Dequantize (named y)
                                         on quint8/qint8, zero blocks as Consts

``remove_dequantize_quantize_pairs`` then removes the round trips on both
sides (the Pad passes its input's range through: :mod:`graphquant.ranges`).
In SCALED mode the integer 0 is 0.0, so padding the integers with zeros is
the fp32 zero Pad exactly.  The zeros are concatenated (TensorFlow's Pad on
quantized types is 15x slower than in fp32: see :func:`int8_ops.pad_integers`),
so the input needs a static shape.  Keras ResNet's ``pool1_pad`` (conv1 ─► Pad ─►
MaxPool) stayed fp32: conv1 had to leave int8 (an int32 output, Cast, Mul),
the Pad copied 4-byte floats and a QuantizeV2 followed.  As for the pools,
a Pad is rewritten only when an int8 op feeds it or every reader of it is
an int8 island's QuantizeV2; ``Pad`` only (``PadV2`` may pad another value,
``MirrorPad`` copies values), any layout (it pads the integers as they are).
"""

from __future__ import annotations

from graphquant import quant_math
from graphquant.graph import const_value, node_name
from graphquant.int8_ops import pad_integers
from graphquant.int8_rewrite import Island, excluded, planned_range
from graphquant.pattern import Any, Const, OpTypePattern, Replacement, rewrite
from graphquant.pipeline import register_pass

PASS = "quantize_pad"

# Pad(x, paddings:Const), float
PAD = OpTypePattern("Pad", name="pad", inputs=[Any("x"), Const("paddings")],
                    where=lambda n: n.attr["T"].type == 1)


def _int8_neighbours(match, rctx) -> bool:
    if match["x"].op == "Dequantize":
        return True
    readers = rctx.index.consumer_nodes(match["pad"].name)
    return bool(readers) and all(r.op == "QuantizeV2" for r in readers)


def _static_shape(ctx, tensor):
    shape = (ctx.options.get("shapes") or {}).get(node_name(tensor))
    return shape if shape and all(d is not None for d in shape) else None


def _quantize(match, rctx, ctx):
    pad = match["pad"]
    why = excluded(ctx, match)
    rng = planned_range(ctx, match.tensor("x"))
    if why or rng is None or not _int8_neighbours(match, rctx):
        if why:
            ctx.note(PASS, pad.name, why, kind="fp32", op=pad.op)
        return None
    shape = _static_shape(ctx, match.tensor("x"))
    paddings = const_value(match["paddings"])
    if shape is None or paddings.shape != (len(shape), 2) or (paddings < 0).any():
        ctx.note(PASS, pad.name, "input shape unknown (or negative paddings): the integer "
                 "pad needs static zero blocks", kind="fp32", op=pad.op)
        return None
    isl = Island(rctx, pad.name)
    qx = isl.quantize("input", match.tensor("x"), rng)
    padded = pad_integers(isl.name("int8"), qx.data, paddings.tolist(), shape, t=qx.type_name)
    isl.nodes += padded
    isl.dequantize(padded[-1].name, qx.min, qx.max, qx.signed)
    lo, hi = quant_math.activation_range(rng[0], rng[1], qx.signed)
    ctx.note(PASS, pad.name, "quantized", kind="int8", op=pad.op, int8_op="ConcatV2",
             input_range=list(rng), output_range=[lo, hi], nodes=[pad.name])
    return Replacement(nodes=isl.nodes)


@register_pass(PASS)
def quantize_pad(graph_def, ctx):
    graph_def, _ = rewrite(graph_def, PAD, lambda m, r: _quantize(m, r, ctx),
                           protected=ctx.protected)
    return graph_def
