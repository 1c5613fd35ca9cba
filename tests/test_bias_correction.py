"""bias_correction: no correction for exact weights, lower per-channel mean error otherwise,
applied to int8 ops only."""

import numpy as np
import pytest

from graphquant import target
from graphquant.bias_correction import bias_corrections, dequantized_weights, output_shifts
from graphquant.calibrate import calibrate
from graphquant.convert import convert
from graphquant.execute import GraphRunner
from graphquant.int8_rewrite import quantize_weights
from graphquant.pipeline import PassContext
from graphquant.ranges import calibration_tensors
from graphquant.runtime import tf
from helpers import build_graph

RNG = np.random.default_rng(1)


def ctx_avx2(**options):
    return PassContext(options={"target": target.resolve("avx2"), **options})


def relu_then(op, w, b=None):
    """x -> Relu -> op(w) [+ b] -> out: inputs with a positive mean, as after any Relu."""
    t = tf()

    def body(x):
        h = t.nn.relu(x)
        y = op(t, h, t.constant(w))
        if b is not None:
            y = t.nn.bias_add(y, t.constant(b))
        return t.identity(y, name="out")
    return body


OPS = {
    "conv": (lambda t, h, w: t.nn.conv2d(h, w, 1, "SAME"), (3, 3, 8, 16), [1, 9, 9, 8]),
    "depthwise": (lambda t, h, w: t.nn.depthwise_conv2d(h, w, [1, 1, 1, 1], "SAME"),
                  (3, 3, 8, 2), [1, 9, 9, 8]),
    "matmul": (lambda t, h, w: t.linalg.matmul(h, w), (24, 10), [4, 24]),
    "matmul_tb": (lambda t, h, w: t.linalg.matmul(h, w, transpose_b=True), (10, 24), [4, 24]),
}


@pytest.mark.parametrize("kind", sorted(OPS))
def test_dequantized_weights_are_what_the_kernel_scales(kind):
    _, shape, _ = OPS[kind]
    w = RNG.normal(0, 0.2, shape).astype(np.float32)
    base = "matmul" if kind.startswith("matmul") else kind
    qw = quantize_weights(ctx_avx2(), w, base, False, transpose_b=kind == "matmul_tb")
    deq = dequantized_weights(qw, base, w.shape, kind == "matmul_tb")
    assert deq.shape == w.shape
    assert np.abs(deq - w).max() <= qw.step.max() / 2 * 1.0001


def exact_weights(shape, level_max=60):
    levels = RNG.integers(-level_max, level_max + 1, shape).astype(np.float32)
    levels.reshape(-1, shape[-1])[0] = 63      # the max level in every output channel
    return levels * np.float32(2.0 ** -6)


@pytest.mark.parametrize("kind", ["conv", "matmul"])
def test_exactly_representable_weights_get_no_correction(kind):
    op, shape, x_shape = OPS[kind]
    w = exact_weights(shape)
    gd, outs = build_graph(relu_then(op, w), x=x_shape)
    feeds = [{"x:0": RNG.normal(0, 1, x_shape).astype(np.float32)} for _ in range(4)]
    ranges, _ = calibrate(gd, calibration_tensors(gd), feeds)
    assert bias_corrections(gd, ranges, feeds, ctx_avx2()) == {}
    plain = dict(outputs=outs, target="avx2", max_layer_error=None, pair_weights=False,
                 shift_signed=False)          # 7-bit weights: the levels above are exact
    with_bc = convert(gd, feeds, bias_correction=True, **plain)
    without = convert(gd, feeds, bias_correction=False, **plain)
    a, b = GraphRunner(with_bc.graph_def, outs), GraphRunner(without.graph_def, outs)
    for f in feeds:
        np.testing.assert_array_equal(a(f)[0], b(f)[0])


@pytest.mark.parametrize("kind", sorted(OPS))
def test_correction_removes_the_mean_shift_of_the_quantized_weights(kind):
    op, shape, x_shape = OPS[kind]
    w = RNG.normal(0, 0.2, shape).astype(np.float32)
    gd, outs = build_graph(relu_then(op, w), x=x_shape)
    feeds = [{"x:0": RNG.normal(0.5, 1, x_shape).astype(np.float32)} for _ in range(6)]
    ranges, _ = calibrate(gd, calibration_tensors(gd), feeds)
    corr = bias_corrections(gd, ranges, feeds, ctx_avx2())
    (name, delta), = corr.items()
    # the shift it removes is the measured mean of op(x, Wq - W), per output channel
    base = "matmul" if kind.startswith("matmul") else kind
    qw = quantize_weights(ctx_avx2(), w, base, False, transpose_b=kind == "matmul_tb")
    dw = dequantized_weights(qw, base, w.shape, kind == "matmul_tb") - w
    t = tf()
    shift = np.mean([t.reduce_mean(op(t, t.nn.relu(f["x:0"]), t.constant(dw.astype(
        np.float32))), axis=list(range(len(x_shape) - 1))).numpy() for f in feeds], axis=0)
    np.testing.assert_allclose(delta, -shift, rtol=1e-3, atol=1e-6)


def test_int8_mean_error_per_channel_drops_on_held_out_data():
    op, shape, x_shape = OPS["conv"]
    w = RNG.normal(0, 0.2, shape).astype(np.float32)
    b = RNG.normal(0, 0.1, shape[-1]).astype(np.float32)
    gd, outs = build_graph(relu_then(op, w, b), x=x_shape)
    calib = [{"x:0": RNG.normal(0.5, 1, x_shape).astype(np.float32)} for _ in range(8)]
    held = [{"x:0": RNG.normal(0.5, 1, x_shape).astype(np.float32)} for _ in range(8)]
    ref = GraphRunner(gd, outs)

    def mean_error(**kw):
        got = GraphRunner(convert(gd, calib, outputs=outs, target="avx2", max_layer_error=None,
                                  **kw).graph_def, outs)
        diff = np.concatenate([got(f)[0] - ref(f)[0] for f in held])
        return np.abs(diff.reshape(-1, shape[-1]).mean(axis=0))

    plain, corrected = mean_error(bias_correction=False), mean_error(bias_correction=True)
    assert corrected.mean() < 0.5 * plain.mean()


def test_a_node_left_in_fp32_keeps_its_own_bias():
    op, shape, x_shape = OPS["conv"]
    w = RNG.normal(0, 0.2, shape).astype(np.float32)
    gd, outs = build_graph(relu_then(op, w), x=x_shape)
    feeds = [{"x:0": RNG.normal(0.5, 1, x_shape).astype(np.float32)} for _ in range(4)]
    result = convert(gd, feeds, outputs=outs, target="avx2", bias_correction=True,
                     exclude=["Conv2D"], max_layer_error=None)
    assert any(n.op == "Conv2D" for n in result.graph_def.node)
    a, b = GraphRunner(gd, outs), GraphRunner(result.graph_def, outs)
    for f in feeds:
        np.testing.assert_allclose(b(f)[0], a(f)[0], rtol=1e-5, atol=1e-6)


def test_output_shifts_are_zero_without_weight_error():
    op, shape, x_shape = OPS["conv"]
    gd, _ = build_graph(relu_then(op, RNG.normal(0, 1, shape).astype(np.float32)), x=x_shape)
    assert output_shifts(gd, {"Conv2D": np.zeros(shape, np.float32)},
                         [{"x:0": np.ones(x_shape, np.float32)}]) == {}


# --------------------------------------------------------------------------- from calibration means
def _maps(gd, feeds):
    from graphquant.bias_correction import mean_tensors
    from graphquant.calibrate import collect_statistics

    return collect_statistics(gd, calibration_tensors(gd), feeds,
                              mean_tensors=mean_tensors(gd)).mean_maps


def _random_deltas(gd):
    from graphquant.int8_rewrite import WEIGHTED_OPS
    from graphquant.graph import GraphIndex, const_value

    index = GraphIndex(gd)
    return {n.name: RNG.normal(0, 0.01, const_value(index.node(n.input[1])).shape
                               ).astype(np.float32)
            for n in gd.node if n.op in WEIGHTED_OPS}


@pytest.mark.parametrize("kind", sorted(OPS))
def test_shifts_from_calibration_means_equal_the_per_feed_shifts(kind):
    from graphquant.bias_correction import shifts_from_means

    op, shape, x_shape = OPS[kind]
    gd, _ = build_graph(relu_then(op, RNG.normal(0, 0.2, shape).astype(np.float32)), x=x_shape)
    feeds = [{"x:0": RNG.normal(0.5, 1, x_shape).astype(np.float32)} for _ in range(5)]
    deltas = _random_deltas(gd)
    shifts, rest = shifts_from_means(gd, deltas, _maps(gd, feeds))
    assert rest == {} and sorted(shifts) == sorted(deltas)
    expected = output_shifts(gd, deltas, feeds)
    for name in deltas:
        np.testing.assert_allclose(shifts[name], expected[name], rtol=1e-4, atol=1e-7)


def test_means_of_several_shapes_and_rows_per_sample_weigh_like_the_feeds():
    from graphquant.bias_correction import shifts_from_means

    t = tf()
    w = RNG.normal(0, 0.2, (8, 5)).astype(np.float32)

    def body(x):      # [b, 3, 8] -> [3b, 8] rows: three rows per sample
        rows = t.reshape(t.nn.relu(x), [-1, 8])
        return t.identity(t.linalg.matmul(rows, t.constant(w)), name="out")

    gd, _ = build_graph(body, x=[None, 3, 8])
    feeds = [{"x:0": RNG.normal(0.5, 1, (b, 3, 8)).astype(np.float32)} for b in (1, 4, 2)]
    deltas = _random_deltas(gd)
    maps = _maps(gd, feeds)
    assert maps.per_row            # the MatMul input holds 3 rows per sample
    shifts, rest = shifts_from_means(gd, deltas, maps)
    expected = output_shifts(gd, deltas, feeds)
    assert rest == {}
    for name in deltas:
        np.testing.assert_allclose(shifts[name], expected[name], rtol=1e-4, atol=1e-7)


def test_inputs_shifted_after_calibration_are_found_or_measured_per_feed():
    """shift_signed_activations rewrites after calibration: a shifted tensor under its old
    name (after a MaxPool) is the measured mean plus a constant; the results equal the
    per-feed ones."""
    from graphquant.bias_correction import constant_offset, shifts_from_means
    from graphquant.execute import tensor_shapes
    from graphquant.pipeline import run_pipeline

    t = tf()
    w1 = RNG.normal(0, 0.3, (3, 3, 4, 8)).astype(np.float32)
    w2 = RNG.normal(0, 0.3, (1, 1, 8, 6)).astype(np.float32)
    w3 = RNG.normal(0, 0.3, (3, 3, 8, 5)).astype(np.float32)

    def body(x):
        y = t.nn.bias_add(t.nn.conv2d(x, t.constant(w1), 1, "SAME"), t.constant(
            np.linspace(-1, 1, 8).astype(np.float32)))          # signed, no Relu
        p = t.nn.max_pool2d(y, 2, 2, "VALID")
        a = t.nn.conv2d(p, t.constant(w2), 1, "VALID")          # 1x1 reader of the MaxPool
        b = t.nn.conv2d(y, t.constant(w3), 1, "SAME")           # padded reader of y
        return t.identity(a, name="a"), t.identity(b, name="b")

    gd, outs = build_graph(body, x=[1, 8, 8, 4])
    feeds = [{"x:0": RNG.normal(0, 1, (1, 8, 8, 4)).astype(np.float32)} for _ in range(4)]
    maps = _maps(gd, feeds)
    ranges, _ = calibrate(gd, calibration_tensors(gd), feeds)
    ctx = ctx_avx2(ranges=dict(ranges), shapes=tensor_shapes(gd))
    ctx.outputs = [o.split(":")[0] for o in outs]
    shifted = run_pipeline(gd, ["shift_signed_activations"], ctx)
    assert any(n.name.endswith("/shifted") for n in shifted.node)
    deltas = _random_deltas(shifted)
    shifts, rest = shifts_from_means(shifted, deltas, maps)
    expected = output_shifts(shifted, deltas, feeds)
    # every input's mean was found: x through Pad/AddV2, the MaxPool's as measured + lo
    assert rest == {} and sorted(shifts) == sorted(expected)
    for name in shifts:
        np.testing.assert_allclose(shifts[name], expected[name], rtol=1e-4, atol=1e-6)
    assert constant_offset(np.float32([1, 2, 3]), np.float32([0.5, 1.5, 2.5])) == -0.5
    assert constant_offset(np.float32([1, 2, 3]), np.float32([1, 2, 4])) is None
