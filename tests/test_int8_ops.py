"""Every int8 NodeDef builder, run in TensorFlow against an exact integer reference.

Accumulators are compared bit for bit; requantized outputs within one
quantization step (the kernels round in float32, the reference in float64),
and in practice they are bit-exact too -- the tests also require that at
least 99.9% of the elements are.  Weights use the format graphquant.target
gives for AVX2 (exact on every CPU).  The last tests run the same graphs in
fresh processes with TF_ENABLE_ONEDNN_OPTS=0 and =1.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from graphquant import int8_ops as ops
from graphquant import quant_math as qm
from graphquant import target
from graphquant.graph import make_const, make_node
from graphquant.runtime import onednn_enabled, tf
from int8_reference import conv2d_int, depthwise_int, matmul_int, run_nodes

RNG = np.random.default_rng(3)
TESTS = os.path.dirname(os.path.abspath(__file__))


def f32(name, value):
    return make_const(name, np.asarray(value, np.float32))


def assert_within_one_step(got, ref, exact_fraction=0.999):
    got = np.asarray(got).astype(np.int64)
    ref = np.asarray(ref).astype(np.int64)
    assert got.shape == ref.shape
    diff = np.abs(got - ref)
    assert diff.max() <= 1, f"max difference {diff.max()} steps"
    assert np.mean(diff == 0) >= exact_fraction


def quantized_input(name, x_float, range_max, signed):
    """Placeholder + range consts + QuantizeV2; returns (nodes, integer values)."""
    lo, hi = qm.activation_range(-range_max if signed else 0.0, range_max, signed)
    nodes = [make_node("Placeholder", name, dtype=tf().float32),
             f32(name + "_lo", lo), f32(name + "_hi", hi),
             ops.quantize_v2(name + "_q", name, name + "_lo", name + "_hi", signed)]
    return nodes, qm.quantize_activation(x_float, hi, signed)


def weights(name, w_float, kind, signed_input, per_channel=True, transpose_b=False):
    level, multiple = target.weight_format("avx2", kind, signed_input)
    qw = qm.quantize_weights(w_float, kind, per_channel, level, multiple=multiple,
                             transpose_b=transpose_b)
    nodes = [ops.quantized_const(name, qw.values, "qint8"),
             f32(name + "_min", qw.min_range), f32(name + "_max", qw.max_range)]
    return nodes, qw


# --------------------------------------------------------------------------- conv
CONV_CASES = [
    # tinput, depthwise, per_channel, fused, out_type
    ("quint8", False, True, ["BiasAdd", "Relu", "Requantize"], "quint8"),
    ("quint8", False, False, ["BiasAdd", "Requantize"], "qint8"),
    ("quint8", False, True, ["BiasAdd", "Requantize"], "quint8"),
    ("qint8", False, True, ["BiasAdd", "Relu", "Requantize"], "quint8"),
    ("qint8", False, True, ["BiasAdd", "Requantize"], "qint8"),
    ("quint8", True, True, ["BiasAdd", "Relu", "Requantize"], "quint8"),
    ("qint8", True, True, ["BiasAdd", "Requantize"], "qint8"),
    ("qint8", True, False, ["BiasAdd", "Relu", "Requantize"], "qint8"),
]


@pytest.mark.parametrize("tinput,depthwise,per_channel,fused,out_type", CONV_CASES)
def test_fused_quantized_conv_requantized(tinput, depthwise, per_channel, fused, out_type):
    signed = tinput == "qint8"
    c, k = 16, 8
    x = RNG.uniform(-2.0 if signed else 0.0, 2.0, (2, 9, 9, c)).astype(np.float32)
    w = RNG.normal(0, 0.2, (3, 3, c, 2) if depthwise else (3, 3, c, k)).astype(np.float32)
    kind = "depthwise" if depthwise else "conv"
    nodes, xq = quantized_input("x", x, 2.0, signed)
    wn, qw = weights("w", w, kind, signed, per_channel)
    channels = 2 * c if depthwise else k
    bias = RNG.uniform(-1, 1, channels).astype(np.float32)
    out_signed = out_type == "qint8"
    r_out = 3.0
    nodes += wn + [f32("b", bias), f32("omin", -r_out if out_signed else 0.0), f32("omax", r_out),
                   ops.fused_quantized_conv("conv", "x_q:0", "w", "x_q:1", "x_q:2", "w_min",
                                            "w_max", bias="b", tinput=tinput, out_type=out_type,
                                            fused_ops=fused, min_freezed_output="omin",
                                            max_freezed_output="omax", depthwise=depthwise)]
    got, omin, omax = run_nodes(nodes, ["conv:0", "conv:1", "conv:2"], {"x:0": x})
    acc = depthwise_int(xq, qw.values) if depthwise else conv2d_int(xq, qw.values)
    ref = qm.requantize_reference(acc, 2.0, signed, qw.min_range, qw.max_range, bias=bias,
                                  relu="Relu" in fused, output_range=r_out,
                                  out_signed=out_signed)
    assert got.dtype == ref.dtype
    assert_within_one_step(got, ref)
    assert (float(omin), float(omax)) == (-r_out if out_signed else 0.0, r_out)


@pytest.mark.parametrize("tinput", ["quint8", "qint8"])
def test_int32_output_is_the_accumulator_per_tensor(tinput):
    """qint32 output, per-tensor weights, zero bias: bit-exact accumulator; the
    reported range is +-s_in*s_w*2^31."""
    signed = tinput == "qint8"
    x = RNG.uniform(-1.0 if signed else 0.0, 1.0, (1, 7, 7, 24)).astype(np.float32)
    w = RNG.normal(0, 1, (3, 3, 24, 8)).astype(np.float32)
    nodes, xq = quantized_input("x", x, 1.0, signed)
    wn, qw = weights("w", w, "conv", signed, per_channel=False)
    nodes += wn + [f32("b", np.zeros(8)),
                   ops.fused_quantized_conv("conv", "x_q:0", "w", "x_q:1", "x_q:2", "w_min",
                                            "w_max", bias="b", tinput=tinput, out_type="qint32",
                                            fused_ops=["BiasAdd"])]
    got, lo, hi = run_nodes(nodes, ["conv:0", "conv:1", "conv:2"], {"x:0": x})
    assert np.array_equal(got.astype(np.int64), conv2d_int(xq, qw.values))
    ref_lo, ref_hi = qm.int32_reported_range(1.0, signed, qw.min_range, qw.max_range)
    np.testing.assert_allclose([lo, hi], [ref_lo, ref_hi], rtol=1e-6)


def test_int32_output_with_per_channel_weights_uses_one_scale():
    """Per-channel weights + qint32 output: data = y / (s_in * max s_w), not the
    accumulator, while the reported ranges are per channel."""
    x = RNG.uniform(0.0, 1.0, (1, 6, 6, 8)).astype(np.float32)
    w = RNG.normal(0, 1, (3, 3, 8, 4)).astype(np.float32) * np.float32([1, 2, 4, 8])
    nodes, xq = quantized_input("x", x, 1.0, False)
    wn, qw = weights("w", w, "conv", False)
    nodes += wn + [f32("b", np.zeros(4)),
                   ops.fused_quantized_conv("conv", "x_q:0", "w", "x_q:1", "x_q:2", "w_min",
                                            "w_max", bias="b", out_type="qint32",
                                            fused_ops=["BiasAdd", "Relu"])]
    got, lo = run_nodes(nodes, ["conv:0", "conv:1"], {"x:0": x})
    y = qm.requantize_reference(conv2d_int(xq, qw.values), 1.0, False, qw.min_range,
                                qw.max_range, relu=True)
    expect = np.rint(y / qm.int32_output_scale(1.0, False, qw.min_range, qw.max_range))
    assert_within_one_step(got, expect)
    assert lo.shape == (4,)


def test_qint32_bias_is_float_bias_rounded():
    x = RNG.uniform(0.0, 4.0, (1, 8, 8, 8)).astype(np.float32)
    w = RNG.normal(0, 0.3, (3, 3, 8, 6)).astype(np.float32)
    bias = RNG.uniform(-2, 2, 6).astype(np.float32)
    nodes, xq = quantized_input("x", x, 4.0, False)
    wn, qw = weights("w", w, "conv", False)
    bq = qm.quantize_bias(bias, 4.0, False, qw.min_range, qw.max_range)
    nodes += wn + [ops.quantized_const("bq", bq, "qint32"), f32("b", bias),
                   f32("omin", 0.0), f32("omax", 6.0)]
    for name, b, tbias in (("cq", "bq", "qint32"), ("cf", "b", "float")):
        nodes.append(ops.fused_quantized_conv(name, "x_q:0", "w", "x_q:1", "x_q:2", "w_min",
                                              "w_max", bias=b, tbias=tbias, out_type="quint8",
                                              min_freezed_output="omin",
                                              max_freezed_output="omax"))
    got_q, got_f = run_nodes(nodes, ["cq:0", "cf:0"], {"x:0": x})
    acc = conv2d_int(xq, qw.values)
    bias_back = qm.dequantize_bias(bq, 4.0, False, qw.min_range, qw.max_range)
    assert np.all(np.abs(bias_back - bias) <= 4.0 / 255 * qw.step / 2 * 1.001)
    ref_q = qm.requantize_reference(acc, 4.0, False, qw.min_range, qw.max_range,
                                    bias=bias_back, relu=True, output_range=6.0)
    assert_within_one_step(got_q, ref_q)
    assert_within_one_step(got_q, got_f, exact_fraction=0.99)


def test_relu6_is_relu_with_a_capped_quint8_range():
    x = RNG.uniform(0.0, 4.0, (1, 8, 8, 8)).astype(np.float32)
    w = RNG.uniform(-0.3, 1.0, (1, 1, 8, 4)).astype(np.float32)
    nodes, xq = quantized_input("x", x, 4.0, False)
    wn, qw = weights("w", w, "conv", False)
    r6 = qm.relu6_output_range(9.0)
    nodes += wn + [f32("b", np.zeros(4)), f32("omin", 0.0), f32("omax", r6),
                   ops.fused_quantized_conv("conv", "x_q:0", "w", "x_q:1", "x_q:2", "w_min",
                                            "w_max", bias="b", min_freezed_output="omin",
                                            max_freezed_output="omax"),
                   ops.dequantize("dq", "conv:0", "conv:1", "conv:2", False)]
    got = run_nodes(nodes, ["dq:0"], {"x:0": x})[0]
    y = qm.requantize_reference(conv2d_int(xq, qw.values), 4.0, False, qw.min_range,
                                qw.max_range)
    relu6 = np.clip(y, 0.0, 6.0)
    assert y.max() > 6.5  # the cap matters in this test
    assert np.max(np.abs(got - relu6)) <= 6.0 / 255 * 0.5001 + 1e-6


@pytest.mark.parametrize("tsummand", ["quint8"])
def test_sum_relu_requantize(tsummand):
    """Residual Add + Relu fused: y = conv + bias + summand, relu, quint8."""
    s_signed = tsummand == "qint8"
    x = RNG.uniform(0.0, 2.0, (1, 8, 8, 16)).astype(np.float32)
    s = RNG.uniform(-1.5 if s_signed else 0.0, 1.5, (1, 8, 8, 8)).astype(np.float32)
    w = RNG.normal(0, 0.2, (3, 3, 16, 8)).astype(np.float32)
    bias = RNG.uniform(-0.5, 0.5, 8).astype(np.float32)
    nodes, xq = quantized_input("x", x, 2.0, False)
    sn, sq = quantized_input("s", s, 1.5, s_signed)
    wn, qw = weights("w", w, "conv", False)
    nodes += sn + wn + [f32("b", bias), f32("omin", 0.0), f32("omax", 4.0),
                        ops.fused_quantized_conv(
                            "conv", "x_q:0", "w", "x_q:1", "x_q:2", "w_min", "w_max", bias="b",
                            fused_ops=["BiasAdd", "Sum", "Relu", "Requantize"],
                            out_type="quint8", summand="s_q:0", tsummand=tsummand,
                            min_summand="s_q:1", max_summand="s_q:2",
                            min_freezed_output="omin", max_freezed_output="omax")]
    got = run_nodes(nodes, ["conv:0"], {"x:0": x, "s:0": s})[0]
    ref = qm.requantize_reference(conv2d_int(xq, qw.values), 2.0, False, qw.min_range,
                                  qw.max_range, bias=bias, relu=True, output_range=4.0,
                                  summand=sq, summand_range=1.5, summand_signed=s_signed)
    assert_within_one_step(got, ref)


@pytest.mark.parametrize("padding,strides,dilations", [
    ("VALID", (1, 2, 2, 1), (1, 1, 1, 1)),
    ("SAME", (1, 2, 2, 1), (1, 1, 1, 1)),
    ("SAME", (1, 1, 1, 1), (1, 2, 2, 1)),
    ("EXPLICIT", (1, 1, 1, 1), (1, 1, 1, 1)),
])
def test_conv_geometry(padding, strides, dilations):
    x = RNG.uniform(0.0, 1.0, (1, 11, 10, 8)).astype(np.float32)
    w = RNG.normal(0, 0.3, (3, 3, 8, 4)).astype(np.float32)
    nodes, xq = quantized_input("x", x, 1.0, False)
    wn, qw = weights("w", w, "conv", False)
    explicit = (2, 0, 1, 2)  # top, bottom, left, right
    nodes += wn + [f32("b", np.zeros(4)), f32("omin", -2.0), f32("omax", 2.0),
                   ops.fused_quantized_conv(
                       "conv", "x_q:0", "w", "x_q:1", "x_q:2", "w_min", "w_max", bias="b",
                       fused_ops=["BiasAdd", "Requantize"], out_type="qint8", strides=strides,
                       padding=padding, dilations=dilations,
                       explicit_paddings=[0, 0, explicit[0], explicit[1], explicit[2],
                                          explicit[3], 0, 0],
                       min_freezed_output="omin", max_freezed_output="omax")]
    got = run_nodes(nodes, ["conv:0"], {"x:0": x})[0]
    acc = conv2d_int(xq, qw.values, strides=strides[1:3], dilations=dilations[1:3],
                     padding=padding, explicit=explicit)
    ref = qm.requantize_reference(acc, 1.0, False, qw.min_range, qw.max_range,
                                  output_range=2.0, out_signed=True)
    assert_within_one_step(got, ref)


def test_conv_builder_refuses_what_the_kernels_refuse():
    common = ("c", "x", "w", "a", "b", "c1", "d")
    with pytest.raises(ValueError, match="not supported"):
        ops.fused_quantized_conv(*common, bias="b", fused_ops=["BiasAdd", "Relu6"])
    with pytest.raises(ValueError, match="not supported"):  # segfaults the process
        ops.fused_quantized_conv(*common, bias="b", fused_ops=["BiasAdd", "Sum", "Relu"],
                                 out_type="qint32")
    with pytest.raises(ValueError, match="out_type"):
        ops.fused_quantized_conv(*common, bias="b", fused_ops=["BiasAdd", "Relu", "Requantize"],
                                 out_type="qint32")
    with pytest.raises(ValueError, match="clip the output at 127"):
        ops.fused_quantized_conv(*common, bias="b", fused_ops=["BiasAdd", "Sum", "Relu",
                                                               "Requantize"],
                                 summand="s", tsummand="qint8", min_summand="e",
                                 max_summand="f", min_freezed_output="e",
                                 max_freezed_output="f")
    with pytest.raises(ValueError, match="freezed"):
        ops.fused_quantized_conv(*common, bias="b", out_type="quint8")
    with pytest.raises(ValueError, match="Sum"):
        ops.fused_quantized_conv(*common, bias="b", fused_ops=["BiasAdd", "Sum", "Relu",
                                                               "Requantize"],
                                 min_freezed_output="e", max_freezed_output="f")


# --------------------------------------------------------------------------- matmul
@pytest.mark.parametrize("t1,per_channel,transpose_b", [
    ("quint8", True, False), ("qint8", False, True), ("qint8", True, False)])
def test_quantized_matmul_dequantize_and_requantize(t1, per_channel, transpose_b):
    signed = t1 == "qint8"
    a = RNG.uniform(-3.0 if signed else 0.0, 3.0, (32, 200)).astype(np.float32)
    w = RNG.normal(0, 0.1, (200, 24)).astype(np.float32)
    bias = RNG.uniform(-1, 1, 24).astype(np.float32)
    nodes, aq = quantized_input("a", a, 3.0, signed)
    wn, qw = weights("w", w.T.copy() if transpose_b else w, "matmul", signed, per_channel,
                     transpose_b=transpose_b)
    nodes += wn + [f32("b", bias), f32("omin", 0.0), f32("omax", 5.0), f32("omin_s", -5.0),
                   f32("omax_s", 5.0)]
    common = dict(t1=t1, transpose_b=transpose_b)
    nodes += [
        ops.quantized_matmul("mf", "a_q:0", "w", "b", "a_q:1", "a_q:2", "w_min", "w_max",
                             tout="float", fused_ops=["BiasAdd", "Dequantize"], **common),
        ops.quantized_matmul("mr6", "a_q:0", "w", "b", "a_q:1", "a_q:2", "w_min", "w_max",
                             tout="float", fused_ops=["BiasAdd", "Relu6", "Dequantize"],
                             **common),
        ops.quantized_matmul("mq", "a_q:0", "w", "b", "a_q:1", "a_q:2", "w_min", "w_max",
                             tout="quint8", fused_ops=["BiasAdd", "Relu", "Requantize"],
                             min_freezed_output="omin", max_freezed_output="omax", **common),
        ops.quantized_matmul("ms", "a_q:0", "w", "b", "a_q:1", "a_q:2", "w_min", "w_max",
                             tout="qint8", fused_ops=["BiasAdd", "Requantize"],
                             min_freezed_output="omin_s", max_freezed_output="omax_s", **common),
    ]
    mf, mr6, mq, ms, ms_lo, ms_hi = run_nodes(nodes, ["mf:0", "mr6:0", "mq:0", "ms:0", "ms:1",
                                                      "ms:2"], {"a:0": a})
    acc = matmul_int(aq, qw.values, transpose_b=transpose_b)
    y = qm.requantize_reference(acc, 3.0, signed, qw.min_range, qw.max_range, bias=bias)
    np.testing.assert_allclose(mf, y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mr6, np.clip(y, 0, 6), rtol=1e-5, atol=1e-5)
    assert_within_one_step(mq, qm.requantize_reference(
        acc, 3.0, signed, qw.min_range, qw.max_range, bias=bias, relu=True, output_range=5.0))
    assert_within_one_step(ms, qm.requantize_reference(
        acc, 3.0, signed, qw.min_range, qw.max_range, bias=bias, output_range=5.0,
        out_signed=True))
    assert (float(ms_lo), float(ms_hi)) == (-5.0, 5.0)


def test_matmul_int32_output_is_the_accumulator():
    a = RNG.uniform(0.0, 1.0, (8, 64)).astype(np.float32)
    w = RNG.normal(0, 1, (64, 16)).astype(np.float32)
    nodes, aq = quantized_input("a", a, 1.0, False)
    wn, qw = weights("w", w, "matmul", False, per_channel=False)
    nodes += wn + [f32("b", np.zeros(16)),
                   ops.quantized_matmul("m", "a_q:0", "w", "b", "a_q:1", "a_q:2", "w_min",
                                        "w_max", tout="qint32", fused_ops=["BiasAdd"])]
    got = run_nodes(nodes, ["m:0"], {"a:0": a})[0]
    assert np.array_equal(got.astype(np.int64), matmul_int(aq, qw.values))


# --------------------------------------------------------------------------- pools / concat
@pytest.mark.parametrize("t", ["quint8", "qint8"])
def test_quantized_max_and_avg_pool(t):
    signed = t == "qint8"
    x = RNG.uniform(-2.0 if signed else 0.0, 2.0, (1, 8, 8, 4)).astype(np.float32)
    nodes, xq = quantized_input("x", x, 2.0, signed)
    pool = dict(t=t, ksize=[1, 2, 2, 1], strides=[1, 2, 2, 1], padding="VALID")
    nodes += [ops.quantized_max_pool("mp", "x_q:0", "x_q:1", "x_q:2", **pool),
              ops.quantized_avg_pool("ap", "x_q:0", "x_q:1", "x_q:2", **pool)]
    mp, mp_lo, mp_hi, ap = run_nodes(nodes, ["mp:0", "mp:1", "mp:2", "ap:0"], {"x:0": x})
    blocks = xq.astype(np.int64).reshape(1, 4, 2, 4, 2, 4)
    assert np.array_equal(mp, blocks.max(axis=(2, 4)))
    assert (float(mp_lo), float(mp_hi)) == qm.activation_range(-2.0 if signed else 0.0, 2.0,
                                                               signed)
    # the oneDNN kernel rounds the mean to nearest, the reference kernel rounds down
    rounding = np.rint if onednn_enabled() else np.floor
    assert np.array_equal(ap, rounding(blocks.mean(axis=(2, 4))))


@pytest.mark.parametrize("builder", ["concat_same_range", "quantized_concat"])
def test_concat_with_one_range_copies_integers(builder):
    a = RNG.uniform(0.0, 1.0, (1, 4, 4, 3)).astype(np.float32)
    b = RNG.uniform(0.0, 0.5, (1, 4, 4, 5)).astype(np.float32)
    lo, hi = qm.merge_ranges([(0.0, 1.0), (0.0, 0.5)])
    nodes = [make_node("Placeholder", "a", dtype=tf().float32),
             make_node("Placeholder", "b", dtype=tf().float32),
             f32("lo", lo), f32("hi", hi), make_const("axis", np.int32(3)),
             ops.quantize_v2("aq", "a", "lo", "hi", False),
             ops.quantize_v2("bq", "b", "lo", "hi", False),
             ops.quantized_concat("cat", ["aq:0", "bq:0"], "axis", ["aq:1", "bq:1"],
                                  ["aq:2", "bq:2"], t="quint8")
             if builder == "quantized_concat" else
             ops.concat_same_range("cat", ["aq:0", "bq:0"], "axis", t="quint8")]
    got = run_nodes(nodes, ["cat:0"], {"a:0": a, "b:0": b})[0]
    expect = np.concatenate([qm.quantize_activation(a, hi, False),
                             qm.quantize_activation(b, hi, False)], axis=3)
    assert np.array_equal(got, expect)
    if builder == "quantized_concat":
        glo, ghi = run_nodes(nodes, ["cat:1", "cat:2"], {"a:0": a, "b:0": b})
        assert (float(glo), float(ghi)) == (lo, hi)


def test_requantize_int32_to_quint8():
    a = RNG.uniform(0.0, 1.0, (4, 32)).astype(np.float32)
    w = RNG.normal(0, 1, (32, 8)).astype(np.float32)
    nodes, aq = quantized_input("a", a, 1.0, False)
    wn, qw = weights("w", w, "matmul", False, per_channel=False)
    nodes += wn + [f32("b", np.zeros(8)), f32("rlo", 0.0), f32("rhi", 3.0),
                   ops.quantized_matmul("m", "a_q:0", "w", "b", "a_q:1", "a_q:2", "w_min",
                                        "w_max", tout="qint32", fused_ops=["BiasAdd", "Relu"]),
                   ops.requantize("rq", "m:0", "m:1", "m:2", "rlo", "rhi")]
    got, lo, hi = run_nodes(nodes, ["rq:0", "rq:1", "rq:2"], {"a:0": a})
    ref = qm.requantize_reference(matmul_int(aq, qw.values), 1.0, False, qw.min_range,
                                  qw.max_range, relu=True, output_range=3.0)
    assert_within_one_step(got, ref, exact_fraction=0.95)
    assert (float(lo), float(hi)) == (0.0, 3.0)


# --------------------------------------------------------------------------- fresh processes
_SUBPROCESS = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {tests!r})
    import numpy as np
    import graphquant
    from graphquant import int8_ops as ops, quant_math as qm
    from graphquant.graph import make_const, make_node
    from graphquant.runtime import tf
    from int8_reference import run_nodes
    rng = np.random.default_rng(0)
    f32 = lambda n, v: make_const(n, np.asarray(v, np.float32))
    x = rng.uniform(-1, 1, (1, 6, 6, 8)).astype(np.float32)
    qw = qm.quantize_weights(rng.normal(0, 1, (3, 3, 8, 4)), "conv", True, 63)
    qd = qm.quantize_weights(rng.normal(0, 1, (3, 3, 8, 1)), "depthwise", True, 127)
    qm_w = qm.quantize_weights(rng.normal(0, 1, (72, 4)), "matmul", True, 63)
    nodes = [make_node("Placeholder", "x", dtype=tf().float32), f32("z", 0.0), f32("one", 1.0),
             f32("m1", -1.0), f32("two", 2.0),
             ops.quantize_v2("xu", "x", "z", "one", False),
             ops.quantize_v2("xs", "x", "m1", "one", True),
             ops.quantized_const("w", qw.values, "qint8"),
             f32("wl", qw.min_range), f32("wh", qw.max_range),
             ops.quantized_const("wd", qd.values, "qint8"),
             f32("dl", qd.min_range), f32("dh", qd.max_range),
             ops.quantized_const("wm", qm_w.values, "qint8"),
             f32("ml", qm_w.min_range), f32("mh", qm_w.max_range),
             f32("b", np.arange(4) / 4.0), f32("bd", np.zeros(8)),
             ops.fused_quantized_conv("conv", "xu:0", "w", "xu:1", "xu:2", "wl", "wh", bias="b",
                                      min_freezed_output="z", max_freezed_output="two"),
             ops.fused_quantized_conv("dw", "xs:0", "wd", "xs:1", "xs:2", "dl", "dh", bias="bd",
                                      tinput="qint8", out_type="qint8",
                                      fused_ops=["BiasAdd", "Requantize"], depthwise=True,
                                      min_freezed_output="m1", max_freezed_output="one"),
             make_node("Reshape", "flat", ["xu:0", "shape"], T=ops.dtype("quint8")),
             make_const("shape", np.int32([4, 72])),
             ops.quantized_matmul("mm", "flat", "wm", "b", "xu:1", "xu:2", "ml", "mh"),
             ops.dequantize("dq", "conv:0", "conv:1", "conv:2", False),
             ops.quantized_max_pool("mp", "xs:0", "xs:1", "xs:2", t="qint8", ksize=[1, 2, 2, 1],
                                    strides=[1, 2, 2, 1], padding="SAME"),
             ops.quantized_avg_pool("ap", "xu:0", "xu:1", "xu:2", t="quint8", ksize=[1, 3, 3, 1],
                                    strides=[1, 1, 1, 1], padding="SAME"),
             make_const("axis", np.int32(3)),
             ops.concat_same_range("cat", ["xu:0", "conv:0"], "axis", t="quint8")]
    fetch = ["xu:0", "xs:0", "conv:0", "dw:0", "mm:0", "dq:0", "mp:0", "ap:0", "cat:0"]
    out = dict(zip(fetch, (a.tolist() for a in run_nodes(nodes, fetch, {{"x:0": x}}))))
    legacy = [ops.legacy_quantized_conv("QuantizedConv2DWithBiasAndReluAndRequantize", "legacy",
                                        "xu:0", "w", "b", "xu:1", "xu:2", "wl", "wh", "z", "two"),
              ops.quantized_concat("qcat", ["xu:0", "xu:0"], "axis", ["xu:1", "xu:1"],
                                   ["xu:2", "xu:2"], t="quint8")]
    t = tf()
    g = t.Graph()
    with g.as_default():
        from tensorflow.core.framework import graph_pb2
        gd = graph_pb2.GraphDef(); gd.node.extend(nodes + legacy)
        t.graph_util.import_graph_def(gd, name="")
    for name in ("legacy", "qcat"):
        try:
            with t.compat.v1.Session(graph=g) as sess:
                out[name] = sess.run(name + ":0", {{"x:0": x}}).tolist()
        except t.errors.OpError as exc:
            out[name + "_error"] = exc.message
    print("RESULT" + json.dumps(out))
""")


def _run_fresh(env_value):
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS=env_value, TF_CPP_MIN_LOG_LEVEL="3")
    code = _SUBPROCESS.format(tests=TESTS)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert line, proc.stderr[-2000:]
    return json.loads(line[0][len("RESULT"):])


def test_attribute_driven_family_runs_without_onednn_and_legacy_does_not():
    """Same graph in fresh processes with TF_ENABLE_ONEDNN_OPTS=0 and =1: every op
    graphquant emits gives identical results; the legacy conv and QuantizedConcatV2
    only run with oneDNN."""
    off = _run_fresh("0")
    on = _run_fresh("1")
    for key in ("xu:0", "xs:0", "conv:0", "dw:0", "mm:0", "dq:0", "mp:0", "cat:0"):
        assert np.array_equal(np.asarray(off[key]), np.asarray(on[key])), key
    # QuantizedAvgPool rounds down without oneDNN, to nearest with it
    assert np.abs(np.asarray(off["ap:0"]) - np.asarray(on["ap:0"])).max() <= 1
    assert "Missing 0-th output" in off["legacy_error"]
    assert "Missing 0-th output" in off["qcat_error"]  # QuantizedConcatV2 needs oneDNN too
    assert "legacy_error" not in on and "qcat_error" not in on
    # legacy and attribute-driven kernels agree when oneDNN is on
    assert np.array_equal(np.asarray(on["legacy"]), np.asarray(on["conv:0"]))


def test_sum_summand_shared_with_the_branch_like_resnet():
    """out = relu(conv2(conv1(x)) + x): x feeds conv1 and is the summand of conv2.
    The in-place summand is safe because conv1 must finish before conv2 runs."""
    x = RNG.uniform(0.0, 2.0, (1, 6, 6, 8)).astype(np.float32)
    w = RNG.normal(0, 0.2, (3, 3, 8, 8)).astype(np.float32)
    nodes, xq = quantized_input("x", x, 2.0, False)
    wn, qw = weights("w", w, "conv", False)
    nodes += wn + [f32("b", np.zeros(8)), f32("z", 0.0), f32("four", 4.0),
                   ops.fused_quantized_conv("branch", "x_q:0", "w", "x_q:1", "x_q:2", "w_min",
                                            "w_max", bias="b", min_freezed_output="z",
                                            max_freezed_output="four"),
                   ops.fused_quantized_conv(
                       "block", "branch:0", "w", "branch:1", "branch:2", "w_min", "w_max",
                       bias="b", fused_ops=["BiasAdd", "Sum", "Relu", "Requantize"],
                       summand="x_q:0", tsummand="quint8", min_summand="x_q:1",
                       max_summand="x_q:2", min_freezed_output="z", max_freezed_output="four")]
    got = run_nodes(nodes, ["block:0"], {"x:0": x})[0]
    branch = qm.requantize_reference(conv2d_int(xq, qw.values), 2.0, False, qw.min_range,
                                     qw.max_range, relu=True, output_range=4.0)
    ref = qm.requantize_reference(conv2d_int(branch, qw.values), 4.0, False, qw.min_range,
                                  qw.max_range, relu=True, output_range=4.0, summand=xq,
                                  summand_range=2.0)
    assert_within_one_step(got, ref)
