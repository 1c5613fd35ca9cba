"""quantize_concat: a concat of int8 branches copies integers in one shared range."""

import numpy as np

from graphquant.execute import run_graph
from graphquant.graph import GraphIndex, data_inputs
from graphquant.runtime import tf
from helpers import build_graph
from int8_helpers import ops, output_step, quantize_tiny

RNG = np.random.default_rng(11)
PASSES = ["quantize_conv", "quantize_pool", "quantize_concat", "quantize_pool",
          "remove_dequantize_quantize_pairs", "merge_duplicate_quantize", "remove_unused_nodes"]


def test_inception_like_block_is_int8_end_to_end():
    t = tf()
    w1 = RNG.normal(0, 0.3, [1, 1, 4, 6]).astype(np.float32)
    w2 = RNG.normal(0, 0.3, [3, 3, 4, 5]).astype(np.float32)
    w3 = RNG.normal(0, 0.3, [1, 1, 15, 4]).astype(np.float32)

    def body(x):
        a = t.nn.relu(t.nn.conv2d(x, t.constant(w1), 1, "SAME"), name="a")
        b = t.nn.relu(t.nn.conv2d(x, t.constant(w2), 1, "SAME"), name="b")
        p = t.nn.max_pool2d(x, 3, 1, "SAME", name="p")
        c = t.concat([a, b, p], axis=3, name="cat")
        return t.nn.relu(t.nn.conv2d(c, t.constant(w3), 1, "SAME"), name="out")

    gd, outs = build_graph(body, x=[1, 6, 6, 4])
    x = RNG.uniform(0, 1, [1, 6, 6, 4]).astype(np.float32)
    int8, ctx, ranges = quantize_tiny(gd, outs, {"x:0": x}, PASSES)
    assert ops(int8).count("ConcatV2") == 1
    assert ops(int8).count("QuantizeV2") == 1 and ops(int8).count("Dequantize") == 1
    index = GraphIndex(int8)
    cat = [n for n in int8.node if n.op == "ConcatV2"][0]
    assert cat.attr["T"].type == tf().quint8.as_datatype_enum
    producers = {index.node(v).op for v in data_inputs(cat)[:3]}
    assert producers == {"_FusedQuantizedConv2D", "QuantizedMaxPool"}
    # one range for all inputs and the output of the concat
    assert ranges["a:0"] != ranges["b:0"]
    planned = ctx.options["ranges"]
    assert planned["a:0"] == planned["b:0"] == planned["p:0"] == planned["cat:0"]
    ref = run_graph(gd, {"x:0": x}, outs)[0]
    got = run_graph(int8, {"x:0": x}, outs)[0]
    step = output_step(ranges["out:0"], False)
    assert np.sqrt(np.mean((got - ref) ** 2)) < 2 * step
