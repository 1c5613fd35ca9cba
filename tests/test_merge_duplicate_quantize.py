"""merge_duplicate_quantize: one QuantizeV2 per tensor and scale; different scales stay apart."""

import numpy as np
from tensorflow.core.framework import graph_pb2

from graphquant import int8_ops
from graphquant.execute import run_graph
from graphquant.graph import GraphIndex, make_const, make_node
from graphquant.passes.merge_duplicate_quantize import merge_duplicate_quantize
from graphquant.pipeline import PassContext
from graphquant.runtime import tf


def _graph(hi_b=2.0):
    gd = graph_pb2.GraphDef()
    gd.node.extend([
        make_node("Placeholder", "x", dtype=tf().float32),
        make_const("lo", np.float32(0)), make_const("hi", np.float32(2)),
        make_const("lo_b", np.float32(0)), make_const("hi_b", np.float32(hi_b)),
        int8_ops.quantize_v2("qa", "x", "lo", "hi", False),
        int8_ops.quantize_v2("qb", "x", "lo_b", "hi_b", False),
        int8_ops.dequantize("a", "qa", "qa:1", "qa:2", False),
        int8_ops.dequantize("b", "qb", "qb:1", "qb:2", False)])
    return gd


def test_identical_quantizes_merge_into_the_first():
    gd = _graph()
    out = merge_duplicate_quantize(gd, PassContext(inputs=["x"], outputs=["a:0", "b:0"]))
    index = GraphIndex(out)
    assert "qb" not in index.nodes
    assert list(index.nodes["b"].input) == ["qa", "qa:1", "qa:2"]
    x = np.linspace(0, 2, 7, dtype=np.float32)
    np.testing.assert_array_equal(*run_graph(out, {"x:0": x}, ["a:0", "b:0"]))


def test_different_scales_are_kept():
    gd = _graph(hi_b=3.0)
    out = merge_duplicate_quantize(gd, PassContext(inputs=["x"], outputs=["a:0", "b:0"]))
    assert {"qa", "qb"} <= set(GraphIndex(out).nodes)
