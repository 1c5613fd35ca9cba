"""The non-VNNI saturation test: one 3x3 conv, 1x16x16x64 -> 32, through
_FusedQuantizedConv2D, against the exact integer reference.

With the weights graphquant uses for ``--target=avx2`` (|w| <= 63) the int32
accumulator and the requantized output must be bit-exact on every CPU.  With
full-range weights (|w| <= 127) CPUs without VNNI add u8 x s8 products pairwise
in saturating 16 bits: the result is wrong there -- exactly the pairwise
saturation model of tests/int8_reference.py (asserted only when graphquant.target
says this CPU has no VNNI) -- and exact with VNNI.  Measured here (AVX2):
relative L2 error of the int32 result 0.097 (inputs 0..255) and 0.135 (inputs
128..255) with uniform weights, every output wrong; 0.006 / 0.009 with
normally distributed weights.
"""

import numpy as np
import pytest

from graphquant import int8_ops as ops
from graphquant import quant_math as qm
from graphquant import target
from graphquant.graph import make_const, make_node
from graphquant.runtime import tf
from int8_reference import conv2d_int, pairwise_saturated_conv2d, run_nodes

SHAPE, K = (1, 16, 16, 64), 32
R_IN, R_OUT = 4.0, 40.0


def f32(name, value):
    return make_const(name, np.asarray(value, np.float32))


def run_conv(xq_float, w_float, max_level):
    """int32 output and requantized quint8 output of the conv, plus the reference."""
    qw = qm.quantize_weights(w_float, "conv", per_channel=False, max_level=max_level)
    nodes = [make_node("Placeholder", "x", dtype=tf().float32), f32("lo", 0.0), f32("hi", R_IN),
             ops.quantize_v2("xq", "x", "lo", "hi", False),
             ops.quantized_const("w", qw.values, "qint8"),
             f32("wmin", qw.min_range), f32("wmax", qw.max_range), f32("b", np.zeros(K)),
             f32("omin", 0.0), f32("omax", R_OUT),
             ops.fused_quantized_conv("acc", "xq:0", "w", "xq:1", "xq:2", "wmin", "wmax",
                                      bias="b", out_type="qint32", fused_ops=["BiasAdd"]),
             ops.fused_quantized_conv("out", "xq:0", "w", "xq:1", "xq:2", "wmin", "wmax",
                                      bias="b", min_freezed_output="omin",
                                      max_freezed_output="omax")]
    acc, out = run_nodes(nodes, ["acc:0", "out:0"], {"x:0": xq_float})
    xq = qm.quantize_activation(xq_float, R_IN, False)
    ref_acc = conv2d_int(xq, qw.values)
    ref_out = qm.requantize_reference(ref_acc, R_IN, False, qw.min_range, qw.max_range,
                                      relu=True, output_range=R_OUT)
    return acc.astype(np.int64), out, ref_acc, ref_out, qw


def inputs(low_level):
    rng = np.random.default_rng(11)
    levels = rng.integers(low_level, 256, SHAPE)
    return (levels * (R_IN / 255)).astype(np.float32)


def weights_float():
    """Uniform weights: every integer level equally likely (the worst case for
    saturation; trained weights, mostly small, saturate less often)."""
    rng = np.random.default_rng(12)
    return rng.uniform(-1, 1, (3, 3, SHAPE[3], K)).astype(np.float32)


@pytest.mark.parametrize("low_level", [0, 128])
def test_seven_bit_weights_are_bit_exact(low_level):
    level, _ = target.weight_format("avx2", "conv", signed_input=False)
    assert level == 63
    acc, out, ref_acc, ref_out, qw = run_conv(inputs(low_level), weights_float(), level)
    assert np.abs(qw.values).max() == 63
    assert np.array_equal(acc, ref_acc)
    assert np.array_equal(out, ref_out)


@pytest.mark.parametrize("low_level", [0, 128])
def test_full_range_weights_depend_on_vnni(low_level, record_property):
    acc, out, ref_acc, ref_out, qw = run_conv(inputs(low_level), weights_float(), 127)
    assert np.abs(qw.values).max() == 127
    rel = float(np.linalg.norm(acc - ref_acc) / np.linalg.norm(ref_acc))
    wrong = float(np.mean(acc != ref_acc))
    record_property("rel_l2_int32_error_127", rel)
    record_property("fraction_wrong_127", wrong)
    print(f"|w|<=127, inputs {low_level}..255: relative L2 error {rel:.4f}, "
          f"{wrong:.1%} of int32 outputs wrong, max requantized diff "
          f"{int(np.abs(out.astype(int) - ref_out.astype(int)).max())} steps")
    if target.resolve("auto").has_vnni:
        assert np.array_equal(acc, ref_acc)
    else:
        assert rel > 1e-3 and wrong > 0.01
        # and it is exactly the 16-bit pairwise saturation (vpmaddubsw) model
        xq = qm.quantize_activation(inputs(low_level), R_IN, False)
        assert np.array_equal(acc, pairwise_saturated_conv2d(xq, qw.values))
