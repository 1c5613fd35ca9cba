"""fold_mul_into_conv: constant per-channel Mul / Add after conv, depthwise and matmul
fold into weights and one BiasAdd; wiring and numbers checked."""

import numpy as np
import pytest

from graphquant.execute import run_graph
from graphquant.graph import GraphIndex, const_value, data_inputs, op_histogram
from graphquant.graph_io import load_graph_def
from graphquant.pipeline import PassContext, get_pass, registered_passes, run_pipeline
from graphquant.runtime import tf
from helpers import build_graph, real_model, rel_l2

PASS = "fold_mul_into_conv"
rng = np.random.default_rng(2)


def rand(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def producer(x, kind, cin, cout, data_format="NHWC"):
    t = tf()
    if kind == "conv":
        return t.nn.conv2d(x, t.constant(rand(3, 3, cin, cout), name="w"), 1, "SAME",
                           data_format=data_format, name="conv")
    if kind == "depthwise":
        return t.nn.depthwise_conv2d(x, t.constant(rand(3, 3, cin, cout // cin), name="w"),
                                     [1, 1, 1, 1], "SAME", data_format=data_format, name="conv")
    return t.matmul(x, t.constant(rand(cin, cout), name="w"), name="conv")


SHAPES = {"conv": ([1, 5, 5, 3], 3, 6), "depthwise": ([1, 5, 5, 3], 3, 6), "matmul": ([2, 5], 5, 4)}


def run_pass(gd, outputs):
    ctx = PassContext.for_graph(gd, outputs=outputs)
    return get_pass(PASS)(gd, ctx), ctx


def assert_same_outputs(before, after, outputs, shape, tol=1e-5):
    x = rand(*shape)
    for u, v in zip(run_graph(before, {"x": x}, outputs), run_graph(after, {"x": x}, outputs)):
        assert u.shape == v.shape and rel_l2(v, u) < tol


def nodes(gd):
    return {n.name: n for n in gd.node}


@pytest.mark.parametrize("scale_shape", ["vector", "broadcast", "scalar", "const_first"])
@pytest.mark.parametrize("kind", sorted(SHAPES))
def test_mul_after_conv_scales_the_weights(kind, scale_shape):
    t = tf()
    shape, cin, cout = SHAPES[kind]
    s = {"vector": rand(cout), "broadcast": rand(*([1] * (len(shape) - 1)), cout),
         "scalar": np.float32(1.7), "const_first": rand(cout)}[scale_shape]

    def body(x):
        y = producer(x, kind, cin, cout)
        c = t.constant(s, name="s")
        return t.nn.relu(c * y if scale_shape == "const_first" else y * c, name="out")

    gd, outs = build_graph(body, x=shape)
    new, ctx = run_pass(gd, outs)
    by_name = nodes(new)
    assert "Mul" not in op_histogram(new) and "s" not in by_name and "w" not in by_name
    conv = by_name[data_inputs(by_name["out"])[0]]   # the conv now carries the Mul's name
    assert conv.op == nodes(gd)["conv"].op and data_inputs(conv)[0] == "x"
    w = const_value(by_name[data_inputs(conv)[1]])
    assert w.shape == const_value(nodes(gd)["w"]).shape and w.dtype == np.float32
    assert not ctx.notes
    assert_same_outputs(gd, new, outs, shape)


@pytest.mark.parametrize("bias_op", ["BiasAdd", "AddV2"])
@pytest.mark.parametrize("kind", sorted(SHAPES))
def test_mul_after_biased_conv_scales_weights_and_bias(kind, bias_op):
    t = tf()
    shape, cin, cout = SHAPES[kind]

    def body(x):
        y = producer(x, kind, cin, cout)
        b = t.constant(rand(cout), name="b")
        y = t.nn.bias_add(y, b, name="bias") if bias_op == "BiasAdd" else t.add(b, y, name="bias")
        return t.multiply(y, t.constant(rand(cout), name="s"), name="mul")

    gd, outs = build_graph(body, x=shape)
    new, _ = run_pass(gd, outs)
    by_name = nodes(new)
    assert by_name["mul"].op == "BiasAdd" and data_inputs(by_name["mul"])[0] == "conv"
    assert "bias" not in by_name and not {"Mul", "AddV2"} & set(op_histogram(new))
    assert_same_outputs(gd, new, outs, shape)


@pytest.mark.parametrize("kind", sorted(SHAPES))
def test_add_of_per_channel_constant_becomes_bias_add(kind):
    t = tf()
    shape, cin, cout = SHAPES[kind]
    gd, outs = build_graph(lambda x: t.add(t.constant(rand(cout), name="b"),
                                           producer(x, kind, cin, cout), name="add"), x=shape)
    new, _ = run_pass(gd, outs)
    by_name = nodes(new)
    assert by_name["add"].op == "BiasAdd" and data_inputs(by_name["add"])[0] == "conv"
    assert data_inputs(by_name["conv"]) == ["x", "w"]    # weights untouched
    assert_same_outputs(gd, new, outs, shape)


def test_onnx2tf_chain_ends_as_one_conv_and_one_bias_add():
    # conv -> Mul(s) -> Add(o) -> Mul(k) -> Add(scalar), as onnx2tf writes folded batch norms
    t = tf()

    def body(x):
        y = producer(x, "conv", 3, 4)
        y = t.add(t.multiply(y, t.constant(rand(1, 1, 1, 4))), t.constant(rand(4)))
        y = t.add(t.constant(rand(4)) * y, t.constant(0.5))
        return t.nn.relu(y, name="out")

    gd, outs = build_graph(body, x=[1, 4, 4, 3])
    new, _ = run_pass(gd, outs)
    hist, by_name = op_histogram(new), nodes(new)
    assert hist == {"Placeholder": 1, "Conv2D": 1, "BiasAdd": 1, "Relu": 1, "Const": 2}
    bias_add = by_name[data_inputs(by_name["out"])[0]]
    assert bias_add.op == "BiasAdd" and by_name[data_inputs(bias_add)[0]].op == "Conv2D"
    assert_same_outputs(gd, new, outs, [1, 4, 4, 3])


def test_constant_subgraph_scale_is_evaluated_and_its_chain_removed():
    t = tf()

    def body(x):
        s = t.reshape(t.math.sqrt(t.constant(rng.uniform(1, 2, 4).astype(np.float32), name="v")),
                      [1, 1, 1, 4], name="s")
        return t.multiply(producer(x, "conv", 2, 4), s, name="mul")

    gd, outs = build_graph(body, x=[1, 3, 3, 2])
    new, _ = run_pass(gd, outs)
    assert set(op_histogram(new)) == {"Placeholder", "Conv2D", "Const"}
    assert nodes(new)["mul"].op == "Conv2D"
    assert_same_outputs(gd, new, outs, [1, 3, 3, 2])


@pytest.mark.parametrize("kind", ["conv", "depthwise"])
def test_nchw_needs_a_channel_first_shape(kind):
    t = tf()

    def body(x):
        y = producer(x, kind, 2, 4, data_format="NCHW")
        a = t.multiply(y, t.constant(rand(1, 4, 1, 1)), name="per_channel")
        return t.multiply(a, t.constant(rand(4)), name="per_width")   # [4] scales W, not C

    gd, outs = build_graph(body, x=[1, 2, 4, 4])
    new, ctx = run_pass(gd, outs)
    by_name = nodes(new)
    assert by_name["per_channel"].op == nodes(gd)["conv"].op
    assert by_name["per_width"].op == "Mul"
    assert [n["node"] for n in ctx.notes] == ["per_width"]
    assert "shape (4,)" in ctx.notes[0]["message"]
    assert_same_outputs(gd, new, outs, [1, 2, 4, 4])


def test_scale_varying_over_space_is_noted_and_left():
    t = tf()
    gd, outs = build_graph(lambda x: t.multiply(producer(x, "conv", 2, 3),
                                                t.constant(rand(1, 4, 4, 1)), name="mul"),
                           x=[1, 4, 4, 2])
    new, ctx = run_pass(gd, outs)
    assert [(n.name, n.op) for n in new.node] == [(n.name, n.op) for n in gd.node]
    assert len(ctx.notes) == 1 and "(1, 4, 4, 1)" in ctx.notes[0]["message"]


def test_non_constant_mul_and_shared_conv_are_untouched():
    t = tf()

    def body(x, g):
        y = producer(x, "conv", 2, 3)
        gated = t.multiply(y, g, name="gated")                  # not a constant
        z = t.nn.conv2d(x, t.constant(rand(3, 3, 2, 3)), 1, "SAME", name="conv2")
        return [gated, t.multiply(z, t.constant(rand(3)), name="mul"), t.nn.relu(z, name="other")]

    gd, outs = build_graph(body, x=[1, 4, 4, 2], g=[1, 4, 4, 3])
    new, ctx = run_pass(gd, outs)
    assert [(n.name, n.op) for n in new.node] == [(n.name, n.op) for n in gd.node]
    assert not ctx.notes


def test_shared_weights_are_copied_for_the_folded_conv():
    t = tf()

    def body(x):
        w = t.constant(rand(3, 3, 2, 3), name="w")
        a = t.nn.conv2d(x, w, 1, "SAME", name="conv_a")
        b = t.nn.conv2d(x, w, 1, "SAME", name="conv_b")
        return [t.multiply(a, t.constant(rand(3)), name="mul"), t.nn.relu(b, name="other")]

    gd, outs = build_graph(body, x=[1, 4, 4, 2])
    new, _ = run_pass(gd, outs)
    by_name = nodes(new)
    assert data_inputs(by_name["conv_b"]) == ["x", "w"]
    np.testing.assert_array_equal(const_value(by_name["w"]), const_value(nodes(gd)["w"]))
    assert by_name["mul"].op == "Conv2D" and data_inputs(by_name["mul"])[1] != "w"
    assert_same_outputs(gd, new, outs, [1, 4, 4, 2])


def test_bias_add_then_add_merges_into_one_bias():
    t = tf()

    def body(x):
        y = t.nn.bias_add(producer(x, "conv", 2, 3), t.constant(rand(3)), name="bias")
        return t.add(y, t.constant(rand(1, 1, 3)), name="add")

    gd, outs = build_graph(body, x=[1, 4, 4, 2])
    new, _ = run_pass(gd, outs)
    by_name = nodes(new)
    assert by_name["add"].op == "BiasAdd" and data_inputs(by_name["add"])[0] == "conv"
    assert "bias" not in by_name
    assert_same_outputs(gd, new, outs, [1, 4, 4, 2])


def test_real_onnx2tf_graph_folds_its_mul_add_batch_norms(shared_models_dir):
    pb, meta, samples = real_model("rapidocr_cls_mobile_v2")
    gd = load_graph_def(pb)
    inputs = [i[0] for i in meta["inputs"]]
    outputs = [o[0] for o in meta["outputs"]]
    ctx = PassContext.for_graph(gd, inputs=inputs, outputs=outputs)
    base = [p for p in ("strip_debug_ops", "remove_unused_nodes", "fold_constants")
            if p in registered_passes()]
    cleaned = run_pipeline(gd, base, ctx)
    new = run_pipeline(cleaned, [PASS], ctx)
    before, after = op_histogram(cleaned), op_histogram(new)
    # every conv output scaled by a per-channel Mul and shifted by an AddV2 -> one BiasAdd
    assert after.get("BiasAdd", 0) - before.get("BiasAdd", 0) >= 35
    assert after["Mul"] <= before["Mul"] - 35
    GraphIndex(new).topological_order()
    feeds = {inputs[0]: samples[:1]}
    for a, b in zip(run_graph(gd, feeds, outputs), run_graph(new, feeds, outputs)):
        assert rel_l2(b, a) < 1e-4
