"""sensitivity: shadow islands read fp32 inputs; own error <= accumulated; exact islands score 0."""

import numpy as np

from graphquant.graph import GraphIndex
from graphquant.pipeline import ISLAND_PASSES
from graphquant.runtime import tf
from graphquant.sensitivity import PREFIX, IslandError, island_errors, shadow_graph, worst_first
from helpers import build_graph
from int8_helpers import quantize_tiny

RNG = np.random.default_rng(23)


def _chain():
    t = tf()
    w1 = RNG.normal(0, 0.3, [3, 3, 4, 8]).astype(np.float32)
    w2 = RNG.normal(0, 0.3, [3, 3, 8, 8]).astype(np.float32)

    def body(x):
        a = t.nn.relu(t.nn.conv2d(x, t.constant(w1), 1, "SAME"), name="a")
        p = t.nn.max_pool2d(a, 2, 2, "VALID", name="p")
        return t.nn.relu(t.nn.conv2d(p, t.constant(w2), 1, "SAME"), name="b")

    return build_graph(body, x=[1, 8, 8, 4])


def test_shadow_islands_read_the_fp32_tensors():
    gd, outs = _chain()
    x = RNG.uniform(0, 1, [1, 8, 8, 4]).astype(np.float32)
    islands, _, _ = quantize_tiny(gd, outs, {"x:0": x}, ISLAND_PASSES)
    merged, roots = shadow_graph(gd, islands)
    assert roots == ["a", "b", "p"]
    index = GraphIndex(merged)
    assert index.nodes["b"].op == "Relu"                      # the fp32 graph is intact
    assert index.nodes[PREFIX + "b"].op == "Dequantize"       # its shadow island
    shadow_input = index.node(index.nodes[PREFIX + "b/input"].input[0])
    assert shadow_input.name == "p" and shadow_input.op == "MaxPool"  # fed by fp32


def test_errors_own_vs_accumulated_and_exact_pool():
    gd, outs = _chain()
    xs = RNG.uniform(0, 1, [4, 1, 8, 8, 4]).astype(np.float32)
    islands, _, _ = quantize_tiny(gd, outs, {"x:0": xs[0]}, ISLAND_PASSES)
    errors = island_errors(gd, islands, [{"x:0": x} for x in xs])
    assert set(errors) == {"a", "b", "p"}
    assert errors["a"].own == errors["a"].accumulated > 0      # nothing upstream of a
    assert errors["b"].accumulated > errors["b"].own > 0
    # max pool of int8 values on their own grid adds no error; its input's grid error
    # (a's output rounding) is what its own error measures: at most a's own error
    assert errors["p"].own <= errors["a"].own + 1e-7
    assert worst_first(errors)[0] in ("a", "b")
    assert IslandError.sqnr_db(0.01) == 40.0
