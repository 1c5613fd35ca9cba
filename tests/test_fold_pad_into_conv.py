"""fold_pad_into_conv: a constant zero Pad becomes the conv's SAME or EXPLICIT padding."""

import os

import numpy as np
import pytest

from graphquant.execute import run_graph
from graphquant.graph import GraphIndex, data_inputs
from graphquant.pipeline import PassContext, get_pass, run_pipeline
from graphquant.runtime import tf
from helpers import SHARED_MODELS, build_graph, real_model, rel_l2

fold_pad_into_conv = get_pass("fold_pad_into_conv")
RNG = np.random.RandomState(0)


def _conv(x, op, fmt, kernel=3, channels=2, stride=1, dilation=1, padding="VALID",
          explicit=(), name="conv"):
    t = tf()
    spatial = (lambda v: [1, v, v, 1]) if fmt == "NHWC" else (lambda v: [1, 1, v, v])
    out_channels = 3 if op == "Conv2D" else 2
    w = t.constant(RNG.randn(kernel, kernel, channels, out_channels).astype(np.float32),
                   name=name + "_w")
    make = t.raw_ops.Conv2D if op == "Conv2D" else t.raw_ops.DepthwiseConv2dNative
    return make(input=x, filter=w, strides=spatial(stride), padding=padding,
                explicit_paddings=list(explicit), data_format=fmt, dilations=spatial(dilation),
                name=name)


def _pads(fmt, h, w):
    if fmt == "NHWC":
        return [[0, 0], list(h), list(w), [0, 0]]
    return [[0, 0], [0, 0], list(h), list(w)]


def _fold(gd, outputs):
    ctx = PassContext.for_graph(gd, outputs=outputs)
    return fold_pad_into_conv(gd, ctx), ctx


def _check_numbers(before, after, outputs, shape):
    feeds = {"x:0": RNG.randn(*shape).astype(np.float32)}
    for got, want in zip(run_graph(after, feeds, outputs), run_graph(before, feeds, outputs)):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["NHWC", "NCHW"])
@pytest.mark.parametrize("stride", [1, 2])
def test_uneven_pad_becomes_explicit_padding_that_the_cpu_kernels_run(fmt, stride):
    t = tf()
    shape = [1, 9, 10, 2] if fmt == "NHWC" else [1, 2, 9, 10]

    def body(x):
        p = t.pad(x, t.constant(_pads(fmt, (1, 2), (2, 1))), name="pad")
        bias = t.constant(np.linspace(-1, 1, 3, dtype=np.float32))
        y = t.nn.bias_add(_conv(p, "Conv2D", fmt, stride=stride), bias, data_format=fmt)
        return t.nn.relu(y, name="out")  # grappler fuses Conv2D+BiasAdd+Relu: EXPLICIT there too

    gd, outs = build_graph(body, x=shape)
    folded, ctx = _fold(gd, outs)
    nodes = GraphIndex(folded).nodes
    assert "pad" not in nodes and not any(n.op == "Pad" for n in folded.node)
    conv = nodes["conv"]
    assert conv.op == "Conv2D" and data_inputs(conv) == ["x", "conv_w"]
    assert conv.attr["padding"].s == b"EXPLICIT"
    h, w = (1, 2) if fmt == "NHWC" else (2, 3)
    expected = [0] * 8
    expected[2 * h:2 * h + 2], expected[2 * w:2 * w + 2] = [1, 2], [2, 1]
    assert list(conv.attr["explicit_paddings"].list.i) == expected
    assert ctx.notes == []
    _check_numbers(gd, folded, outs, shape)


@pytest.mark.parametrize("fmt", ["NHWC", "NCHW"])
def test_depthwise_takes_a_same_pad_but_never_explicit(fmt):
    t = tf()
    shape = [1, 8, 8, 2] if fmt == "NHWC" else [1, 2, 8, 8]

    def body(x, uneven):
        p = t.pad(x, t.constant(_pads(fmt, (1, 2) if uneven else (1, 1), (1, 1))), name="pad")
        bias = t.constant(np.linspace(-1, 1, 4, dtype=np.float32))
        y = t.nn.bias_add(_conv(p, "DepthwiseConv2dNative", fmt), bias, data_format=fmt)
        return t.nn.relu6(y, name="out")

    gd, outs = build_graph(lambda x: body(x, False), x=shape)
    folded, ctx = _fold(gd, outs)
    conv = GraphIndex(folded).nodes["conv"]
    assert data_inputs(conv)[0] == "x" and conv.attr["padding"].s == b"SAME"
    assert ctx.notes == []
    _check_numbers(gd, folded, outs, shape)

    _not_folded(lambda x: body(x, True), shape,
                "DepthwiseConv2dNative with EXPLICIT padding aborts")


@pytest.mark.parametrize("size,stride,dilation,pad,want", [
    (8, 1, 1, (1, 1), "SAME"),
    (8, 2, 1, (0, 1), "SAME"),      # SAME puts the odd pixel after
    (8, 2, 1, (1, 1), "EXPLICIT"),  # symmetric (ONNX style): not what SAME adds
    (9, 2, 1, (1, 1), "SAME"),
    (8, 1, 2, (2, 2), "SAME"),      # dilation 2: effective kernel 5
    (8, 1, 1, (0, 0), "VALID"),
])
def test_pad_equal_to_what_same_adds_becomes_same(size, stride, dilation, pad, want):
    t = tf()

    def body(x):
        p = t.pad(x, t.constant(_pads("NHWC", pad, pad)), name="pad")
        return _conv(p, "Conv2D", "NHWC", stride=stride, dilation=dilation, name="out")

    gd, outs = build_graph(body, x=[1, size, size, 2])
    folded, _ = _fold(gd, outs)
    conv = GraphIndex(folded).nodes["out"]
    assert data_inputs(conv)[0] == "x" and conv.attr["padding"].s.decode() == want
    if want != "EXPLICIT":
        assert list(conv.attr["explicit_paddings"].list.i) == []
    _check_numbers(gd, folded, outs, [1, size, size, 2])


@pytest.mark.parametrize("conv_padding,explicit", [
    ("SAME", ()), ("EXPLICIT", (0, 0, 1, 0, 0, 2, 0, 0))])
def test_pad_adds_to_the_convs_own_padding(conv_padding, explicit):
    t = tf()

    def body(x):
        p = t.pad(x, t.constant(_pads("NHWC", (2, 0), (0, 1))), name="pad")
        return _conv(p, "Conv2D", "NHWC", padding=conv_padding, explicit=explicit, name="out")

    gd, outs = build_graph(body, x=[1, 7, 7, 2])
    folded, _ = _fold(gd, outs)
    conv = GraphIndex(folded).nodes["out"]
    own = [(1, 1), (1, 1)] if conv_padding == "SAME" else [(1, 0), (0, 2)]
    want = [0, 0, 2 + own[0][0], own[0][1], own[1][0], 1 + own[1][1], 0, 0]
    assert conv.attr["padding"].s == b"EXPLICIT"
    assert list(conv.attr["explicit_paddings"].list.i) == want
    _check_numbers(gd, folded, outs, [1, 7, 7, 2])


def test_pad_read_by_two_convs_folds_into_both_and_goes():
    t = tf()

    def body(x):
        p = t.raw_ops.PadV2(input=x, paddings=t.constant(_pads("NHWC", (1, 1), (1, 1))),
                            constant_values=t.constant(0.0), name="pad")
        return (_conv(p, "Conv2D", "NHWC", name="a"),
                _conv(p, "DepthwiseConv2dNative", "NHWC", name="b"))

    gd, outs = build_graph(body, x=[1, 6, 6, 2])
    folded, ctx = _fold(gd, outs)
    nodes = GraphIndex(folded).nodes
    assert set(nodes) == {"x", "a_w", "a", "b_w", "b"}
    for name in ("a", "b"):
        assert data_inputs(nodes[name])[0] == "x" and nodes[name].attr["padding"].s == b"SAME"
    _check_numbers(gd, folded, outs, [1, 6, 6, 2])


def _not_folded(body, shape, reason):
    gd, outs = build_graph(body, x=shape)
    folded, ctx = _fold(gd, outs)
    assert [n.SerializeToString() for n in folded.node] == [n.SerializeToString() for n in gd.node]
    assert [n["node"] for n in ctx.notes] == ["pad"]
    assert reason in ctx.notes[0]["message"]


def test_nonzero_pad_value_is_left_with_a_note():
    t = tf()
    _not_folded(lambda x: _conv(t.pad(x, _pads("NHWC", (1, 1), (1, 1)), constant_values=1.0,
                                      name="pad"), "Conv2D", "NHWC"),
                [1, 5, 5, 2], "pads with the value 1.0, not 0")


def test_mirror_pad_is_left_with_a_note():
    t = tf()
    _not_folded(lambda x: _conv(t.pad(x, _pads("NHWC", (1, 1), (1, 1)), mode="REFLECT",
                                      name="pad"), "Conv2D", "NHWC"),
                [1, 5, 5, 2], "MirrorPad reflects")


def test_channel_padding_is_left_with_a_note():
    t = tf()
    _not_folded(lambda x: _conv(t.pad(x, [[0, 0], [1, 1], [1, 1], [0, 1]], name="pad"),
                                "Conv2D", "NHWC", channels=3),
                [1, 5, 5, 2], "batch or channel dimension")


def test_pad_with_another_reader_is_left_with_a_note():
    t = tf()

    def body(x):
        p = t.pad(x, _pads("NHWC", (1, 1), (1, 1)), name="pad")
        return _conv(p, "Conv2D", "NHWC"), t.nn.relu(p, name="other")

    _not_folded(body, [1, 5, 5, 2], "also read by 'other' (Relu)")


def test_non_constant_paddings_are_left_with_a_note():
    t = tf()
    _not_folded(lambda x: _conv(t.pad(x, t.identity(t.constant(_pads("NHWC", (1, 1), (1, 1)))),
                                      name="pad"), "Conv2D", "NHWC"),
                [1, 5, 5, 2], "not constant")


@pytest.mark.skipif(not os.path.isdir(SHARED_MODELS), reason="shared models not present")
@pytest.mark.parametrize("name", ["musicnn_MTT_musicnn", "rapidocr_cls_mobile_v2",
                                  "rapidocr_det_ppocrv4"])
def test_real_model_pads_fold_and_outputs_stay(name):
    from graphquant.graph_io import load_graph_def

    pb, meta, samples = real_model(name)
    gd = load_graph_def(pb)
    inputs, outputs = [n for n, _ in meta["inputs"]], [n for n, _ in meta["outputs"]]
    ctx = PassContext.for_graph(gd, inputs, outputs)
    cleaned = run_pipeline(gd, ["strip_debug_ops", "remove_unused_nodes", "fold_constants"], ctx)
    pads = sum(n.op == "Pad" for n in cleaned.node)
    folded = fold_pad_into_conv(cleaned, ctx)
    assert pads > 0 and not any(n.op == "Pad" for n in folded.node) and ctx.notes == []
    feeds = {inputs[0]: samples[:1]}
    for got, want in zip(run_graph(folded, feeds, outputs), run_graph(gd, feeds, outputs)):
        assert rel_l2(got, want) <= 1e-5
