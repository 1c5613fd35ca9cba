"""remove_unused_nodes: drop every node that no graph output depends on.

Before::                               After::

    x -> a -> out                          x -> a -> out
    x -> b (read by nothing)               (b gone)
    NoOp, Assert, orphan Const             (gone)

Graph inputs always stay, even when unread, so the graph's interface does not
change.  Outputs are ``ctx.outputs`` (inferred when the user gave none); an
output that names no node is an error, not a reason to delete the whole graph.
A TF1 while loop stays whole when any of it is needed (an Exit nobody reads
included): loops are left as they are.
"""

from __future__ import annotations

from graphquant.errors import NodeNotFoundError
from graphquant.graph import GraphIndex, node_name, suggest_names
from graphquant.pipeline import register_pass


@register_pass("remove_unused_nodes")
def remove_unused_nodes(graph_def, ctx):
    by_name = {n.name: n for n in graph_def.node}
    for tensor in ctx.outputs:
        if node_name(tensor) not in by_name:
            raise NodeNotFoundError(f"output '{tensor}' names no node in the graph",
                                    suggest_names(node_name(tensor), by_name))
    loops = {}   # outermost loop frame -> its nodes
    for name, frames in GraphIndex(graph_def).loop_frames().items():
        loops.setdefault(frames[0], []).append(name)
    frame_of = {name: frame for frame, names in loops.items() for name in names}
    keep = set()
    stack = [node_name(t) for t in ctx.outputs] + list(ctx.inputs)
    while stack:
        name = stack.pop()
        if name in keep or name not in by_name:
            continue
        keep.add(name)
        stack.extend(node_name(i) for i in by_name[name].input)
        stack.extend(loops.pop(frame_of.get(name), ()))
    out = type(graph_def)()
    out.versions.CopyFrom(graph_def.versions)
    out.library.CopyFrom(graph_def.library)
    out.node.extend(n for n in graph_def.node if n.name in keep)
    return out
