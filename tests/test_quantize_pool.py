"""quantize_pool: pools between int8 neighbours become quantized pools; lone pools stay fp32."""

import numpy as np
import pytest

from graphquant.execute import run_graph
from graphquant.graph import GraphIndex
from graphquant.runtime import tf
from helpers import build_graph
from int8_helpers import ops, output_step, quantize_tiny

RNG = np.random.default_rng(5)
PASSES = ["quantize_conv", "quantize_pool", "remove_dequantize_quantize_pairs",
          "remove_unused_nodes"]


@pytest.mark.parametrize("pool", ["max_pool2d", "avg_pool2d"])
def test_pool_after_conv_stays_int8_and_is_exact(pool):
    t = tf()
    w = RNG.normal(0, 0.3, [3, 3, 4, 8]).astype(np.float32)

    def body(x):
        a = t.nn.relu(t.nn.conv2d(x, t.constant(w), 1, "SAME"), name="a")
        return getattr(t.nn, pool)(a, 2, 2, "VALID", name="p")

    gd, outs = build_graph(body, x=[1, 8, 8, 4])
    x = RNG.uniform(0, 1, [1, 8, 8, 4]).astype(np.float32)
    int8, ctx, ranges = quantize_tiny(gd, outs, {"x:0": x}, PASSES)
    qop = "QuantizedMaxPool" if pool == "max_pool2d" else "QuantizedAvgPool"
    assert ops(int8) == sorted(["Placeholder", "QuantizeV2", "_FusedQuantizedConv2D", qop,
                                "Dequantize"])
    index = GraphIndex(int8)
    assert index.node(index.nodes["p"].input[0]).op == qop
    # the pool itself adds at most one rounding of the conv's int8 output
    conv_only, _, _ = quantize_tiny(gd, ["a:0"], {"x:0": x}, PASSES)
    a_int8 = run_graph(conv_only, {"x:0": x}, ["a:0"])[0]
    expect = getattr(t.nn, pool)(a_int8, 2, 2, "VALID").numpy()
    got = run_graph(int8, {"x:0": x}, outs)[0]
    step = output_step(ranges["a:0"], False)
    assert np.abs(got - expect).max() <= (0 if pool == "max_pool2d" else 0.5 * step + 1e-6)


def test_pool_between_fp32_ops_stays_fp32():
    t = tf()
    gd, outs = build_graph(lambda x: t.nn.sigmoid(t.nn.max_pool2d(t.nn.tanh(x), 2, 2, "VALID",
                                                                  name="p")), x=[1, 4, 4, 2])
    x = RNG.uniform(0, 1, [1, 4, 4, 2]).astype(np.float32)
    int8, _, _ = quantize_tiny(gd, outs, {"x:0": x}, PASSES)
    assert "MaxPool" in ops(int8) and "QuantizedMaxPool" not in ops(int8)
