"""quantize_conv: wiring of the int8 island and its error, bounded in quantization steps."""

import numpy as np
import pytest

from graphquant.graph import GraphIndex, const_value, data_inputs
from graphquant.runtime import tf
from helpers import build_graph
from int8_helpers import conv_error_bound, node, ops, output_step, quantize_tiny

RNG = np.random.default_rng(7)


def _conv_graph(act=None, depthwise=False, signed_input=False, bias=True, residual=False):
    t = tf()
    w = RNG.normal(0, 0.3, [3, 3, 8, 2 if depthwise else 16]).astype(np.float32)
    b = RNG.normal(0, 0.5, [16]).astype(np.float32)

    def body(x):
        if depthwise:
            y = t.nn.depthwise_conv2d(x, t.constant(w, name="w"), [1, 1, 1, 1], "SAME",
                                      name="conv")
        else:
            y = t.nn.conv2d(x, t.constant(w, name="w"), 1, "SAME", name="conv")
        if bias:
            y = t.nn.bias_add(y, t.constant(b, name="b"), name="bias")
        if residual:
            s = t.nn.relu(t.nn.conv2d(x, t.constant(RNG.normal(0, 0.3, [1, 1, 8, 16]).astype(
                np.float32)), 1, "SAME"), name="shortcut")
            y = t.add(y, s, name="add")
        if act:
            y = getattr(t.nn, act)(y, name="act")
        return y

    gd, outs = build_graph(body, x=[2, 9, 9, 8])
    lo = -1.0 if signed_input else 0.0
    x = RNG.uniform(lo, 1.0, [2, 9, 9, 8]).astype(np.float32)
    return gd, outs, x, w, b


def _fp32_and_int8(gd, outs, x, **options):
    int8, ctx, ranges = quantize_tiny(gd, outs, {"x:0": x}, ["quantize_conv"], **options)
    from graphquant.execute import run_graph

    return run_graph(gd, {"x:0": x}, outs)[0], run_graph(int8, {"x:0": x}, outs)[0], int8, ctx, \
        ranges


@pytest.mark.parametrize("act", [None, "relu", "relu6"])
def test_conv_bias_act_becomes_one_island(act):
    gd, outs, x, _, _ = _conv_graph(act)
    _, _, int8, ctx, _ = _fp32_and_int8(gd, outs, x)
    assert ops(int8) == sorted(["Placeholder", "QuantizeV2", "_FusedQuantizedConv2D",
                                "Dequantize"])
    root = outs[0].split(":")[0]
    dq = node(int8, root)
    assert dq.op == "Dequantize"  # readers of the old root stay wired
    conv = GraphIndex(int8).node(dq.input[0])
    fused = [s.decode() for s in conv.attr["fused_ops"].list.s]
    assert fused == ["BiasAdd"] + (["Relu"] if act else []) + ["Requantize"]
    index = GraphIndex(int8)
    assert index.node(conv.input[0]).op == "QuantizeV2"
    weights = index.node(conv.input[1])
    assert weights.attr["dtype"].type == tf().qint8.as_datatype_enum
    assert np.abs(const_value(weights).astype(np.int32)).max() <= 63  # avx2 target
    assert index.node(conv.input[2]).attr["dtype"].type == tf().qint32.as_datatype_enum
    assert conv.attr["out_type"].type == (tf().qint8 if act is None else tf().quint8
                                          ).as_datatype_enum
    assert [n["node"] for n in ctx.notes_of("int8")] == [root]


@pytest.mark.parametrize("act,signed_input,depthwise", [
    ("relu", False, False), ("relu6", False, False), (None, False, False),
    ("relu", True, False), (None, True, True), ("relu", False, True)])
def test_error_within_quantization_bound(act, signed_input, depthwise):
    gd, outs, x, w, b = _conv_graph(act, depthwise, signed_input)
    ref, got, int8, ctx, ranges = _fp32_and_int8(gd, outs, x)
    t = tf()
    note = ctx.notes_of("int8")[0]
    out_rng = note["output_range"]
    out_signed = out_rng[0] < 0
    step = output_step(out_rng, out_signed)
    wq_step = np.abs(w).reshape(-1, w.shape[2] * w.shape[3] if depthwise else w.shape[3]).max(0)
    level = 63 if not signed_input or depthwise else 126
    level = 127 if depthwise else level
    w_step = wq_step / level
    if depthwise:
        conv = lambda a, k: t.nn.depthwise_conv2d(a, k, [1, 1, 1, 1], "SAME").numpy()
    else:
        conv = lambda a, k: t.nn.conv2d(a, k, 1, "SAME").numpy()
    x_range = ranges["x:0"]
    bound = conv_error_bound(conv, x, w, x_range, w_step, step)
    err = np.abs(got - ref)
    assert np.all(err <= bound + 1e-6)
    # and typically far inside it: RMS error below one output step
    assert np.sqrt(np.mean(err ** 2)) < step


def test_residual_add_relu_fuses_as_sum():
    gd, outs, x, _, _ = _conv_graph("relu", residual=True)
    ref, got, int8, ctx, _ = _fp32_and_int8(gd, outs, x)
    fused = [n for n in int8.node if n.op == "_FusedQuantizedConv2D"]
    sums = [n for n in fused if b"Sum" in list(n.attr["fused_ops"].list.s)]
    assert len(fused) == 2 and len(sums) == 1
    assert "AddV2" not in ops(int8) and "Add" not in ops(int8)
    ranges = ctx.options["ranges"]
    step = output_step(ranges[outs[0]], False)
    summand_step = output_step(ranges["shortcut:0"], False)
    # the summand arrives rounded to its own steps: one step of each, RMS
    assert np.sqrt(np.mean((got - ref) ** 2)) < step + summand_step


def test_residual_with_later_reader_of_summand_keeps_add_fp32():
    t = tf()
    w = RNG.normal(0, 0.3, [3, 3, 8, 8]).astype(np.float32)

    def body(x):
        s = t.nn.relu(x, name="s")
        y = t.nn.relu(t.add(t.nn.conv2d(x, t.constant(w), 1, "SAME", name="conv"), s,
                            name="add"), name="act")
        return [y, t.nn.relu6(s, name="later")]  # reads s, not an ancestor of conv

    gd, outs = build_graph(body, x=[1, 5, 5, 8])
    x = RNG.uniform(-1, 1, [1, 5, 5, 8]).astype(np.float32)
    int8, _, _ = quantize_tiny(gd, outs, {"x:0": x}, ["quantize_conv"])
    assert "AddV2" in ops(int8) or "Add" in ops(int8)
    fused = [n for n in int8.node if n.op == "_FusedQuantizedConv2D"]
    assert len(fused) == 1 and b"Sum" not in list(fused[0].attr["fused_ops"].list.s)


def test_exclude_and_nchw_stay_fp32_with_reason():
    gd, outs, x, _, _ = _conv_graph("relu")
    int8, ctx, _ = quantize_tiny(gd, outs, {"x:0": x}, ["quantize_conv"], exclude={"Conv2D"})
    assert "Conv2D" in ops(int8) and "_FusedQuantizedConv2D" not in ops(int8)
    assert any("excluded" in n["message"] for n in ctx.notes_of("fp32"))


def test_per_tensor_weights_have_scalar_ranges():
    gd, outs, x, _, _ = _conv_graph("relu")
    int8, _, _ = quantize_tiny(gd, outs, {"x:0": x}, ["quantize_conv"], per_tensor=True)
    conv = [n for n in int8.node if n.op == "_FusedQuantizedConv2D"][0]
    index = GraphIndex(int8)
    min_filter = const_value(index.node(data_inputs(conv)[5]))
    assert np.ndim(min_filter) == 0


def test_int32_bias_is_exact():
    """The qint32 bias is round(b / (s_in * s_w[c])) for the island's own ranges."""
    gd, outs, x, w, b = _conv_graph("relu")
    int8, _, ranges = quantize_tiny(gd, outs, {"x:0": x}, ["quantize_conv"])
    conv = [n for n in int8.node if n.op == "_FusedQuantizedConv2D"][0]
    index = GraphIndex(int8)
    ins = data_inputs(conv)
    bias_q = const_value(index.node(ins[2])).astype(np.int64)
    max_in = float(const_value(index.node(ins[4])))
    max_filter = const_value(index.node(ins[6])).astype(np.float64)
    s_in = max_in / 255.0
    s_w = np.abs(max_filter) / 127.0
    assert max_in == pytest.approx(max(abs(ranges["x:0"][0]), abs(ranges["x:0"][1])), rel=1e-6)
    np.testing.assert_array_equal(bias_q, np.rint(b.astype(np.float64) / (s_in * s_w)))


def _with_conventional_weight_range(int8):
    """A copy of ``int8`` where each int8 conv/matmul reads its weight range the
    conventional way: min = -bound and max = +bound as two Consts."""
    from graphquant.graph import make_const

    out = type(int8)()
    out.CopyFrom(int8)
    index = GraphIndex(int8)
    for n in out.node:
        if n.op in ("_FusedQuantizedConv2D", "_FusedQuantizedDepthwiseConv2D",
                    "_QuantizedMatMul"):
            bound = const_value(index.node(n.input[5]))
            out.node.add().CopyFrom(make_const(n.name + "/negated_bound",
                                               -np.asarray(bound, np.float32)))
            n.input[5] = n.name + "/negated_bound"
    return out


@pytest.mark.parametrize("depthwise,per_tensor,act", [
    (False, False, "relu"), (False, True, None), (True, False, "relu6"), (True, True, None)])
def test_one_weight_bound_const_is_bit_identical_to_min_max_pair(depthwise, per_tensor, act):
    """Both weight-range inputs read one Const of max|w| per channel (the kernels use
    max(|min|, |max|)): outputs equal those with the conventional (-bound, +bound)."""
    from graphquant.execute import run_graph

    gd, outs, x, _, _ = _conv_graph(act, depthwise)
    int8, _, _ = quantize_tiny(gd, outs, {"x:0": x}, ["quantize_conv"], per_tensor=per_tensor)
    conv = next(n for n in int8.node if n.op.startswith("_FusedQuantized"))
    assert conv.input[5] == conv.input[6]
    assert np.all(const_value(GraphIndex(int8).node(conv.input[5])) > 0)
    conventional = _with_conventional_weight_range(int8)
    np.testing.assert_array_equal(run_graph(int8, {"x:0": x}, outs)[0],
                                  run_graph(conventional, {"x:0": x}, outs)[0])


def test_accuracy_fallbacks_match_node_names_only():
    """convert's own fallbacks (``fp32_nodes``) name nodes: a node TF named "Conv2D"
    stays fp32 without taking every Conv2D op with it (``exclude`` also takes op types)."""
    t = tf()
    w1 = RNG.normal(0, 0.3, [3, 3, 8, 8]).astype(np.float32)
    w2 = RNG.normal(0, 0.3, [3, 3, 8, 8]).astype(np.float32)

    def body(x):
        y = t.nn.relu(t.nn.conv2d(x, t.constant(w1), 1, "SAME"))   # TF names it "Conv2D"
        return t.nn.relu(t.nn.conv2d(y, t.constant(w2), 1, "SAME", name="conv2"))

    gd, outs = build_graph(body, x=[2, 9, 9, 8])
    assert "Conv2D" in {n.name for n in gd.node}
    x = RNG.uniform(0, 1, [2, 9, 9, 8]).astype(np.float32)
    int8, ctx, _ = quantize_tiny(gd, outs, {"x:0": x}, ["quantize_conv"], fp32_nodes={"Conv2D"})
    assert [n.name for n in int8.node if n.op == "Conv2D"] == ["Conv2D"]
    assert sum(n.op == "_FusedQuantizedConv2D" for n in int8.node) == 1
    assert any("accuracy checks" in n["message"] for n in ctx.notes_of("fp32"))
