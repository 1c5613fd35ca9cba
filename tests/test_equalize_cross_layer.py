"""equalize_cross_layer: an fp32 identity; which chains it rescales; ranges equalized;
the activation criterion's scales lower the int8 error of a dominant channel."""

import numpy as np
import pytest

from graphquant.convert import convert
from graphquant.execute import GraphRunner
from graphquant.graph import GraphIndex, const_value
from graphquant.passes.equalize_cross_layer import (activation_scales, channel_statistics,
                                                    equalize_pair, expected_noise, find_pairs)
from graphquant.pipeline import PassContext, run_pipeline
from graphquant.runtime import tf
from helpers import build_graph, rel_l2

RNG = np.random.default_rng(4)


def spread_const(*shape):
    """Weights whose output channels differ in range by up to 100x (as after BN folding)."""
    w = RNG.normal(0, 0.3, shape)
    w *= 10.0 ** RNG.uniform(-1, 1, shape[-1])
    return tf().constant(w.astype(np.float32))


def const(*shape):
    return tf().constant(RNG.normal(0, 0.3, shape).astype(np.float32))


def equalized(gd, outs, feeds=None, criterion=None):
    ctx = PassContext.for_graph(gd, outputs=outs)
    if criterion:
        ctx.options["equalize_criterion"] = criterion
    if feeds is not None:
        ctx.options["channel_stats"] = channel_statistics(
            gd, [p.between for p in find_pairs(gd)], feeds)
    return run_pipeline(gd, ["equalize_cross_layer"], ctx), ctx


def same_outputs(a, b, outs, feeds):
    ra, rb = GraphRunner(a, outs), GraphRunner(b, outs)
    return max(rel_l2(y, x) for f in feeds for x, y in zip(ra(f), rb(f)))


def mobile_block(t, x):
    h = t.nn.relu(t.nn.bias_add(t.nn.conv2d(x, spread_const(3, 3, 3, 8), 1, "SAME"), const(8)))
    d = t.nn.depthwise_conv2d(h, spread_const(3, 3, 8, 2), [1, 1, 1, 1], "SAME")
    d = t.nn.relu(t.nn.bias_add(d, const(16)))
    p = t.nn.max_pool2d(d, 2, 2, "SAME")
    return t.identity(t.nn.conv2d(p, const(1, 1, 16, 4), 1, "VALID"), name="out")


def test_rescaling_is_an_fp32_identity_and_equalizes_ranges():
    gd, outs = build_graph(lambda x: mobile_block(tf(), x), x=[1, 12, 12, 3])
    pairs = find_pairs(gd)
    assert [(p.conv1, p.conv2) for p in pairs] == [("Conv2D", "depthwise"),
                                                   ("depthwise", "Conv2D_1")]
    assert pairs[1].chain == ["depthwise", "BiasAdd_1", "Relu_1", "MaxPool2d"]
    out, ctx = equalized(gd, outs)                       # no statistics: every pair
    feeds = [{"x:0": RNG.normal(0, 1, (1, 12, 12, 3)).astype(np.float32)} for _ in range(3)]
    assert same_outputs(gd, out, outs, feeds) < 1e-5
    assert len([n for n in ctx.notes if n["pass"] == "equalize_cross_layer"]) == 2


def test_one_pair_ends_with_equal_ranges():
    t = tf()

    def body(x):
        h = t.nn.relu(t.nn.conv2d(x, spread_const(3, 3, 3, 8), 1, "SAME"))
        return t.identity(t.nn.conv2d(h, spread_const(3, 3, 8, 4), 1, "SAME"), name="out")

    gd, outs = build_graph(body, x=[1, 8, 8, 3])
    out, _ = equalized(gd, outs)
    feeds = [{"x:0": RNG.normal(0, 1, (1, 8, 8, 3)).astype(np.float32)} for _ in range(3)]
    assert same_outputs(gd, out, outs, feeds) < 1e-5
    index = GraphIndex(out)
    w1 = const_value(index.node(index.node("Conv2D").input[1]))
    w2 = const_value(index.node(index.node("Conv2D_1").input[1]))
    r1, r2 = np.abs(w1).max(axis=(0, 1, 2)), np.abs(w2).max(axis=(0, 1, 3))
    np.testing.assert_allclose(r1, r2, rtol=1e-5)        # both sqrt(r1 * r2)


@pytest.mark.parametrize("act", ["relu6", "shared"])
def test_relu6_and_shared_tensors_end_a_chain(act):
    t = tf()

    def body(x):
        h = t.nn.conv2d(x, const(3, 3, 3, 8), 1, "SAME")
        h = t.nn.relu6(h) if act == "relu6" else t.nn.relu(h)
        a = t.nn.conv2d(h, const(1, 1, 8, 4), 1, "VALID", name="a")
        if act == "shared":
            return [t.identity(a, name="out"), t.identity(h, name="h_out")]
        return t.identity(a, name="out")

    gd, outs = build_graph(body, x=[1, 8, 8, 3])
    assert find_pairs(gd, PassContext.for_graph(gd, outputs=outs).protected) == []


def test_statistics_decide_and_the_decision_lowers_the_expected_noise():
    gd, outs = build_graph(lambda x: mobile_block(tf(), x), x=[1, 12, 12, 3])
    feeds = [{"x:0": RNG.normal(0, 1, (1, 12, 12, 3)).astype(np.float32)} for _ in range(4)]
    stats = channel_statistics(gd, [p.between for p in find_pairs(gd)], feeds)
    index = GraphIndex(gd)
    graph = {n.name: n for n in gd.node}
    for pair in find_pairs(gd):
        st = stats[pair.between]
        assert st.amax.shape == st.sq.shape == st.lo.shape == st.hi.shape and not st.signed
        np.testing.assert_allclose(st.amax, st.hi)                # after Relu: max |x| = max x
        chosen = equalize_pair(graph, index, pair, stats[pair.between])
        if chosen is not None:
            _, before, after = chosen
            assert after < 0.9 * before
    out, ctx = equalized(gd, outs, feeds)
    assert same_outputs(gd, out, outs, feeds) < 1e-5


def dominant_channel_block(t, x):
    """depthwise whose channel 0 is 40x the other 15 (no nonlinearity) -> 1x1 pointwise."""
    rng = np.random.default_rng(11)
    w = rng.normal(0, 0.3, (3, 3, 16, 1))
    w[..., 0, :] *= 40.0
    d = t.nn.depthwise_conv2d(x, t.constant(w.astype(np.float32)), [1, 1, 1, 1], "SAME")
    w2 = t.constant(rng.normal(0, 0.3, (1, 1, 16, 6)).astype(np.float32))
    return t.identity(t.nn.conv2d(d, w2, 1, "VALID"), name="out")


def dominant_feeds(n, seed=12):
    rng = np.random.default_rng(seed)
    return [rng.normal(0, 1, (1, 10, 10, 16)).astype(np.float32) for _ in range(n)]


def test_activation_criterion_scales_the_dominant_channel_down_exactly():
    gd, outs = build_graph(lambda x: dominant_channel_block(tf(), x), x=[1, 10, 10, 16])
    feeds = [{"x:0": f} for f in dominant_feeds(4)]
    (pair,) = find_pairs(gd)
    stats = channel_statistics(gd, [pair.between], feeds)[pair.between]
    assert stats.signed and stats.amax[0] > 10 * stats.amax[1:].max()
    w2 = const_value(GraphIndex(gd).node(GraphIndex(gd).node("Conv2D").input[1]))
    s, alpha = activation_scales(w2.astype(np.float64), "Conv2D", stats)
    assert s[0] > 5 * s[1:].max() and alpha > 0        # channel 0 divided, the others raised
    noise = expected_noise(w2 * s[None, None, :, None], "Conv2D", stats.divided(s))
    assert noise < 0.5 * expected_noise(w2, "Conv2D", stats)
    out, ctx = equalized(gd, outs, feeds, criterion="activation")
    assert GraphIndex(out).node("depthwise").input[1] == "depthwise/equalized_weights"
    assert GraphIndex(out).node("Conv2D").input[1] == "Conv2D/equalized_weights"
    assert [n["pass"] for n in ctx.notes] == ["equalize_cross_layer"]
    assert same_outputs(gd, out, outs, feeds) < 1e-5                  # fp32 identity


def test_activation_criterion_lowers_the_int8_error_of_a_dominant_channel():
    gd, outs = build_graph(lambda x: dominant_channel_block(tf(), x), x=[1, 10, 10, 16])
    feeds = dominant_feeds(8)
    ref = GraphRunner(gd, outs)

    def error(**kw):
        got = GraphRunner(convert(gd, feeds, outputs=outs, target="avx2", max_layer_error=None,
                                  **kw).graph_def, outs)
        return np.mean([rel_l2(got({"x:0": f})[0], ref({"x:0": f})[0]) for f in feeds])

    assert error(equalize="activation") < 0.75 * error()
