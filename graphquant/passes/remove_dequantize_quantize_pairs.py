"""remove_dequantize_quantize_pairs: join int8 islands; no fp32 round trip inside a chain.

Before::

    int8 op A ─► Dequantize(q, lo, hi) ─► QuantizeV2(lo', hi') ─► int8 op B
                                    └──► fp32 reader (optional)

After (when both describe the same integers: same type, same scale)::

    int8 op A ─► int8 op B         (B's min/max inputs read lo, hi)
          └──► Dequantize ─► fp32 reader       (kept only if something reads it)

The Dequantize is matched with ``keep=True``: it stays for its fp32 readers and
``remove_unused_nodes`` drops it when none is left.  Ranges are compared as the
kernels read them: the scale ``max(|lo|, |hi|)`` per type.
"""

from __future__ import annotations

import numpy as np

from graphquant.graph import const_value
from graphquant.pattern import Any, Const, OpTypePattern, Replacement, rewrite
from graphquant.pipeline import register_pass

# QuantizeV2(Dequantize(q, lo:Const, hi:Const), qlo:Const, qhi:Const)
PAIR = OpTypePattern("QuantizeV2", name="quantize", inputs=[
    OpTypePattern("Dequantize", name="dequantize", keep=True,
                  inputs=[Any("q"), Const("lo"), Const("hi")]),
    Const("qlo"), Const("qhi")])


def _scale(lo_node, hi_node) -> float:
    return float(max(abs(float(const_value(lo_node))), abs(float(const_value(hi_node)))))


def _same_integers(match) -> bool:
    dq, q = match["dequantize"], match["quantize"]
    if dq.attr["T"].type != q.attr["T"].type or dq.attr["mode"].s != q.attr["mode"].s:
        return False
    if dq.attr["narrow_range"].b != q.attr["narrow_range"].b:
        return False
    a, b = _scale(match["lo"], match["hi"]), _scale(match["qlo"], match["qhi"])
    return bool(np.isclose(a, b, rtol=1e-6, atol=0.0))


def _bypass(match, rctx):
    if not _same_integers(match):
        return None
    q = match["quantize"].name
    return Replacement(forward={f"{q}:0": match.tensor("q"), f"{q}:1": match["lo"].name,
                                f"{q}:2": match["hi"].name})


@register_pass("remove_dequantize_quantize_pairs")
def remove_dequantize_quantize_pairs(graph_def, ctx):
    graph_def, _ = rewrite(graph_def, PAIR, _bypass, protected=ctx.protected)
    return graph_def
