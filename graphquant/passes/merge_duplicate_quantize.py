"""merge_duplicate_quantize: one QuantizeV2 per (tensor, type, scale).

Before::                                   After::

    x ─► QuantizeV2(lo, hi) ─► conv A          x ─► QuantizeV2(lo, hi) ─► conv A
    x ─► QuantizeV2(lo, hi) ─► conv B                              └──► conv B

Each int8 island quantizes its own inputs, so a tensor read by several islands
(a graph input feeding three Inception branches) is quantized several times.
Identical ones -- same input, attributes and scale -- are merged into the one
that comes first in the graph.
"""

from __future__ import annotations

from graphquant.graph import GraphIndex, const_value
from graphquant.pattern import Any, Const, OpTypePattern, Replacement, match_at, rewrite
from graphquant.pipeline import register_pass

# QuantizeV2(x, lo:Const, hi:Const)
QUANTIZE = OpTypePattern("QuantizeV2", name="quantize",
                         inputs=[Any("x"), Const("lo"), Const("hi")])


def _key(match):
    q = match["quantize"]
    scale = max(abs(float(const_value(match["lo"]))), abs(float(const_value(match["hi"]))))
    attrs = tuple(sorted((k, v.SerializeToString(deterministic=True)) for k, v in q.attr.items()))
    return match.tensor("x"), attrs, scale, float(const_value(match["lo"])) < 0


@register_pass("merge_duplicate_quantize")
def merge_duplicate_quantize(graph_def, ctx):
    index = GraphIndex(graph_def)
    first = {}  # key -> name of the earliest QuantizeV2 in graph order
    for node in graph_def.node:
        m = match_at(index, node, QUANTIZE) if node.op == "QuantizeV2" else None
        if m is not None:
            first.setdefault(_key(m), node.name)

    def merge(match, rctx):
        q, keep = match["quantize"].name, first.get(_key(match))
        if keep is None or keep == q or keep not in rctx.index.nodes:
            return None
        return Replacement(forward={f"{q}:0": keep, f"{q}:1": f"{keep}:1", f"{q}:2": f"{keep}:2"})

    graph_def, _ = rewrite(graph_def, QUANTIZE, merge, protected=ctx.protected)
    return graph_def
