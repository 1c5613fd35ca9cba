"""shift_signed_activations: a signed tensor read by unpadded convs/matmuls is stored as y - lo.

TensorFlow's int8 activations have no zero point: a tensor in ``[lo, hi]``
with ``lo < 0`` is qint8 over ``[-R, R]`` (``R = max(-lo, hi)``, 127 steps a
side), and a conv reading qint8 gets 7-bit weights on AVX2 without VNNI
(oneDNN halves them).  When every window of the reading conv lies inside the
tensor (no zero padding: VALID or 1x1 convs, matmuls), the reader can take
``y - lo`` instead and put the difference in its bias, because
``W * (y - lo) + c + lo * sum(W) = W * y + c``::

    Before:  P ─► y ─► [MaxPool|AvgPool|Reshape|Transpose|…] ─► Conv2D|MatMul ─► BiasAdd(c)
                  └──► other readers

    After:   P ─► y ─► AddV2(-lo) "y/shifted" ─► [same] ─► Conv2D|MatMul ─► BiasAdd(c + lo·ΣW)
                  └──► other readers (unchanged)

    or, when P is a conv/matmul (+BiasAdd b) and y's other readers are fp32 ops:
             conv ─► BiasAdd(b - lo) "y" ─► [same] ─► Conv2D|MatMul ─► BiasAdd(c + lo·ΣW)
                                      └──► AddV2(+lo) "y/unshifted" ─► other readers

``ΣW`` sums each output channel's weights over its window (and input
channels); pools, reshapes and transposes commute with adding a constant.  The
result is an fp32 identity (tests/test_shift_signed_activations.py) and the
shifted tensor is quint8 over ``[0, hi - lo]``: 255 steps over the data's span
instead of 127 over half of ``[-R, R]``, and the reader's input is unsigned,
so it gets 8-bit weights where the target allows (:mod:`graphquant.pair_weights`).

A reader with zero padding (Conv2D, or DepthwiseConv2dNative: the inputs of
PP-OCR's depthwise convs are hard-swish outputs, ``lo`` ~ -0.4) gets it as an
explicit fp32 Pad before the shift and runs VALID; a depthwise reader only
where the unsigned step is at most :data:`DEPTHWISE_STEP_RATIO` of the signed
one (its weights are 8-bit either way, so the step is all it gains).

Where an AddV2 is inserted before a QuantizeV2,
:mod:`graphquant.passes.fold_shift_into_quantize` moves it into the QuantizeV2
(MIN_COMBINED mode) after quantization.

Runs after calibration on the clean fp32 graph with the calibrated (unplanned)
ranges in ``ctx.options['ranges']``; adds the ranges of the tensors it makes
and moves the ranges of the shifted ones.  Graph outputs are never shifted.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
from tensorflow.core.framework import graph_pb2, types_pb2

from graphquant.graph import (GraphIndex, canonical_tensor, const_value, make_const,
                              make_node, node_name, parse_tensor_name)
from graphquant.pipeline import register_pass

PASS = "shift_signed_activations"
CONV_LIKE = frozenset({"Conv2D", "DepthwiseConv2dNative", "MatMul"})
# convs whose zero padding can be made explicit before the shift (then VALID)
PADDED_READERS = frozenset({"Conv2D", "DepthwiseConv2dNative"})
# a padded depthwise reader is shifted only where the step drops at least this much:
# rapidocr_det's hardswish-like inputs (lo ~ -0.1..-1, hi 2.5..12.6) reach 0.51-0.70,
# relL2 0.131 -> 0.091; fer's residual sums (0.78-0.86) came out 0.046 -> 0.048
DEPTHWISE_STEP_RATIO = 0.75
# ops through which "+ constant" passes unchanged (input 0 only)
TRANSPARENT = frozenset({"MaxPool", "AvgPool", "Reshape", "Transpose", "Squeeze", "ExpandDims",
                         "Identity"})
# readers that would need the unshifted tensor in int8 (then y's producer keeps y)
# producers whose output may already be int8: a padded reader keeps reading it as it is
INT8_PRODUCERS = frozenset({"Conv2D", "DepthwiseConv2dNative", "MatMul", "BiasAdd", "Relu",
                            "Relu6", "MaxPool", "AvgPool", "ConcatV2"})
INT8_READERS = frozenset({"Conv2D", "DepthwiseConv2dNative", "MatMul", "ConcatV2", "MaxPool",
                          "AvgPool"})


# --------------------------------------------------------------------------- who absorbs
def _pads(size, k, stride, dilation) -> int:
    eff = (k - 1) * dilation + 1
    out = -(-size // stride)
    return max((out - 1) * stride + eff - size, 0)


def _no_zero_padding(node, weights, shapes) -> bool:
    padding = node.attr["padding"].s
    if padding == b"VALID":
        return True
    if padding == b"EXPLICIT":
        return not any(node.attr["explicit_paddings"].list.i)
    x_shape = shapes.get(node_name(node.input[0])) if shapes else None
    strides = list(node.attr["strides"].list.i) or [1, 1, 1, 1]
    dil = list(node.attr["dilations"].list.i) or [1, 1, 1, 1]
    for axis in (1, 2):
        k = weights.shape[axis - 1]
        if k == 1 and strides[axis] >= 1:
            continue           # 1x1: never padded
        if not x_shape or x_shape[axis] is None:
            return False
        if _pads(x_shape[axis], k, strides[axis], dil[axis]):
            return False
    return True


def weight_sums(node, weights: np.ndarray) -> np.ndarray:
    """Per output channel, the sum of the weights one output element reads."""
    w = weights.astype(np.float64)
    if node.op == "Conv2D":
        return w.sum(axis=(0, 1, 2))
    if node.op == "DepthwiseConv2dNative":
        return w.sum(axis=(0, 1)).reshape(-1)
    return w.sum(axis=1) if node.attr["transpose_b"].b else w.sum(axis=0)


def _absorbing_weights(index: GraphIndex, node, shapes) -> Optional[np.ndarray]:
    """The Const weights of a reader that can take a shifted input 0, else None."""
    if node.op not in CONV_LIKE or node.attr["T"].type != types_pb2.DT_FLOAT:
        return None
    producer = index.node(node.input[1])
    if producer.op != "Const":
        return None
    weights = const_value(producer)
    if node.op == "MatMul":
        return None if node.attr["transpose_a"].b else weights
    if node.attr["data_format"].s not in (b"", b"NHWC"):
        return None
    return weights if _no_zero_padding(node, weights, shapes) else None


class _Plan:
    """Readers of a tensor that take the shift (absorbing convs/matmuls, transparent ops
    whose own readers all take it) and the others."""

    def __init__(self):
        self.absorbing: List[Tuple[str, np.ndarray]] = []   # (node name, weights)
        self.transparent: List[str] = []                     # node names, in order
        self.direct: List[Tuple[str, int]] = []              # (reader, input index) to rewire
        self.others: List[str] = []                          # reader names
        self.padded: List[Tuple[str, np.ndarray, List[int]]] = []   # (conv, weights, pads)


def _step_ratio(lo: float, hi: float) -> float:
    """Step of quint8 over ``[0, hi - lo]`` over the step of qint8 over ``[-R, R]``."""
    r = max(-lo, hi)
    return ((hi - lo) / 255.0) / (r / 127.0) if r > 0 else 1.0


def _padded_conv(index: GraphIndex, node, shapes) -> Optional[List[int]]:
    """[top, bottom, left, right] zero padding of a Conv2D or depthwise conv with Const
    weights that pads."""
    if (node.op not in PADDED_READERS or node.attr["T"].type != types_pb2.DT_FLOAT
            or node.attr["data_format"].s not in (b"", b"NHWC")
            or index.node(node.input[1]).op != "Const"):
        return None
    if node.attr["padding"].s == b"EXPLICIT":
        p = list(node.attr["explicit_paddings"].list.i)
        return p[2:6] if any(p) and not any(p[:2] + p[6:]) else None
    if node.attr["padding"].s != b"SAME":
        return None
    x_shape = (shapes or {}).get(node_name(node.input[0]))
    w_shape = index.node(node.input[1]).attr["value"].tensor.tensor_shape.dim
    if not x_shape or x_shape[1] is None or x_shape[2] is None:
        return None
    strides = list(node.attr["strides"].list.i) or [1, 1, 1, 1]
    dil = list(node.attr["dilations"].list.i) or [1, 1, 1, 1]
    pads = []
    for axis in (1, 2):
        total = _pads(x_shape[axis], w_shape[axis - 1].size, strides[axis], dil[axis])
        pads += [total // 2, total - total // 2]
    return pads if any(pads) else None


def _plan(index: GraphIndex, tensor: str, shapes, protected, top: bool = True) -> _Plan:
    """``top``: readers of the tensor itself (padded convs are only taken there)."""
    plan = _Plan()
    for reader, i in index.consumers(canonical_tensor(tensor)):
        weights = _absorbing_weights(index, reader, shapes) if i == 0 else None
        if weights is not None:
            plan.absorbing.append((reader.name, weights))
            plan.direct.append((reader.name, i))
            continue
        pads = _padded_conv(index, reader, shapes) if i == 0 and top else None
        if pads is not None:
            plan.padded.append((reader.name, const_value(index.node(reader.input[1])), pads))
            continue
        if (reader.op in TRANSPARENT and i == 0 and reader.name not in protected
                and reader.attr["T"].type == types_pb2.DT_FLOAT
                and reader.attr["data_format"].s in (b"", b"NHWC")):
            sub = _plan(index, f"{reader.name}:0", shapes, protected, top=False)
            if sub.absorbing and not sub.others:
                plan.absorbing += sub.absorbing
                plan.transparent += [reader.name] + sub.transparent
                plan.direct.append((reader.name, i))
                continue
        plan.others.append(reader.name)
    return plan


# --------------------------------------------------------------------------- rewriting
class _Editor:
    """A mutable name -> NodeDef map of a GraphDef, emitted in the original order."""

    def __init__(self, graph_def: graph_pb2.GraphDef):
        self.graph = graph_pb2.GraphDef()
        self.graph.CopyFrom(graph_def)
        self.nodes = {n.name: n for n in self.graph.node}
        self.fp32_ops: List[Tuple[str, str]] = []    # (node, why) of the fp32 ops added

    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.nodes:
            name, k = f"{base}_{k}", k + 1
        return name

    def add(self, node):
        self.nodes[node.name] = self.graph.node.add()
        self.nodes[node.name].CopyFrom(node)
        return self.nodes[node.name]

    def const(self, base: str, value) -> str:
        return self.add(make_const(self.fresh(base), np.asarray(value, np.float32))).name

    def rewire(self, reader: str, i: int, tensor: str) -> None:
        self.nodes[reader].input[i] = tensor

    def rename(self, old: str, new: str) -> None:
        """Give node ``old`` the name ``new``; its readers are not rewired."""
        node = self.nodes.pop(old)
        node.name = new
        self.nodes[new] = node


def _fold_producer(index: GraphIndex, tensor: str, plan: _Plan, protected) -> Optional[str]:
    """The BiasAdd (or bias-less conv) whose bias can take ``-lo``, when allowed."""
    t = parse_tensor_name(tensor)
    node = index.node(t.node)
    if t.port or node.name in protected or any(
            index.node(r).op in INT8_READERS for r in plan.others):
        return None
    if node.op in CONV_LIKE:
        return node.name
    if node.op == "BiasAdd" and index.node(node.input[1]).op == "Const":
        conv = index.node(node.input[0])
        readers = {c.name for c in index.consumer_nodes(conv.name)}
        if conv.op in CONV_LIKE and readers == {node.name}:
            return node.name
    return None


def _add_to_bias(ed: _Editor, index: GraphIndex, conv: str, delta: np.ndarray,
                 use_existing: bool = True) -> None:
    """Add ``delta`` (per output channel) to the bias of conv-like node ``conv``: to the
    Const of its one reader when that is a BiasAdd, else in a new BiasAdd that takes the
    conv's name (the conv is renamed, so its readers read the BiasAdd)."""
    readers = index.consumer_nodes(conv)
    if use_existing and len(readers) == 1 and readers[0].op == "BiasAdd":
        bias_add = ed.nodes[readers[0].name]
        bias_node = index.node(bias_add.input[1])
        if node_name(bias_add.input[0]) == conv and bias_node.op == "Const":
            bias = const_value(bias_node).astype(np.float64).reshape(-1) + delta
            bias_add.input[1] = ed.const(f"{bias_add.name}/shifted_bias", bias)
            return
    inner = ed.fresh(f"{conv}/before_shift_bias")
    ed.rename(conv, inner)
    ed.add(make_node("BiasAdd", conv, [inner, ed.const(f"{conv}/shift_bias", delta)],
                     T=np.float32))


def shift_tensor(graph_def: graph_pb2.GraphDef, tensor: str, lo: float, ranges, shapes,
                 protected, added: Optional[List[Tuple[str, str]]] = None,
                 int8_deltas: Optional[Dict[str, np.ndarray]] = None, int8_sums=None
                 ) -> Tuple[graph_pb2.GraphDef, Optional[str]]:
    """Shift ``tensor`` by ``-lo`` for the readers that absorb it; (graph, mode or None).
    ``added`` collects (node, why) for every fp32 op added (AddV2, Pad).  With
    ``int8_sums(node, weights)`` (the per-channel sums of the int8 weights the reader
    will use), ``int8_deltas[reader]`` gets ``lo * (sum Wq - sum W)``: what the int8
    reader needs on top of the exact fp32 bias."""
    index = GraphIndex(graph_def)
    plan = _plan(index, tensor, shapes, protected)
    t = parse_tensor_name(tensor)
    if index.node(t.node).op in INT8_PRODUCERS:
        plan.others += [name for name, _, _ in plan.padded]   # no fp32 round trip for them
        plan.padded = []
    if _step_ratio(lo, ranges[canonical_tensor(tensor)][1]) > DEPTHWISE_STEP_RATIO:
        # a depthwise conv gets 8-bit weights either way: the shift (and the fp32 Pad it
        # needs) pays only when the unsigned step is much finer than the signed one
        depthwise = [p[0] for p in plan.padded
                     if index.node(p[0]).op == "DepthwiseConv2dNative"]
        plan.others += depthwise
        plan.padded = [p for p in plan.padded if p[0] not in depthwise]
    if not plan.absorbing and not plan.padded:
        return graph_def, None
    ed = _Editor(graph_def)
    hi = ranges[canonical_tensor(tensor)][1]
    producer = _fold_producer(index, tensor, plan, protected) if not plan.padded else None
    if producer is not None:
        mode = "folded into the producer's bias"
        shifted = producer
        _add_to_bias_or_self(ed, index, producer, -lo)
        if plan.others:
            back = ed.fresh(f"{t.node}/unshifted")
            ed.add(make_node("AddV2", back, [t.node, ed.const(f"{back}/lo", lo)],
                             T=np.float32))
            ed.fp32_ops.append((back, f"adds {lo:.4g} back to the shifted {t.node} for its "
                                      "other readers"))
            for reader in plan.others:
                node = ed.nodes[reader]
                for i, inp in enumerate(node.input):
                    if inp in (t.node, f"{t.node}:0"):
                        node.input[i] = back
            ranges[canonical_tensor(back)] = ranges[canonical_tensor(tensor)]
        ranges[canonical_tensor(tensor)] = (0.0, float(hi - lo))
    else:
        mode = "AddV2 before its readers"
        shifted = ed.fresh(f"{t.node}/shifted")
        ed.add(make_node("AddV2", shifted, [str(t), ed.const(f"{shifted}/minus_lo", -lo)],
                         T=np.float32))
        ed.fp32_ops.append((shifted, f"shifts {t.node} by {-lo:.4g} so its int8 readers "
                                     "take it unsigned"))
        for reader, i in plan.direct:
            ed.rewire(reader, i, shifted)
        ranges[canonical_tensor(shifted)] = (0.0, float(hi - lo))
    for name in plan.transparent:
        key = canonical_tensor(name)
        if key in ranges:
            r_lo, r_hi = ranges[key]
            ranges[key] = (max(0.0, float(r_lo - lo)), float(r_hi - lo))
    for reader, weights, pads in [(r, w, None) for r, w in plan.absorbing] + plan.padded:
        if pads is not None:
            _pad_first(ed, str(t), reader, pads, lo, ranges, hi)
        exact = weight_sums(index.node(reader), weights)
        _add_to_bias(ed, index, reader, lo * exact)
        if int8_sums is not None and int8_deltas is not None:
            int8_deltas[reader] = (int8_deltas.get(reader, 0.0)
                                   + lo * (int8_sums(index.node(reader), weights) - exact))
    if plan.padded:
        mode += f"; zero padding made explicit before the shift for {len(plan.padded)} convs"
    if added is not None:
        added += ed.fp32_ops
    return ed.graph, (f"{mode} (shift {-lo:.4g}, "
                      f"{len(plan.absorbing) + len(plan.padded)} readers absorb it)")


def _pad_first(ed: _Editor, tensor: str, reader: str, pads: List[int], lo: float, ranges,
               hi: float) -> None:
    """reader(pad(x)) as Pad(x) -> AddV2(-lo) -> reader with VALID padding."""
    pad = ed.fresh(f"{reader}/pad")
    paddings = make_const(ed.fresh(f"{pad}/paddings"),
                          np.array([[0, 0], pads[0:2], pads[2:4], [0, 0]], np.int32))
    ed.add(paddings)
    ed.add(make_node("Pad", pad, [tensor, paddings.name], T=np.float32, Tpaddings=np.int32))
    ed.fp32_ops.append((pad, f"{reader}'s zero padding, made explicit before the shift"))
    shifted = ed.fresh(f"{pad}/shifted")
    ed.add(make_node("AddV2", shifted, [pad, ed.const(f"{shifted}/minus_lo", -lo)],
                     T=np.float32))
    ed.fp32_ops.append((shifted, f"shifts {reader}'s padded input by {-lo:.4g} (unsigned "
                                 "int8 input)"))
    conv = ed.nodes[reader]
    conv.input[0] = shifted
    conv.attr["padding"].s = b"VALID"
    if "explicit_paddings" in conv.attr:
        del conv.attr["explicit_paddings"].list.i[:]
    ranges[canonical_tensor(shifted)] = (0.0, float(hi - lo))


def _add_to_bias_or_self(ed: _Editor, index: GraphIndex, producer: str, delta: float) -> None:
    """Producer is a BiasAdd (its Const bias moves by ``delta``) or a bias-less conv."""
    node = index.node(producer)
    if node.op == "BiasAdd":
        bias = const_value(index.node(node.input[1])).astype(np.float64).reshape(-1) + delta
        ed.nodes[producer].input[1] = ed.const(f"{producer}/shifted_bias", bias)
        return
    weights = const_value(index.node(node.input[1]))
    channels = weight_sums(node, weights).shape[0]
    _add_to_bias(ed, index, producer, np.full([channels], delta), use_existing=False)


def _candidates(graph_def, ranges) -> List[Tuple[str, float]]:
    """Calibrated float tensors that can be negative, in graph order."""
    out = []
    for node in graph_def.node:
        key = canonical_tensor(node.name)
        rng = ranges.get(key)
        if rng is not None and rng[0] < 0 and rng[1] > rng[0]:
            out.append((key, float(rng[0])))
    return out


@register_pass(PASS)
def shift_signed_activations(graph_def, ctx):
    ranges: Dict[str, Tuple[float, float]] = dict(ctx.options.get("ranges") or {})
    shapes = ctx.options.get("shapes")
    if shapes is None:
        from graphquant.execute import tensor_shapes

        shapes = tensor_shapes(graph_def)
    int8_deltas = dict(ctx.options.get("offset_bias_deltas") or {})

    def int8_sums(node, weights):   # the weights the int8 reader (unsigned input) will use
        from graphquant.bias_correction import dequantized_weights
        from graphquant.int8_rewrite import WEIGHTED_OPS, quantize_weights

        kind = WEIGHTED_OPS[node.op]
        tb = kind == "matmul" and node.attr["transpose_b"].b
        qw = quantize_weights(ctx, weights.astype(np.float32), kind, False, transpose_b=tb)
        return weight_sums(node, dequantized_weights(qw, kind, weights.shape, tb))

    for tensor, _ in _candidates(graph_def, ranges):
        lo = ranges[tensor][0]       # an earlier shift may have moved it (pools, reshapes)
        if lo >= 0:
            continue
        added: List[Tuple[str, str]] = []
        graph_def, how = shift_tensor(graph_def, tensor, lo, ranges, shapes, ctx.protected,
                                      added, int8_deltas, int8_sums)
        if how:
            ctx.note(PASS, node_name(tensor), f"signed tensor stored as y - ({lo:.4g}) >= 0: "
                     + how)
        for name, why in added:
            ctx.note(PASS, name, f"fp32 op added by {PASS}: {why}", kind="fp32")
    ctx.options["ranges"] = ranges
    # int8 readers: the weight rounding of lo * sum(W) (graphquant.int8_rewrite.corrected_bias)
    ctx.options["offset_bias_deltas"] = {name: np.asarray(d, np.float32)
                                         for name, d in int8_deltas.items()}
    return graph_def
