"""Which tensors to calibrate, and the one range each int8 tensor gets.

Calibration measures every float tensor that enters or leaves an op the int8
passes may rewrite.  :func:`plan_ranges` then makes ranges agree where int8 ops
need them equal, so that no requantization is needed between them:

* MaxPool / AvgPool / Pad output = input range (the quantized pools and the
  integer Pad pass it through);
* every ConcatV2 input and its output share one range (the union), so the
  quantized concat is a plain copy and each producer requantizes straight
  into it -- unless the inputs' ranges differ by more than
  :data:`CONCAT_MAX_RATIO`: one shared 8-bit range would round the small input
  to a few steps (a constant-Q front end concatenates octaves whose magnitudes
  differ 300x), so such a concat keeps separate ranges and stays fp32.

Tensors tied this way form classes (union-find); a class's range is the union
of its members' calibrated ranges.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

from tensorflow.core.framework import graph_pb2, types_pb2

from graphquant.graph import GraphIndex, canonical_tensor, data_inputs, dtype_of

QUANTIZABLE_OPS = frozenset({
    "Conv2D", "DepthwiseConv2dNative", "MatMul", "BiasAdd", "Relu", "Relu6", "Add", "AddV2",
    "MaxPool", "AvgPool", "ConcatV2", "Pad",
})
RANGE_PRESERVING_OPS = frozenset({"MaxPool", "AvgPool", "Pad"})  # Pad: zeros, always in range
CONCAT_MAX_RATIO = 8.0  # the smallest input keeps at least 255/8 = 32 steps

Range = Tuple[float, float]


def calibration_tensors(graph_def: graph_pb2.GraphDef) -> List[str]:
    """Float tensors read or written by ops the int8 passes handle, in graph order.

    Nodes inside TF1 ``cond`` branches (after a Switch, before its Merge) are
    left out: a sample that takes the other branch gives them no value, so
    they get no range and stay fp32.  So are nodes inside TF1 while loops
    (:meth:`GraphIndex.loop_frames`): a loop runs as written, in fp32.
    """
    index = GraphIndex(graph_def)
    in_loop = index.loop_frames()
    conditional = _inside_switch_branches(index, in_loop) | set(in_loop)
    wanted: Dict[str, None] = {}
    for node in graph_def.node:
        if (node.op not in QUANTIZABLE_OPS or dtype_of(node) != types_pb2.DT_FLOAT
                or node.name in conditional):
            continue
        inputs = data_inputs(node)
        if node.op == "ConcatV2":
            inputs = inputs[:-1]  # the axis
        for inp in inputs:
            producer = index.node(inp)
            if producer.op != "Const":
                wanted[canonical_tensor(inp)] = None
        wanted[canonical_tensor(node.name)] = None
    return list(wanted)


def fused_intermediates(graph_def: graph_pb2.GraphDef) -> List[str]:
    """Calibrated tensors that never become an int8 tensor: a conv/depthwise/matmul
    output read only by the BiasAdd of a Const bias, and that BiasAdd's output when
    read only by a Relu/Relu6.  The quantize passes fuse such chains into one op
    whose range is the chain's last tensor; if the op stays fp32 no range is used.
    Their min and max are still measured; they need no histogram."""
    index = GraphIndex(graph_def)
    out = []
    for node in graph_def.node:
        if node.op not in ("Conv2D", "DepthwiseConv2dNative", "MatMul"):
            continue
        readers = index.consumers(node.name)
        if len(readers) != 1:
            continue
        bias, position = readers[0]
        if (bias.op != "BiasAdd" or position != 0 or ":" in bias.input[0]
                or index.node(bias.input[1]).op != "Const"):
            continue
        out.append(canonical_tensor(node.name))
        after = index.consumers(bias.name)
        if (len(after) == 1 and after[0][0].op in ("Relu", "Relu6")
                and ":" not in after[0][0].input[after[0][1]]):
            out.append(canonical_tensor(bias.name))
    return out


def _inside_switch_branches(index: GraphIndex, in_loop) -> set:
    """Names of nodes reachable from a cond's Switch without passing its Merge (a TF1
    while loop's own Switch and Merge nodes, in ``in_loop``, are neither)."""
    seen = set()
    stack = [c.name for n in index.graph_def.node
             if n.op in ("Switch", "RefSwitch") and n.name not in in_loop
             for c in index.consumer_nodes(n.name)]
    while stack:
        name = stack.pop()
        if name in seen or (index.nodes[name].op in ("Merge", "RefMerge")
                            and name not in in_loop):
            continue
        seen.add(name)
        stack.extend(c.name for c in index.consumer_nodes(name))
    return seen


def _compatible(ranges) -> bool:
    if any(r is None for r in ranges):
        return False
    sizes = [max(abs(lo), abs(hi)) for lo, hi in ranges]
    return max(sizes) <= CONCAT_MAX_RATIO * max(min(sizes), 1e-12)


def plan_ranges(graph_def: graph_pb2.GraphDef, calibrated: Dict[str, Range]) -> Dict[str, Range]:
    """Calibrated ranges, unified across pools and concats (module docstring)."""
    parent = {t: t for t in calibrated}

    def find(t):
        while parent[t] != t:
            parent[t] = parent[parent[t]]
            t = parent[t]
        return t

    def union(a, b):
        if a in parent and b in parent:
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)  # deterministic representative

    for node in graph_def.node:
        out = canonical_tensor(node.name)
        if node.op in RANGE_PRESERVING_OPS:
            union(out, canonical_tensor(data_inputs(node)[0]))
        elif node.op == "ConcatV2" and _compatible(
                [calibrated.get(canonical_tensor(t)) for t in data_inputs(node)[:-1]]):
            for inp in data_inputs(node)[:-1]:
                union(out, canonical_tensor(inp))
    merged: Dict[str, Range] = {}
    for t, (lo, hi) in calibrated.items():
        root = find(t)
        if root in merged:
            mlo, mhi = merged[root]
            merged[root] = (min(mlo, lo), max(mhi, hi))
        else:
            merged[root] = (float(lo), float(hi))
    return {t: merged[find(t)] for t in calibrated}
