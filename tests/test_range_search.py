"""range_search: expected error on synthetic histograms, the known optimum, auto's choice."""

import numpy as np
import pytest

from graphquant.calibrate import CalibrationStats, TensorStats
from graphquant.range_search import auto_range, auto_ranges, expected_mse, gain_of


def stats_of(values, name="t"):
    s = TensorStats(name)
    s.update(np.asarray(values, np.float32))
    return s


def brute_force_threshold(s, signed):
    """argmin over thresholds on a fine grid of expected_mse (the error auto minimises)."""
    top = s.absmax
    grid = np.linspace(top / 400, top, 400)
    errors = [expected_mse(s, -t if signed else 0.0, t) for t in grid]
    return grid[int(np.argmin(errors))], min(errors)


def test_expected_mse_of_a_uniform_grid_is_step_squared_over_twelve():
    s = stats_of(np.random.default_rng(0).uniform(0.01, 1.0, 200000))
    for hi in (1.0, 2.0):
        step = hi / 255
        assert expected_mse(s, 0.0, hi) == pytest.approx(step ** 2 / 12, rel=1e-6)
    # clipping at 0.5 adds E[(x - 0.5)^2; x > 0.5] ~ 0.5**3 / 3 / 0.99
    assert expected_mse(s, 0.0, 0.5) == pytest.approx(0.5 ** 3 / 3 / 0.99, rel=0.02)


def test_exact_zeros_of_a_relu_tensor_cost_nothing():
    x = np.random.default_rng(1).uniform(0.01, 1.0, 10000)
    with_zeros = stats_of(np.concatenate([x, np.zeros(10000)]))
    assert expected_mse(with_zeros, 0.0, 1.0) == pytest.approx(
        expected_mse(stats_of(x), 0.0, 1.0) / 2, rel=1e-3)


@pytest.mark.parametrize("dist,signed", [("uniform", False), ("laplace", False),
                                         ("laplace", True), ("gauss_outliers", True)])
def test_auto_finds_the_known_optimum(dist, signed):
    rng = np.random.default_rng(2)
    if dist == "uniform":          # optimum: no clipping at all
        x = rng.uniform(0.001, 3.0, 100000)
    elif dist == "laplace":
        x = rng.laplace(0, 1.0, 100000) + 0.05
    else:
        x = np.concatenate([rng.normal(0, 1, 100000), [60.0, -55.0]])
    if not signed:
        x = np.abs(x)
    s = stats_of(x)
    (lo, hi), method = auto_range(s)
    threshold = max(-lo, hi) if signed else hi
    best_t, best_err = brute_force_threshold(s, signed)
    if dist == "uniform":
        assert method == "minmax" or threshold == pytest.approx(s.absmax, rel=0.01)
    else:                          # heavy tails: clipped, where the brute force puts it
        assert method == "mse" and threshold < s.absmax
        assert threshold == pytest.approx(best_t, rel=0.05)
    # as good as the brute-force optimum (within 2%), and never worse than the data range
    chosen_err = expected_mse(s, -threshold if signed else 0.0, threshold)
    assert chosen_err <= best_err * 1.02
    assert chosen_err <= expected_mse(s, -s.absmax if signed else 0.0, s.absmax) * (1 + 1e-9)


def test_gain_keeps_the_data_range_unless_clipping_pays_that_much():
    rng = np.random.default_rng(3)
    gauss = stats_of(rng.normal(0, 1, 100000))
    outlier = stats_of(np.concatenate([rng.normal(0, 1, 1000000), [200.0]]))
    assert auto_range(gauss, gain=4.0)[1] == "minmax"
    assert auto_range(outlier, gain=4.0)[1] == "mse"
    assert gain_of("auto") == 1.0 and gain_of("auto2.5") == 2.5


def test_auto_ranges_covers_every_tensor_and_empty_ones():
    stats = CalibrationStats({"a:0": stats_of([0.0, 1.0, 2.0], "a:0"),
                              "b:0": TensorStats("b:0")})
    ranges, methods = auto_ranges(stats)
    assert set(ranges) == set(methods) == {"a:0", "b:0"}
    assert ranges["b:0"] == (0.0, 0.0)
