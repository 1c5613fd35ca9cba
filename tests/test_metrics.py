"""graphquant.metrics: each metric on inputs whose answer is known by hand."""

import math

import numpy as np
import pytest

from graphquant import metrics


def test_relative_l2_and_sqnr_of_a_known_error():
    ref = np.array([[3.0, 4.0]])  # norm 5
    cand = np.array([[3.0, 4.5]])  # error norm 0.5
    assert metrics.relative_l2(ref, cand) == pytest.approx(0.1)
    # 10 log10(25 / 0.25) = 20 dB
    assert metrics.sqnr_db(ref, cand) == pytest.approx(20.0)
    rel = metrics.relative_l2(ref, cand)
    assert metrics.sqnr_db(ref, cand) == pytest.approx(-20 * math.log10(rel))


def test_identical_outputs_and_zero_reference():
    x = np.array([[1.0, -2.0]])
    assert metrics.relative_l2(x, x) == 0.0
    assert metrics.sqnr_db(x, x) == math.inf
    zero = np.zeros((1, 2))
    assert metrics.relative_l2(zero, zero) == 0.0
    assert metrics.relative_l2(zero, x) == math.inf
    assert metrics.sqnr_db(zero, x) == -math.inf


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differs"):
        metrics.relative_l2(np.zeros((2, 3)), np.zeros((3, 2)))


def test_cosine_per_sample():
    ref = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    cand = np.array([[0.0, 2.0], [2.0, 2.0], [0.0, 0.0], [1.0, 0.0]])
    cos = metrics.cosine_similarity(ref, cand)
    np.testing.assert_allclose(cos, [0.0, 1.0, 1.0, 0.0])
    summary = metrics.cosine_summary(ref, cand)
    assert summary == {"mean": pytest.approx(0.5), "min": 0.0}
    # antiparallel
    assert metrics.cosine_similarity([[1.0, 2.0]], [[-1.0, -2.0]])[0] == pytest.approx(-1.0)


def test_cosine_flattens_feature_maps():
    ref = np.ones((2, 3, 3, 4))
    cand = ref.copy()
    cand[1] *= 7.0  # scaling does not change the direction
    np.testing.assert_allclose(metrics.cosine_similarity(ref, cand), [1.0, 1.0])


def test_topk_agreement():
    ref = np.array([[0.1, 0.7, 0.2],    # top-1 = 1
                    [0.5, 0.3, 0.2],    # top-1 = 0
                    [0.2, 0.3, 0.5]])   # top-1 = 2
    cand = np.array([[0.1, 0.8, 0.1],   # top-1 1: agrees
                     [0.3, 0.5, 0.2],   # top-1 1, class 0 is second
                     [0.6, 0.3, 0.1]])  # class 2 is last
    assert metrics.topk_agreement(ref, cand, 1) == pytest.approx(1 / 3)
    assert metrics.topk_agreement(ref, cand, 2) == pytest.approx(2 / 3)
    assert metrics.topk_agreement(ref, cand, 3) == pytest.approx(1.0)
    assert metrics.topk_agreement(ref, cand, 5) == pytest.approx(1.0)  # k capped at classes


def test_topk_ties_break_to_the_lower_index():
    np.testing.assert_array_equal(metrics.topk_indices([[1.0, 1.0, 0.0]], 2), [[0, 1]])


def test_topk_accuracy():
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5], [0.4, 0.35, 0.25]])
    labels = np.array([0, 1, 2])
    assert metrics.topk_accuracy(scores, labels, 1) == pytest.approx(1 / 3)
    assert metrics.topk_accuracy(scores, labels, 2) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="labels"):
        metrics.topk_accuracy(scores, labels[:2], 1)


def test_compare_outputs_classifier_and_feature_map():
    ref = np.array([[0.1, 0.9], [0.8, 0.2]])
    cand = np.array([[0.2, 0.8], [0.4, 0.6]])
    result = metrics.compare_outputs(ref, cand, labels=np.array([1, 1]))
    assert result["top1_agreement"] == pytest.approx(0.5)
    assert result["top5_agreement"] == pytest.approx(1.0)
    assert result["reference_top1_accuracy"] == pytest.approx(0.5)
    assert result["candidate_top1_accuracy"] == pytest.approx(1.0)
    assert result["max_abs_diff"] == pytest.approx(0.4)
    # error vector (0.1, -0.1, -0.4, 0.4): sum of squares 0.34; signal 0.01+0.81+0.64+0.04 = 1.5
    assert result["relative_l2"] == pytest.approx(math.sqrt(0.34 / 1.5))
    assert result["sqnr_db"] == pytest.approx(10 * math.log10(1.5 / 0.34))

    fmap = metrics.compare_outputs(np.ones((2, 4, 4, 1)), np.ones((2, 4, 4, 1)))
    assert "top1_agreement" not in fmap
    assert fmap["sqnr_db"] == math.inf and fmap["cosine"]["min"] == pytest.approx(1.0)
