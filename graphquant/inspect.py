"""What ``graphquant inspect`` shows: a graph's interface, its ops, and what int8 could take.

:func:`int8_candidates` lists the nodes a later int8 pass would turn into
quantized ops, found with the same op-type patterns every pass uses::

    [Relu|Relu6] ( [Add|AddV2 (., summand)] ( [BiasAdd|Add (., Const)] (
        Conv2D | DepthwiseConv2dNative | MatMul (x, weights:Const) )))

(each bracketed op optional, a fused interior node read by nothing outside the
fusion), and MaxPool / AvgPool / ConcatV2, which stay int8 when their inputs
are int8.  A conv or matmul that is not a candidate is listed with the reason.
Run it on an optimized graph: batch-norm and Identity left in place hide
fusions.  This is a first cut; the int8 passes refine it.

(Import it as ``graphquant.inspect``; running a file inside ``graphquant/`` as
a script would shadow the standard library's ``inspect``.)
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Set

from tensorflow.core.framework import graph_pb2, types_pb2

from graphquant.graph import GraphIndex, data_inputs, node_name, parse_tensor_name
from graphquant.pattern import Any, Const, OpTypePattern, match_at
from graphquant.report import LOOP_REASON

WEIGHTED_OPS = ("Conv2D", "DepthwiseConv2dNative", "MatMul")
POOL_OPS = ("MaxPool", "AvgPool")
CONCAT_OPS = ("ConcatV2",)
_KIND = {"Conv2D": "conv", "DepthwiseConv2dNative": "depthwise_conv", "MatMul": "matmul",
         "MaxPool": "pool", "AvgPool": "pool", "ConcatV2": "concat"}


def _is_float32(node) -> bool:
    return node.attr["T"].type == types_pb2.DT_FLOAT


def _not_const(node) -> bool:
    return node.op != "Const"


# The patterns, as data.  Each level wraps the one below; longer fusions are tried first.
WEIGHTED = OpTypePattern("|".join(WEIGHTED_OPS), name="conv", where=_is_float32,
                         inputs=[Any("x"), Const("weights")])


def _bias(inner):
    return OpTypePattern("BiasAdd|Add|AddV2", name="bias_add", inputs=[inner, Const("bias")],
                         commutative=True)


def _sum(inner):
    return OpTypePattern("Add|AddV2", name="sum", commutative=True,
                         inputs=[inner, OpTypePattern("*", name="summand", where=_not_const)])


def _act(inner):
    return OpTypePattern("Relu|Relu6", name="act", inputs=[inner])


def _fusion_patterns() -> List[OpTypePattern]:
    patterns = []
    for with_act, with_sum, with_bias in itertools.product((True, False), repeat=3):
        p = _bias(WEIGHTED) if with_bias else WEIGHTED
        p = _sum(p) if with_sum else p
        p = _act(p) if with_act else p
        patterns.append((with_act + with_sum + with_bias, with_bias, p))
    # longest first; at equal length prefer a bias over a residual sum
    return [p for _, _, p in sorted(patterns, key=lambda e: (-e[0], -e[1]))]


FUSIONS = _fusion_patterns()
POOL = OpTypePattern("|".join(POOL_OPS), name="pool", where=_is_float32, inputs=[Any("x")])


@dataclass
class Candidate:
    """Nodes one int8 op would replace."""

    kind: str                 # conv, depthwise_conv, matmul, pool or concat
    root: str                 # the node whose output the int8 op produces
    nodes: List[str]          # the fused nodes, first op first
    ops: List[str]            # their op types, same order
    int8_inputs: bool = True  # pools/concats: are all data inputs produced by int8 candidates?

    @property
    def fused(self) -> str:
        return "+".join(self.ops)


@dataclass
class Fp32Node:
    """A conv or matmul that no int8 pattern takes, and why."""

    name: str
    op: str
    reason: str


def int8_candidates(graph_def: graph_pb2.GraphDef,
                    protected: Sequence[str] = ()) -> List[Candidate]:
    """Candidates for int8 in topological order (see the module docstring).

    ``protected`` are graph outputs: such a node may end a fusion but not sit
    inside one.
    """
    index = GraphIndex(graph_def)
    order = index.topological_order()
    protected_nodes = {node_name(p) for p in protected}
    claimed: Set[str] = set(index.loop_frames())   # TF1 while loops stay fp32
    by_root: Dict[str, Candidate] = {}
    for name in reversed(order):
        node = index.nodes[name]
        if name in claimed:
            continue
        for pattern in FUSIONS:
            m = match_at(index, node, pattern)
            if m is None or not _fusable(index, m, protected_nodes, claimed):
                continue
            chain = [m.nodes[k] for k in ("conv", "bias_add", "sum", "act") if k in m.nodes]
            claimed.update(n.name for n in chain)
            by_root[name] = Candidate(_KIND[m["conv"].op], name, [n.name for n in chain],
                                      [n.op for n in chain])
            break
    int8_roots = set(by_root)
    for name in order:  # pools and concats, producers first so chains of them propagate
        node = index.nodes[name]
        if name in claimed:
            continue
        if match_at(index, node, POOL) is not None:
            ins = data_inputs(node)[:1]
        elif node.op in CONCAT_OPS and _is_float32(node):
            ins = data_inputs(node)[:-1]  # the last input is the axis
        else:
            continue
        int8_in = all(parse_tensor_name(i).node in int8_roots for i in ins)
        if int8_in:
            int8_roots.add(name)
        by_root[name] = Candidate(_KIND[node.op], name, [name], [node.op], int8_in)
    return [by_root[n] for n in order if n in by_root]


def _fusable(index: GraphIndex, m, protected: Set[str], claimed: Set[str]) -> bool:
    """Interior fused nodes must be read only inside the fusion and not be outputs."""
    inside = {n.name for n in m.matched}
    for node in m.matched:
        if node.op == "Const":
            continue
        if node.name in claimed:
            return False
        if node is m.root:
            continue
        if node.name in protected:
            return False
        if any(c.name not in inside for c in index.consumer_nodes(node.name)):
            return False
    return True


def fp32_weighted_nodes(graph_def: graph_pb2.GraphDef,
                        candidates: Sequence[Candidate]) -> List[Fp32Node]:
    """Conv2D / DepthwiseConv2dNative / MatMul nodes no candidate covers, with the reason."""
    taken = {n for c in candidates for n in c.nodes}
    index = GraphIndex(graph_def)
    out = []
    for node in graph_def.node:
        if node.op not in WEIGHTED_OPS or node.name in taken:
            continue
        if node.name in index.loop_frames():
            reason = LOOP_REASON
        elif not _is_float32(node):
            reason = "not float32"
        elif index.input_node(node, 1).op != "Const":
            reason = f"weights are not a constant (computed by {index.input_node(node, 1).op})"
        else:  # pragma: no cover - every float conv with Const weights matches WEIGHTED
            reason = "no int8 pattern matched"
        out.append(Fp32Node(node.name, node.op, reason))
    return out


# --------------------------------------------------------------------------- whole report
@dataclass
class TensorSpec:
    name: str
    dtype: str
    shape: Optional[List[Optional[int]]]  # None when the rank is unknown

    @property
    def shape_str(self) -> str:
        if self.shape is None:
            return "unknown"
        return "[" + ", ".join("?" if d is None else str(d) for d in self.shape) + "]"


@dataclass
class Inspection:
    """Everything ``graphquant inspect`` prints."""

    inputs: List[TensorSpec]
    outputs: List[TensorSpec]
    histogram: Dict[str, int]
    optimized_histogram: Dict[str, int]
    candidates: List[Candidate]
    fp32: List[Fp32Node] = field(default_factory=list)
    notes: List[Dict[str, str]] = field(default_factory=list)

    def candidate_counts(self) -> Dict[str, int]:
        counts: Dict[str, int] = {}
        for c in self.candidates:
            counts[c.kind] = counts.get(c.kind, 0) + 1
        return counts


# Attributes that hold a node's output type, most specific first.
_OUTPUT_TYPE_ATTRS = ("dtype", "DstT", "out_type", "output_type", "T")


def _dtype_name(node, port: int) -> str:
    from tensorflow.python.framework import dtypes

    for key in _OUTPUT_TYPE_ATTRS:
        if key in node.attr:
            attr = node.attr[key]
            if attr.type != types_pb2.DT_INVALID:
                return dtypes.as_dtype(attr.type).name
            if attr.list.type and port < len(attr.list.type):
                return dtypes.as_dtype(attr.list.type[port]).name
    return "unknown"


def tensor_specs(graph_def: graph_pb2.GraphDef, names: Sequence[str]) -> List[TensorSpec]:
    """dtype and static shape of each tensor name (shape known for output 0 only)."""
    from graphquant.execute import tensor_shapes

    shapes = tensor_shapes(graph_def)
    index = GraphIndex(graph_def)
    specs = []
    for name in names:
        t = parse_tensor_name(name)
        shape = shapes.get(t.node) if t.port == 0 else None
        specs.append(TensorSpec(f"{t.node}:{t.port}", _dtype_name(index.nodes[t.node], t.port),
                                shape))
    return specs


def inspect_graph(graph, inputs=None, outputs=None,
                  passes: Optional[Sequence[str]] = None) -> Inspection:
    """Inspect ``graph`` (GraphDef or path); candidates come from its optimized form."""
    from graphquant import api
    from graphquant.graph import op_histogram

    graph_def = api.as_graph_def(graph)
    optimized, ctx = api.optimize(graph_def, inputs, outputs, passes=passes)
    input_specs = tensor_specs(graph_def, ctx.inputs)
    output_specs = tensor_specs(graph_def, ctx.outputs)
    candidates = int8_candidates(optimized, protected=ctx.outputs)
    return Inspection(inputs=input_specs, outputs=output_specs,
                      histogram=op_histogram(graph_def),
                      optimized_histogram=op_histogram(optimized),
                      candidates=candidates, fp32=fp32_weighted_nodes(optimized, candidates),
                      notes=list(ctx.notes))
