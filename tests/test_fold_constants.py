"""fold_constants: constant subgraphs evaluated by TensorFlow become Consts named like the node."""

import os

import numpy as np
import pytest

from graphquant.execute import run_graph
from graphquant.graph import GraphIndex, data_inputs, op_histogram
from graphquant.pipeline import PassContext, get_pass, run_pipeline
from graphquant.runtime import tf
from helpers import REAL_MODELS, SHARED_MODELS, build_graph, real_model, rel_l2

fold_constants = get_pass("fold_constants")
RNG = np.random.RandomState(0)


def _fold(gd, outputs, **options):
    ctx = PassContext.for_graph(gd, outputs=outputs, **options)
    return fold_constants(gd, ctx), ctx


def _same_outputs(before, after, outputs, feeds):
    want = run_graph(before, feeds, outputs)
    got = run_graph(after, feeds, outputs)
    for w, g in zip(want, got):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)


def test_weight_chain_becomes_one_const_named_like_its_last_node():
    t = tf()
    w_value = RNG.randn(4, 2, 3, 3).astype(np.float32)

    def body(x):
        w = t.transpose(t.constant(w_value, name="w"), [2, 3, 1, 0], name="w_hwio")
        w = t.multiply(w, t.constant(0.5, name="half"), name="w_scaled")
        return t.nn.relu(t.nn.conv2d(x, w, 1, "SAME", name="conv"), name="out")

    gd, outs = build_graph(body, x=[1, 6, 6, 2])
    folded, ctx = _fold(gd, outs)
    nodes = GraphIndex(folded).nodes
    assert set(nodes) == {"x", "w_scaled", "conv", "out"}
    assert nodes["w_scaled"].op == "Const"
    assert data_inputs(nodes["conv"]) == ["x", "w_scaled"]
    assert ctx.notes == []
    _same_outputs(gd, folded, outs, {"x:0": RNG.randn(1, 6, 6, 2).astype(np.float32)})


def test_shape_of_a_static_input_folds_but_not_of_a_dynamic_one():
    t = tf()

    def body(x):
        n = t.shape(x, name="shape")[0]
        return t.reshape(t.nn.relu(x), t.stack([n, -1], name="new_shape"), name="out")

    static, outs = build_graph(body, x=[2, 3, 4])
    folded, _ = _fold(static, outs)
    nodes = GraphIndex(folded).nodes
    assert nodes["new_shape"].op == "Const" and "shape" not in nodes
    assert nodes["out"].input[1] == "new_shape"
    _same_outputs(static, folded, outs, {"x:0": RNG.randn(2, 3, 4).astype(np.float32)})

    dynamic, outs = build_graph(body, x=[None, 3, 4])
    folded, _ = _fold(dynamic, outs)
    assert op_histogram(folded) == op_histogram(dynamic)


def test_each_read_port_of_a_multi_output_node_gets_its_own_const():
    t = tf()

    def body(x):
        a, b, _ = t.split(t.constant(RNG.randn(6, 4).astype(np.float32)), 3, name="split")
        return t.add(x, a, name="use_a"), t.multiply(x, b, name="use_b")

    gd, outs = build_graph(body, x=[2, 4])
    folded, _ = _fold(gd, outs)
    nodes = GraphIndex(folded).nodes
    assert nodes["split"].op == "Const" and nodes["split/port_1"].op == "Const"
    assert "split/port_2" not in nodes  # port 2 is read by nobody
    assert data_inputs(nodes["use_a"]) == ["x", "split"]
    assert data_inputs(nodes["use_b"]) == ["x", "split/port_1"]
    _same_outputs(gd, folded, outs, {"x:0": RNG.randn(2, 4).astype(np.float32)})


def test_results_over_the_size_cap_stay_and_their_inputs_fold_instead():
    t = tf()

    def body(x):
        base = t.add(t.constant(np.ones([4], np.float32)), t.constant(2.0), name="base")
        big = t.tile(base, [1000], name="big")  # 16000 bytes
        return t.add(x, big, name="out")

    gd, outs = build_graph(body, x=[4000])
    folded, ctx = _fold(gd, outs, fold_constants_max_bytes=10000)
    nodes = GraphIndex(folded).nodes
    assert nodes["big"].op == "Tile" and nodes["base"].op == "Const"
    assert [n["node"] for n in ctx.notes] == ["big"] and "16000 bytes" in ctx.notes[0]["message"]
    _same_outputs(gd, folded, outs, {"x:0": RNG.randn(4000).astype(np.float32)})

    folded_all, ctx = _fold(gd, outs)  # default cap: 16 MiB
    assert GraphIndex(folded_all).nodes["big"].op == "Const" and ctx.notes == []


def test_graph_outputs_and_existing_consts_are_left_alone():
    t = tf()

    def body(x):
        c = t.constant(np.arange(3, dtype=np.float32), name="c")
        return t.identity(c, name="const_out"), t.add(c, c, name="sum_out"), x + c

    gd, outs = build_graph(body, x=[3])
    folded, _ = _fold(gd, outs)
    nodes = GraphIndex(folded).nodes
    assert nodes["const_out"].op == "Identity" and nodes["sum_out"].op == "AddV2"
    assert [n.name for n in folded.node] == [n.name for n in gd.node]
    _same_outputs(gd, folded, outs, {"x:0": np.ones(3, np.float32)})


def test_unprotected_identity_of_a_const_folds():
    t = tf()
    gd, outs = build_graph(lambda x: x * t.identity(t.constant(3.0, name="c"), name="c_id"), x=[2])
    folded, _ = _fold(gd, outs)
    nodes = GraphIndex(folded).nodes
    assert nodes["c_id"].op == "Const" and "c" not in nodes
    _same_outputs(gd, folded, outs, {"x:0": np.ones(2, np.float32)})


def test_stateful_ops_do_not_fold():
    t = tf()

    def body(x):
        noise = t.random.uniform([3], seed=1, name="noise")
        return t.add(x, t.multiply(noise, 2.0, name="scaled"), name="out")

    gd, outs = build_graph(body, x=[3])
    folded, _ = _fold(gd, outs)
    assert op_histogram(folded) == op_histogram(gd)


def test_a_node_tensorflow_cannot_evaluate_is_noted_and_the_rest_still_folds():
    t = tf()

    def body(x):
        bad = t.strings.to_number(t.constant("not a number"), name="bad")
        good = t.add(t.constant(1.0), t.constant(2.0), name="good")
        return t.add(x, bad, name="out1"), t.add(x, good, name="out2")

    gd, outs = build_graph(body, x=[2])
    folded, ctx = _fold(gd, outs)
    nodes = GraphIndex(folded).nodes
    assert nodes["bad"].op == "StringToNumber" and nodes["good"].op == "Const"
    assert [n["node"] for n in ctx.notes] == ["bad"]
    assert "could not evaluate" in ctx.notes[0]["message"]


def test_folding_is_deterministic():
    t = tf()

    def body(x):
        parts = t.unstack(t.constant(RNG.randn(3, 5).astype(np.float32)), name="parts")
        return [t.add(x, t.exp(p), name=f"out{i}") for i, p in enumerate(parts)]

    gd, outs = build_graph(body, x=[5])
    first = _fold(gd, outs)[0].SerializeToString(deterministic=True)
    assert first == _fold(gd, outs)[0].SerializeToString(deterministic=True)


@pytest.mark.skipif(not os.path.isdir(SHARED_MODELS), reason="shared models not present")
@pytest.mark.parametrize("name", sorted(REAL_MODELS))
def test_real_model_outputs_unchanged_after_cleanup_and_folding(name):
    pb, meta, samples = real_model(name)
    from graphquant.graph_io import load_graph_def

    gd = load_graph_def(pb)
    inputs = [n for n, _ in meta["inputs"]]
    outputs = [n for n, _ in meta["outputs"]]
    ctx = PassContext.for_graph(gd, inputs, outputs)
    folded = run_pipeline(gd, ["strip_debug_ops", "remove_unused_nodes", "fold_constants"], ctx)
    assert len(folded.node) < len(gd.node)
    feeds = {inputs[0]: samples[:1]}
    for got, want in zip(run_graph(folded, feeds, outputs), run_graph(gd, feeds, outputs)):
        assert rel_l2(got, want) <= 1e-5
