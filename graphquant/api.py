"""The library calls behind the CLI: what ``graphquant optimize`` does, as a function.

    from graphquant import api
    graph_def, ctx = api.optimize("model.pb", outputs=["logits:0"])

Every function takes a GraphDef or a path, checks the user's input and output
names against the graph (a mistyped name is a :class:`NodeNotFoundError` with
the closest names), and runs a pipeline from :mod:`graphquant.pipeline` by name.
"""

from __future__ import annotations

import os
from typing import Callable, List, Optional, Sequence, Tuple, Union

from tensorflow.core.framework import graph_pb2

from graphquant.errors import GraphQuantError, NodeNotFoundError
from graphquant.graph import GraphIndex, canonical_tensor, parse_tensor_name, suggest_names
from graphquant.graph_io import load_graph_def, validate_graph_def
from graphquant.pipeline import CLEANUP_PIPELINE, PassContext, get_pass, run_pipeline

GraphLike = Union[graph_pb2.GraphDef, str, "os.PathLike[str]"]


def as_graph_def(graph: GraphLike) -> graph_pb2.GraphDef:
    """``graph`` itself when it is a GraphDef (validated: a library user's graph gets the
    same clear errors as a file), else the validated graph loaded from that path."""
    if isinstance(graph, graph_pb2.GraphDef):
        validate_graph_def(graph)
        return graph
    if isinstance(graph, (str, os.PathLike)):
        return load_graph_def(graph)
    raise GraphQuantError(f"expected a GraphDef or a path, got {type(graph).__name__}",
                          "pass a tf.compat.v1.GraphDef or the path of a frozen .pb/.pbtxt file")


def split_names(names: Union[None, str, Sequence[str]]) -> List[str]:
    """``"a,b"`` or ``["a", "b"]`` -> ``["a", "b"]``; None -> ``[]``."""
    if names is None:
        return []
    if isinstance(names, str):
        names = names.split(",")
    return [n.strip() for n in names if n and n.strip()]


def check_interface(graph_def: graph_pb2.GraphDef, inputs: Sequence[str] = (),
                    outputs: Sequence[str] = ()) -> Tuple[List[str], List[str]]:
    """Validate user-given input and output names; return them as (node names, tensor names).

    Raises :class:`NodeNotFoundError` naming the closest existing names.
    """
    from tensorflow.python.framework import op_def_registry

    index = GraphIndex(graph_def)
    checked_inputs, checked_outputs = [], []
    for kind, names, out in (("input", inputs, checked_inputs),
                             ("output", outputs, checked_outputs)):
        for name in names:
            t = parse_tensor_name(name)
            if t.control or not t.node:
                raise NodeNotFoundError(f"'{name}' is not a tensor name",
                                        "give names like 'input' or 'logits:0'")
            if t.node not in index:
                hint = suggest_names(t.node, index.nodes)
                raise NodeNotFoundError(
                    f"the graph has no node named '{t.node}' (given as {kind} '{name}')",
                    hint + _interface_hint(index, kind))
            node = index.nodes[t.node]
            op_def = op_def_registry.get(node.op)
            fixed = op_def is not None and all(
                not (a.number_attr or a.type_list_attr) for a in op_def.output_arg)
            if fixed and t.port >= len(op_def.output_arg):
                raise NodeNotFoundError(
                    f"node '{t.node}' ({node.op}) has {len(op_def.output_arg)} output(s); "
                    f"there is no tensor '{t.node}:{t.port}'",
                    f"use '{t.node}:0'")
            out.append(t.node if kind == "input" else canonical_tensor(name))
    return checked_inputs, checked_outputs


def _interface_hint(index: GraphIndex, kind: str) -> str:
    names = index.inputs() if kind == "input" else index.inferred_outputs()
    if not names:
        return ""
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    return f" (the graph's {kind}s: {shown})"


def make_context(graph_def: graph_pb2.GraphDef, inputs=None, outputs=None, debug: bool = False,
                 **options) -> PassContext:
    """A PassContext for ``graph_def`` with checked names (inferred where not given)."""
    ins, outs = check_interface(graph_def, split_names(inputs), split_names(outputs))
    ctx = PassContext.for_graph(graph_def, ins or None, outs or None, **options)
    ctx.debug = debug
    return ctx


def optimize(graph: GraphLike, inputs=None, outputs=None,
             passes: Optional[Sequence[str]] = None, debug: bool = False,
             progress: Optional[Callable[[str], None]] = None,
             **options) -> Tuple[graph_pb2.GraphDef, PassContext]:
    """Run the fp32 clean-up pipeline on ``graph`` (a GraphDef or a path).

    ``inputs`` are node names and ``outputs`` tensor names (``"logits:0"``),
    as lists or comma-separated strings; inferred from the graph when not given.
    ``passes`` defaults to :data:`graphquant.pipeline.CLEANUP_PIPELINE`;
    ``debug`` validates the graph after every pass; ``options`` go to the
    passes through ``ctx.options``.  Returns the new GraphDef and the context,
    whose ``notes`` say what the passes decided not to do and why.
    """
    graph_def = as_graph_def(graph)
    ctx = make_context(graph_def, inputs, outputs, debug=debug, **options)
    pass_names = list(CLEANUP_PIPELINE if passes is None else passes)
    for name in pass_names:
        get_pass(name)  # an unknown name fails before any pass runs
    result = run_pipeline(graph_def, pass_names, ctx, progress=progress)
    return result, ctx

