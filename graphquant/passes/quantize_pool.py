"""quantize_pool: MaxPool / AvgPool between int8 neighbours -> QuantizedMaxPool / QuantizedAvgPool.

Before::

    … ─► Dequantize ─► MaxPool ─► y                (an int8 op feeds the pool)

After::

    … ─► Dequantize ─► QuantizeV2 ─► QuantizedMaxPool ─► Dequantize (named y)

``remove_dequantize_quantize_pairs`` then removes the Dequantize→QuantizeV2
round trips on both sides.  The pools pass the range through, so the planned
ranges of input and output are the same (:mod:`graphquant.ranges`).  A pool is
rewritten only when an int8 op feeds it or every reader of its output is an
int8 island's QuantizeV2: a pool between fp32 ops stays fp32 (a round trip
would cost more than the pool).  The pipeline runs this pass before and after
``quantize_concat`` so pools next to concats are caught in either order.
"""

from __future__ import annotations

from graphquant import quant_math
from graphquant.int8_ops import quantized_avg_pool, quantized_max_pool
from graphquant.int8_rewrite import Island, excluded, planned_range
from graphquant.pattern import Any, OpTypePattern, Replacement, rewrite
from graphquant.pipeline import register_pass

PASS = "quantize_pool"

# MaxPool|AvgPool(x)
POOL = OpTypePattern("MaxPool|AvgPool", name="pool", inputs=[Any("x")],
                     where=lambda n: n.attr["data_format"].s in (b"", b"NHWC")
                     and n.attr["T"].type == 1)


def _int8_neighbours(match, rctx) -> bool:
    if match["x"].op == "Dequantize":
        return True
    readers = rctx.index.consumer_nodes(match["pool"].name)
    return bool(readers) and all(r.op == "QuantizeV2" for r in readers)


def _quantize(match, rctx, ctx):
    pool = match["pool"]
    why = excluded(ctx, match)
    rng = planned_range(ctx, match.tensor("x"))
    if why or rng is None or not _int8_neighbours(match, rctx):
        if why:
            ctx.note(PASS, pool.name, why, kind="fp32", op=pool.op)
        return None
    isl = Island(rctx, pool.name)
    qx = isl.quantize("input", match.tensor("x"), rng)
    build = quantized_max_pool if pool.op == "MaxPool" else quantized_avg_pool
    op = build(isl.name("int8"), qx.data, qx.min, qx.max, t=qx.type_name,
               ksize=list(pool.attr["ksize"].list.i), strides=list(pool.attr["strides"].list.i),
               padding=pool.attr["padding"].s.decode())
    isl.nodes.append(op)
    isl.dequantize(op.name, qx.min, qx.max, qx.signed)
    lo, hi = quant_math.activation_range(rng[0], rng[1], qx.signed)
    ctx.note(PASS, pool.name, "quantized", kind="int8", op=pool.op, int8_op=op.op,
             input_range=list(rng), output_range=[lo, hi], nodes=[pool.name])
    return Replacement(nodes=isl.nodes)


@register_pass(PASS)
def quantize_pool(graph_def, ctx):
    graph_def, _ = rewrite(graph_def, POOL, lambda m, r: _quantize(m, r, ctx),
                           protected=ctx.protected)
    return graph_def
