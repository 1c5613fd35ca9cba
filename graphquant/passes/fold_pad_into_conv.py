"""fold_pad_into_conv: a constant zero Pad in front of a conv becomes the conv's own padding.

Before::                                        After::

    x -> Pad(paddings:Const) -> Conv2D(VALID)        x -> Conv2D(SAME)
                                                     (when the Pad adds exactly what SAME adds)
    x -> Pad(paddings:Const) -> Conv2D(VALID)        x -> Conv2D(EXPLICIT, explicit_paddings)
                                                     (any other amounts)

For Conv2D and DepthwiseConv2dNative, NHWC and NCHW, with the conv's own
padding (VALID, SAME or EXPLICIT) added to the Pad's.  A Pad read by several
convs folds into each of them; the Pad and its constants then go.  SAME is
chosen when it gives exactly the same amounts for the input's static shape,
stride and dilation, EXPLICIT otherwise -- for Conv2D only: TensorFlow 2.21's
CPU kernels run EXPLICIT for both ops, but with oneDNN on, grappler's fusion of
a DepthwiseConv2dNative(EXPLICIT) with its BiasAdd aborts the process (a
CHECK failure in tensor_format.h), so a depthwise conv only takes SAME pads.

Left alone, with the reason in ``ctx.notes``: MirrorPad, PadV2 with a non-zero
or non-constant value, paddings that are not a Const, padding on the batch or
channel dimension, a Pad read by anything that cannot absorb it (another op,
a conv's filter, a graph output), a SAME conv whose input shape is unknown, and
a depthwise conv that would need EXPLICIT padding.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Set, Tuple, Union

import numpy as np

from graphquant.graph import GraphIndex, const_value, data_inputs, node_name, parse_tensor_name
from graphquant.pattern import Any, OpTypePattern, Replacement, rewrite
from graphquant.pipeline import register_pass

PASS = "fold_pad_into_conv"
PAD_OPS = ("Pad", "PadV2", "MirrorPad")
CONV_OPS = ("Conv2D", "DepthwiseConv2dNative")

# Conv2D|DepthwiseConv2dNative(pad: Pad|PadV2|MirrorPad(x, paddings[, value]), filter)
# The Pad is kept by the driver: it may feed other convs too, and goes once none reads it.
CONV_AFTER_PAD = OpTypePattern("|".join(CONV_OPS), name="conv", inputs=[
    OpTypePattern("|".join(PAD_OPS), name="pad", keep=True),
    Any("filter")])

Pads = List[Tuple[int, int]]  # (before, after) for H and W


@register_pass(PASS)
def fold_pad_into_conv(graph_def, ctx):
    shapes = _LazyShapes(graph_def)
    noted: Set[Tuple[str, str]] = set()
    folded: Set[str] = set()

    def fold(match, rctx):
        pad, conv = match["pad"], match["conv"]
        plans = _plan_pad(rctx.index, pad, shapes, rctx.protected)
        if isinstance(plans, str):
            if (pad.name, plans) not in noted:
                noted.add((pad.name, plans))
                ctx.note(PASS, pad.name, f"{pad.op} not folded into the following conv: {plans}")
            return None
        new = type(conv)()
        new.CopyFrom(conv)
        new.input[0] = data_inputs(pad)[0]
        padding, explicit = plans[conv.name]
        new.attr["padding"].s = padding.encode()
        del new.attr["explicit_paddings"].list.i[:]
        new.attr["explicit_paddings"].list.i.extend(explicit)
        folded.add(pad.name)
        return Replacement(nodes=[new])

    out, count = rewrite(graph_def, CONV_AFTER_PAD, fold, protected=ctx.protected)
    return _drop_unread(out, folded, ctx.protected) if count else out


# ------------------------------------------------------------------ decision
def _plan_pad(index: GraphIndex, pad, shapes: "_LazyShapes", protected: Set[str]
              ) -> Union[str, Dict[str, Tuple[str, List[int]]]]:
    """conv name -> (padding, explicit_paddings) for every reader of ``pad``, or why not."""
    amounts = _pad_amounts(index, pad)
    if isinstance(amounts, str):
        return amounts
    if pad.name in protected:
        return "the Pad is a graph output"
    plans = {}
    for consumer, i in index.consumers(pad.name):
        if consumer.op not in CONV_OPS or i != 0:
            return f"it is also read by '{consumer.name}' ({consumer.op}), which cannot absorb it"
        plan = _plan_conv(index, consumer, pad, amounts, shapes)
        if isinstance(plan, str):
            return f"conv '{consumer.name}': {plan}"
        plans[consumer.name] = plan
    return plans


def _pad_amounts(index: GraphIndex, pad) -> Union[str, np.ndarray]:
    """The Pad's [4, 2] paddings when they are constant zero-padding, else why not."""
    if pad.op == "MirrorPad":
        return "MirrorPad reflects the border instead of padding with zeros"
    ins = data_inputs(pad)
    producers = [index.nodes.get(node_name(i)) for i in ins[1:]]
    if any(p is None or p.op != "Const" for p in producers):
        return "its paddings or pad value are not constant (run fold_constants first)"
    if pad.op == "PadV2" and np.any(const_value(producers[1]) != 0):
        return f"it pads with the value {const_value(producers[1]).tolist()}, not 0"
    amounts = const_value(producers[0])
    if amounts.shape != (4, 2):
        return f"paddings of shape {list(amounts.shape)}, not a 4-D input"
    return amounts.astype(np.int64)


def _plan_conv(index, conv, pad, amounts, shapes) -> Union[str, Tuple[str, List[int]]]:
    fmt = conv.attr["data_format"].s.decode() if "data_format" in conv.attr else "NHWC"
    if fmt not in ("NHWC", "NCHW"):
        return f"data format {fmt} is not NHWC or NCHW"
    h, w = (1, 2) if fmt == "NHWC" else (2, 3)
    batch_channel = [d for d in range(4) if d not in (h, w)]
    if np.any(amounts[batch_channel] != 0):
        return "the Pad pads the batch or channel dimension"
    strides = _spatial(conv, "strides", (h, w))
    dilations = _spatial(conv, "dilations", (h, w))
    kernel = shapes.of(data_inputs(conv)[1], index)
    x_shape = shapes.of(data_inputs(pad)[0], index)
    x_size = None if x_shape is None or len(x_shape) != 4 else [x_shape[h], x_shape[w]]
    kernel_size = None if kernel is None or len(kernel) != 4 else kernel[:2]
    known = x_size is not None and kernel_size is not None and None not in x_size + kernel_size
    padding = conv.attr["padding"].s.decode()
    if padding == "VALID":
        own = [(0, 0), (0, 0)]
    elif padding == "EXPLICIT":
        ex = list(conv.attr["explicit_paddings"].list.i)
        own = [(ex[2 * h], ex[2 * h + 1]), (ex[2 * w], ex[2 * w + 1])]
    elif padding == "SAME" and known:
        padded = [x_size[k] + int(amounts[d].sum()) for k, d in enumerate((h, w))]
        own = same_padding(padded, kernel_size, strides, dilations)
    elif padding == "SAME":
        return "the conv pads SAME and the static input or filter shape is unknown"
    else:
        return f"padding {padding} is not VALID, SAME or EXPLICIT"
    total = [(int(amounts[d][0]) + own[k][0], int(amounts[d][1]) + own[k][1])
             for k, d in enumerate((h, w))]
    if total == [(0, 0), (0, 0)]:
        return "VALID", []
    if known and total == same_padding(x_size, kernel_size, strides, dilations):
        return "SAME", []
    if conv.op == "DepthwiseConv2dNative" and padding != "EXPLICIT":
        why = "the pad is not what SAME adds" if known else "the static input shape is unknown"
        return (f"{why}, and a DepthwiseConv2dNative with EXPLICIT padding aborts "
                "TensorFlow 2.21 (oneDNN on) once it is fused with a BiasAdd")
    explicit = [0] * 8
    for k, d in enumerate((h, w)):
        explicit[2 * d], explicit[2 * d + 1] = total[k]
    return "EXPLICIT", explicit


def same_padding(size: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
                 dilations: Sequence[int]) -> Pads:
    """(before, after) that TensorFlow's SAME adds to each spatial dimension."""
    out = []
    for n, k, s, d in zip(size, kernel, strides, dilations):
        effective = (k - 1) * d + 1
        total = max((-(-n // s) - 1) * s + effective - n, 0)
        out.append((total // 2, total - total // 2))
    return out


def _spatial(conv, attr: str, dims: Tuple[int, int]) -> List[int]:
    values = list(conv.attr[attr].list.i) if attr in conv.attr else []
    return [values[d] for d in dims] if len(values) == 4 else [1, 1]


class _LazyShapes:
    """Static shapes, computed by TensorFlow the first time one is needed."""

    def __init__(self, graph_def):
        self._graph_def = graph_def
        self._shapes: Optional[dict] = None

    def of(self, tensor: str, index: GraphIndex) -> Optional[List[Optional[int]]]:
        ref = parse_tensor_name(tensor)
        node = index.nodes.get(ref.node)
        if node is not None and node.op == "Const":
            return [d.size for d in node.attr["value"].tensor.tensor_shape.dim]
        if ref.port != 0:
            return None
        if self._shapes is None:
            from graphquant.execute import tensor_shapes

            try:
                self._shapes = tensor_shapes(self._graph_def)
            except (ValueError, TypeError):
                self._shapes = {}  # TensorFlow cannot import the graph: no static shapes
        return self._shapes.get(ref.node)


# ------------------------------------------------------------------ clean-up
def _drop_unread(graph_def, pads: Set[str], protected: Set[str]):
    """The folded Pads (no reader is left for them) and the Consts only they read."""
    index = GraphIndex(graph_def)
    dead = {name for name in pads if not index.consumers(name) and name not in protected}
    for name in list(dead):
        for inp in index.nodes[name].input:
            src = index.nodes.get(node_name(inp))
            if (src is not None and src.op == "Const" and src.name not in protected
                    and all(c.name in dead for c in index.consumer_nodes(src.name))):
                dead.add(src.name)
    out = type(graph_def)()
    out.versions.CopyFrom(graph_def.versions)
    out.library.CopyFrom(graph_def.library)
    out.node.extend(n for n in graph_def.node if n.name not in dead)
    return out
