"""offset_residual_summands: signed residual summands get an offset so the Add fuses in int8.

Wiring after the pass (biases, Add input order, the Relu that takes a stream
Add's name, ranges and offsets), the fp32 sums unchanged inside the calibrated
ranges, and after the whole int8 pipeline: the Adds are Sum fusions, the 1x1
readers take quint8 input, and the error stays within a few output steps.
"""

import numpy as np
import pytest

from graphquant.calibrate import calibrate
from graphquant.execute import run_graph
from graphquant.graph import GraphIndex, canonical_tensor, const_value, data_inputs
from graphquant.pipeline import ISLAND_PASSES, JOIN_PASSES, RANGE_PASSES, PassContext, \
    run_pipeline
from graphquant.ranges import calibration_tensors, plan_ranges
from graphquant.execute import tensor_shapes
from graphquant.int8_rewrite import quantize_weights
from graphquant.runtime import tf
from graphquant.target import resolve
from helpers import build_graph
from int8_helpers import ops, output_step

RNG = np.random.default_rng(11)
SHAPE = [2, 6, 6, 8]


def _w(shape, scale=0.4):
    return RNG.normal(0, scale, shape).astype(np.float32)


def _conv(t, x, w, b, name, padding="SAME"):
    y = t.nn.conv2d(x, t.constant(w), 1, padding, name=f"{name}_conv")
    return t.nn.bias_add(y, t.constant(b), name=name)


def _stream_graph(reader_kernel=1):
    """MobileNetV2's residual stream: p1 feeds an expand conv and the Add; s = p1 + p2
    feeds a 1x1 conv (or a padded 3x3 one) and a second Add."""
    t = tf()
    w = {k: _w(s) for k, s in dict(p1=[1, 1, 8, 8], e=[1, 1, 8, 16], p2=[1, 1, 16, 8],
                                   e2=[1, 1, 8, 16], p3=[1, 1, 16, 8],
                                   out=[reader_kernel, reader_kernel, 8, 4]).items()}
    b = {k: RNG.normal(0, 0.3, [v.shape[-1]]).astype(np.float32) for k, v in w.items()}

    def body(x):
        p1 = _conv(t, x, w["p1"], b["p1"], "p1")
        h = t.nn.relu6(_conv(t, p1, w["e"], b["e"], "e"), name="e_relu")
        s = t.add(p1, _conv(t, h, w["p2"], b["p2"], "p2"), name="s")
        h2 = t.nn.relu6(_conv(t, s, w["e2"], b["e2"], "e2"), name="e2_relu")
        s2 = t.add(s, _conv(t, h2, w["p3"], b["p3"], "p3"), name="s2")
        return t.identity(_conv(t, s2, w["out"], b["out"], "out"), name="y")

    return build_graph(body, x=SHAPE)


def _projection_graph():
    """ResNet's projection block: relu(conv_a(h) + conv_b(x)), both branches signed."""
    t = tf()
    wa, wb, wh = _w([1, 1, 8, 8]), _w([1, 1, 8, 8]), _w([3, 3, 8, 8])
    ba, bb, bh = (RNG.normal(0, 0.3, [8]).astype(np.float32) for _ in range(3))

    def body(x):
        h = t.nn.relu(_conv(t, x, wh, bh, "h"), name="h_relu")
        a = _conv(t, h, wa, ba, "a")
        short = _conv(t, x, wb, bb, "short")
        return t.identity(t.nn.relu(t.add(a, short, name="add"), name="act"), name="y")

    return build_graph(body, x=SHAPE)


def _calibrated(gd, outs, x):
    ranges, _ = calibrate(gd, calibration_tensors(gd), [{"x:0": x}])
    ctx = PassContext.for_graph(gd, ["x"], outs)
    ctx.options.update(target=resolve("avx2"), ranges=plan_ranges(gd, ranges),
                       shapes=tensor_shapes(gd))
    return ctx, ranges


def _inputs():
    return RNG.uniform(-1.0, 1.0, SHAPE).astype(np.float32)


def _offset(gd, outs, x):
    ctx, ranges = _calibrated(gd, outs, x)
    return run_pipeline(gd, RANGE_PASSES, ctx), ctx, ranges


def _bias(graph_def, bias_add):
    index = GraphIndex(graph_def)
    return const_value(index.node(index.nodes[bias_add].input[1])).astype(np.float64)


def test_stream_wiring_offsets_and_ranges():
    gd, outs = _stream_graph()
    x = _inputs()
    out, ctx, ranges = _offset(gd, outs, x)
    index = GraphIndex(out)
    c_p1, c_s = -ranges["p1:0"][0], -ranges["s:0"][0]
    assert c_p1 > 0 and c_s > 0  # the test exercises signed tensors
    # the Adds: (conv branch, summand), a Relu named like the Add reads them
    for add, o, u in (("s", "p2", "p1"), ("s2", "p3", "s")):
        relu = index.nodes[add]
        assert relu.op == "Relu"
        inner = index.node(relu.input[0])
        assert inner.op == "AddV2" and data_inputs(inner) == [o, u]
    # the summand source carries +c, the conv branch the difference of offsets
    assert np.allclose(_bias(out, "p1"), _bias(gd, "p1") + c_p1, atol=1e-5)
    assert np.allclose(_bias(out, "p2"), _bias(gd, "p2") + c_s - c_p1, atol=1e-5)
    # the 1x1 readers lose c * (sum of their weights)
    before = GraphIndex(gd)
    w_e = const_value(before.node(before.nodes["e_conv"].input[1]))
    delta = _bias(gd, "e") - _bias(out, "e")
    assert np.allclose(delta, c_p1 * w_e.sum(axis=(0, 1, 2)), rtol=0.05, atol=0.02 * c_p1)
    planned = ctx.options["ranges"]
    assert planned[canonical_tensor("p1")][0] == 0.0
    assert planned["p1:0"][1] == pytest.approx(ranges["p1:0"][1] + c_p1, rel=1e-6)
    assert planned["s:0"][0] == 0.0
    offsets = ctx.options["offsets"]
    assert offsets["p1"] == pytest.approx(c_p1) and offsets["s"] == pytest.approx(c_s)
    assert offsets["p2"] == pytest.approx(c_s - c_p1)
    assert "y" not in offsets and "out" not in offsets
    assert {n["node"] for n in ctx.notes if n["pass"] == "offset_residual_summands"} >= {
        "p1", "s"}


def test_stream_fp32_values_unchanged_inside_the_ranges():
    gd, outs = _stream_graph()
    x = _inputs()
    out, ctx, _ = _offset(gd, outs, x)
    fetch = ["s:0", "p1:0", "e:0"]
    ref = run_graph(gd, {"x:0": x}, fetch)
    got = run_graph(out, {"x:0": x}, fetch)
    offsets = ctx.options["offsets"]
    assert np.allclose(got[1] - offsets["p1"], ref[1], atol=1e-5)
    # a reader's bias loses c * (sum of its fp32 weights): exact in fp32 (a reader left
    # fp32 by a fallback computes what it did) ...
    assert np.allclose(got[2], ref[2], atol=1e-4)
    # ... and its int8 op gets c * sum(w - w_int8) more, for the weights it will use
    before = GraphIndex(gd)
    w = const_value(before.node(before.nodes["e_conv"].input[1]))
    qw = quantize_weights(ctx, w, "conv", signed_input=False)
    w_int8 = qw.values.astype(np.float64) * qw.step
    assert np.allclose(ctx.options["offset_bias_deltas"]["e_conv"],
                       offsets["p1"] * (w - w_int8).sum(axis=(0, 1, 2)), atol=1e-5)
    # so the stream moves by exactly its offset
    assert np.abs(got[0] - offsets["s"] - ref[0]).max() < 1e-4 * np.abs(ref[0]).max() + 1e-5


def _int8(gd, outs, x, passes):
    ctx, _ = _calibrated(gd, outs, x)
    return run_pipeline(gd, passes, ctx), ctx


def test_stream_becomes_sum_fusions_with_unsigned_readers():
    gd, outs = _stream_graph()
    x = _inputs()
    int8, ctx = _int8(gd, outs, x, RANGE_PASSES + ISLAND_PASSES + JOIN_PASSES)
    assert "AddV2" not in ops(int8) and "Relu" not in ops(int8)
    convs = [n for n in int8.node if n.op == "_FusedQuantizedConv2D"]
    sums = [n for n in convs if b"Sum" in list(n.attr["fused_ops"].list.s)]
    assert len(sums) == 2
    quint8 = tf().quint8.as_datatype_enum
    assert all(n.attr["Tsummand"].type == quint8 for n in sums)
    index = GraphIndex(int8)
    for root in ("e_relu", "e2_relu", "out"):   # the convs reading offset tensors: quint8
        conv = index.nodes[root + "/int8"]
        assert conv.attr["Tinput"].type == quint8, reader
    # every int8 tensor between the first QuantizeV2 and the last conv stays int8
    assert ops(int8).count("QuantizeV2") == 1
    assert index.nodes["y"].op == "Identity"


def test_stream_error_within_a_few_output_steps_and_not_worse():
    gd, outs = _stream_graph()
    x = _inputs()
    ref = run_graph(gd, {"x:0": x}, outs)[0]
    with_pass, ctx = _int8(gd, outs, x, RANGE_PASSES + ISLAND_PASSES + JOIN_PASSES)
    without, _ = _int8(gd, outs, x, ISLAND_PASSES + JOIN_PASSES)
    got = run_graph(with_pass, {"x:0": x}, outs)[0]
    old = run_graph(without, {"x:0": x}, outs)[0]
    step = output_step(ctx.options["ranges"]["out:0"], True)
    rms_new = np.sqrt(np.mean((got - ref) ** 2))
    rms_old = np.sqrt(np.mean((old - ref) ** 2))
    # five int8 tensors on the way (x, p1/s, h, s2...), each rounding by half a step
    assert rms_new < 4 * step
    assert rms_new < 1.25 * rms_old + 0.5 * step


def test_projection_block_fuses_with_the_offset_branch_as_summand():
    gd, outs = _projection_graph()
    x = _inputs()
    out, ctx, ranges = _offset(gd, outs, x)
    add = GraphIndex(out).nodes["add"]
    assert data_inputs(add) == ["a", "short"]          # o = first operand, u = second
    c = -ranges["short:0"][0]
    assert np.allclose(_bias(out, "short"), _bias(gd, "short") + c, atol=1e-5)
    assert np.allclose(_bias(out, "a"), _bias(gd, "a") - c, atol=1e-5)
    assert "act" not in ctx.options["offsets"]          # a Relu'd sum keeps its value
    ref = run_graph(gd, {"x:0": x}, outs)[0]
    assert np.allclose(run_graph(out, {"x:0": x}, outs)[0], ref, atol=1e-4)

    int8, ctx = _int8(gd, outs, x, RANGE_PASSES + ISLAND_PASSES + JOIN_PASSES)
    assert "AddV2" not in ops(int8) and "Cast" not in ops(int8)
    sums = [n for n in int8.node if b"Sum" in list(n.attr["fused_ops"].list.s)]
    assert len(sums) == 1
    got = run_graph(int8, {"x:0": x}, outs)[0]
    step = output_step(ctx.options["ranges"]["act:0"], False)
    assert np.sqrt(np.mean((got - ref) ** 2)) < 2 * step


def test_summand_with_a_padded_reader_is_left_alone():
    gd, outs = _stream_graph(reader_kernel=3)   # s2 feeds a SAME 3x3 conv: zero padding
    x = _inputs()
    out, ctx, _ = _offset(gd, outs, x)
    index = GraphIndex(out)
    assert index.nodes["s2"].op == "AddV2"      # s2 cannot move: its Add stays as it was
    assert "s2" not in (ctx.options.get("offsets") or {})
    # s feeds s2 as summand: with s2 fp32 that Add is no Sum conv, so s stays too, and so p1
    assert index.nodes["s"].op == "AddV2"
    assert np.allclose(_bias(out, "p1"), _bias(gd, "p1"))


def test_graph_output_is_never_offset():
    gd, outs = _stream_graph()
    x = _inputs()
    ctx, _ = _calibrated(gd, outs + ["s:0"], x)
    out = run_pipeline(gd, RANGE_PASSES, ctx)
    assert GraphIndex(out).nodes["s"].op == "AddV2"
    ref = run_graph(gd, {"x:0": x}, ["s:0"])[0]
    assert np.allclose(run_graph(out, {"x:0": x}, ["s:0"])[0], ref, atol=1e-5)


def test_convert_keeps_the_sum_fusions_when_signed_tensors_are_shifted_too():
    """convert runs this pass before shift_signed_activations (issue 6), which would
    otherwise move the stream's tensors for their 1x1 readers and leave the Adds fp32."""
    from graphquant.convert import convert

    gd, outs = _stream_graph()
    feeds = [_inputs() for _ in range(2)]
    for shift in (False, True):
        result = convert(gd, feeds, outputs=outs, target="avx2", shift_signed=shift)
        sums = [n for n in result.graph_def.node
                if b"Sum" in list(n.attr["fused_ops"].list.s)]
        assert len(sums) == 2, shift


def test_int8_bias_takes_the_offset_delta_unless_bias_correction_measured_it():
    from graphquant.int8_rewrite import corrected_bias
    from graphquant.pipeline import PassContext

    bias = np.array([1.0, 2.0], np.float32)
    ctx = PassContext(inputs=["x"], outputs=["y"], options={
        "offset_bias_deltas": {"a": np.array([0.5, -0.5], np.float32)},
        "bias_corrections": {"b": np.array([0.25, 0.25], np.float32)}})
    assert np.array_equal(corrected_bias(ctx, "a", bias), [1.5, 1.5])
    ctx.options["bias_corrections"]["a"] = np.array([-1.0, 1.0], np.float32)  # contains it
    assert np.array_equal(corrected_bias(ctx, "a", bias), [0.0, 3.0])
    assert np.array_equal(corrected_bias(ctx, "c", bias), bias)
