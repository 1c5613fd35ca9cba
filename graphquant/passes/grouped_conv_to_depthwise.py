"""grouped_conv_to_depthwise: a Conv2D with one input channel per group is a depthwise conv.

Before::                                         After::

    x[N,H,W,C] ─► Conv2D(w[kh,kw,1,C*m]) ─► y        x ─► DepthwiseConv2dNative(w'[kh,kw,C,m]) ─► y

Converters from ONNX (onnx2tf) write depthwise convolutions as grouped Conv2D:
TensorFlow runs them, but the int8 conv kernels have no groups.  Output
channel ``o`` of the grouped conv belongs to group ``o // m``, which is the
depthwise layout ``c*m + j``, so ``w' = reshape(w, [kh, kw, C, m])`` -- an
exact rewrite.  Needs the input's static channel count; NHWC only.  EXPLICIT
padding is turned into SAME/VALID when equivalent, else the conv stays (oneDNN
crashes on an EXPLICIT-padded depthwise conv followed by BiasAdd).
"""

from __future__ import annotations

import numpy as np

from graphquant.execute import tensor_shapes
from graphquant.graph import const_value, make_const, make_node, node_name
from graphquant.pattern import Any, Const, OpTypePattern, Replacement, rewrite
from graphquant.pipeline import register_pass

PASS = "grouped_conv_to_depthwise"

# Conv2D(x, w:Const[kh, kw, 1, out]), NHWC, float
GROUPED = OpTypePattern("Conv2D", name="conv", inputs=[Any("x"), Const(
    "weights", where=lambda n: len(n.attr["value"].tensor.tensor_shape.dim) == 4
    and n.attr["value"].tensor.tensor_shape.dim[2].size == 1)],
    where=lambda n: n.attr["data_format"].s in (b"", b"NHWC"))


def _padding(conv, in_hw, k_hw):
    """SAME/VALID equal to the conv's padding, or None."""
    padding = conv.attr["padding"].s.decode()
    if padding != "EXPLICIT":
        return padding
    pads = list(conv.attr["explicit_paddings"].list.i)
    if not any(pads):
        return "VALID"
    strides = list(conv.attr["strides"].list.i)[1:3]
    dilations = (list(conv.attr["dilations"].list.i) or [1, 1, 1, 1])[1:3]
    for axis in range(2):
        size, k, s, d = in_hw[axis], k_hw[axis], strides[axis], dilations[axis]
        if size is None:
            return None
        out = -(-size // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        if pads[2 + 2 * axis: 4 + 2 * axis] != [total // 2, total - total // 2]:
            return None
    return "SAME"


def _rewrite(match, rctx, ctx, shapes):
    conv = match["conv"]
    x_shape = shapes.get(node_name(match.tensor("x")))
    w = const_value(match["weights"])
    if not x_shape or len(x_shape) != 4 or not x_shape[3] or x_shape[3] == 1:
        return None  # unknown channels, or an ordinary conv of a 1-channel input
    channels, out = x_shape[3], w.shape[3]
    if out % channels:
        return None
    padding = _padding(conv, x_shape[1:3], w.shape[:2])
    if padding is None:
        ctx.note(PASS, conv.name, "grouped conv left as is: its EXPLICIT padding is not SAME or "
                 "VALID, and an EXPLICIT-padded depthwise conv crashes oneDNN", kind="note")
        return None
    weights = make_const(rctx.fresh_name(f"{conv.name}/depthwise_weights"),
                         np.ascontiguousarray(w.reshape(w.shape[0], w.shape[1], channels,
                                                        out // channels)))
    dw = make_node("DepthwiseConv2dNative", conv.name, [match.tensor("x"), weights.name],
                   T=conv.attr["T"], strides=conv.attr["strides"], padding=padding,
                   dilations=conv.attr["dilations"], data_format="NHWC")
    return Replacement(nodes=[weights, dw])


@register_pass(PASS)
def grouped_conv_to_depthwise(graph_def, ctx):
    if not any(n.op == "Conv2D" for n in graph_def.node):
        return graph_def
    shapes = tensor_shapes(graph_def)
    graph_def, _ = rewrite(graph_def, GROUPED, lambda m, r: _rewrite(m, r, ctx, shapes),
                           protected=ctx.protected)
    return graph_def
