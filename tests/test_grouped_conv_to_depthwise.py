"""grouped_conv_to_depthwise: grouped Conv2D with one input channel per group -> depthwise, exact."""

import numpy as np
import pytest

from graphquant.execute import run_graph
from graphquant.graph import GraphIndex
from graphquant.passes.grouped_conv_to_depthwise import grouped_conv_to_depthwise
from graphquant.pipeline import PassContext
from graphquant.runtime import tf
from helpers import build_graph

RNG = np.random.default_rng(29)


@pytest.mark.parametrize("mult,stride,padding", [(1, 1, "SAME"), (2, 2, "VALID"), (3, 1, "SAME")])
def test_grouped_conv_becomes_depthwise_with_same_outputs(mult, stride, padding):
    t = tf()
    w = RNG.normal(0, 0.5, [3, 3, 1, 6 * mult]).astype(np.float32)
    gd, outs = build_graph(lambda x: t.nn.relu(t.nn.conv2d(x, t.constant(w), stride, padding,
                                                         name="conv"), name="out"),
                           x=[1, 9, 9, 6])
    x = RNG.normal(0, 1, [1, 9, 9, 6]).astype(np.float32)
    ref = run_graph(gd, {"x:0": x}, outs)[0]
    out = grouped_conv_to_depthwise(gd, PassContext(inputs=["x"], outputs=outs))
    index = GraphIndex(out)
    assert index.nodes["conv"].op == "DepthwiseConv2dNative"
    assert index.node(index.nodes["conv"].input[1]).attr["value"].tensor.tensor_shape.dim[2].size == 6
    np.testing.assert_allclose(run_graph(out, {"x:0": x}, outs)[0], ref, rtol=1e-5, atol=1e-5)


def test_ordinary_conv_is_left_alone():
    t = tf()
    w = RNG.normal(0, 0.5, [3, 3, 4, 8]).astype(np.float32)
    gd, outs = build_graph(lambda x: t.nn.conv2d(x, t.constant(w), 1, "SAME", name="conv"),
                           x=[1, 5, 5, 4])
    out = grouped_conv_to_depthwise(gd, PassContext(inputs=["x"], outputs=outs))
    assert GraphIndex(out).nodes["conv"].op == "Conv2D"
