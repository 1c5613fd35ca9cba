"""inspect.int8_candidates on hand-built graphs: which nodes each int8 op would take."""

import numpy as np

from graphquant.inspect import fp32_weighted_nodes, inspect_graph, int8_candidates
from graphquant.runtime import tf
from helpers import build_graph


def _by_root(candidates):
    return {c.root: (c.kind, c.nodes, c.int8_inputs) for c in candidates}


def test_conv_bias_residual_relu_is_one_candidate_and_pool_follows():
    t = tf()

    def body(x):
        w = t.constant(np.ones([3, 3, 4, 4], np.float32), name="w")
        y = t.nn.conv2d(x, w, 1, "SAME", name="conv")
        y = t.nn.bias_add(y, t.constant(np.ones([4], np.float32), name="b"), name="bias")
        y = t.nn.relu(t.add(y, x, name="residual"), name="relu")
        return t.nn.max_pool2d(y, 2, 2, "VALID", name="pool")

    gd, outs = build_graph(body, x=[1, 6, 6, 4])
    cands = int8_candidates(gd, protected=outs)
    assert _by_root(cands) == {
        "relu": ("conv", ["conv", "bias", "residual", "relu"], True),
        "pool": ("pool", ["pool"], True),
    }
    assert [c.fused for c in cands] == ["Conv2D+BiasAdd+AddV2+Relu", "MaxPool"]


def test_fusion_stops_where_an_interior_tensor_is_read_elsewhere():
    t = tf()

    def body(x):
        w = t.constant(np.ones([1, 1, 2, 2], np.float32), name="w")
        y = t.nn.bias_add(t.nn.conv2d(x, w, 1, "SAME", name="conv"),
                          t.constant(np.ones([2], np.float32), name="b"), name="bias")
        return [t.nn.relu6(y, name="act"), t.negative(y, name="other")]

    gd, outs = build_graph(body, x=[1, 3, 3, 2])
    assert _by_root(int8_candidates(gd, protected=outs)) == {
        "bias": ("conv", ["conv", "bias"], True)}


def test_matmul_with_constant_add_and_pool_after_fp32_input():
    t = tf()

    def body(x, v):
        h = t.nn.avg_pool2d(x, 2, 2, "VALID", name="pool")  # reads a graph input: fp32
        h = t.reshape(h, [1, 8], name="flat")
        y = t.add(t.matmul(h, t.constant(np.ones([8, 3], np.float32), name="w"), name="mm"),
                  t.constant(np.ones([3], np.float32), name="c"), name="add")
        z = t.matmul(v, t.transpose(v), name="gram")  # weights computed: stays fp32
        return [y, z]

    gd, outs = build_graph(body, x=[1, 4, 4, 2], v=[2, 3])
    cands = int8_candidates(gd, protected=outs)
    assert _by_root(cands) == {
        "pool": ("pool", ["pool"], False),
        "add": ("matmul", ["mm", "add"], True),
    }
    fp32 = fp32_weighted_nodes(gd, cands)
    assert [(n.name, n.op) for n in fp32] == [("gram", "MatMul")]
    assert "not a constant" in fp32[0].reason and "Transpose" in fp32[0].reason


def test_concat_of_two_conv_outputs_stays_int8():
    t = tf()

    def body(x):
        a = t.nn.conv2d(x, t.constant(np.ones([1, 1, 2, 2], np.float32), name="wa"), 1, "SAME",
                        name="conv_a")
        b = t.nn.depthwise_conv2d(x, t.constant(np.ones([3, 3, 2, 1], np.float32), name="wb"),
                                  [1, 1, 1, 1], "SAME", name="dw")
        return t.concat([a, b], axis=3, name="cat")

    gd, outs = build_graph(body, x=[1, 5, 5, 2])
    got = _by_root(int8_candidates(gd, protected=outs))
    assert got["cat"] == ("concat", ["cat"], True)
    assert got["conv_a"][0] == "conv" and got["dw"] == ("depthwise_conv", ["dw"], True)


def test_inspect_graph_reports_interface_and_histograms():
    t = tf()

    def body(x):
        y = t.identity(t.nn.conv2d(x, t.constant(np.ones([1, 1, 2, 3], np.float32)), 1, "SAME",
                                   name="conv"), name="out")
        return y

    gd, _ = build_graph(body, x=[1, 4, 4, 2])
    report = inspect_graph(gd, passes=["strip_debug_ops", "remove_unused_nodes"])
    assert [(s.name, s.dtype, s.shape) for s in report.inputs] == [("x:0", "float32", [1, 4, 4, 2])]
    assert [(s.name, s.shape_str) for s in report.outputs] == [("out:0", "[1, 4, 4, 3]")]
    assert report.histogram["Identity"] == 1 and "Identity" not in report.optimized_histogram
    assert report.candidate_counts() == {"conv": 1}
