"""remove_dequantize_quantize_pairs: int8 islands join into chains; fp32 readers keep a Dequantize."""

import numpy as np

from graphquant.execute import run_graph
from graphquant.graph import GraphIndex, data_inputs
from graphquant.runtime import tf
from helpers import build_graph
from int8_helpers import ops, quantize_tiny

RNG = np.random.default_rng(3)


def _two_convs(extra_reader=False):
    t = tf()
    w1 = RNG.normal(0, 0.3, [3, 3, 4, 8]).astype(np.float32)
    w2 = RNG.normal(0, 0.3, [3, 3, 8, 4]).astype(np.float32)

    def body(x):
        a = t.nn.relu(t.nn.conv2d(x, t.constant(w1), 1, "SAME", name="c1"), name="a")
        b = t.nn.relu(t.nn.conv2d(a, t.constant(w2), 1, "SAME", name="c2"), name="b")
        return [b, t.nn.sigmoid(a, name="side")] if extra_reader else b

    return build_graph(body, x=[1, 6, 6, 4])


def test_pair_between_islands_is_removed():
    gd, outs = _two_convs()
    x = RNG.uniform(0, 1, [1, 6, 6, 4]).astype(np.float32)
    before, _, _ = quantize_tiny(gd, outs, {"x:0": x}, ["quantize_conv"])
    assert ops(before).count("QuantizeV2") == 2 and ops(before).count("Dequantize") == 2
    after, _, _ = quantize_tiny(gd, outs, {"x:0": x}, ["quantize_conv",
                                                       "remove_dequantize_quantize_pairs",
                                                       "remove_unused_nodes"])
    assert ops(after).count("QuantizeV2") == 1 and ops(after).count("Dequantize") == 1
    index = GraphIndex(after)
    c2 = index.node(index.nodes["b"].input[0])
    c1 = index.node(data_inputs(c2)[0])
    assert c1.op == "_FusedQuantizedConv2D"  # int8 straight into int8
    # min/max of c2's input are the Consts c1's island declared for its output
    assert index.node(data_inputs(c2)[3]).op == "Const"
    # same numbers with or without the round trip (it was exact)
    np.testing.assert_array_equal(run_graph(before, {"x:0": x}, outs)[0],
                                  run_graph(after, {"x:0": x}, outs)[0])


def test_fp32_reader_keeps_its_dequantize():
    gd, outs = _two_convs(extra_reader=True)
    x = RNG.uniform(0, 1, [1, 6, 6, 4]).astype(np.float32)
    after, _, _ = quantize_tiny(gd, outs, {"x:0": x}, ["quantize_conv",
                                                       "remove_dequantize_quantize_pairs",
                                                       "remove_unused_nodes"])
    index = GraphIndex(after)
    assert index.nodes["a"].op == "Dequantize"
    assert index.node(index.nodes["side"].input[0]).name == "a"
    assert ops(after).count("QuantizeV2") == 1


def test_different_scales_are_not_joined():
    from graphquant.passes.remove_dequantize_quantize_pairs import PAIR
    from graphquant.pattern import match_at
    from graphquant import int8_ops
    from graphquant.graph import make_const, make_node
    from tensorflow.core.framework import graph_pb2

    gd = graph_pb2.GraphDef()
    gd.node.extend([
        make_node("Placeholder", "q", dtype=tf().quint8),
        make_const("lo", np.float32(0)), make_const("hi", np.float32(2)),
        make_const("qlo", np.float32(0)), make_const("qhi", np.float32(3)),
        int8_ops.dequantize("dq", "q", "lo", "hi", False),
        int8_ops.quantize_v2("qv", "dq", "qlo", "qhi", False),
        make_node("Dequantize", "use", ["qv", "qv:1", "qv:2"], T=tf().quint8, mode="SCALED")])
    from graphquant.passes.remove_dequantize_quantize_pairs import remove_dequantize_quantize_pairs
    from graphquant.pipeline import PassContext

    out = remove_dequantize_quantize_pairs(gd, PassContext(outputs=["use:0"]))
    assert [n.name for n in out.node] == [n.name for n in gd.node]  # 2 vs 3: kept
    gd.node[4].attr["value"].tensor.float_val[:] = [2.0]  # same scale now
    out = remove_dequantize_quantize_pairs(gd, PassContext(outputs=["use:0"]))
    assert "qv" not in [n.name for n in out.node]
    assert list(GraphIndex(out).nodes["use"].input) == ["q", "lo", "hi"]
    assert match_at(GraphIndex(gd), GraphIndex(gd).nodes["qv"], PAIR) is not None
