"""fold_decomposed_batch_norms: Keras 3 / tf.keras / TF-slim Mul/Add/Rsqrt/Sub batch
norms fold into the conv/matmul before them, or lose their Rsqrt chains; wiring and
numbers checked, with and without fold_constants first."""

import numpy as np
import pytest

from graphquant.execute import run_graph
from graphquant.graph import GraphIndex, data_inputs, op_histogram
from graphquant.graph_io import load_graph_def
from graphquant.pipeline import PassContext, registered_passes, run_pipeline
from graphquant.runtime import tf
from helpers import build_graph, real_model, rel_l2

PASS = "fold_decomposed_batch_norms"
rng = np.random.default_rng(1)


def rand(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def batch_norm(y, c, gamma=True, beta=True, shape=None):
    """tf.nn.batch_normalization as Keras 3 / tf.keras / TF-slim emit it (params as Consts)."""
    t = tf()

    def param(value, name):
        const = t.constant(value, name=name)
        return const if shape is None else t.reshape(const, shape, name=name + "_reshape")

    return t.nn.batch_normalization(
        y, param(rand(c), "mean"), param(rng.uniform(0.5, 2, c).astype(np.float32), "var"),
        param(rand(c), "beta") if beta else None, param(rand(c), "gamma") if gamma else None,
        1e-3, name="bn")


def producer(x, kind, cin, cout, data_format="NHWC"):
    t = tf()
    if kind == "conv":
        return t.nn.conv2d(x, t.constant(rand(3, 3, cin, cout), name="w"), 1, "SAME",
                           data_format=data_format, name="conv")
    if kind == "depthwise":
        return t.nn.depthwise_conv2d(x, t.constant(rand(3, 3, cin, cout // cin), name="w"),
                                     [1, 1, 1, 1], "SAME", data_format=data_format, name="conv")
    return t.matmul(x, t.constant(rand(cin, cout), name="w"), name="conv")


def run_passes(gd, outputs, passes=(PASS,)):
    ctx = PassContext.for_graph(gd, outputs=outputs)
    return run_pipeline(gd, [p for p in passes if p in registered_passes()], ctx), ctx


def assert_same_outputs(before, after, outputs, shape, tol=1e-5):
    x = rand(*shape)
    for u, v in zip(run_graph(before, {"x": x}, outputs), run_graph(after, {"x": x}, outputs)):
        assert u.shape == v.shape and rel_l2(v, u) < tol


def nodes(gd):
    return {n.name: n for n in gd.node}


def root_of(gd, outputs):
    return nodes(gd)[outputs[0].split(":")[0]]


FORMS = {  # name -> batch_norm kwargs
    "keras": {},                              # x * (gamma*rsqrt) + (beta - mean*(gamma*rsqrt))
    "slim_no_gamma": {"gamma": False},        # x * rsqrt + (beta - mean*rsqrt)
    "no_beta": {"beta": False},               # x * s + Neg(mean * s)
}
SHAPES = {"conv": ([1, 5, 5, 3], 3, 6), "depthwise": ([1, 5, 5, 3], 3, 6), "matmul": ([2, 5], 5, 4)}


@pytest.mark.parametrize("with_fold_constants", [False, True])
@pytest.mark.parametrize("bias", [None, "BiasAdd", "keras3_reshape"])
@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("kind", sorted(SHAPES))
def test_decomposed_batch_norm_folds_into_weights(kind, form, bias, with_fold_constants):
    t = tf()
    shape, cin, cout = SHAPES[kind]

    def body(x):
        y = producer(x, kind, cin, cout)
        if bias == "BiasAdd":
            y = t.nn.bias_add(y, t.constant(rand(cout), name="b"), name="bias")
        elif bias == "keras3_reshape":  # Keras 3: bias reshaped to broadcast, then added
            b = t.reshape(t.constant(rand(cout), name="b"), [1] * (len(shape) - 1) + [cout])
            y = t.add(y, b, name="bias")
        return t.nn.relu(batch_norm(y, cout, **FORMS[form]), name="out")

    gd, outs = build_graph(body, x=shape)
    passes = ("fold_constants", PASS) if with_fold_constants else (PASS,)
    new, ctx = run_passes(gd, outs, passes)
    hist, by_name = op_histogram(new), nodes(new)
    assert not {"Rsqrt", "Sub", "Mul", "Neg", "Reshape"} & set(hist)
    relu_in = by_name[data_inputs(by_name["out"])[0]]
    assert relu_in.op == "BiasAdd" and data_inputs(relu_in)[0] == "conv"
    conv = by_name["conv"]
    assert data_inputs(conv)[0] == "x" and by_name[data_inputs(conv)[1]].op == "Const"
    # the parameter chains died with the fold and were removed
    assert not {"mean", "var", "beta", "gamma", "b", "w"} & set(by_name)
    assert sorted(n.op for name, n in by_name.items() if name.startswith("bn/")) == [
        "BiasAdd", "Const"]                   # the BiasAdd named like the Add, its bias
    assert not ctx.notes
    assert_same_outputs(gd, new, outs, shape)


def test_nchw_keras_form_with_reshaped_parameters():
    # Keras 3 with axis=1 reshapes every parameter to [1, C, 1, 1]
    t = tf()

    def body(x):
        y = producer(x, "conv", 2, 4, data_format="NCHW")
        return batch_norm(y, 4, shape=[1, 4, 1, 1])

    gd, outs = build_graph(body, x=[1, 2, 5, 5])
    new, _ = run_passes(gd, outs)
    root = root_of(new, outs)
    assert root.op == "BiasAdd" and root.attr["data_format"].s == b"NCHW"
    assert "Rsqrt" not in op_histogram(new)
    assert_same_outputs(gd, new, outs, [1, 2, 5, 5])


@pytest.mark.parametrize("form", sorted(FORMS))
def test_standalone_batch_norm_gets_constant_operands(form):
    t = tf()
    gd, outs = build_graph(lambda x: batch_norm(t.nn.relu(x, name="relu"), 3, **FORMS[form]),
                           x=[1, 4, 4, 3])
    new, _ = run_passes(gd, outs)
    hist, root = op_histogram(new), root_of(new, outs)
    assert not {"Rsqrt", "Sub", "Neg"} & set(hist)
    assert hist == {"Const": 2, "Placeholder": 1, "Relu": 1, "Mul": 1, root.op: 1}
    mul = nodes(new)[data_inputs(root)[0]]
    assert mul.op == "Mul" and "relu" in data_inputs(mul)
    assert_same_outputs(gd, new, outs, [1, 4, 4, 3])


def test_already_constant_affine_is_left_alone():
    t = tf()
    gd, outs = build_graph(lambda x: t.add(t.constant(rand(3)) * t.nn.relu(x), t.constant(rand(3)),
                                           name="out"), x=[2, 3])
    new, _ = run_passes(gd, outs)
    assert [(n.name, list(n.input)) for n in new.node] == [(n.name, list(n.input)) for n in gd.node]


def test_scale_not_per_channel_is_noted_and_kept_exact():
    t = tf()

    def body(x):
        y = producer(x, "conv", 2, 3)
        s = t.math.rsqrt(t.constant(rng.uniform(1, 2, (4, 4, 3)).astype(np.float32)))
        return t.add(y * s, t.constant(rand(3)), name="out")   # scale varies over H, W

    gd, outs = build_graph(body, x=[1, 4, 4, 2])
    new, ctx = run_passes(gd, outs)
    assert data_inputs(nodes(new)["conv"])[1] == "w"
    assert "Rsqrt" not in op_histogram(new)
    assert len(ctx.notes) == 1 and "shape (4, 4, 3)" in ctx.notes[0]["message"]
    assert_same_outputs(gd, new, outs, [1, 4, 4, 2])


def test_conv_read_elsewhere_is_not_folded():
    t = tf()

    def body(x):
        y = producer(x, "conv", 2, 3)
        return [batch_norm(y, 3), t.nn.relu(y, name="other")]

    gd, outs = build_graph(body, x=[1, 4, 4, 2])
    new, _ = run_passes(gd, outs)
    by_name = nodes(new)
    assert data_inputs(by_name["conv"]) == ["x", "w"] and data_inputs(by_name["other"]) == ["conv"]
    assert "Rsqrt" not in op_histogram(new) and "BiasAdd" not in op_histogram(new)
    assert_same_outputs(gd, new, outs, [1, 4, 4, 2])


def test_interleaved_non_constant_mul_is_not_touched():
    # PReLU as MTCNN lowers it: relu(x) + Neg(alpha) * relu(-x) -- not a batch norm
    t = tf()

    def body(x):
        alpha = t.negative(t.constant(rand(3), name="alpha"), name="neg_alpha")
        return t.add(t.nn.relu(x), alpha * t.nn.relu(-x), name="out")

    gd, outs = build_graph(body, x=[1, 3, 3, 3])
    new, _ = run_passes(gd, outs)
    assert op_histogram(new) == op_histogram(gd)


# ------------------------------------------------------------------ real graphs
@pytest.mark.parametrize("name,fold_constants", [
    ("fer_mini_xception", True), ("fer_mini_xception", False), ("musicnn_MTT_musicnn", True)])
def test_real_graph_has_no_rsqrt_left(name, fold_constants, shared_models_dir):
    pb, meta, samples = real_model(name)
    gd = load_graph_def(pb)
    inputs = [i[0] for i in meta["inputs"]]
    outputs = [o[0] for o in meta["outputs"]]
    ctx = PassContext.for_graph(gd, inputs=inputs, outputs=outputs)
    passes = ["strip_debug_ops", "remove_unused_nodes"] + (["fold_constants"] * fold_constants) + [
        "fold_batch_norms", PASS]
    new = run_pipeline(gd, [p for p in passes if p in registered_passes()], ctx)
    hist = op_histogram(new)
    assert "Rsqrt" not in hist and "Sub" not in hist
    assert not {"FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3"} & set(hist)
    if name == "fer_mini_xception":  # every batch norm there follows a conv: all in weights
        assert "Mul" not in hist and hist["BiasAdd"] == 15
    GraphIndex(new).topological_order()
    for sample in samples[:2]:
        feeds = {inputs[0]: sample[None]}
        for a, b in zip(run_graph(gd, feeds, outputs), run_graph(new, feeds, outputs)):
            assert rel_l2(b, a) < 1e-4
