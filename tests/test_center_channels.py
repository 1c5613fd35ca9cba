"""center_channels: an fp32 identity; which chains it centres; the int8 error it removes."""

import numpy as np
import pytest

from graphquant.convert import convert
from graphquant.execute import GraphRunner
from graphquant.graph import GraphIndex, const_value
from graphquant.passes.center_channels import find_centerable
from graphquant.passes.equalize_cross_layer import channel_statistics
from graphquant.pipeline import PassContext, run_pipeline
from graphquant.runtime import tf
from helpers import build_graph, rel_l2

RNG = np.random.default_rng(7)
OFFSETS = np.linspace(-6.0, 6.0, 8).astype(np.float32)   # channel c of the depthwise output


def const(*shape, rng=RNG):
    return tf().constant(rng.normal(0, 0.3, shape).astype(np.float32))


def separable(t, x, bias=False, between=None, pointwise_k=1, padding="VALID", seed=1):
    """depthwise (+ per-channel offsets) -> [between] -> pointwise conv -> BiasAdd."""
    rng = np.random.default_rng(seed)
    d = t.nn.depthwise_conv2d(x, const(3, 3, 8, 1, rng=rng), [1, 1, 1, 1], "SAME")
    if bias:
        d = t.nn.bias_add(d, t.constant(OFFSETS))
    if between is not None:
        d = between(d)
    p = t.nn.conv2d(d, const(pointwise_k, pointwise_k, 8, 6, rng=rng), 1, padding)
    return t.identity(t.nn.bias_add(p, const(6, rng=rng)), name="out")


def feeds(n=4, shape=(1, 10, 10, 8), seed=2):
    rng = np.random.default_rng(seed)
    return [{"x:0": rng.normal(0, 1, shape).astype(np.float32)} for _ in range(n)]


def centred(gd, outs, data):
    ctx = PassContext.for_graph(gd, outputs=outs)
    ctx.options["channel_stats"] = channel_statistics(
        gd, [p.between for p in find_centerable(gd, ctx.protected)], data)
    return run_pipeline(gd, ["center_channels"], ctx), ctx


def max_rel_l2(a, b, outs, data):
    ra, rb = GraphRunner(a, outs), GraphRunner(b, outs)
    return max(rel_l2(y, x) for f in data for x, y in zip(ra(f), rb(f)))


def test_offsets_go_into_the_depthwise_bias_and_back_in_the_pointwise_bias():
    gd, outs = build_graph(lambda x: separable(tf(), x, bias=True), x=[1, 10, 10, 8])
    data = feeds()
    out, ctx = centred(gd, outs, data)
    index = GraphIndex(out)
    assert index.node("Conv2D").input[0] == "BiasAdd"           # same wiring, new bias values
    b1 = const_value(index.node(index.node("BiasAdd").input[1]))
    assert np.abs(b1).max() < 0.5 * np.abs(OFFSETS).max()       # offsets taken out
    assert index.node("BiasAdd_1").input[1] == "BiasAdd_1/centered_bias"
    assert [n["pass"] for n in ctx.notes] == ["center_channels"]
    assert max_rel_l2(gd, out, outs, data) < 1e-5                # fp32 identity


def test_a_depthwise_without_bias_gets_one():
    t = tf()

    def body(x):
        h = t.nn.depthwise_conv2d(x, const(3, 3, 8, 1), [1, 1, 1, 1], "SAME") + t.constant(OFFSETS)
        d = t.nn.depthwise_conv2d(h, const(3, 3, 8, 1), [1, 1, 1, 1], "VALID", name="dw2")
        p = t.nn.conv2d(d, const(1, 1, 8, 6), 1, "SAME", name="pw")
        return t.identity(t.nn.bias_add(p, const(6)), name="out")

    gd, outs = build_graph(body, x=[1, 10, 10, 8])
    data = feeds()
    out, _ = centred(gd, outs, data)
    index = GraphIndex(out)
    assert index.node("pw").input[0] == "dw2/centered"
    assert index.node("dw2/centered").op == "BiasAdd"
    assert index.node("dw2/centered").input[0] == "dw2"
    assert max_rel_l2(gd, out, outs, data) < 1e-5


@pytest.mark.parametrize("case", ["relu", "padded", "no_offsets"])
def test_chains_it_leaves_alone(case):
    t = tf()
    kw = {"relu": dict(bias=True, between=t.nn.relu),
          "padded": dict(bias=True, pointwise_k=3, padding="SAME"),
          "no_offsets": dict(bias=False)}[case]
    gd, outs = build_graph(lambda x: separable(t, x, **kw), x=[1, 10, 10, 8])
    out, ctx = centred(gd, outs, feeds())
    assert [n for n in ctx.notes if n["pass"] == "center_channels"] == []
    assert out.SerializeToString() == gd.SerializeToString()


def test_centring_lowers_the_int8_error():
    gd, outs = build_graph(lambda x: separable(tf(), x, bias=True), x=[1, 10, 10, 8])
    data = feeds(8)
    ref = GraphRunner(gd, outs)

    def error(**kw):
        got = GraphRunner(convert(gd, data, outputs=outs, target="avx2", max_layer_error=None,
                                  **kw).graph_def, outs)
        return np.mean([rel_l2(got(f)[0], ref(f)[0]) for f in data])

    plain = error(center_channels=False)
    assert error() < 0.8 * plain                                 # the default centres
