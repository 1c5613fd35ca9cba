"""strip_debug_ops: remove Identity, CheckNumerics, StopGradient, Snapshot and control edges.

Before::                              After::

    x -> Identity -> y                    x -> y
    x -> CheckNumerics -> y               x -> y
    c:Const --(^NoOp)--> ...              c:Const      (control edges dropped)

A frozen inference graph holds no state (variables are rejected when it is
loaded), so control edges only order side-effect-free work: they are dropped,
which leaves NoOps and Asserts unread for ``remove_unused_nodes``.  Colocation
hints (``_class: loc:@node``) go too: they name nodes that this and later
passes remove, and TensorFlow refuses to load a graph whose hint names a
missing node.  A TF1 while loop is left as it is (:func:`graphquant.pattern.rewrite`
never matches there): its Consts hang on control edges from the loop to run in
its frame, and its hints name only its own nodes, which no pass removes.

A graph output that is an Identity keeps its name: its producer is renamed to
it (``Softmax -> Identity`` becomes a Softmax named ``Identity``, its other
readers rewired) unless the producer is itself a graph input or output, a TF1
while loop's Exit, or the Identity reads a second output (``x:1``); then the
Identity stays.

With ``options['placeholder_with_default_to_placeholder']`` a
PlaceholderWithDefault becomes a plain Placeholder (its default is dropped).
"""

from __future__ import annotations

from graphquant.graph import GraphIndex, make_node, node_name, parse_tensor_name
from graphquant.pattern import Any, OpTypePattern, Replacement, rewrite
from graphquant.pipeline import register_pass

PASS_THROUGH_OPS = ("Identity", "CheckNumerics", "StopGradient", "Snapshot", "PreventGradient")

# op(x) -> x
PASS_THROUGH = OpTypePattern("|".join(PASS_THROUGH_OPS), name="op", inputs=[Any("x")])


def _bypass(match, ctx):
    return Replacement(nodes=[], forward={match["op"].name: match.tensor("x")})


def _drop_control_edges(graph_def):
    in_loop = GraphIndex(graph_def).loop_frames()
    out = type(graph_def)()
    out.CopyFrom(graph_def)
    for node in out.node:
        keep = [i for i in node.input if not i.startswith("^")]
        hints = node.attr["_class"].list.s if "_class" in node.attr else []
        if node.name in in_loop and all(
                not c.startswith(b"loc:@") or c[5:].decode("utf-8", "replace") in in_loop
                for c in hints):
            continue   # a TF1 while loop's node, colocated with nothing outside it
        if len(keep) != len(node.input) and node.name not in in_loop:
            del node.input[:]
            node.input.extend(keep)
        if "_class" in node.attr:
            del node.attr["_class"]
    return out


def _rename_output_producers(graph_def, ctx):
    """Output Identity(x) -> x renamed to the Identity's name."""
    index = GraphIndex(graph_def)
    renames = {}
    for out in ctx.outputs:
        name = node_name(out)
        node = index.nodes.get(name)
        if node is None or node.op not in PASS_THROUGH_OPS or len(node.input) != 1:
            continue
        src = parse_tensor_name(node.input[0])
        producer = index.nodes.get(src.node)
        if (producer is None or src.port != 0 or src.node in ctx.protected or src.node in renames
                or src.node in index.loop_frames()):   # a loop's Exit keeps its name
            continue
        renames[src.node] = name
    if not renames:
        return graph_def
    out = type(graph_def)()
    out.CopyFrom(graph_def)
    del out.node[:]
    for node in graph_def.node:
        if node.name in renames.values():
            continue  # the output Identity: its producer takes its name
        new = out.node.add()
        new.CopyFrom(node)
        new.name = renames.get(node.name, node.name)
        for i, inp in enumerate(new.input):
            t = parse_tensor_name(inp)
            if t.node in renames:
                new.input[i] = str(type(t)(renames[t.node], t.port, t.control))
    return out


def _placeholder_with_default_to_placeholder(graph_def):
    out = type(graph_def)()
    out.CopyFrom(graph_def)
    for node in out.node:
        if node.op == "PlaceholderWithDefault":
            node.CopyFrom(make_node("Placeholder", node.name, dtype=node.attr["dtype"],
                                    shape=node.attr["shape"]))
    return out


@register_pass("strip_debug_ops")
def strip_debug_ops(graph_def, ctx):
    graph_def = _drop_control_edges(graph_def)
    graph_def, _ = rewrite(graph_def, PASS_THROUGH, _bypass, protected=ctx.protected)
    graph_def = _rename_output_producers(graph_def, ctx)
    if ctx.options.get("placeholder_with_default_to_placeholder"):
        graph_def = _placeholder_with_default_to_placeholder(graph_def)
    return graph_def
