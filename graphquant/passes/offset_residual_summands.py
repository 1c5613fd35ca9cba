"""offset_residual_summands: signed residual summands carried as unsigned, so the Add fuses in int8.

The int8 conv's residual fusion (``[BiasAdd, Sum, Relu, Requantize]``) needs a
Relu and a non-negative (quint8) summand.  ResNet's projection blocks add two
signed conv outputs, and MobileNetV2's residual stream adds signed tensors
without any Relu: those Adds stayed fp32, with Dequantize / int32 outputs
before them and QuantizeV2 after.  A per-tensor offset ``c = -min >= 0``
moved into biases makes them fusable; every sum is unchanged::

    Before:
      h ─► Conv2D ─► BiasAdd(b_u) ─► u                       (u can be negative)
                                     ├─► Conv2D 1x1 ─► BiasAdd(b_r) ─► …
      g ─► Conv2D ─► BiasAdd(b_o) ─► AddV2(·, u) ─► s        (no Relu: s signed too)

    After (c_u = -min u, c_s = -min s, each >= 0):
      h ─► Conv2D ─► BiasAdd(b_u + c_u) ─► u' = u + c_u >= 0  (quint8)
                                     ├─► Conv2D 1x1 ─► BiasAdd(b_r - c_u·ΣW) ─► …
      g ─► Conv2D ─► BiasAdd(b_o - c_u + c_s) ─► AddV2(·, u') ─► Relu ─► s' = s + c_s
                                                       (named s; quantize_conv: Sum conv)

* ``u`` is the Add's summand: a BiasAdd of a conv (its offset goes into that
  bias) or, in a stream of residual Adds, another offset Add.  ``o``, the
  other operand, is a conv + BiasAdd read only by the Add; it becomes the
  Sum conv and gets the difference of the offsets.  The Add's inputs are put
  in the order (o, u) that ``quantize_conv`` reads as (conv, summand).
* An Add followed by Relu keeps its output (``c_s = 0``).  An Add without
  Relu gets a Relu that changes nothing inside the calibrated range (its
  output is the offset ``s' >= 0``); its readers must take the offset too.
* Every reader of an offset tensor must absorb it: a conv (Conv2D or
  depthwise) that reads it with no zero padding, followed by a BiasAdd whose
  bias loses ``c · ΣW`` (ΣW: its fp32 weights summed over each output's
  window, so the fp32 graph computes exactly what it did -- also for a reader
  that stays fp32), or a residual Add as above.  Otherwise the tensor is left
  alone.  The int8 reader computes with ``Wq``: it needs ``-c · (ΣWq - ΣW)``
  more, kept in ``ctx.options['offset_bias_deltas']`` (node -> per channel) and
  added by :func:`graphquant.int8_rewrite.corrected_bias` -- unless bias
  correction measured that reader, whose ``-E[(Wq - W) · (u + c)]`` contains it.
  (With ΣWq in the fp32 bias, every fp32 fallback reading MobileNetV2's
  residual stream was off by ``c · (ΣW - ΣWq)``: relL2 0.11 with every conv
  fp32; and bias correction, measuring on that graph, added the term twice.)
* The Sum fusion writes into the summand's buffer, so the summand's other
  readers must run before the Sum conv (be its ancestors); the Add is left
  alone when they may not.
* Offsets and signed conv inputs: ``u'`` is quint8 over ``[0, max - min]``,
  never coarser than qint8 over ``[-R, R]``; 1x1 convs reading it get an
  unsigned input (oneDNN's faster u8 path on AVX2).

Ranges in ``ctx.options['ranges']`` move with their tensors.  The values of
tensors that now differ from the original graph by a constant are recorded in
``ctx.options['offsets']`` (node name -> offset); :func:`graphquant.convert.convert`
runs this pass on the fp32 graph before measuring island errors, so the
reference it measures against has the same offsets.  Graph outputs are never
offset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Set, Tuple

import numpy as np
from tensorflow.core.framework import graph_pb2, types_pb2

from graphquant.graph import GraphIndex, canonical_tensor, const_value, data_inputs, make_const, \
    make_node, node_name, parse_tensor_name
from graphquant.int8_rewrite import quantize_weights
from graphquant.pipeline import register_pass

PASS = "offset_residual_summands"
CONVS = ("Conv2D", "DepthwiseConv2dNative")
ADDS = ("Add", "AddV2")


# --------------------------------------------------------------------------- what the graph offers
def _conv_bias(index: GraphIndex, name: str) -> Optional[Tuple]:
    """(bias_add, conv) when ``name`` is BiasAdd(Conv2D|Depthwise(x, W:Const), b:Const) and the
    conv is read only by it; else None."""
    node = index.nodes.get(name)
    if node is None or node.op != "BiasAdd" or node.attr["T"].type != types_pb2.DT_FLOAT:
        return None
    ins = data_inputs(node)
    conv, bias = index.node(ins[0]), index.node(ins[1])
    if (conv.op not in CONVS or bias.op != "Const" or parse_tensor_name(ins[0]).port
            or conv.attr["data_format"].s not in (b"", b"NHWC")
            or index.node(data_inputs(conv)[1]).op != "Const"
            or [c.name for c in index.consumer_nodes(conv.name)] != [node.name]):
        return None
    return node, conv


def _window_pads(size, k, stride, dilation) -> int:
    eff = (k - 1) * dilation + 1
    out = -(-size // stride)
    return max((out - 1) * stride + eff - size, 0)


def _unpadded(conv, weights, shapes) -> bool:
    """No output window of ``conv`` reads zero padding (an offset input then is exact)."""
    padding = conv.attr["padding"].s
    if padding == b"VALID":
        return True
    if padding == b"EXPLICIT":
        return not any(conv.attr["explicit_paddings"].list.i)
    strides = list(conv.attr["strides"].list.i) or [1, 1, 1, 1]
    dilations = list(conv.attr["dilations"].list.i) or [1, 1, 1, 1]
    x_shape = (shapes or {}).get(node_name(conv.input[0]))
    for axis in (1, 2):
        k = weights.shape[axis - 1]
        if k == 1:
            continue
        if not x_shape or x_shape[axis] is None:
            return False
        if _window_pads(x_shape[axis], k, strides[axis], dilations[axis]):
            return False
    return True


@dataclass
class _Residual:
    add: object       # the Add node
    o: str            # BiasAdd name of the conv branch (the future Sum conv)
    u: str            # summand node name
    relu: bool        # the Add's one reader is a Relu


def _residual_adds(index: GraphIndex, ancestors, protected) -> Dict[str, _Residual]:
    """Adds of a conv branch and a summand that the Sum fusion could take, by Add name."""
    found = {}
    for node in index.graph_def.node:
        if node.op not in ADDS or node.attr["T"].type != types_pb2.DT_FLOAT:
            continue
        ins = data_inputs(node)
        if len(ins) != 2 or any(parse_tensor_name(i).port for i in ins) or node.name in protected:
            continue
        a, b = node_name(ins[0]), node_name(ins[1])
        if a == b:
            continue
        readers = index.consumer_nodes(node.name)
        relu = len(readers) == 1 and readers[0].op == "Relu" and readers[0].name not in protected
        for o, u in ((a, b), (b, a)):
            branch = _conv_bias(index, o)
            if branch is None or [c.name for c in index.consumer_nodes(o)] != [node.name]:
                continue
            if index.node(u).op == "Const" or u in protected:
                continue
            others = {c.name for c in index.consumer_nodes(u)} - {node.name}
            if others <= ancestors(branch[1].name):
                found[node.name] = _Residual(node, o, u, relu)
                break
    return found


def _absorbing_conv(index: GraphIndex, reader, i: int, shapes) -> Optional[Tuple]:
    """(bias_add, conv) when ``reader`` is a conv taking the tensor as input 0 without padding
    and followed by a BiasAdd with a Const bias; else None."""
    if i != 0 or reader.op not in CONVS:
        return None
    bias_adds = index.consumer_nodes(reader.name)
    if len(bias_adds) != 1:
        return None
    branch = _conv_bias(index, bias_adds[0].name)
    if branch is None or branch[1].name != reader.name:
        return None
    weights = const_value(index.node(data_inputs(reader)[1]))
    return branch if _unpadded(reader, weights, shapes) else None


# --------------------------------------------------------------------------- which tensors move
def _plan(index, ranges, residuals, shapes, protected) -> Set[str]:
    """Names of the tensors to offset: the largest set whose readers all absorb an offset."""
    def lo(name):
        rng = ranges.get(canonical_tensor(name))
        return None if rng is None else rng[0]

    summand_of = {}  # tensor -> residual Adds reading it as summand
    for res in residuals.values():
        summand_of.setdefault(res.u, []).append(res)
    streams = {name for name, res in residuals.items() if not res.relu}
    candidates = set(streams)
    for name, res in residuals.items():
        if lo(res.u) is not None and lo(res.u) < 0 and _conv_bias(index, res.u) is not None:
            candidates.add(res.u)
    candidates = {c for c in candidates if lo(c) is not None and c not in protected}

    def absorbed(t: str, chosen: Set[str]) -> bool:
        if t in streams:
            u = residuals[t].u
            if u not in chosen and (lo(u) is None or lo(u) < 0):
                return False
        for reader, i in index.consumers(canonical_tensor(t)):
            res = residuals.get(reader.name)
            if res is not None and res.u == t and (res.relu or reader.name in chosen):
                continue
            if _absorbing_conv(index, reader, i, shapes) is None:
                return False
        return True

    chosen = set(candidates)
    changed = True
    while changed:
        keep = {t for t in chosen if absorbed(t, chosen)}
        changed = keep != chosen
        chosen = keep
    return chosen


def _weight_sums(ctx, conv, weights: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Per output channel, the sum of the weights one output reads: (fp32, int8-exact)."""
    kind = "depthwise" if conv.op == "DepthwiseConv2dNative" else "conv"
    qw = quantize_weights(ctx, weights.astype(np.float32), kind, signed_input=False)
    step = np.asarray(qw.step, np.float64)
    values = qw.values.astype(np.float64)
    if kind == "depthwise":
        h, w, cin, mult = weights.shape
        return (weights.astype(np.float64).reshape(h, w, cin * mult).sum(axis=(0, 1)),
                (values.reshape(h, w, cin * mult) * step).sum(axis=(0, 1)))
    return (weights.astype(np.float64).sum(axis=(0, 1, 2)),
            (values * step).sum(axis=(0, 1, 2)))


# --------------------------------------------------------------------------- the rewrite
@register_pass(PASS)
def offset_residual_summands(graph_def, ctx):
    ranges = dict(ctx.options.get("ranges") or {})
    if not ranges:
        return graph_def
    index = GraphIndex(graph_def)
    protected = ctx.protected
    nxg = index.to_networkx()
    import networkx as nx

    residuals = _residual_adds(index, lambda n: nx.ancestors(nxg, n), protected)
    shapes = ctx.options.get("shapes")
    chosen = _plan(index, ranges, residuals, shapes, protected)
    active = {name: res for name, res in residuals.items()
              if res.u in chosen or name in chosen}
    if not active:
        return graph_def

    offset = {t: max(0.0, -float(ranges[canonical_tensor(t)][0])) for t in chosen}
    bias_delta: Dict[str, np.ndarray] = {}   # BiasAdd name -> added to its bias
    int8_delta = dict(ctx.options.get("offset_bias_deltas") or {})  # conv -> int8 bias extra
    moved: Dict[str, float] = {}             # node name -> its value's offset

    def add_delta(bias_add: str, delta):
        bias_delta[bias_add] = bias_delta.get(bias_add, 0.0) + np.asarray(delta, np.float64)

    for t in chosen:
        if t not in residuals:          # a conv's BiasAdd: the offset goes into its bias
            add_delta(t, offset[t])
        moved[t] = offset[t]
        for reader, i in index.consumers(canonical_tensor(t)):
            branch = _absorbing_conv(index, reader, i, shapes)
            if branch is not None and offset[t]:
                weights = const_value(index.node(data_inputs(reader)[1]))
                exact, as_int8 = _weight_sums(ctx, reader, weights)
                add_delta(branch[0].name, -offset[t] * exact)
                int8_delta[reader.name] = (int8_delta.get(reader.name, 0.0)
                                           - offset[t] * (as_int8 - exact))
    for name, res in active.items():
        d = offset.get(name, 0.0) - offset.get(res.u, 0.0)
        add_delta(res.o, d)
        moved[res.o] = moved.get(res.o, 0.0) + d

    taken = set(index.nodes)

    def fresh(base):
        name, k = base, 0
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        return name

    out = graph_pb2.GraphDef()
    out.versions.CopyFrom(graph_def.versions)
    out.library.CopyFrom(graph_def.library)
    for original in graph_def.node:
        node = out.node.add()
        node.CopyFrom(original)
        if node.name in bias_delta:
            bias = const_value(index.node(node.input[1])).astype(np.float64)
            const = make_const(fresh(f"{node.name}/offset_bias"),
                               (bias + bias_delta[node.name]).astype(np.float32))
            node.input[1] = const.name
            out.node.add().CopyFrom(const)
        res = active.get(node.name)
        if res is None:
            continue
        controls = [i for i in node.input if i.startswith("^")]
        del node.input[:]
        node.input.extend([res.o, res.u] + controls)
        if res.add.name in chosen:      # a stream Add: a Relu (exact in range) takes its name
            node.name = fresh(f"{res.add.name}/sum")   # no range: nothing reads it as int8
            out.node.add().CopyFrom(make_node("Relu", res.add.name, [node.name], T=np.float32))
    for name, d in moved.items():
        key = canonical_tensor(name)
        if key in ranges and d:
            lo, hi = ranges[key]
            ranges[key] = (max(0.0, lo + d) if name in chosen else lo + d, hi + d)
    for t in sorted(chosen):
        ctx.note(PASS, t, f"carried with offset {offset[t]:.4g} (calibrated minimum "
                 f"{-offset[t]:.4g}) so the residual Add it feeds runs in int8")
    offsets = dict(ctx.options.get("offsets") or {})
    for name, d in moved.items():
        if d:
            offsets[name] = offsets.get(name, 0.0) + float(d)
    ctx.options.update(ranges=ranges, offsets=offsets, offset_bias_deltas={
        name: np.asarray(d, np.float32) for name, d in int8_delta.items()})
    return out
