"""skip_requantize_for_fp32_readers: a conv feeding fp32 ops outputs int32, not 8-bit steps."""

import numpy as np

from graphquant.execute import run_graph
from graphquant.graph import GraphIndex
from graphquant.runtime import tf
from helpers import build_graph
from int8_helpers import conv_error_bound, ops, output_step, quantize_tiny

RNG = np.random.default_rng(17)
BASE = ["quantize_conv", "remove_dequantize_quantize_pairs", "merge_duplicate_quantize"]


def _graph(act):
    t = tf()
    w = RNG.normal(0, 0.3, [3, 3, 4, 8]).astype(np.float32)

    def body(x):
        y = t.nn.bias_add(t.nn.conv2d(x, t.constant(w), 1, "SAME", name="conv"),
                          t.constant(RNG.normal(0, 0.2, [8]).astype(np.float32)), name="y")
        if act:
            y = t.nn.relu(y, name="act")
        return t.nn.sigmoid(y, name="out")  # an fp32 reader

    gd, outs = build_graph(body, x=[1, 7, 7, 4])
    return gd, outs, w


def test_conv_before_fp32_reader_outputs_int32_and_is_more_precise():
    for act in (None, "relu"):
        gd, outs, w = _graph(act)
        x = RNG.uniform(0, 1, [1, 7, 7, 4]).astype(np.float32)
        feeds = {"x:0": x}
        root = "act" if act else "y"
        requant, _, _ = quantize_tiny(gd, [root + ":0"], feeds, BASE + ["remove_unused_nodes"])
        direct, _, ranges = quantize_tiny(gd, [root + ":0"], feeds, BASE + [
            "skip_requantize_for_fp32_readers", "remove_unused_nodes"])
        conv = [n for n in direct.node if n.op == "_FusedQuantizedConv2D"][0]
        assert conv.attr["out_type"].type == tf().qint32.as_datatype_enum
        assert [s.decode() for s in conv.attr["fused_ops"].list.s] == (
            ["BiasAdd", "Relu"] if act else ["BiasAdd"])
        assert "Dequantize" not in ops(direct)
        index = GraphIndex(direct)
        assert index.nodes[root].op == "Mul"  # readers of the root stay wired
        assert index.node(index.nodes[root].input[0]).op == "Cast"
        ref = run_graph(gd, feeds, [root + ":0"])[0]
        got_direct = run_graph(direct, feeds, [root + ":0"])[0]
        got_requant = run_graph(requant, feeds, [root + ":0"])[0]
        err_direct = np.abs(got_direct - ref)
        assert np.sqrt(np.mean(err_direct ** 2)) < np.sqrt(np.mean((got_requant - ref) ** 2))
        # the bound without any output rounding term
        conv_fn = lambda a, k: tf().nn.conv2d(a, k, 1, "SAME").numpy()
        bound = conv_error_bound(conv_fn, x, w, ranges["x:0"], np.abs(w).reshape(-1, 8).max(0)
                                 / 63, 0.0)
        assert np.all(err_direct <= bound + 1e-5)


def test_int8_reader_keeps_requantize():
    t = tf()
    w1 = RNG.normal(0, 0.3, [1, 1, 4, 4]).astype(np.float32)

    def body(x):
        a = t.nn.relu(t.nn.conv2d(x, t.constant(w1), 1, "SAME"), name="a")
        return t.nn.relu(t.nn.conv2d(a, t.constant(w1), 1, "SAME"), name="b")

    gd, outs = build_graph(body, x=[1, 4, 4, 4])
    x = RNG.uniform(0, 1, [1, 4, 4, 4]).astype(np.float32)
    out, _, _ = quantize_tiny(gd, outs, {"x:0": x}, BASE + [
        "skip_requantize_for_fp32_readers", "remove_unused_nodes"])
    index = GraphIndex(out)
    cast = index.node(index.nodes["b"].input[0])
    last = index.node(index.node(cast.input[0]).input[0])
    first = index.node(last.input[0])  # int8 straight into the last conv
    assert last.op == first.op == "_FusedQuantizedConv2D"
    assert last.attr["out_type"].type == tf().qint32.as_datatype_enum
    assert first.attr["out_type"].type == tf().quint8.as_datatype_enum


def test_matmul_before_fp32_reader_dequantizes_in_the_op():
    t = tf()
    w = RNG.normal(0, 0.2, [32, 10]).astype(np.float32)
    b = RNG.normal(0, 0.5, [10]).astype(np.float32)
    for act in (None, "relu", "relu6"):
        def body(x):
            y = t.nn.bias_add(t.linalg.matmul(x, t.constant(w), name="mm"), t.constant(b),
                              name="y")
            y = getattr(t.nn, act)(y, name="act") if act else y
            return t.nn.softmax(y, name="out")  # an fp32 reader

        gd, outs = build_graph(body, x=[4, 32])
        x = RNG.uniform(-1, 1, [4, 32]).astype(np.float32)
        feeds = {"x:0": x}
        root = "act" if act else "y"
        mm_passes = ["quantize_matmul", "remove_dequantize_quantize_pairs",
                     "merge_duplicate_quantize"]
        requant, ctx, ranges = quantize_tiny(gd, [root + ":0"], feeds,
                                             mm_passes + ["remove_unused_nodes"])
        direct, _, _ = quantize_tiny(gd, [root + ":0"], feeds, mm_passes + [
            "skip_requantize_for_fp32_readers", "remove_unused_nodes"])
        assert ops(direct) == sorted(["Placeholder", "QuantizeV2", "_QuantizedMatMul"])
        mm = GraphIndex(direct).nodes[root]    # named like the Dequantize: readers stay wired
        assert mm.op == "_QuantizedMatMul" and mm.attr["Tout"].type == t.float32.as_datatype_enum
        assert [s.decode() for s in mm.attr["fused_ops"].list.s] == ["BiasAdd"] + (
            [{"relu": "Relu", "relu6": "Relu6"}[act]] if act else []) + ["Dequantize"]
        assert len(mm.input) == 7                # no min/max_freezed_output
        ref = run_graph(gd, feeds, [root + ":0"])[0]
        got = run_graph(direct, feeds, [root + ":0"])[0]
        got_requant = run_graph(requant, feeds, [root + ":0"])[0]
        # input and weight rounding only: 32 products of (input step/2) x |w| and
        # (|x| + input step/2) x (weight step/2); no output step
        s_in = output_step(ranges["x:0"], True)
        s_w = np.abs(w).max(axis=0) / 63
        bound = (np.abs(x) + s_in / 2) @ (np.ones_like(w) * s_w / 2) + \
            np.full_like(x, s_in / 2) @ np.abs(w)
        assert np.all(np.abs(got - ref) <= bound + 1e-5)
        # the only difference to the requantized op: its output rounding, half a step at most
        out_rng = ctx.notes_of("int8")[0]["output_range"]
        step = output_step(out_rng, out_rng[0] < 0)
        assert np.all(np.abs(got_requant - got) <= step / 2 + 1e-5)
        assert np.abs(got_requant - got).max() > 1e-4     # and it did round
