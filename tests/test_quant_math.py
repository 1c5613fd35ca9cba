"""Quantization arithmetic: exact conventions, checked against TensorFlow's own ops."""

import numpy as np
import pytest

from graphquant import int8_ops, quant_math as qm
from graphquant.graph import make_const, make_node
from graphquant.runtime import tf
from int8_reference import run_nodes

RNG = np.random.default_rng(7)


# --------------------------------------------------------------------------- activations
def test_activation_range_is_symmetric_or_from_zero():
    assert qm.activation_range(-0.5, 3.0, signed=False) == (0.0, 3.0)
    assert qm.activation_range(-5.0, 3.0, signed=True) == (-5.0, 5.0)
    assert qm.activation_range(0.0, 0.0, signed=False) == (0.0, pytest.approx(qm.MIN_RANGE))
    assert qm.needs_signed(-1e-3) and not qm.needs_signed(0.0)


def test_quantize_activation_by_hand():
    # R = 2.55: step 0.01 for quint8; ties go to even
    q = qm.quantize_activation([-1.0, 0.0, 0.004, 0.006, 0.015, 0.025, 2.55, 9.0], 2.55, False)
    assert q.dtype == np.uint8
    assert q.tolist() == [0, 0, 0, 1, 2, 2, 255, 255]
    # R = 1.27: step 0.01 for qint8, narrow range -127..127
    q = qm.quantize_activation([-9.0, -1.27, -0.015, 0.5, 1.27, 9.0], 1.27, True)
    assert q.dtype == np.int8
    assert q.tolist() == [-127, -127, -2, 50, 127, 127]
    np.testing.assert_allclose(qm.dequantize_activation([255], 2.55, False), [2.55], rtol=1e-6)
    np.testing.assert_allclose(qm.dequantize_activation([-127], 1.27, True), [-1.27], rtol=1e-6)


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("r", [6.0, 0.37, 0.004])
def test_quantize_v2_and_dequantize_match_the_convention_bit_exactly(signed, r):
    """TF's QuantizeV2/Dequantize with quant_math's attributes == quant_math, bit for bit,
    including values outside the range, tiny ranges (< 0.01) and exact ties."""
    n = 20000
    x = RNG.uniform(-1.3 * r, 1.3 * r, n).astype(np.float32)
    step = float(qm.activation_scale(r, signed))
    x[:200] = (np.arange(200) - 100 + 0.5).astype(np.float32) * np.float32(step)  # ties
    lo, hi = qm.activation_range(-r if signed else 0.0, r, signed)
    nodes = [make_node("Placeholder", "x", dtype=tf().float32),
             make_const("lo", np.float32(lo)), make_const("hi", np.float32(hi)),
             int8_ops.quantize_v2("q", "x", "lo", "hi", signed),
             int8_ops.dequantize("dq", "q:0", "q:1", "q:2", signed)]
    q, qmin, qmax, dq = run_nodes(nodes, ["q:0", "q:1", "q:2", "dq:0"], {"x:0": x})
    expect = qm.quantize_activation(x, hi, signed)
    assert q.dtype == expect.dtype
    assert np.array_equal(q, expect)
    assert (float(qmin), float(qmax)) == (lo, hi)
    assert np.array_equal(dq, qm.dequantize_activation(expect, hi, signed))
    # round trip error is at most half a step inside the range
    inside = np.abs(x) <= r
    if not signed:
        inside &= x >= 0
    assert np.max(np.abs(dq[inside] - x[inside])) <= step * 0.5001


def test_default_attributes_would_widen_small_ranges():
    """Why ensure_minimum_range=0: with TF's default a 0.001 range becomes 0.01."""
    x = np.float32([0.0005])
    nodes = [make_node("Placeholder", "x", dtype=tf().float32),
             make_const("lo", np.float32(0.0)), make_const("hi", np.float32(0.001)),
             make_node("QuantizeV2", "q", ["x", "lo", "hi"], T=tf().quint8, mode="SCALED")]
    _, qmax = run_nodes(nodes, ["q:0", "q:2"], {"x:0": x})
    assert float(qmax) == pytest.approx(0.01)
    assert qm.quantize_v2_attrs(False)["ensure_minimum_range"] == 0.0


def test_relu6_range_never_exceeds_six():
    assert qm.relu6_output_range(9.0) == 6.0
    assert qm.relu6_output_range(2.5) == 2.5


# --------------------------------------------------------------------------- weights
def test_conv_weights_per_channel():
    w = RNG.normal(0, 1, (3, 3, 4, 5)).astype(np.float32)
    w[..., 2] *= 10.0
    qw = qm.quantize_weights(w, "conv", per_channel=True, max_level=127)
    absmax = np.abs(w).reshape(-1, 5).max(axis=0)
    assert qw.values.dtype == np.int8 and qw.values.shape == w.shape
    np.testing.assert_allclose(qw.step, absmax / 127, rtol=1e-6)
    np.testing.assert_allclose(qw.max_range, absmax, rtol=1e-6)  # step * 127
    np.testing.assert_allclose(qw.min_range, -qw.max_range)
    assert np.all(np.abs(qw.values).reshape(-1, 5).max(axis=0) == 127)
    assert np.max(np.abs(qw.dequantize() - w) / qw.step) <= 0.5 + 1e-4
    # what the kernel derives from the declared range is the step
    np.testing.assert_allclose(qm.kernel_weight_step(qw.min_range, qw.max_range), qw.step,
                               rtol=1e-6)


def test_seven_bit_weights_keep_the_float_range():
    w = RNG.normal(0, 1, (3, 3, 4, 6)).astype(np.float32)
    q63 = qm.quantize_weights(w, "conv", max_level=63)
    q127 = qm.quantize_weights(w, "conv", max_level=127)
    assert np.abs(q63.values).max() == 63
    np.testing.assert_allclose(q63.step, q127.step * 127 / 63, rtol=1e-6)
    # declared = step * 127 = absmax * 127/63: the kernel's reconstruction is the float range
    np.testing.assert_allclose(q63.max_range, np.abs(w).reshape(-1, 6).max(0) * 127 / 63,
                               rtol=1e-6)
    np.testing.assert_allclose(np.abs(q63.dequantize()).reshape(-1, 6).max(0),
                               np.abs(w).reshape(-1, 6).max(0), rtol=1e-6)
    assert np.max(np.abs(q63.dequantize() - w) / q63.step) <= 0.5 + 1e-4


def test_even_weights_for_signed_input_convs():
    w = RNG.normal(0, 1, (3, 3, 4, 6)).astype(np.float32)
    qw = qm.quantize_weights(w, "conv", max_level=126, multiple=2)
    assert np.all(qw.values % 2 == 0)
    assert np.abs(qw.values).max() == 126
    assert np.max(np.abs(qw.dequantize() - w) / qw.step) <= 1.0 + 1e-4
    with pytest.raises(ValueError):
        qm.quantize_weights(w, max_level=63, multiple=2)


def test_depthwise_channel_is_in_times_mult():
    w = RNG.normal(0, 1, (3, 3, 4, 2)).astype(np.float32)
    w[:, :, 1, 0] *= 50.0  # channel 1*2+0 = 2
    qw = qm.quantize_weights(w, "depthwise", per_channel=True, max_level=127)
    assert qw.step.shape == (8,)
    absmax = np.abs(w).reshape(9, 8).max(axis=0)
    np.testing.assert_allclose(qw.step, absmax / 127, rtol=1e-6)
    assert np.argmax(qw.step) == 2
    assert qw.values.shape == w.shape


def test_matmul_channel_axis_and_transpose():
    w = RNG.normal(0, 1, (16, 3)).astype(np.float32)
    a = qm.quantize_weights(w, "matmul", max_level=63)
    b = qm.quantize_weights(w.T.copy(), "matmul", max_level=63, transpose_b=True)
    assert a.step.shape == (3,)
    np.testing.assert_allclose(a.step, b.step)
    assert np.array_equal(a.values, b.values.T)


def test_per_tensor_and_zero_weights():
    w = np.zeros((3, 3, 2, 2), np.float32)
    w[0, 0, 0, 0] = -0.5
    qw = qm.quantize_weights(w, "conv", per_channel=False, max_level=63)
    assert qw.step.shape == () and not qw.per_channel
    assert float(qw.step) == pytest.approx(0.5 / 63)
    z = qm.quantize_weights(np.zeros((1, 1, 2, 3), np.float32), "conv")
    assert np.all(z.values == 0) and np.all(z.max_range > 0)


# --------------------------------------------------------------------------- bias
def test_int32_bias_scale_formula():
    min_f, max_f = np.float32([-2.0, -0.5]), np.float32([1.0, 0.5])
    s_in = 4.0 / 255  # quint8 input with range 4
    s_w = np.array([2.0, 0.5]) / 127
    b = np.array([0.3, -0.02])
    bq = qm.quantize_bias(b, 4.0, False, min_f, max_f)
    assert bq.dtype == np.int32
    assert bq.tolist() == np.rint(b / (s_in * s_w)).astype(int).tolist()
    back = qm.dequantize_bias(bq, 4.0, False, min_f, max_f)
    assert np.all(np.abs(back - b) <= s_in * s_w / 2 * 1.0001)
    # signed input uses 127 levels
    bq_s = qm.quantize_bias(b, 4.0, True, min_f, max_f)
    assert bq_s.tolist() == np.rint(b / (4.0 / 127 * s_w)).astype(int).tolist()
    # saturates instead of wrapping
    huge = qm.quantize_bias([1e12, -1e12], 1.0, False, [1.0, 1.0], [1.0, 1.0])
    assert huge.tolist() == [qm.INT32_MAX, qm.INT32_MIN]


# --------------------------------------------------------------------------- epilogue model
def test_requantize_reference_by_hand():
    acc = np.array([[100, -100]])
    # s_in = 2.55/255 = 0.01, s_w = 1.27/127 = 0.01: y = acc * 1e-4 + bias
    y = qm.requantize_reference(acc, 2.55, False, [-1.27, -1.27], [1.27, 1.27],
                                bias=[0.5, 0.0])
    np.testing.assert_allclose(y, [[0.51, -0.01]])
    q = qm.requantize_reference(acc, 2.55, False, [-1.27, -1.27], [1.27, 1.27],
                                bias=[0.5, 0.0], relu=True, output_range=2.55)
    assert q.dtype == np.uint8 and q.tolist() == [[51, 0]]
    q = qm.requantize_reference(acc, 2.55, False, [-1.27, -1.27], [1.27, 1.27],
                                bias=[0.5, 0.0], output_range=1.27, out_signed=True)
    assert q.dtype == np.int8 and q.tolist() == [[51, -1]]
    # a summand adds q * R_sum/L
    y = qm.requantize_reference(acc * 0, 2.55, False, [-1.27] * 2, [1.27] * 2,
                                summand=[[10, 20]], summand_range=2.55)
    np.testing.assert_allclose(y, [[0.1, 0.2]])


def test_int32_output_scale_uses_the_largest_channel_step():
    s = qm.int32_output_scale(2.55, False, [-1.27, -2.54], [1.27, 2.54])
    assert float(s) == pytest.approx(0.01 * 0.02)
    lo, hi = qm.int32_reported_range(2.55, False, [-1.27, -2.54], [1.27, 2.54])
    np.testing.assert_allclose(hi, [1e-4 * (2 ** 31 - 1), 2e-4 * (2 ** 31 - 1)], rtol=1e-5)
    np.testing.assert_allclose(lo, [-1e-4 * 2 ** 31, -2e-4 * 2 ** 31], rtol=1e-5)


def test_merge_ranges():
    assert qm.merge_ranges([(0.0, 2.0), (0.0, 5.0), (-1.0, 1.0)]) == (-1.0, 5.0)
