"""pair_weights: 8-bit weights whose adjacent input-channel pairs cannot saturate 16-bit sums.

The kernels are run on inputs at the u8 maximum (255) with weights at the pair
limit (|q[2k] + q[2k+1]| = 128, single values up to 127), against an exact
integer reference; the negative control (same-sign pairs of 127) must differ on
CPUs without VNNI, which shows the test can see saturation.
"""

import numpy as np
import pytest

from graphquant import int8_ops as ops
from graphquant import pair_weights, target
from graphquant.graph import make_const, make_node
from graphquant.int8_rewrite import quantize_weights as rewrite_quantize_weights
from graphquant.pipeline import PassContext
from graphquant.quant_math import quantize_weights as seven_bit
from graphquant.runtime import tf
from int8_reference import conv2d_int, matmul_int, run_nodes


def f32(name, value):
    return make_const(name, np.asarray(value, np.float32))


def extreme_pairs(rng, shape, in_axis):
    """Integer weights at the pair limit: a = +-127 and its partner +-1 (same sign) or
    anything of the other sign; pairs along ``in_axis``."""
    w = np.moveaxis(rng.integers(-127, 128, shape), in_axis, -1).copy()
    for k in range(0, w.shape[-1] - 1, 2):
        sign = np.where(rng.random(w[..., k].shape) < 0.5, -1, 1)
        w[..., k] = 127 * sign
        w[..., k + 1] = np.where(rng.random(sign.shape) < 0.5, sign,
                                 -sign * rng.integers(0, 128, sign.shape))
    return np.moveaxis(w, -1, in_axis)


def conv_int32(x_levels, wq, stride=1, padding="SAME"):
    k = wq.shape[-1]
    nodes = [make_node("Placeholder", "x", dtype=tf().float32), f32("lo", 0.0), f32("hi", 255.0),
             ops.quantize_v2("xq", "x", "lo", "hi", False),
             ops.quantized_const("w", wq, "qint8"), f32("wmin", -127.0 * np.ones(k)),
             f32("wmax", 127.0 * np.ones(k)), f32("b", np.zeros(k)),
             ops.fused_quantized_conv("acc", "xq:0", "w", "xq:1", "xq:2", "wmin", "wmax",
                                      bias="b", out_type="qint32", fused_ops=["BiasAdd"],
                                      strides=[1, stride, stride, 1], padding=padding)]
    return run_nodes(nodes, ["acc:0"], {"x:0": x_levels.astype(np.float32)})[0].astype(np.int64)


def matmul_int32(a_levels, wq):
    k = wq.shape[1]
    nodes = [make_node("Placeholder", "x", dtype=tf().float32), f32("lo", 0.0), f32("hi", 255.0),
             ops.quantize_v2("xq", "x", "lo", "hi", False), ops.quantized_const("w", wq, "qint8"),
             f32("wmin", -127.0 * np.ones(k)), f32("wmax", 127.0 * np.ones(k)),
             f32("b", np.zeros(k)),
             ops.quantized_matmul("mm", "xq:0", "w", "b", "xq:1", "xq:2", "wmin", "wmax",
                                  tout="qint32", fused_ops=["BiasAdd"])]
    return run_nodes(nodes, ["mm:0"], {"x:0": a_levels.astype(np.float32)})[0].astype(np.int64)


@pytest.mark.parametrize("k,cin,cout,stride,padding", [
    (1, 64, 32, 1, "SAME"), (3, 16, 16, 1, "SAME"), (3, 3, 8, 2, "VALID"), (3, 17, 7, 1, "VALID"),
    (5, 24, 32, 2, "SAME"), (1, 256, 64, 2, "SAME")])
def test_conv_at_the_pair_limit_is_exact(k, cin, cout, stride, padding):
    rng = np.random.default_rng(cin * 31 + k)
    wq = extreme_pairs(rng, (k, k, cin, cout), 2)
    assert pair_weights.pair_sums_ok(wq, "conv")
    for x in (np.full((1, 12, 12, cin), 255), rng.integers(0, 256, (1, 12, 12, cin))):
        assert np.array_equal(conv_int32(x, wq, stride, padding),
                              conv2d_int(x, wq, (stride, stride), padding=padding))


@pytest.mark.parametrize("m,k,n", [(1, 1024, 10), (8, 17, 64), (16, 100, 5)])
def test_matmul_at_the_pair_limit_is_exact(m, k, n):
    rng = np.random.default_rng(k + n)
    wq = extreme_pairs(rng, (k, n), 0)
    for a in (np.full((m, k), 255), rng.integers(0, 256, (m, k))):
        assert np.array_equal(matmul_int32(a, wq), matmul_int(a, wq))


@pytest.mark.skipif(target.resolve("auto").has_vnni, reason="VNNI CPUs do not saturate")
def test_same_sign_pairs_above_the_limit_saturate_here():
    wq = np.full((1, 1, 16, 8), 127)
    x = np.full((1, 4, 4, 16), 255)
    assert not np.array_equal(conv_int32(x, wq), conv2d_int(x, wq))


@pytest.mark.parametrize("kind,shape,transpose_b", [
    ("conv", (3, 3, 16, 8), False), ("conv", (1, 1, 7, 5), False), ("matmul", (33, 10), False),
    ("matmul", (10, 33), True)])
@pytest.mark.parametrize("per_channel", [True, False])
def test_quantized_weights_respect_the_limit_and_round_to_nearest(kind, shape, transpose_b,
                                                                  per_channel):
    rng = np.random.default_rng(3)
    w = rng.normal(0, 0.1, shape).astype(np.float32)
    w.flat[0] = 0.9                     # an outlier
    if kind == "conv":
        w[0, 0, 1, 0] = 0.85            # ... with a same-sign partner: the pair limit binds
    qw = pair_weights.quantize_weights(w, kind, per_channel, transpose_b)
    assert qw.values.shape == w.shape and qw.max_level == 127
    assert pair_weights.pair_sums_ok(qw.values, kind, transpose_b)
    np.testing.assert_allclose(qw.max_range, qw.step * 127, rtol=1e-6)
    out_axis = (0 if transpose_b else 1) if kind == "matmul" else 3
    step = qw.step if not per_channel else np.expand_dims(
        qw.step, tuple(a for a in range(w.ndim) if a != out_axis))
    err = np.abs(qw.values * step - w)
    assert np.mean(err <= step * 0.5 + 1e-7) > 0.99     # nearly all round to nearest
    safe = pair_weights.quantize_weights(w, kind, per_channel, transpose_b, search=1)
    assert np.all(np.abs(safe.values * np.reshape(safe.step, step.shape) - w)
                  <= np.reshape(safe.step, step.shape) + 1e-7)   # no search: ties move 1 step
    assert np.sum(err ** 2) <= np.sum((safe.values * np.reshape(safe.step, step.shape) - w)
                                      ** 2) * (1 + 1e-6)          # the search never does worse


def test_two_thirds_of_the_seven_bit_error_on_gaussian_weights():
    w = np.random.default_rng(5).normal(0, 0.05, (3, 3, 64, 32)).astype(np.float32)
    pairs = pair_weights.quantize_weights(w, "conv")
    seven = seven_bit(w, "conv", max_level=63)
    assert np.all(pairs.step < seven.step)
    err_pairs = np.linalg.norm(pairs.dequantize() - w)
    err_seven = np.linalg.norm(seven.dequantize() - w)
    assert err_pairs < 0.7 * err_seven


def test_quantize_passes_use_pairs_only_for_unsigned_inputs_on_avx2():
    w = np.random.default_rng(6).normal(0, 0.1, (3, 3, 8, 4)).astype(np.float32)
    ctx = PassContext(options={"target": target.resolve("avx2"), "pair_weights": True})
    assert rewrite_quantize_weights(ctx, w, "conv", signed_input=False).max_level == 127
    assert rewrite_quantize_weights(ctx, w, "conv", signed_input=True).max_level == 126
    ctx.options["pair_weights"] = False
    assert rewrite_quantize_weights(ctx, w, "conv", signed_input=False).max_level == 63
    ctx.options.update(pair_weights=True, target=target.resolve("vnni"))
    qw = rewrite_quantize_weights(ctx, w, "conv", signed_input=False)
    assert qw.max_level == 127 and np.abs(qw.values).max() == 127


def test_quantized_weights_are_remembered_per_format_and_read_only():
    w = np.random.default_rng(7).normal(0, 0.1, (3, 3, 8, 4)).astype(np.float32)
    ctx = PassContext(options={"target": target.resolve("avx2"), "pair_weights": True})
    first = rewrite_quantize_weights(ctx, w, "conv", signed_input=False)
    assert rewrite_quantize_weights(ctx, w.copy(), "conv", signed_input=False) is first
    assert not first.values.flags.writeable and not first.step.flags.writeable
    fresh = pair_weights.quantize_weights(w, "conv")
    assert np.array_equal(first.values, fresh.values) and np.array_equal(first.step, fresh.step)
    signed = rewrite_quantize_weights(ctx, w, "conv", signed_input=True)   # another format
    assert signed is not first and signed.max_level == 126
    other = w.copy()
    other[0, 0, 0, 0] += 0.01                                             # other weights
    changed = rewrite_quantize_weights(ctx, other, "conv", signed_input=False)
    assert changed is not first and changed.values[0, 0, 0, 0] != first.values[0, 0, 0, 0]


@pytest.mark.parametrize("kind,shape,transpose_b", [("conv", (3, 3, 7, 45), False),
                                                     ("conv", (1, 1, 64, 19), False),
                                                     ("matmul", (30, 50), True)])
def test_search_on_channel_blocks_in_threads_equals_the_whole_tensor(monkeypatch, kind, shape,
                                                                     transpose_b):
    w = np.random.default_rng(8).normal(0, 0.1, shape).astype(np.float32)
    w[..., 3] = 0.0                                     # an all-zero channel (or row)
    whole = pair_weights.quantize_weights(w, kind, transpose_b=transpose_b)
    monkeypatch.setattr(pair_weights, "BLOCK_VALUES", 1)      # blocks of 8 channels
    searched, search = [], pair_weights._search

    def counted(pairs, *args, **kwargs):
        searched.append(pairs.shape[-1])
        return search(pairs, *args, **kwargs)

    monkeypatch.setattr(pair_weights, "_search", counted)
    blocked = pair_weights.quantize_weights(w, kind, transpose_b=transpose_b)
    assert len(searched) > 1 and max(searched) == 8
    assert np.array_equal(blocked.values, whole.values)
    assert np.array_equal(blocked.step, whole.step)
    assert np.array_equal(blocked.max_range, whole.max_range)
