"""quantize_matmul: MatMul (+bias)(+Relu/Relu6) -> _QuantizedMatMul, error in quantization steps."""

import numpy as np
import pytest

from graphquant.execute import run_graph
from graphquant.graph import GraphIndex, const_value
from graphquant.runtime import tf
from helpers import build_graph
from int8_helpers import ops, output_step, quantize_tiny

RNG = np.random.default_rng(13)


@pytest.mark.parametrize("act,bias_op,transpose_b", [
    ("relu", "bias_add", False), (None, "add", False), ("relu6", "bias_add", True),
    (None, None, False)])
def test_matmul_island_and_error(act, bias_op, transpose_b):
    t = tf()
    w = RNG.normal(0, 0.2, [10, 32] if transpose_b else [32, 10]).astype(np.float32)
    b = RNG.normal(0, 0.5, [10]).astype(np.float32)

    def body(x):
        y = t.linalg.matmul(x, t.constant(w), transpose_b=transpose_b, name="mm")
        if bias_op == "bias_add":
            y = t.nn.bias_add(y, t.constant(b), name="bias")
        elif bias_op == "add":
            y = t.add(y, t.constant(b), name="bias")
        if act:
            y = getattr(t.nn, act)(y, name="act")
        return y

    gd, outs = build_graph(body, x=[4, 32])
    x = RNG.uniform(-1, 1, [4, 32]).astype(np.float32)
    int8, ctx, ranges = quantize_tiny(gd, outs, {"x:0": x}, ["quantize_matmul"])
    assert ops(int8) == sorted(["Placeholder", "QuantizeV2", "_QuantizedMatMul", "Dequantize"])
    mm = [n for n in int8.node if n.op == "_QuantizedMatMul"][0]
    fused = [s.decode() for s in mm.attr["fused_ops"].list.s]
    assert fused == ["BiasAdd"] + ([{"relu": "Relu", "relu6": "Relu6"}[act]] if act else []) + [
        "Requantize"]
    assert mm.attr["transpose_b"].b == transpose_b
    wq = const_value(GraphIndex(int8).node(mm.input[1]))
    assert np.abs(wq.astype(np.int32)).max() <= 63
    ref = run_graph(gd, {"x:0": x}, outs)[0]
    got = run_graph(int8, {"x:0": x}, outs)[0]
    out_rng = ctx.notes_of("int8")[0]["output_range"]
    step = output_step(out_rng, out_rng[0] < 0)
    # 32 products of (input step/2) x |w| and |x| x (weight step/2) + output rounding
    s_in = output_step(ranges["x:0"], True)
    s_w = np.abs(w).max(axis=1 if transpose_b else 0) / 63
    wk = w.T if transpose_b else w
    bound = (np.abs(x) + s_in / 2) @ (np.ones_like(wk) * s_w / 2) + (s_in / 2) @ np.abs(wk) \
        if False else (np.abs(x) + s_in / 2) @ (np.ones_like(wk) * s_w / 2) + \
        np.full_like(x, s_in / 2) @ np.abs(wk)
    bound = bound + 0.5 * s_in * s_w.max() + 0.5 * step
    assert np.all(np.abs(got - ref) <= bound + 1e-6)
    assert np.sqrt(np.mean((got - ref) ** 2)) < step


def test_one_weight_bound_const_is_bit_identical_to_min_max_pair():
    """min_b and max_b read one Const of max|w| per column; the conventional pair
    (-bound, +bound) gives the same outputs bit for bit."""
    from graphquant.graph import make_const

    t = tf()
    w = RNG.normal(0, 0.2, [32, 10]).astype(np.float32)
    gd, outs = build_graph(lambda x: t.nn.relu(t.linalg.matmul(x, t.constant(w)), name="act"),
                           x=[4, 32])
    x = RNG.uniform(0, 1, [4, 32]).astype(np.float32)
    int8, _, _ = quantize_tiny(gd, outs, {"x:0": x}, ["quantize_matmul"])
    mm = next(n for n in int8.node if n.op == "_QuantizedMatMul")
    assert mm.input[5] == mm.input[6]
    conventional = type(int8)()
    conventional.CopyFrom(int8)
    bound = const_value(GraphIndex(int8).node(mm.input[5]))
    conventional.node.add().CopyFrom(make_const("negated_bound", -bound))
    next(n for n in conventional.node if n.op == "_QuantizedMatMul").input[5] = "negated_bound"
    np.testing.assert_array_equal(run_graph(int8, {"x:0": x}, outs)[0],
                                  run_graph(conventional, {"x:0": x}, outs)[0])
