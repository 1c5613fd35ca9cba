"""Declarative op-type patterns and the one match-and-rewrite driver every pass uses.

A pattern is a literal tree of op types, written the way the subgraph is drawn::

    # Relu(BiasAdd(Conv2D(x, w:Const), b:Const))
    OpTypePattern("Relu", name="relu", inputs=[
        OpTypePattern("BiasAdd", name="bias_add", inputs=[
            OpTypePattern("Conv2D|DepthwiseConv2dNative", name="conv", inputs=[
                OpTypePattern("*", name="x"),
                OpTypePattern("Const", name="weights")]),
            OpTypePattern("Const", name="bias")])])

``op`` is an op type, ``A|B`` for alternatives or ``*`` for anything.  ``inputs``
(when given) must match the node's data inputs one for one; ``commutative``
also tries two inputs swapped; ``where`` is an extra predicate on the node;
``keep=True`` constrains a node (and what is under it) without making it part
of what the rewrite replaces, like a wildcard.
A ``name`` used twice must bind the same node both times (diamonds).

:func:`rewrite` finds matches, asks a callback for the replacement, and applies
them.  It alone decides whether a rewrite is safe: a matched node other than
the root that is read outside the match (or is a graph output) vetoes the match,
except a Const, which is then kept for its other readers.  Matched nodes that
the replacement still reads are kept too.  Wildcard (``*``) nodes are the
match's boundary and are never removed.  Nothing inside a TF1 while loop
(:meth:`GraphIndex.loop_frames`) is ever rewritten: a match with a matched node
there is vetoed, so every pass built on :func:`rewrite` leaves the loop as it
was, in fp32 (new nodes outside the loop's frame could not feed it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

from tensorflow.core.framework import graph_pb2, node_def_pb2

from graphquant.graph import GraphIndex, data_inputs, parse_tensor_name

NodeDef = node_def_pb2.NodeDef


@dataclass(frozen=True)
class OpTypePattern:
    op: str = "*"
    name: Optional[str] = None
    inputs: Optional[Sequence["OpTypePattern"]] = None
    where: Optional[Callable[[NodeDef], bool]] = None
    commutative: bool = False
    keep: bool = False  # matched and constrained, but left in place like a wildcard

    def __post_init__(self):
        if self.inputs is not None:
            object.__setattr__(self, "inputs", tuple(self.inputs))

    @property
    def is_wildcard(self) -> bool:
        return self.op == "*"

    def accepts(self, node: NodeDef) -> bool:
        if not self.is_wildcard and node.op not in self.op.split("|"):
            return False
        return self.where is None or bool(self.where(node))


def Const(name: Optional[str] = None, where=None) -> OpTypePattern:  # noqa: N802 - reads as data
    """A Const node (kept when something outside the match also reads it)."""
    return OpTypePattern("Const", name=name, where=where)


def Any(name: Optional[str] = None) -> OpTypePattern:  # noqa: N802
    """Any tensor; the boundary of a match, never removed."""
    return OpTypePattern("*", name=name)


@dataclass
class Match:
    """A successful match: nodes and the tensors that fed them, by pattern name."""

    root: NodeDef
    nodes: Dict[str, NodeDef] = field(default_factory=dict)
    tensors: Dict[str, str] = field(default_factory=dict)  # name -> input string as read
    matched: List[NodeDef] = field(default_factory=list)   # non-wildcard nodes, root first
    boundary: Set[str] = field(default_factory=set)        # node names matched by '*'

    def __getitem__(self, name: str) -> NodeDef:
        return self.nodes[name]

    def __contains__(self, name: str) -> bool:
        return name in self.nodes

    def tensor(self, name: str) -> str:
        """The tensor (``node`` or ``node:port``) through which pattern ``name`` was reached."""
        return self.tensors.get(name, self.nodes[name].name)

    def copy(self) -> "Match":
        return Match(self.root, dict(self.nodes), dict(self.tensors), list(self.matched),
                     set(self.boundary))


def match_at(index: GraphIndex, node: NodeDef, pattern: OpTypePattern) -> Optional[Match]:
    """Match ``pattern`` with ``node`` as its root, or None."""
    return _match(index, node, node.name, pattern, Match(root=node))


def _match(index: GraphIndex, node: NodeDef, via: str, pattern: OpTypePattern,
           m: Match, kept: bool = False) -> Optional[Match]:
    if not pattern.accepts(node):
        return None
    if pattern.name is not None:
        bound = m.nodes.get(pattern.name)
        if bound is not None:
            return m if bound.name == node.name else None
        m.nodes[pattern.name] = node
        m.tensors[pattern.name] = via
    if pattern.is_wildcard:
        m.boundary.add(node.name)
        return m
    if parse_tensor_name(via).port != 0 and node is not m.root:
        return None  # an op pattern matches the node's first output only
    kept = kept or pattern.keep
    if kept:
        m.boundary.add(node.name)
    else:
        m.matched.append(node)
    if pattern.inputs is None:
        return m
    ins = data_inputs(node)
    if len(ins) != len(pattern.inputs):
        return None
    orders = [tuple(range(len(ins)))]
    if pattern.commutative and len(ins) == 2:
        orders.append((1, 0))
    for order in orders:
        trial = m.copy()
        for sub, i in zip(pattern.inputs, order):
            producer = index.nodes.get(parse_tensor_name(ins[i]).node)
            if producer is None:
                trial = None
                break
            trial = _match(index, producer, ins[i], sub, trial, kept)
            if trial is None:
                break
        if trial is not None:
            return trial
    return None


@dataclass
class Replacement:
    """What a rewrite callback returns.

    ``nodes`` replace the match's non-wildcard nodes; ``forward`` maps tensor
    names that disappear to the tensors their readers should read instead.
    Give a new node the root's name to keep its readers wired without a forward.
    """

    nodes: List[NodeDef] = field(default_factory=list)
    forward: Dict[str, str] = field(default_factory=dict)


class RewriteContext:
    """Handed to rewrite callbacks: the index of the graph being matched and fresh names."""

    def __init__(self, index: GraphIndex, protected: Iterable[str] = ()):
        self.index = index
        self.protected = set(protected)
        self._taken: Set[str] = set(index.nodes)

    def ancestors(self, name: str) -> Set[str]:
        """Names of every node ``name`` depends on (computed once per sweep)."""
        import networkx as nx

        if not hasattr(self, "_nx"):
            self._nx = self.index.to_networkx()
        return nx.ancestors(self._nx, name)

    def fresh_name(self, base: str) -> str:
        """``base`` if unused, else ``base_1``, ``base_2``... (never reused in this run)."""
        name, i = base, 0
        while name in self._taken:
            i += 1
            name = f"{base}_{i}"
        self._taken.add(name)
        return name


Callback = Callable[[Match, RewriteContext], Optional[Replacement]]


def rewrite(graph_def: graph_pb2.GraphDef, pattern: OpTypePattern, callback: Callback,
            protected: Iterable[str] = (), max_sweeps: int = 100) -> Tuple[graph_pb2.GraphDef, int]:
    """Apply ``callback`` to every match of ``pattern`` until none is left.

    Returns the new graph and the number of rewrites.  ``protected`` are node
    names that must keep existing under their name (graph inputs and outputs).
    """
    total = 0
    for _ in range(max_sweeps):
        graph_def, count = _sweep(graph_def, pattern, callback, set(protected))
        total += count
        if count == 0:
            return graph_def, total
    raise RuntimeError(f"pattern rooted at {pattern.op} still matched after {max_sweeps} sweeps")


def _sweep(graph_def, pattern, callback, protected) -> Tuple[graph_pb2.GraphDef, int]:
    index = GraphIndex(graph_def)
    ctx = RewriteContext(index, protected)
    claimed: Set[str] = set()
    removed: Set[str] = set()
    inserted: Dict[str, List[NodeDef]] = {}  # root name -> new nodes, placed where it was
    forward: Dict[str, str] = {}
    count = 0
    in_loop = index.loop_frames()
    for name in reversed(index.topological_order()):
        node = index.nodes[name]
        if name in claimed or name in in_loop or not pattern.accepts(node):
            continue
        m = match_at(index, node, pattern)
        if m is None or any(n.name in claimed or n.name in in_loop for n in m.matched):
            continue
        removable = _removable_nodes(index, m, protected)
        if removable is None:
            continue
        replacement = callback(m, ctx)
        if replacement is None:
            continue
        new_names = {n.name for n in replacement.nodes}
        if name in protected and name not in new_names:
            continue  # a graph input/output must keep its name
        clash = new_names & (set(index.nodes) - removable)
        if clash:
            raise RuntimeError(f"rewrite at '{name}' creates names already in use: {sorted(clash)}")
        still_read = {parse_tensor_name(i).node for n in replacement.nodes for i in n.input}
        claimed.update(n.name for n in m.matched)
        removed |= removable - (still_read - new_names)
        inserted[name] = list(replacement.nodes)
        forward.update(replacement.forward)
        count += 1
    if count == 0:
        return graph_def, 0
    out = graph_pb2.GraphDef()
    out.versions.CopyFrom(graph_def.versions)
    out.library.CopyFrom(graph_def.library)
    for node in graph_def.node:
        for new in inserted.get(node.name, ()):
            out.node.add().CopyFrom(new)
        if node.name not in removed:
            out.node.add().CopyFrom(node)
    if forward:
        _apply_forwards(out, forward)
    return out, count


def _removable_nodes(index: GraphIndex, m: Match, protected: Set[str]) -> Optional[Set[str]]:
    """Names the rewrite may delete, or None when a matched node is needed elsewhere."""
    inside = {n.name for n in m.matched}
    removable = set()
    for node in m.matched:
        if node is m.root:
            removable.add(node.name)
            continue
        outside = any(c.name not in inside for c in index.consumer_nodes(node.name))
        if outside or node.name in protected:
            if node.op == "Const":
                continue  # shared constant: keep it for its other readers
            return None
        removable.add(node.name)
    return removable


def _resolve(name: str, forward: Dict[str, str]) -> str:
    seen = set()
    while True:
        t = parse_tensor_name(name)
        key = f"{t.node}:{t.port}"
        target = forward.get(key) or (forward.get(t.node) if t.port == 0 else None)
        if target is None or key in seen:
            return str(t)
        seen.add(key)
        name = target


def _apply_forwards(graph_def: graph_pb2.GraphDef, forward: Dict[str, str]) -> None:
    forward = {f"{parse_tensor_name(k).node}:{parse_tensor_name(k).port}": v
               for k, v in forward.items()}
    forwarded_nodes = {k.split(":")[0] for k in forward}
    for node in graph_def.node:
        new_inputs, seen_ctrl = [], set()
        for inp in node.input:
            t = parse_tensor_name(inp)
            if t.control:
                if t.node in forwarded_nodes:
                    target = parse_tensor_name(_resolve(f"{t.node}:0", forward)).node
                    inp = "^" + target
                if inp in seen_ctrl:
                    continue
                seen_ctrl.add(inp)
                new_inputs.append(inp)
            else:
                new_inputs.append(_resolve(inp, forward))
        del node.input[:]
        node.input.extend(new_inputs)
