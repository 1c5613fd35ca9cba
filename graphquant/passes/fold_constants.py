"""fold_constants: evaluate every subgraph fed only by constants, keep the results as Consts.

Before::                                      After::

    w:Const -> Transpose -> Mul -> Conv2D         Mul:Const ---------> Conv2D
    perm:Const -^          ^          ^           (w, perm, s, Transpose gone)
    s:Const ---------------'          x           x ------------------^

    x (static shape) -> Shape -> StridedSlice -> Reshape(y, .)
                                              StridedSlice:Const -> Reshape(y, .)

A node folds when it is stateless and everything it reads (data and control)
is a Const or folds too; ``Shape``/``Size``/``Rank`` also fold when their
input's static shape is fully known, whatever computes that input.  Only the
folding nodes that something else still reads ("targets") are evaluated -- by
TensorFlow itself, all in one session run over a graph holding just the nodes
they need -- and each becomes a Const under its own name, so readers stay
wired.  A target read on another output (``node:1``) gets one Const per read
port; the extra ones are named ``node/port_N``.

Not folded: graph inputs and outputs (``ctx.protected``: an output named by the
user keeps its op, even ``Identity`` of a Const), Consts themselves, stateful or
control-flow ops and function calls, anything inside a TF1 while loop (a Const
made there would live outside the loop's frame), resource/variant outputs,
results bigger than ``ctx.options['fold_constants_max_bytes']`` (default 16 MiB
per tensor) and anything TensorFlow fails to evaluate; the last two are noted in
``ctx.notes`` and their constant inputs fold instead.
"""

from __future__ import annotations

from typing import Dict, List, Set, Tuple

import numpy as np
from tensorflow.core.framework import graph_pb2, types_pb2

from graphquant.errors import GraphQuantError
from graphquant.graph import GraphIndex, node_name, parse_tensor_name
from graphquant.pipeline import register_pass

PASS = "fold_constants"
DEFAULT_MAX_BYTES = 16 << 20
NEVER_FOLD = frozenset({
    "Const", "Placeholder", "PlaceholderWithDefault", "NoOp", "Assert", "Print", "PrintV2",
    "Switch", "RefSwitch", "Merge", "RefMerge", "Enter", "RefEnter", "Exit", "RefExit",
    "NextIteration", "RefNextIteration", "LoopCond", "ControlTrigger",
    "PartitionedCall", "StatefulPartitionedCall", "If", "StatelessIf", "While",
    "StatelessWhile", "Case", "StatelessCase", "_Arg", "_Retval",
})
STATIC_SHAPE_OPS = ("Shape", "Size", "Rank")
_UNFOLDABLE_TYPES = frozenset({types_pb2.DT_RESOURCE, types_pb2.DT_VARIANT})


@register_pass(PASS)
def fold_constants(graph_def, ctx):
    index = GraphIndex(graph_def)
    order = index.topological_order()
    max_bytes = int(ctx.options.get("fold_constants_max_bytes", DEFAULT_MAX_BYTES))
    excluded = set(ctx.protected) | set(index.loop_frames())
    static = _static_shape_values(graph_def, index, excluded)
    values: Dict[str, Tuple[np.ndarray, int]] = {}  # "node:port" -> (value, DataType enum)
    while True:
        foldable = _foldable_nodes(index, order, excluded, static)
        targets = _targets(index, foldable)
        todo = [t for n in targets for t in _port_names(n, targets[n]) if t not in values]
        newly_excluded = _evaluate(graph_def, index, foldable, static, todo, values, ctx)
        for tensor, (value, _) in values.items():
            name = node_name(tensor)
            if value.nbytes > max_bytes and name in targets and name not in excluded:
                ctx.note(PASS, name, f"not folded: its value would take {value.nbytes} bytes, "
                         f"more than fold_constants_max_bytes={max_bytes}")
                newly_excluded.add(name)
        if not newly_excluded:
            return _replace(graph_def, index, foldable, targets, values, ctx.protected)
        excluded |= newly_excluded


# ------------------------------------------------------------------ what folds
def _foldable_nodes(index: GraphIndex, order: List[str], excluded: Set[str],
                    static: Dict[str, Tuple[np.ndarray, int]]) -> Set[str]:
    """Non-Const nodes whose value does not depend on any graph input."""
    foldable: Set[str] = set()
    for name in order:
        node = index.nodes[name]
        if name in excluded:
            continue
        if name in static:
            foldable.add(name)
            continue
        if node.op in NEVER_FOLD or not _stateless_with_plain_outputs(node):
            continue
        if all(_is_constant(index, node_name(i), foldable) for i in node.input):
            foldable.add(name)
    return foldable


def _is_constant(index: GraphIndex, name: str, foldable: Set[str]) -> bool:
    node = index.nodes.get(name)
    return node is not None and (node.op == "Const" or name in foldable)


def _stateless_with_plain_outputs(node) -> bool:
    from tensorflow.python.framework import op_def_registry

    op_def = op_def_registry.get(node.op)
    if op_def is None or op_def.is_stateful or not op_def.output_arg:
        return False
    for arg in op_def.output_arg:
        types = [arg.type]
        if arg.type_attr and arg.type_attr in node.attr:
            types.append(node.attr[arg.type_attr].type)
        if arg.type_list_attr and arg.type_list_attr in node.attr:
            types.extend(node.attr[arg.type_list_attr].list.type)
        if _UNFOLDABLE_TYPES.intersection(types):
            return False
    return True


def _targets(index: GraphIndex, foldable: Set[str]) -> Dict[str, List[int]]:
    """Folding nodes read by a node that stays -> the output ports it reads, sorted."""
    targets: Dict[str, Set[int]] = {}
    for name in foldable:
        for consumer, i in index.consumers(name):
            if consumer.name in foldable:
                continue
            ref = parse_tensor_name(consumer.input[i])
            targets.setdefault(name, set()).add(0 if ref.control else ref.port)
    return {name: sorted(ports) for name, ports in sorted(targets.items())}


def _port_names(name: str, ports: List[int]) -> List[str]:
    return [f"{name}:{p}" for p in ports]


def _static_shape_values(graph_def, index: GraphIndex, excluded: Set[str]):
    """Shape/Size/Rank nodes whose input has a fully known static shape -> (value, dtype)."""
    candidates = [n for n in graph_def.node if n.op in STATIC_SHAPE_OPS and n.name not in excluded
                  and len(n.input) >= 1 and parse_tensor_name(n.input[0]).port == 0]
    if not candidates:
        return {}
    from graphquant.execute import tensor_shapes

    try:
        shapes = tensor_shapes(graph_def)
    except (ValueError, TypeError, GraphQuantError):
        return {}  # TensorFlow cannot import the graph: no static shapes, nothing folds here
    values = {}
    for node in candidates:
        shape = shapes.get(node_name(node.input[0]))
        if shape is None or any(d is None for d in shape):
            continue
        dtype = node.attr["out_type"].type if "out_type" in node.attr else types_pb2.DT_INT32
        value = {"Shape": shape, "Size": int(np.prod(shape, dtype=np.int64)),
                 "Rank": len(shape)}[node.op]
        if node.op == "Rank":
            dtype = types_pb2.DT_INT32
        values[node.name] = (np.asarray(value, _numpy_dtype(dtype)), dtype)
    return values


def _numpy_dtype(dtype: int):
    from tensorflow.python.framework import dtypes

    return dtypes.as_dtype(dtype).as_numpy_dtype


# ------------------------------------------------------------------ evaluation
def _evaluate(graph_def, index, foldable, static, todo, values, ctx) -> Set[str]:
    """Fill ``values`` for the ``todo`` tensors; return the nodes that could not be evaluated."""
    for tensor in [t for t in todo if node_name(t) in static]:
        values[tensor] = static[node_name(tensor)]
    todo = [t for t in todo if node_name(t) not in static]
    if not todo:
        return set()
    from graphquant.execute import GraphRunner

    sub = _subgraph(graph_def, index, foldable, static, todo)
    try:
        with GraphRunner(sub, todo) as runner:
            results = runner({})
            dtypes = [runner.graph.get_tensor_by_name(t).dtype.as_datatype_enum
                      for t in runner.fetches]
    except GraphQuantError as exc:
        if len(todo) > 1:  # find the culprit(s); the others still fold
            failed: Set[str] = set()
            for tensor in todo:
                failed |= _evaluate(graph_def, index, foldable, static, [tensor], values, ctx)
            return failed
        name = node_name(todo[0])
        ctx.note(PASS, name, f"not folded: TensorFlow could not evaluate it ({exc.problem})")
        return {name}
    for tensor, value, dtype in zip(todo, results, dtypes):
        values[tensor] = (np.asarray(value), dtype)
    return set()


def _subgraph(graph_def, index, foldable, static, todo) -> graph_pb2.GraphDef:
    """Just the nodes the ``todo`` tensors need, static-shape nodes as Consts."""
    needed: Set[str] = set()
    stack = [node_name(t) for t in todo]
    while stack:
        name = stack.pop()
        if name in needed:
            continue
        needed.add(name)
        if name not in static:
            stack.extend(node_name(i) for i in index.nodes[name].input)
    sub = graph_pb2.GraphDef()
    sub.versions.CopyFrom(graph_def.versions)
    sub.library.CopyFrom(graph_def.library)
    for node in graph_def.node:
        if node.name not in needed:
            continue
        if node.name in static:
            sub.node.append(_const_node(node.name, *static[node.name]))
            continue
        new = sub.node.add()
        new.CopyFrom(node)
        new.attr.pop("_class", None)  # colocation with nodes left out of the subgraph
    return sub


def _const_node(name: str, value: np.ndarray, dtype: int):
    from tensorflow.core.framework import node_def_pb2
    from tensorflow.python.framework import tensor_util

    node = node_def_pb2.NodeDef(name=name, op="Const")
    node.attr["dtype"].type = dtype
    node.attr["value"].tensor.CopyFrom(
        tensor_util.make_tensor_proto(value, dtype=dtype, shape=value.shape))
    return node


# ------------------------------------------------------------------ replacement
def _replace(graph_def, index, foldable, targets, values, protected) -> graph_pb2.GraphDef:
    """Targets become Consts; folded nodes and Consts nobody reads any more go."""
    taken = set(index.nodes)
    new_consts: Dict[str, list] = {}   # target -> Const nodes, in port order
    rename: Dict[str, str] = {}        # "node:port" -> Const name, for ports > 0
    for name, ports in targets.items():
        consts = []
        for port in ports:
            const_name = name if port == 0 else _fresh(f"{name}/port_{port}", taken)
            consts.append(_const_node(const_name, *values[f"{name}:{port}"]))
            if port:
                rename[f"{name}:{port}"] = const_name
        new_consts[name] = consts
    out = graph_pb2.GraphDef()
    out.versions.CopyFrom(graph_def.versions)
    out.library.CopyFrom(graph_def.library)
    for node in graph_def.node:
        if node.name in new_consts:
            out.node.extend(new_consts[node.name])
        elif node.name in foldable or _only_feeds(index, node, foldable, protected):
            continue
        else:
            new = out.node.add()
            new.CopyFrom(node)
            _rewire(new, rename)
    return out


def _only_feeds(index, node, foldable, protected) -> bool:
    """A Const whose every reader folds away."""
    if node.op != "Const" or node.name in protected:
        return False
    readers = index.consumer_nodes(node.name)
    return bool(readers) and all(r.name in foldable for r in readers)


def _rewire(node, rename: Dict[str, str]) -> None:
    """Readers of ``target:N`` (N > 0) read that port's own Const."""
    for i, inp in enumerate(node.input):
        ref = parse_tensor_name(inp)
        if not ref.control and ref.port and f"{ref.node}:{ref.port}" in rename:
            node.input[i] = rename[f"{ref.node}:{ref.port}"]


def _fresh(base: str, taken: Set[str]) -> str:
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name
