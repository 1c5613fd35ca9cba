"""Calibration: exact min/max from the graph, order-free histograms, KL/MSE/percentile ranges."""

import math

import numpy as np
import pytest

from graphquant.calib_data import open_data
from graphquant.calibrate import (HIST_BINS, METHODS, TensorStats, calibrate, collect_statistics,
                                  compute_ranges, kl_divergences, kl_threshold, mse_curve,
                                  mse_threshold, quantization_mse, stderr_progress, tensor_range)
from graphquant.errors import CalibrationDataError, GraphQuantError, NodeNotFoundError
from graphquant.execute import GraphRunner
from graphquant.runtime import tf
from helpers import build_graph


def _conv_graph(batch=1):
    t = tf()

    def body(x):
        w = t.constant(np.random.default_rng(0).normal(size=(3, 3, 2, 4)).astype(np.float32))
        y = t.nn.conv2d(x, w, 1, "SAME", name="conv")
        y = t.nn.bias_add(y, t.constant(np.float32([0.5, -0.5, 1.0, 0.0])), name="bias")
        r = t.nn.relu(y, name="relu")
        return t.tanh(r - 1.0, name="out")

    return build_graph(body, x=[batch, 6, 6, 2])


def _samples(n=6, seed=1):
    return np.random.default_rng(seed).normal(size=(n, 6, 6, 2)).astype(np.float32)


TENSORS = ["x:0", "conv:0", "bias", "relu:0", "out:0"]


# --------------------------------------------------------------------------- running the graph
def test_minmax_ranges_equal_numpy_min_max_exactly(tmp_path):
    gd, _ = _conv_graph()
    path = str(tmp_path / "x.npy")
    np.save(path, _samples())
    data = open_data(path, gd)
    seen = []
    ranges, stats = calibrate(gd, TENSORS, data, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(i, 6) for i in range(1, 7)]
    assert calibrate(gd, TENSORS, data, in_graph=True).ranges == ranges
    with GraphRunner(gd, TENSORS) as runner:
        outputs = [runner(f) for f in data]
    for i, name in enumerate(TENSORS):
        values = np.concatenate([o[i].ravel() for o in outputs])
        assert ranges[name] == (float(values.min()), float(values.max())), name
        assert stats[name].count == values.size and stats[name].nonfinite == 0
    assert ranges["relu:0"][0] == 0.0 and ranges["conv:0"][0] < 0
    assert not stats["conv:0"].has_histogram          # minmax alone needs no histogram
    assert stats.num_samples == 6 and stats.num_feeds == 6 and "x.npy" in stats.source
    with pytest.raises(GraphQuantError, match="without a histogram"):
        compute_ranges(stats, "kl")


def test_same_input_gives_identical_ranges_for_every_method(tmp_path):
    gd, _ = _conv_graph()
    data = open_data([s[None] for s in _samples()], gd)
    first = [calibrate(gd, TENSORS, data, m) for m in METHODS]
    second = [calibrate(gd, TENSORS, data, m) for m in METHODS]
    for (r1, s1), (r2, s2) in zip(first, second):
        assert r1 == r2
    hist = first[1].stats
    for m in METHODS:        # recomputing from the stats needs no new run
        assert compute_ranges(hist, m) == dict(first[METHODS.index(m)].ranges)
    lo, hi = first[0].ranges["conv:0"]
    for ranges, _ in first[1:]:
        assert lo <= ranges["conv:0"][0] <= 0 <= ranges["conv:0"][1] <= hi


def test_numpy_and_in_graph_statistics_are_identical_and_handle_nan_inf():
    t = tf()

    def body(x):
        y = t.identity(x * 3.0 - 1.0, name="y")
        log = t.math.log(x, name="log")                  # -inf at 0, NaN below 0
        index = t.argmax(t.reshape(x, [-1, 4]), axis=1, name="index")   # int64: fetched whole
        return y, log, index

    gd, _ = build_graph(body, x=[None, 4])
    rng = np.random.default_rng(8)
    batches = [rng.uniform(0.5, 2.0, size=(3, 4)).astype(np.float32) for _ in range(4)]
    batches[1][0, 0], batches[2][1, 1] = 0.0, -1.0
    batches[2][0, 0] = batches[2][2, 3] = 1e38                # finite, but their sum overflows
    batches[3] *= 64                                          # the range grows
    names = ["y:0", "log:0", "index:0"]
    with GraphRunner(gd, names) as runner:
        outputs = [runner({"x": b}) for b in batches]
    for in_graph in (False, True):
        stats = collect_statistics(gd, names, [{"x": b} for b in batches], in_graph=in_graph)
        for i, name in enumerate(names):
            expected = TensorStats(name)
            for out in outputs:
                expected.update(out[i])
            got = stats[name]
            assert (got.count, got.nonfinite, got.min, got.max, got.bound) == (
                expected.count, expected.nonfinite, expected.min, expected.max, expected.bound)
            np.testing.assert_array_equal(got.counts, expected.counts)
        assert stats["log:0"].nonfinite == 2 and stats["log:0"].count == 46
        assert stats["y:0"].nonfinite == 0 and stats["y:0"].max > 1e38
        assert stats.unusable() == ["log:0"]
    with pytest.raises(NodeNotFoundError, match="did you mean 'log'"):
        collect_statistics(gd, ["lgo:0"], [{"x": batches[0]}])


def test_statistics_reduced_beside_the_next_run_equal_reducing_after_each_run():
    # collect_statistics reduces feed k in a worker thread while feed k+1 runs
    gd, _ = _conv_graph()
    feeds = [{"x:0": _samples(1, seed=k) * 4.0 ** k} for k in range(5)]   # bounds grow
    seen = []
    stats = collect_statistics(gd, TENSORS, feeds, progress=lambda d, t: seen.append(d))
    assert seen == [1, 2, 3, 4, 5] and stats.num_feeds == 5
    with GraphRunner(gd, TENSORS) as runner:
        expected = {name: TensorStats(name) for name in runner.fetches}
        for feed in feeds:
            for name, value in zip(runner.fetches, runner(feed)):
                expected[name].update(value)
    for name, s in zip(runner.fetches, (stats[t] for t in TENSORS)):
        e = expected[name]
        assert (s.count, s.min, s.max, s.bound) == (e.count, e.min, e.max, e.bound)
        np.testing.assert_array_equal(s.counts, e.counts)


def test_a_failing_feed_stops_calibration_with_its_error():
    gd, _ = _conv_graph()

    def feeds():
        yield {"x:0": _samples(1)}
        yield {"x:0": np.zeros((1, 5, 5, 2), np.float32)}      # wrong shape

    with pytest.raises(GraphQuantError, match="cannot feed"):
        collect_statistics(gd, TENSORS, feeds())


def test_per_tensor_methods_and_option_errors():
    gd, _ = _conv_graph()
    data = open_data([s[None] for s in _samples(3)], gd)
    ranges, stats = calibrate(gd, TENSORS, data, "minmax", methods={"conv:0": "mse"})
    assert stats["conv:0"].has_histogram
    assert ranges["conv:0"] == tensor_range(stats["conv:0"], "mse")
    assert ranges["relu:0"] == (stats["relu:0"].min, stats["relu:0"].max)
    with pytest.raises(GraphQuantError, match="unknown calibration method 'entropy'") as err:
        calibrate(gd, TENSORS, data, "entropy")
    assert "minmax, kl, percentile, mse" in err.value.fix
    with pytest.raises(GraphQuantError, match="not calibrated: nope"):
        calibrate(gd, TENSORS, data, methods={"nope": "kl"})
    with pytest.raises(GraphQuantError, match="percentile must be in"):
        calibrate(gd, TENSORS, data, "percentile", percentile=9999)
    with pytest.raises(CalibrationDataError, match="no feeds"):
        collect_statistics(gd, TENSORS, [])


def test_real_model_ranges_bracket_and_agree_with_the_graph():
    from graphquant.graph import GraphIndex
    from graphquant.graph_io import load_graph_def
    from helpers import real_model

    pb, meta, samples = real_model("mtcnn_rnet")
    gd = load_graph_def(pb)
    relus = [f"{n.name}:0" for n in gd.node if n.op in ("Relu", "BiasAdd", "MatMul")]
    assert len(relus) >= 8
    data = open_data([s[None] for s in samples[:4]], gd)
    result = {m: calibrate(gd, relus, data, m) for m in METHODS}
    with GraphRunner(gd, relus) as runner:
        outputs = [runner(f) for f in data]
    for i, name in enumerate(relus):
        values = np.concatenate([o[i].ravel() for o in outputs])
        assert result["minmax"].ranges[name] == (float(values.min()), float(values.max()))
        for m in ("kl", "mse", "percentile"):
            lo, hi = result[m].ranges[name]
            assert values.min() <= lo <= 0 <= hi <= values.max(), (m, name)
    assert GraphIndex(gd).inputs() == ["input"]


def test_stderr_progress(capsys):
    for done in (1, 2):
        stderr_progress(done, 2)
    assert capsys.readouterr().err.splitlines()[-1].strip().endswith("calibrating 2/2")


# --------------------------------------------------------------------------- the histogram
def _stats(chunks, histogram=True):
    s = TensorStats("t", histogram)
    for c in chunks:
        s.update(c)
    return s


def test_histogram_is_exact_and_independent_of_order_and_batching():
    rng = np.random.default_rng(2)
    edge_cases = [0.0, -0.0, 4.0, -4.0, 0.5, 2.0 ** -45, 1000.0, -1024.0]
    x = np.concatenate([rng.laplace(size=5000) * 0.01, rng.normal(size=5000) * 3,
                        edge_cases]).astype(np.float32)
    whole = _stats([x])
    assert whole.bound == 2048.0 and whole.min == -1024.0 and whole.max == 1000.0
    np.testing.assert_array_equal(whole.counts, np.histogram(x, bins=whole.edges)[0])
    order = rng.permutation(len(x))
    small_first = np.argsort(np.abs(x), kind="stable")       # forces many range extensions
    for chunks in ([x[order[i:i + 7]] for i in range(0, len(x), 7)],
                   [x[small_first[i:i + 1000]] for i in range(0, len(x), 1000)],
                   [x[::-1].reshape(-1, 2)]):
        s = _stats(chunks)
        assert s.bound == whole.bound and (s.min, s.max, s.count) == (whole.min, whole.max, x.size)
        np.testing.assert_array_equal(s.counts, whole.counts)
        assert all(tensor_range(s, m) == tensor_range(whole, m) for m in METHODS)


def test_nonfinite_values_are_counted_and_left_out():
    s = _stats([np.float32([1.0, np.nan, -2.0, np.inf]), np.float32([-np.inf, 3.0])])
    assert (s.count, s.nonfinite, s.min, s.max) == (3, 3, -2.0, 3.0)
    assert s.counts.sum() == 3
    zero = _stats([np.zeros(10, np.float32)])
    assert all(tensor_range(zero, m) == (0.0, 0.0) for m in METHODS)
    empty = _stats([np.float32([np.nan])])
    assert tensor_range(empty, "kl") == (0.0, 0.0) and empty.count == 0


# --------------------------------------------------------------------------- percentile
def test_percentile_matches_numpy_within_a_bin_width():
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.normal(size=200_000), [60.0, -45.0]]).astype(np.float32)
    s = _stats([x])
    for q in (0.01, 1, 25, 50, 90, 99, 99.9, 99.99):
        assert abs(s.percentile(q) - np.percentile(x, q)) <= s.bin_width, q
    lo, hi = tensor_range(s, "percentile", percentile=99.9)
    assert abs(lo - np.percentile(x, 0.1)) <= s.bin_width
    assert abs(hi - np.percentile(x, 99.9)) <= s.bin_width
    relu = _stats([np.maximum(x, 0)])
    assert tensor_range(relu, "percentile")[0] == 0.0


# --------------------------------------------------------------------------- KL
def _naive_kl(hist, levels):
    """KL(P||Q) per threshold, built bin by bin as the kl_divergences docstring defines it."""
    h = np.asarray(hist, np.float64)
    h = h[:np.flatnonzero(h)[-1] + 1]
    out = []
    for i in range(levels, len(h) + 1):
        p = h[:i].copy()
        p[-1] += h[i:].sum()
        q = np.zeros(i)
        for c in range(levels):
            lo, hi = c * i // levels, (c + 1) * i // levels
            nz = p[lo:hi] > 0
            if nz.any():
                q[lo:hi][nz] = h[lo:hi].sum() / nz.sum()
        p, q = p / p.sum(), q / q.sum()
        m = p > 0
        out.append(np.inf if (q[m] == 0).any() else float((p[m] * np.log(p[m] / q[m])).sum()))
    return np.array(out)


@pytest.mark.parametrize("levels", [16, 64])
def test_kl_divergences_match_the_definition(levels):
    rng = np.random.default_rng(levels)
    counts = np.histogram(np.abs(rng.laplace(size=20_000)), bins=300, range=(0, 9))[0]
    counts[rng.integers(0, 300, 40)] = 0              # empty bins inside the data
    counts = np.concatenate([counts, np.zeros(90), [2, 0, 0, 1]])
    counts[0] = counts[1]                            # what kl_threshold does to the zero bin
    thresholds, kl = kl_divergences(counts, levels)
    expected = _naive_kl(counts, levels)
    assert thresholds[0] == levels and len(kl) == len(expected)
    finite = np.isfinite(expected)
    assert (np.isfinite(kl) == finite).all() and not finite.all()
    np.testing.assert_allclose(kl[finite], expected[finite], rtol=1e-9, atol=1e-12)
    before = counts.copy()
    assert kl_threshold(counts, 1.0, levels) == thresholds[np.argmin(expected)]
    np.testing.assert_array_equal(counts, before)    # the caller's histogram is left alone


def test_kl_coarse_to_fine_search_is_near_the_exhaustive_one():
    rng = np.random.default_rng(7)
    for values, bound in ((rng.laplace(size=300_000), 1.01),
                          (np.append(np.maximum(rng.normal(size=30_000), 0), 40.0), 1.15)):
        s = _stats([values.astype(np.float32)])
        hist, width = s.magnitude_histogram()
        levels = 256 if s.one_signed else 128
        t = kl_threshold(hist, width, levels)
        levelled = hist[:np.flatnonzero(hist)[-1] + 1].astype(np.float64)
        levelled[0] = levelled[1]
        thresholds, kl = kl_divergences(levelled, levels)       # every threshold
        assert len(thresholds) > 2000
        assert kl[thresholds == round(t / width)][0] <= bound * kl.min()


def _laplace_hist(n_values, bins, top, b=1.0):
    edges = np.arange(bins + 1) * (top / bins)
    return n_values * -np.diff(np.exp(-edges / b)), top / bins


def test_kl_clips_far_below_an_outlier():
    hist, width = _laplace_hist(1e6, 4096, 100.0)
    hist[-1] += 1                                    # one value at ~100
    for levels in (128, 256):
        t = kl_threshold(hist, width, levels)
        assert 8.0 < t < 20.0, (levels, t)           # Laplace(1): the bulk ends near 14
    relu = np.maximum(np.random.default_rng(4).normal(size=400_000), 0).astype(np.float32)
    s = _stats([np.append(relu, np.float32(40.0))])
    lo, hi = tensor_range(s, "kl")
    assert lo == 0.0 and 3.0 < hi < 6.0


# --------------------------------------------------------------------------- MSE
def _laplace_mse(t, levels, b=1.0):
    """Expected MSE of |x| ~ Exp(b) clipped at t with levels-1 steps (clip + step^2/12)."""
    step = t / (levels - 1)
    return 2 * b * b * np.exp(-t / b) + step ** 2 / 12 * (1 - np.exp(-t / b))


@pytest.mark.parametrize("levels", [128, 256])
def test_mse_threshold_is_the_analytic_optimum(levels):
    grid = np.linspace(1, 60, 400_001)
    # many values: the outlier's own error is negligible -> the Laplace optimum
    hist, width = _laplace_hist(1e9, 4096, 100.0)
    hist[-1] += 1
    t = mse_threshold(hist, width, levels)
    best = grid[np.argmin(_laplace_mse(grid, levels))]
    assert abs(t - best) <= 0.01 * best, (t, best)
    # 1e6 values: the outlier (at ~100) weighs in; optimum of the mixture, still far below it
    hist, width = _laplace_hist(1e6, 4096, 100.0)
    hist[-1] += 1
    t = mse_threshold(hist, width, levels)
    mixture = lambda c: (1e6 * _laplace_mse(c, levels) + (100 - width / 2 - c) ** 2) / (1e6 + 1)
    assert t < 50 and mixture(t) <= 1.01 * mixture(grid).min()


def test_mse_gaussian_optimum_and_real_quantization_error():
    width = 8.0 / 4096
    edges = np.arange(4097) * width
    cdf = np.array([math.erf(e / math.sqrt(2)) for e in edges])
    t = mse_threshold(1e9 * np.diff(cdf), width, 128)
    grid = np.linspace(1, 8, 70_001)
    tail = 1 - np.array([math.erf(g / math.sqrt(2)) for g in grid])
    pdf = np.exp(-grid ** 2 / 2) / math.sqrt(2 * math.pi)
    analytic = (1 + grid ** 2) * tail - 2 * grid * pdf + (grid / 127) ** 2 / 12 * (1 - tail)
    best = grid[np.argmin(analytic)]
    assert abs(t - best) <= 0.01 * best, (t, best)

    # on samples: the chosen threshold is (near) the best one for real fake-quantization.
    # (300k values: one outlier's squared error would outweigh the rest, so none here)
    x = np.random.default_rng(5).laplace(size=300_000).astype(np.float32)
    s = _stats([x])
    lo, hi = tensor_range(s, "mse")
    assert -hi <= lo < 0 and hi < 0.9 * s.absmax

    def real_mse(c):
        step = c / 127
        return float(np.mean((np.clip(np.round(x / step), -127, 127) * step - x) ** 2))

    errors = [real_mse(c) for c in np.linspace(4, s.absmax, 200)]
    assert real_mse(hi) <= 1.02 * min(errors)
    assert real_mse(hi) < 0.8 * real_mse(s.absmax)
    assert quantization_mse(s, lo, hi) < quantization_mse(s, s.min, s.max)


def test_ranges_of_one_signed_and_short_tailed_tensors():
    rng = np.random.default_rng(6)
    u = rng.uniform(0, 3, size=100_000).astype(np.float32)
    s = _stats([u])
    for m in ("kl", "mse"):
        lo, hi = tensor_range(s, m)
        assert lo == 0.0 and 2.9 <= hi <= s.max
    neg = _stats([-np.abs(rng.laplace(size=100_000)).astype(np.float32), np.float32([-80.0])])
    lo, hi = tensor_range(neg, "kl")
    assert hi == 0.0 and -20 < lo < -5
    lo, hi = tensor_range(_stats([-np.abs(rng.laplace(size=100_000)).astype(np.float32)]), "mse")
    assert hi == 0.0 and -13 < lo < -8
    thresholds, mse = mse_curve(*s.magnitude_histogram(), 256)
    assert len(thresholds) == len(mse) and thresholds[-1] >= s.max
    assert HIST_BINS * 2 == len(s.counts)


def test_statistics_of_shifted_and_padded_tensors_are_derived_without_running():
    from graphquant.calibrate import derived_statistics

    t = tf()

    def body(x):
        p = t.pad(x, [[0, 0], [1, 1], [2, 0], [0, 0]], name="pad")
        return t.identity(t.add(p, t.constant(np.float32(1.5)), name="shifted"), name="out")

    gd, _ = build_graph(body, x=[2, 5, 5, 3])
    feeds = [{"x:0": np.random.default_rng(k).normal(size=(2, 5, 5, 3)).astype(np.float32)}
             for k in range(3)]
    measured = collect_statistics(gd, ["x:0", "pad:0", "shifted:0"], feeds)
    known = {"x:0": measured["x:0"]}
    for name in ("pad:0", "shifted:0"):
        got, want = derived_statistics(gd, name, known), measured[name]
        assert (got.count, got.nonfinite) == (want.count, want.nonfinite)
        assert got.min == pytest.approx(want.min, abs=1e-6)
        assert got.max == pytest.approx(want.max, abs=1e-6)
        # the histogram moves by at most a bin: its cumulative counts agree a bin apart
        a, b = np.cumsum(got.counts), np.cumsum(want.counts)
        assert got.bound == want.bound
        assert np.all(a[1:] >= b[:-1]) and np.all(b[1:] >= a[:-1])
    assert derived_statistics(gd, "out:0", known) is None      # Identity: not derived
