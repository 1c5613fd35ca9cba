"""weight_rounding: the Gram matrix of a layer's real inputs, integers in the target's format,
never more layer output error than round-to-nearest on the calibration data."""

import numpy as np
import pytest

from graphquant import pair_weights, quant_math, target
from graphquant.calibrate import calibrate
from graphquant.convert import convert
from graphquant.execute import GraphRunner
from graphquant.graph import const_value
from graphquant.int8_rewrite import quantize_weights
from graphquant.pipeline import PassContext
from graphquant.ranges import calibration_tensors
from graphquant.runtime import tf
from graphquant.weight_rounding import (candidates, hessians, level_projector, output_error,
                                        pair_projector, round_columns, round_weights,
                                        rounded_weights)
from helpers import build_graph

RNG = np.random.default_rng(3)


def ctx_avx2(**options):
    return PassContext(options={"target": target.resolve("avx2"), "pair_weights": True,
                                **options})


def correlated_rows(n, k, rho=0.9):
    """Rows with neighbouring columns correlated like pixels of a smooth image."""
    x = np.empty((n, k))
    x[:, 0] = RNG.normal(size=n)
    for j in range(1, k):
        x[:, j] = rho * x[:, j - 1] + np.sqrt(1 - rho ** 2) * RNG.normal(size=n)
    return np.abs(x)          # non-negative, as after Relu or a shift


def test_round_columns_lowers_output_error_on_correlated_inputs():
    x = correlated_rows(400, 36)
    h = x.T @ x
    z = RNG.normal(0, 20, (36, 8))
    q = round_columns(z, h, level_projector(127))
    nearest = np.clip(np.rint(z), -127, 127)
    assert np.all(q == np.rint(q)) and np.abs(q).max() <= 127
    # squared output error (in steps), summed over channels: well below round-to-nearest
    assert output_error(q, z, h).sum() < 0.7 * output_error(nearest, z, h).sum()
    # per weight it stays within a few steps of the float value
    assert np.abs(q - z).max() <= 3


def test_output_error_is_the_layer_output_mse():
    x = RNG.normal(size=(50, 12))
    z, q = RNG.normal(0, 5, (12, 3)), RNG.integers(-5, 6, (12, 3)).astype(np.float64)
    np.testing.assert_allclose(output_error(q, z, x.T @ x),
                               ((x @ (q - z)) ** 2).sum(axis=0), rtol=1e-10)


def test_level_projector_keeps_multiples_and_levels():
    z = RNG.normal(0, 80, (30, 5))
    x = correlated_rows(200, 30)
    q = round_columns(z, x.T @ x, level_projector(126, 2))
    assert np.all(q % 2 == 0) and np.abs(q).max() <= 126


@pytest.mark.parametrize("channels_in", [4, 5])
def test_pair_projector_keeps_pair_sums_exact_on_avx2(channels_in):
    # weights near the pair limit: most pairs would round above 128 together
    w = np.abs(RNG.normal(64, 3, (3, 3, channels_in, 6)))
    k = 9 * channels_in
    x = correlated_rows(300, k)
    q = round_columns(w.reshape(k, 6), x.T @ x, pair_projector(channels_in))
    assert pair_weights.pair_sums_ok(q.reshape(w.shape).astype(np.int64), "conv")


@pytest.mark.parametrize("kind", ["conv", "matmul", "matmul_tb"])
def test_round_weights_never_worse_than_nearest_per_channel(kind):
    """Per channel, on the data it was checked on (here the same)."""
    base = "matmul" if kind.startswith("matmul") else kind
    shape = {"conv": (3, 3, 6, 8), "matmul": (24, 8), "matmul_tb": (8, 24)}[kind]
    w = RNG.normal(0, 0.1, shape).astype(np.float32)
    ctx = ctx_avx2()
    qw = quantize_weights(ctx, w, base, False, transpose_b=kind == "matmul_tb")
    k = 54 if kind == "conv" else 24
    x = correlated_rows(500, k)
    h = x.T @ x
    project = pair_projector(6 if kind == "conv" else 24)
    new = round_weights(qw, w, base, h, project, transpose_b=kind == "matmul_tb")
    assert new.values.shape == qw.values.shape and new.values.dtype == np.int8
    np.testing.assert_array_equal(new.step, qw.step)          # same declared ranges
    view = quant_math.weight_channel_view
    z = view(w.astype(np.float64), base, kind == "matmul_tb").reshape(k, -1) / qw.step
    before = output_error(view(qw.values, base, kind == "matmul_tb").reshape(k, -1), z, h)
    after = output_error(view(new.values, base, kind == "matmul_tb").reshape(k, -1), z, h)
    assert np.all(after <= before) and after.sum() < before.sum()
    assert pair_weights.pair_sums_ok(new.values, base, kind == "matmul_tb")


def _im2col(x, kh, kw, stride, pads):
    """Patches of an NHWC batch in [h, w, in] order (reference for ExtractImagePatches)."""
    x = np.pad(x, [(0, 0), pads[0], pads[1], (0, 0)])
    n, hh, ww, c = x.shape
    rows = []
    for b in range(n):
        for i in range(0, hh - kh + 1, stride):
            for j in range(0, ww - kw + 1, stride):
                rows.append(x[b, i:i + kh, j:j + kw, :].reshape(-1))
    return np.array(rows, np.float64)


@pytest.mark.parametrize("padding", ["SAME", "VALID", [[0, 0], [1, 2], [2, 1], [0, 0]]])
def test_hessians_are_the_gram_matrix_of_the_input_patches(padding):
    t = tf()
    w = RNG.normal(0, 0.2, (3, 3, 4, 5)).astype(np.float32)
    gd, outs = build_graph(lambda x: t.identity(t.nn.conv2d(t.nn.relu(x), w, 2, padding),
                                                name="out"), x=[1, 9, 9, 4])
    feeds = [{"x:0": RNG.normal(0, 1, (1, 9, 9, 4)).astype(np.float32)} for _ in range(3)]
    ranges, _ = calibrate(gd, calibration_tensors(gd), feeds)
    (cand,) = candidates(gd, ranges)
    h, rows = hessians(gd, [cand], feeds)[cand.node]
    if isinstance(padding, str):   # SAME: 9 -> 5 outputs with stride 2, TF pads (1, 1)
        pads = {"SAME": [(1, 1), (1, 1)], "VALID": [(0, 0), (0, 0)]}[padding]
    else:
        pads = [tuple(padding[1]), tuple(padding[2])]
    ref = sum(_im2col(np.maximum(f["x:0"], 0), 3, 3, 2, pads).T
              @ _im2col(np.maximum(f["x:0"], 0), 3, 3, 2, pads) for f in feeds)
    np.testing.assert_allclose(h, ref, rtol=1e-4, atol=1e-3)
    assert rows == 3 * len(_im2col(feeds[0]["x:0"], 3, 3, 2, pads))
    patches = np.concatenate([_im2col(np.maximum(f["x:0"], 0), 3, 3, 2, pads) for f in feeds])
    centered, _ = hessians(gd, [cand], feeds, centered=True)[cand.node]
    np.testing.assert_allclose(centered, np.cov(patches.T, bias=True) * len(patches),
                               rtol=1e-4, atol=1e-3)


def _conv_relu_conv():
    t = tf()
    w1 = RNG.normal(0, 0.3, (3, 3, 3, 16)).astype(np.float32)
    w2 = RNG.normal(0, 0.1, (3, 3, 16, 8)).astype(np.float32)

    def body(x):
        h = t.nn.relu(t.nn.conv2d(x, w1, 1, "SAME"))
        return t.identity(t.nn.conv2d(h, w2, 1, "SAME"), name="out")
    return build_graph(body, x=[1, 12, 12, 3])


def test_convert_writes_the_rounded_integers_and_they_lower_the_layer_error():
    gd, outs = _conv_relu_conv()
    smooth = [np.cumsum(RNG.normal(size=(1, 12, 12, 3)), axis=2).astype(np.float32)
              for _ in range(6)]
    feeds = [{"x:0": s} for s in smooth]
    kw = dict(outputs=outs, target="avx2", max_layer_error=None, bias_correction=False)
    plain = convert(gd, feeds, **kw)
    rounded = convert(gd, feeds, weight_rounding=True, **kw)
    weights = {n.name: const_value(n) for n in rounded.graph_def.node
               if n.name.endswith("/weights")}
    assert weights
    for values in weights.values():        # u8-input convs on avx2: pair-limited 8-bit
        assert pair_weights.pair_sums_ok(np.asarray(values, np.int64), "conv")
    old = {n.name: const_value(n) for n in plain.graph_def.node if n.name.endswith("/weights")}
    assert any(np.any(np.asarray(old[k]) != np.asarray(v)) for k, v in weights.items())
    ref = GraphRunner(gd, outs)
    a, b = GraphRunner(plain.graph_def, outs), GraphRunner(rounded.graph_def, outs)
    err_plain = sum(np.sum((a(f)[0] - ref(f)[0]) ** 2) for f in feeds)
    err_rounded = sum(np.sum((b(f)[0] - ref(f)[0]) ** 2) for f in feeds)
    assert err_rounded < err_plain


def test_budget_zero_rounds_nothing():
    gd, outs = _conv_relu_conv()
    feeds = [{"x:0": RNG.normal(0, 1, (1, 12, 12, 3)).astype(np.float32)}]
    ranges, _ = calibrate(gd, calibration_tensors(gd), feeds)
    assert rounded_weights(gd, ranges, feeds, ctx_avx2(), budget=0) == {}
    assert len(rounded_weights(gd, ranges, feeds, ctx_avx2())) == 2


def test_round_weights_keeps_nearest_where_the_check_data_says_so():
    w = RNG.normal(0, 0.1, (24, 8)).astype(np.float32)
    qw = quantize_weights(ctx_avx2(), w, "matmul", False)
    fit, check = correlated_rows(300, 24), RNG.exponential(size=(300, 24))
    h_fit, h_check = fit.T @ fit, check.T @ check
    new = round_weights(qw, w, "matmul", h_fit, pair_projector(24), check=h_check)
    z = w.astype(np.float64) / qw.step
    before = output_error(qw.values.astype(np.float64), z, h_check)
    after = output_error(new.values.astype(np.float64), z, h_check)
    assert np.all(after <= before)
    changed = np.any(new.values != qw.values, axis=0)
    assert np.all(after[changed] < before[changed])
