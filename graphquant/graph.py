"""Graph core: tensor names, an index over a GraphDef, constants and node building.

Everything that asks "who produces this tensor", "who consumes it", "in what
order do nodes run" or "what is this constant's value" asks it here, so passes
never re-implement graph bookkeeping.
"""

from __future__ import annotations

import collections
import copy
import functools
import heapq
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import networkx as nx
import numpy as np
from tensorflow.core.framework import attr_value_pb2, graph_pb2, node_def_pb2, types_pb2

from graphquant.errors import InvalidGraphError, NodeNotFoundError

# Ops that hold state: a graph containing them is not frozen.
VARIABLE_OPS = frozenset(
    {"VariableV2", "Variable", "VarHandleOp", "ReadVariableOp", "AssignVariableOp",
     "ResourceGather", "VarIsInitializedOp", "Assign", "AssignAdd", "AssignSub"}
)
INPUT_OPS = frozenset({"Placeholder", "PlaceholderWithDefault"})
# TF1 while loops (control flow v1): a loop's frame runs from its Enter nodes to its
# Exit nodes; NextIteration feeds the next iteration's values back to the frame's
# Merge nodes - the only edges that may close a cycle in a frozen graph.
LOOP_ENTER_OPS = frozenset({"Enter", "RefEnter"})
LOOP_EXIT_OPS = frozenset({"Exit", "RefExit"})
LOOP_BACK_EDGE_OPS = frozenset({"NextIteration", "RefNextIteration"})


# --------------------------------------------------------------------------- names
@dataclass(frozen=True)
class TensorName:
    """A parsed input string: ``node``, ``node:1`` or ``^node`` (control)."""

    node: str
    port: int = 0
    control: bool = False

    def __str__(self) -> str:
        if self.control:
            return "^" + self.node
        return self.node if self.port == 0 else f"{self.node}:{self.port}"


@functools.lru_cache(maxsize=1 << 16)
def parse_tensor_name(name: str) -> TensorName:
    """Parse ``name``, ``name:3`` or ``^name`` into a :class:`TensorName` (immutable, so
    shared: every graph index parses every input string again)."""
    if name.startswith("^"):
        return TensorName(name[1:], 0, True)
    node, sep, port = name.rpartition(":")
    if sep and port.isdigit():
        return TensorName(node, int(port))
    return TensorName(name, 0)


def node_name(name: str) -> str:
    """The node part of a tensor or control-input name."""
    return parse_tensor_name(name).node


def canonical_tensor(name: str) -> str:
    """``node`` -> ``node:0``; ``node:2`` stays.  For user-facing tensor names."""
    t = parse_tensor_name(name)
    return f"{t.node}:{t.port}"


def data_inputs(node: node_def_pb2.NodeDef) -> List[str]:
    """The node's non-control inputs, in order."""
    return [i for i in node.input if not i.startswith("^")]


def control_inputs(node: node_def_pb2.NodeDef) -> List[str]:
    return [i for i in node.input if i.startswith("^")]


# --------------------------------------------------------------------------- index
class GraphIndex:
    """Read-only index over a GraphDef: nodes by name, consumers, order.

    Build a new one after changing the graph; passes never mutate a graph they
    are indexing.
    """

    def __init__(self, graph_def: graph_pb2.GraphDef):
        self.graph_def = graph_def
        self.nodes: Dict[str, node_def_pb2.NodeDef] = {}
        for node in graph_def.node:
            self.nodes[node.name] = node
        # consumers[node_name] -> list of (consumer NodeDef, input index, TensorName)
        self._consumers: Dict[str, List[Tuple[node_def_pb2.NodeDef, int, TensorName]]] = (
            collections.defaultdict(list)
        )
        for node in graph_def.node:
            for i, inp in enumerate(node.input):
                t = parse_tensor_name(inp)
                self._consumers[t.node].append((node, i, t))
        self._loop_frames: Optional[Dict[str, Tuple[str, ...]]] = None

    def __contains__(self, name: str) -> bool:
        return name in self.nodes

    def node(self, name: str) -> node_def_pb2.NodeDef:
        """The node producing ``name`` (a node or tensor name)."""
        try:
            return self.nodes[node_name(name)]
        except KeyError:
            raise NodeNotFoundError(
                f"no node named '{node_name(name)}' in the graph",
                suggest_names(node_name(name), self.nodes),
            ) from None

    def consumers(self, name: str, include_control: bool = True):
        """(consumer, input index) pairs that read any output of node ``name``
        (control readers too unless ``include_control`` is False), or only
        output ``port`` when ``name`` is a tensor name with a port."""
        t = parse_tensor_name(name)
        one_port = ":" in name
        out = []
        for consumer, idx, ref in self._consumers.get(t.node, []):
            if ref.control and (one_port or not include_control):
                continue
            if one_port and ref.port != t.port:
                continue
            out.append((consumer, idx))
        return out

    def consumer_nodes(self, name: str) -> List[node_def_pb2.NodeDef]:
        seen, out = set(), []
        for consumer, _ in self.consumers(name):
            if consumer.name not in seen:
                seen.add(consumer.name)
                out.append(consumer)
        return out

    def input_node(self, node: node_def_pb2.NodeDef, i: int) -> node_def_pb2.NodeDef:
        """The node producing data input ``i`` of ``node``."""
        return self.node(data_inputs(node)[i])

    def to_networkx(self, back_edges: bool = True) -> nx.DiGraph:
        """Producer -> consumer edges (control edges too); without ``back_edges``, no edge
        leaves a TF1 loop's NextIteration, which leaves an acyclic graph."""
        g = nx.DiGraph()
        for name in self.nodes:
            g.add_node(name)
        for node in self.graph_def.node:
            for inp in node.input:
                src = node_name(inp)
                if src in self.nodes and (back_edges
                                          or self.nodes[src].op not in LOOP_BACK_EDGE_OPS):
                    g.add_edge(src, node.name)
        return g

    def topological_order(self) -> List[str]:
        """Node names, producers before consumers; ties broken by graph order.

        A TF1 while loop's back edges (NextIteration -> Merge) are left out: a
        NextIteration comes after the loop body computing it, its Merge before it.
        """
        names = list(self.nodes)
        position = {name: i for i, name in enumerate(names)}
        readers: List[set] = [set() for _ in names]        # by position, no duplicates
        for src, uses in self._consumers.items():
            i = position.get(src)
            if i is None or self.nodes[src].op in LOOP_BACK_EDGE_OPS:
                continue
            readers[i].update(position[consumer.name] for consumer, _, _ in uses)
        waiting = [0] * len(names)
        for out in readers:
            for j in out:
                waiting[j] += 1
        ready = [i for i, n in enumerate(waiting) if n == 0]   # sorted: a valid heap
        order = []
        while ready:   # always the ready node first in graph order (smallest topological order)
            i = heapq.heappop(ready)
            order.append(names[i])
            for j in readers[i]:
                waiting[j] -= 1
                if not waiting[j]:
                    heapq.heappush(ready, j)
        if len(order) < len(names):
            cycle = nx.find_cycle(self.to_networkx(back_edges=False))
            raise InvalidGraphError(
                "the graph has a cycle: " + " -> ".join([a for a, _ in cycle] + [cycle[0][0]])
                + " (only a TF1 while loop's NextIteration -> Merge edges may close one)",
                "the graph is corrupt; re-export it",
            )
        return order

    def loop_frames(self) -> Dict[str, Tuple[str, ...]]:
        """Every node inside a TF1 while loop -> the ``frame_name`` of each loop it is in,
        outermost first.  Nodes outside every loop are absent.

        As TensorFlow's executor assigns them: a node runs in the frame of its inputs
        (data or control: a Const in a loop body hangs on a control edge from the
        loop), an Enter opens its ``frame_name`` inside its input's frame, an Exit
        leaves its input's frame.  "Inside" is from the Enter nodes to the Exit nodes,
        both included, so each loop's own control-flow ops (Enter, Merge, Switch,
        LoopCond, NextIteration, Exit) belong to it.
        """
        if self._loop_frames is None:
            self._loop_frames = {}
            if any(n.op in LOOP_ENTER_OPS for n in self.graph_def.node):
                self._loop_frames = self._assign_frames()
        return self._loop_frames

    def _assign_frames(self) -> Dict[str, Tuple[str, ...]]:
        out_frame: Dict[str, Tuple[str, ...]] = {}   # the frames a node's outputs live in
        inside: Dict[str, Tuple[str, ...]] = {}
        for name in self.topological_order():
            node = self.nodes[name]
            frames = [out_frame.get(node_name(i), ()) for i in node.input]
            first = frames[0] if frames else ()
            if node.op in LOOP_ENTER_OPS:
                frame = first + (node.attr["frame_name"].s.decode("utf-8", "replace"),)
                out_frame[name] = inside[name] = frame
            elif node.op in LOOP_EXIT_OPS:
                out_frame[name] = first[:-1]
                if first:
                    inside[name] = first
            else:   # a NextIteration input of a Merge is not seen yet: () never wins
                frame = max(frames, key=len, default=())
                out_frame[name] = frame
                if frame:
                    inside[name] = frame
        return inside

    def inputs(self) -> List[str]:
        """Placeholder node names, in graph order."""
        return [n.name for n in self.graph_def.node if n.op in INPUT_OPS
                and not (n.op == "PlaceholderWithDefault" and n.input)]

    def inferred_outputs(self) -> List[str]:
        """Nodes nobody consumes (NoOps, Asserts, Consts and inputs excluded), in graph order."""
        return [n.name for n in self.graph_def.node
                if not self._consumers.get(n.name)
                and n.op not in ("NoOp", "Assert", "Const") and n.op not in INPUT_OPS]


def suggest_names(name: str, candidates: Iterable[str], n: int = 3) -> str:
    """A 'did you mean' line for a mistyped node name."""
    import difflib

    close = difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.5)
    if close:
        return "did you mean " + " or ".join(f"'{c}'" for c in close) + "?"
    return "run `graphquant inspect MODEL` to list the graph's inputs and outputs"


# --------------------------------------------------------------------------- consts
def const_value(node: node_def_pb2.NodeDef) -> np.ndarray:
    """The value of a Const node as a numpy array."""
    from tensorflow.python.framework import tensor_util

    return tensor_util.MakeNdarray(node.attr["value"].tensor)


def make_const(name: str, value, dtype=None) -> node_def_pb2.NodeDef:
    """A Const node holding ``value`` (numpy array or scalar)."""
    from tensorflow.python.framework import tensor_util

    value = np.asarray(value, dtype=dtype)
    node = node_def_pb2.NodeDef(name=name, op="Const")
    tensor = tensor_util.make_tensor_proto(value, dtype=value.dtype, shape=value.shape)
    node.attr["dtype"].type = tensor.dtype
    node.attr["value"].tensor.CopyFrom(tensor)
    return node


def make_node(op: str, name: str, inputs: Iterable[str] = (), **attrs) -> node_def_pb2.NodeDef:
    """A NodeDef with attributes given as Python values.

    ``T=np.float32`` or a ``types_pb2`` enum sets a type attr; lists of ints or
    strings set list attrs; bytes/str set string attrs.  Pass an
    ``attr_value_pb2.AttrValue`` to set anything else verbatim.
    """
    node = node_def_pb2.NodeDef(name=name, op=op, input=list(inputs))
    for key, value in attrs.items():
        node.attr[key].CopyFrom(attr_value(value))
    return node


def attr_value(value) -> attr_value_pb2.AttrValue:
    from tensorflow.python.framework import dtypes

    if isinstance(value, attr_value_pb2.AttrValue):
        return value
    if isinstance(value, bool):
        return attr_value_pb2.AttrValue(b=value)
    if isinstance(value, int) and not isinstance(value, bool):
        return attr_value_pb2.AttrValue(i=value)
    if isinstance(value, float):
        return attr_value_pb2.AttrValue(f=value)
    if isinstance(value, (str, bytes)):
        return attr_value_pb2.AttrValue(s=value.encode() if isinstance(value, str) else value)
    if isinstance(value, type) or isinstance(value, np.dtype) or isinstance(value, dtypes.DType):
        return attr_value_pb2.AttrValue(type=dtypes.as_dtype(value).as_datatype_enum)
    if isinstance(value, (list, tuple)):
        lst = attr_value_pb2.AttrValue.ListValue()
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            lst.i.extend(value)
        elif all(isinstance(v, float) for v in value):
            lst.f.extend(value)
        elif all(isinstance(v, (str, bytes)) for v in value):
            lst.s.extend(v.encode() if isinstance(v, str) else v for v in value)
        else:
            lst.type.extend(dtypes.as_dtype(v).as_datatype_enum for v in value)
        return attr_value_pb2.AttrValue(list=lst)
    raise TypeError(f"cannot turn {value!r} into an AttrValue")


def dtype_of(node: node_def_pb2.NodeDef, attr: str = "T") -> Optional[int]:
    """The ``types_pb2`` enum in ``attr`` (falls back to ``dtype``), or None."""
    for key in (attr, "dtype"):
        if key in node.attr and node.attr[key].type != types_pb2.DT_INVALID:
            return node.attr[key].type
    return None


def clone_graph(graph_def: graph_pb2.GraphDef) -> graph_pb2.GraphDef:
    return copy.deepcopy(graph_def)


def op_histogram(graph_def: graph_pb2.GraphDef) -> Dict[str, int]:
    """Op type -> count, most frequent first (ties by name) - deterministic."""
    counts = collections.Counter(n.op for n in graph_def.node)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
