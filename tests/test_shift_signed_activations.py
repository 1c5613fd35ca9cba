"""shift_signed_activations: fp32 identity, which readers absorb the shift, ranges, int8 error."""

import numpy as np
import pytest

from graphquant.calibrate import calibrate
from graphquant.convert import convert
from graphquant.execute import GraphRunner, tensor_shapes
from graphquant.graph import GraphIndex, canonical_tensor
from graphquant.pipeline import PassContext, run_pipeline
from graphquant.ranges import calibration_tensors
from graphquant.runtime import tf
from helpers import build_graph, rel_l2

RNG = np.random.default_rng(0)


def const(*shape, scale=0.3):
    return tf().constant(RNG.normal(0, scale, shape).astype(np.float32))


def prelu(t, y):
    return t.nn.relu(y) - 0.25 * t.nn.relu(-y)


def shifted(graph_def, outs, feeds):
    ranges, _ = calibrate(graph_def, calibration_tensors(graph_def), feeds)
    ctx = PassContext.for_graph(graph_def, outputs=outs)
    ctx.options.update(ranges=dict(ranges), shapes=tensor_shapes(graph_def))
    out = run_pipeline(graph_def, ["shift_signed_activations"], ctx)
    return out, ctx, ranges


def assert_same_outputs(a, b, outs, feeds, rtol=1e-5):
    ra, rb = GraphRunner(a, outs), GraphRunner(b, outs)
    for feed in feeds:
        for x, y in zip(ra(feed), rb(feed)):
            assert rel_l2(y, x) < rtol


def feeds_of(shape, n=4, offset=0.0):
    return [{"x:0": (RNG.normal(offset, 1, shape)).astype(np.float32)} for _ in range(n)]


def test_conv_output_read_by_a_1x1_conv_is_shifted_in_its_bias():
    t = tf()

    def body(x):
        y = t.nn.bias_add(t.nn.conv2d(x, const(3, 3, 4, 8), 1, "VALID"), const(8), name="y")
        z = t.nn.bias_add(t.nn.conv2d(y, const(1, 1, 8, 6), 1, "VALID"), const(6))
        return t.nn.relu(z, name="out")

    gd, outs = build_graph(body, x=[1, 10, 10, 4])
    feeds = feeds_of([1, 10, 10, 4])
    out, ctx, ranges = shifted(gd, outs, feeds)
    assert_same_outputs(gd, out, outs, feeds)
    index = GraphIndex(out)
    assert not any(n.op == "AddV2" and "y" in n.input for n in out.node)   # folded
    assert index.node("y").op == "BiasAdd"
    lo, hi = ranges["y:0"]
    assert ctx.options["ranges"]["y:0"] == (0.0, pytest.approx(hi - lo))
    measured, _ = calibrate(out, ["y:0"], feeds)
    assert measured["y:0"][0] >= -1e-5 * (hi - lo)
    notes = {n["node"]: n["message"] for n in ctx.notes if n["kind"] != "fp32"}
    assert {n["node"] for n in ctx.notes if n["kind"] == "fp32"} == {"x/shifted"}
    assert set(notes) == {"x", "y"} and "folded" in notes["y"] and "AddV2" in notes["x"]


def test_prelu_output_through_max_pool_into_valid_conv_gets_an_add():
    t = tf()

    def body(x):
        y = prelu(t, t.nn.conv2d(x, const(3, 3, 3, 8), 1, "VALID"))
        p = t.nn.max_pool2d(y, 3, 2, "SAME", name="pool")
        z = t.nn.bias_add(t.nn.conv2d(p, const(3, 3, 8, 4), 1, "VALID"), const(4))
        return t.identity(z, name="out")

    gd, outs = build_graph(body, x=[1, 16, 16, 3])
    feeds = feeds_of([1, 16, 16, 3])
    out, ctx, ranges = shifted(gd, outs, feeds)
    assert_same_outputs(gd, out, outs, feeds)
    index = GraphIndex(out)
    pool = index.node("pool")
    adds = [n for n in out.node if n.op == "AddV2" and n.name.endswith("/shifted")]
    assert len(adds) == 2                                      # the input and the PReLU output
    assert pool.input[0] in {a.name for a in adds}
    p_lo, p_hi = ctx.options["ranges"]["pool:0"]
    assert p_lo >= 0 and p_hi > 0


def test_flatten_into_matmul():
    t = tf()

    def body(x):
        y = t.add(x, const(3), name="y")                # calibrated (Add): shifted there
        flat = t.reshape(t.transpose(y, [0, 2, 1, 3]), [2, -1])
        return t.nn.bias_add(t.linalg.matmul(flat, const(48, 5)), const(5), name="out")

    gd, outs = build_graph(body, x=[2, 4, 4, 3])
    feeds = feeds_of([2, 4, 4, 3], offset=0.5)
    out, ctx, _ = shifted(gd, outs, feeds)
    assert_same_outputs(gd, out, outs, feeds)
    index = GraphIndex(out)
    assert index.node(index.node("transpose").input[0]).name == "y/shifted"


def test_padded_conv_readers_and_graph_outputs_are_left_alone():
    t = tf()

    def body(x):
        y = t.nn.bias_add(t.nn.conv2d(x, const(3, 3, 4, 8), 1, "VALID"), const(8), name="y")
        a = t.nn.conv2d(y, const(3, 3, 8, 4), 1, "SAME", name="padded")       # zero padding
        b = t.nn.conv2d(y, const(1, 1, 8, 4), 1, "VALID", name="pointwise")
        return [t.identity(a, name="out_a"), t.identity(b, name="out_b"), t.identity(y, "out_y")]

    gd, outs = build_graph(body, x=[1, 10, 10, 4])
    feeds = feeds_of([1, 10, 10, 4])
    out, ctx, _ = shifted(gd, outs, feeds)
    assert_same_outputs(gd, out, outs, feeds)
    index = GraphIndex(out)
    assert index.node(index.node("out_a").input[0]).input[0] == "y"      # padded reads y itself
    assert index.node("pointwise/before_shift_bias").input[0] == "y/shifted"
    assert index.node("out_y").input[0] == "y"


def test_no_signed_tensor_no_change():
    t = tf()

    def body(x):
        y = t.nn.relu(t.nn.conv2d(x, const(3, 3, 4, 8), 1, "VALID"))
        return t.nn.conv2d(y, const(1, 1, 8, 4), 1, "VALID", name="out")

    gd, outs = build_graph(body, x=[1, 8, 8, 4])
    feeds = [{"x:0": np.abs(f["x:0"])} for f in feeds_of([1, 8, 8, 4])]
    out, ctx, _ = shifted(gd, outs, feeds)
    assert out.SerializeToString() == gd.SerializeToString() and not ctx.notes


def test_int8_reader_takes_quint8_and_is_exact_on_grid_data():
    """Input on the quint8 grid of [lo, hi], weights exactly representable: the int8
    graph's only error is rounding its output (at most one output step)."""
    t = tf()
    lo, hi = -1.5, 2.5
    step = (hi - lo) / 255
    w_levels = RNG.integers(-60, 61, (1, 1, 8, 6)).astype(np.float32)
    w_levels[..., 0, :] = 60                        # every output channel reaches its max
    w = w_levels * np.float32(0.01)
    bias = RNG.normal(0, 0.1, 6).astype(np.float32)

    def body(x):
        z = t.nn.bias_add(t.nn.conv2d(x, t.constant(w), 1, "VALID"), t.constant(bias))
        return t.identity(z, name="out")

    gd, outs = build_graph(body, x=[1, 6, 6, 8])
    levels = [RNG.integers(0, 256, (1, 6, 6, 8)) for _ in range(6)]
    for lv in levels:
        lv[0, 0, 0, 0], lv[0, 0, 0, 1] = 0, 255           # the calibrated range is exact
    xs = [(lo + lv * step).astype(np.float32) for lv in levels]
    result = convert(gd, xs, outputs=outs, target="avx2", shift_signed=True,
                     pair_weights=True, max_layer_error=None)
    conv = next(n for n in result.graph_def.node if n.op == "_FusedQuantizedConv2D")
    assert conv.attr["Tinput"].type == 12                   # DT_QUINT8
    quantize = next(n for n in result.graph_def.node if n.op == "QuantizeV2")
    assert quantize.attr["mode"].s == b"MIN_COMBINED" and quantize.input[0] == "x"   # folded
    ref, got = GraphRunner(gd, outs), GraphRunner(result.graph_def, outs)
    out_range = max(abs(v) for x in xs for v in (ref({"x:0": x})[0].min(),
                                                 ref({"x:0": x})[0].max()))
    for x in xs:
        err = np.abs(got({"x:0": x})[0] - ref({"x:0": x})[0]).max()
        assert err <= out_range / 127 * 1.01 + 1e-5


def test_shift_lowers_int8_error_on_asymmetric_signed_input():
    t = tf()

    def body(x):
        y = prelu(t, t.nn.conv2d(x, const(3, 3, 3, 16), 1, "VALID"))
        z = t.nn.bias_add(t.nn.conv2d(y, const(3, 3, 16, 16), 1, "VALID"), const(16))
        return t.identity(z, name="out")

    gd, outs = build_graph(body, x=[1, 14, 14, 3])
    xs = [RNG.normal(0, 1, (1, 14, 14, 3)).astype(np.float32) for _ in range(8)]
    ref = GraphRunner(gd, outs)

    def error(**kw):
        got = GraphRunner(convert(gd, xs, outputs=outs, target="avx2", max_layer_error=None,
                                  **kw).graph_def, outs)
        return np.mean([rel_l2(got({"x:0": x})[0], ref({"x:0": x})[0]) for x in xs])

    plain = error(shift_signed=False, bias_correction=False, pair_weights=False)
    assert error(shift_signed=True, bias_correction=True, pair_weights=True) < 0.8 * plain


@pytest.mark.parametrize("padding", ["SAME", "EXPLICIT"])
def test_padded_conv_on_the_graph_input_pads_before_the_shift(padding):
    t = tf()
    pad = "SAME" if padding == "SAME" else [[0, 0], [1, 2], [0, 1], [0, 0]]

    def body(x):
        z = t.nn.relu(t.nn.bias_add(t.nn.conv2d(x, const(3, 3, 3, 8), 2, pad, name="first"),
                                    const(8)))
        return t.identity(z, name="out")

    gd, outs = build_graph(body, x=[1, 11, 12, 3])
    feeds = feeds_of([1, 11, 12, 3], offset=0.3)
    out, ctx, ranges = shifted(gd, outs, feeds)
    assert_same_outputs(gd, out, outs, feeds)
    index = GraphIndex(out)
    conv = next(n for n in out.node if n.op == "Conv2D")
    assert conv.attr["padding"].s == b"VALID" and not list(conv.attr["explicit_paddings"].list.i)
    shift = index.node(conv.input[0])
    assert shift.op == "AddV2" and index.node(shift.input[0]).op == "Pad"
    assert index.node(shift.input[0]).input[0] == "x"
    assert ctx.options["ranges"][f"{shift.name}:0"][0] == 0.0


def test_without_bias_correction_the_int8_reader_gets_the_rounding_of_lo_sum_w():
    """Input exact on the quint8 grid, weights not representable, no bias correction: the
    int8 reader's error is its weight rounding times y (not y - lo: the int8 bias takes
    lo * (sum Wq - sum W), recorded in ctx.options['offset_bias_deltas'])."""
    from graphquant.bias_correction import dequantized_weights
    from graphquant.int8_rewrite import quantize_weights
    from graphquant.target import resolve

    t = tf()
    lo, hi = -1.5, 2.5
    step = (hi - lo) / 255
    w = RNG.normal(0, 0.3, (1, 1, 8, 6)).astype(np.float32)
    bias = RNG.normal(0, 0.1, 6).astype(np.float32)

    def body(x):
        z = t.nn.bias_add(t.nn.conv2d(x, t.constant(w), 1, "VALID", name="conv"),
                          t.constant(bias))
        return t.identity(z, name="out")

    gd, outs = build_graph(body, x=[1, 6, 6, 8])
    levels = [RNG.integers(0, 256, (1, 6, 6, 8)) for _ in range(6)]
    for lv in levels:
        lv[0, 0, 0, 0], lv[0, 0, 0, 1] = 0, 255
    xs = [(lo + lv * step).astype(np.float32) for lv in levels]
    # the pass alone: the recorded int8 delta is lo * (sum Wq - sum W) per channel
    ranges, _ = calibrate(gd, calibration_tensors(gd), [{"x:0": x} for x in xs])
    ctx = PassContext.for_graph(gd, outputs=outs)
    ctx.options.update(ranges=dict(ranges), shapes=tensor_shapes(gd), target=resolve("avx2"),
                       pair_weights=True)
    run_pipeline(gd, ["shift_signed_activations"], ctx)
    qw = quantize_weights(ctx, w, "conv", False)
    wq = dequantized_weights(qw, "conv", w.shape)
    expect = ranges["x:0"][0] * (wq - w.astype(np.float64)).sum(axis=(0, 1, 2))
    assert np.allclose(ctx.options["offset_bias_deltas"]["conv"], expect, atol=1e-6)
    # end to end: |int8 - fp32| <= sum |Wq - W| |y| + the int32 bias rounding
    result = convert(gd, xs, outputs=outs, target="avx2", shift_signed=True, pair_weights=True,
                     bias_correction=False, max_layer_error=None, calibration="minmax")
    ref, got = GraphRunner(gd, outs), GraphRunner(result.graph_def, outs)
    w_err = np.abs(wq - w).reshape(8, 6)
    s_bias = step * np.asarray(qw.step, np.float64).reshape(-1)
    for x in xs:
        bound = np.abs(x).reshape(-1, 8) @ w_err + 0.5 * s_bias + 1e-4
        err = np.abs(got({"x:0": x})[0] - ref({"x:0": x})[0]).reshape(-1, 6)
        assert np.all(err <= bound)


def _hardswish_into_depthwise(t, lo_scale):
    """x -> hard-swish-like (min ``-lo_scale``, max ~6) -> Transpose pair -> SAME depthwise."""
    def body(x):
        y = x * t.nn.relu6(x + 3.0) / 6.0 * lo_scale
        y = t.transpose(t.transpose(y, [0, 3, 1, 2]), [0, 2, 3, 1], name="y")
        z = t.nn.bias_add(t.nn.depthwise_conv2d(y, const(3, 3, 8, 1), [1, 1, 1, 1], "SAME",
                                                name="dw"), const(8))
        return t.identity(z, name="out")
    return body


def test_padded_depthwise_on_an_asymmetric_tensor_pads_before_the_shift():
    t = tf()
    gd, outs = build_graph(_hardswish_into_depthwise(t, 1.0), x=[1, 9, 9, 8])
    feeds = feeds_of([1, 9, 9, 8], offset=1.0)
    out, ctx, ranges = shifted(gd, outs, feeds)
    assert_same_outputs(gd, out, outs, feeds)
    index = GraphIndex(out)
    dw = next(n for n in out.node if n.op == "DepthwiseConv2dNative")
    assert dw.attr["padding"].s == b"VALID"
    shift = index.node(dw.input[0])
    assert shift.op == "AddV2" and index.node(shift.input[0]).op == "Pad"
    assert ctx.options["ranges"][f"{shift.name}:0"][0] == 0.0
    # int8: the shifted input has a finer step, the output error drops
    ref = GraphRunner(gd, outs)

    def error(shift_signed):
        got = GraphRunner(convert(gd, feeds, outputs=outs, target="avx2", max_layer_error=None,
                                  shift_signed=shift_signed).graph_def, outs)
        return np.mean([rel_l2(got(f)[0], ref(f)[0]) for f in feeds])

    assert error(True) < 0.8 * error(False)


def test_padded_depthwise_on_a_symmetric_tensor_is_left_alone():
    t = tf()

    def body(x):
        y = t.identity(x * 2.0, name="y")            # symmetric: the shift gains no step
        z = t.nn.depthwise_conv2d(y, const(3, 3, 8, 1), [1, 1, 1, 1], "SAME", name="dw")
        return t.identity(z, name="out")

    gd, outs = build_graph(body, x=[1, 9, 9, 8])
    feeds = feeds_of([1, 9, 9, 8])
    out, _, _ = shifted(gd, outs, feeds)
    dw = next(n for n in out.node if n.op == "DepthwiseConv2dNative")
    assert dw.attr["padding"].s == b"SAME" and dw.input[0] == "y"
