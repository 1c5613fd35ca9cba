"""strip_debug_ops: pass-through ops bypassed, control edges and colocation hints dropped,
output Identities keep their names, PlaceholderWithDefault -> Placeholder on request."""

import os

import numpy as np
import pytest

from graphquant.execute import run_graph
from graphquant.graph import GraphIndex, data_inputs, op_histogram
from graphquant.pipeline import PassContext, get_pass
from graphquant.runtime import tf
from helpers import SHARED_MODELS, build_graph, real_model, rel_l2

strip_debug_ops = get_pass("strip_debug_ops")
RNG = np.random.RandomState(0)


def _strip(gd, outputs, **options):
    return strip_debug_ops(gd, PassContext.for_graph(gd, outputs=outputs, **options))


def _same_outputs(before, after, outputs, shape, name="x:0"):
    feeds = {name: RNG.randn(*shape).astype(np.float32)}
    for got, want in zip(run_graph(after, feeds, outputs), run_graph(before, feeds, outputs)):
        np.testing.assert_array_equal(got, want)


def test_pass_through_chain_is_bypassed():
    t = tf()

    def body(x):
        y = t.identity(x, name="id")
        y = t.debugging.check_numerics(y, "bad", name="check")
        y = t.stop_gradient(y, name="stop")
        y = t.raw_ops.Snapshot(input=y, name="snap")
        return t.nn.relu(y, name="out")

    gd, outs = build_graph(body, x=[2, 3])
    stripped = _strip(gd, outs)
    nodes = GraphIndex(stripped).nodes
    assert set(nodes) == {"x", "out"} and data_inputs(nodes["out"]) == ["x"]
    _same_outputs(gd, stripped, outs, [2, 3])


def test_identity_of_a_second_output_is_bypassed_to_that_port():
    t = tf()

    def body(x):
        _, second = t.split(x, 2, name="split")
        return t.nn.relu(t.identity(second, name="id"), name="out")

    gd, outs = build_graph(body, x=[4])
    stripped = _strip(gd, outs)
    nodes = GraphIndex(stripped).nodes
    assert "id" not in nodes and data_inputs(nodes["out"]) == ["split:1"]
    _same_outputs(gd, stripped, outs, [4])


def test_output_identity_keeps_its_name_by_renaming_its_producer():
    t = tf()

    def body(x):
        probs = t.nn.softmax(x, name="softmax")
        return t.identity(probs, name="Identity"), t.add(probs, 1.0, name="other")

    gd, outs = build_graph(body, x=[1, 5])
    stripped = _strip(gd, outs)
    nodes = GraphIndex(stripped).nodes
    assert "softmax" not in nodes
    assert nodes["Identity"].op == "Softmax" and data_inputs(nodes["Identity"]) == ["x"]
    assert data_inputs(nodes["other"])[0] == "Identity"
    _same_outputs(gd, stripped, outs, [1, 5])


def test_output_identity_stays_when_its_producer_cannot_take_the_name():
    t = tf()

    def body(x):
        probs = t.nn.softmax(x, name="softmax")
        _, half = t.split(x, 2, axis=1, name="split")
        return (t.identity(x, name="copy_of_input"),        # producer is a graph input
                t.identity(half, name="second_half"),       # reads port 1
                t.identity(probs, name="out_a"),            # first output Identity: renamed
                t.identity(probs, name="out_b"))            # second one on the same producer

    gd, outs = build_graph(body, x=[1, 4])
    stripped = _strip(gd, outs)
    nodes = GraphIndex(stripped).nodes
    assert nodes["copy_of_input"].op == "Identity" and data_inputs(nodes["copy_of_input"]) == ["x"]
    assert nodes["second_half"].op == "Identity"
    assert data_inputs(nodes["second_half"]) == ["split:1"]
    assert nodes["out_a"].op == "Softmax"
    assert nodes["out_b"].op == "Identity" and data_inputs(nodes["out_b"]) == ["out_a"]
    _same_outputs(gd, stripped, outs, [1, 4])


def test_control_edges_and_colocation_hints_are_dropped():
    t = tf()

    def body(x):
        check = t.debugging.Assert(t.reduce_all(t.math.is_finite(x)), [x], name="check")
        with t.control_dependencies([check]):
            y = t.identity(x, name="guarded")
        return t.nn.relu(y, name="out")

    gd, outs = build_graph(body, x=[3])
    relu = next(n for n in gd.node if n.name == "out")
    relu.attr["_class"].list.s.append(b"loc:@guarded")  # names a node the pass removes
    stripped = _strip(gd, outs)
    assert not any(i.startswith("^") for n in stripped.node for i in n.input)
    assert not any("_class" in n.attr for n in stripped.node)
    nodes = GraphIndex(stripped).nodes
    assert "guarded" not in nodes and data_inputs(nodes["out"]) == ["x"]
    # the assertion (an If in TF2 graphs) is unread now: remove_unused_nodes' job
    assert "check/AssertGuard" in nodes and not GraphIndex(stripped).consumers("check/AssertGuard")
    _same_outputs(gd, stripped, outs, [3])


@pytest.mark.parametrize("convert", [False, True])
def test_placeholder_with_default_becomes_a_placeholder_only_when_asked(convert):
    t = tf()

    def body(x):
        scale = t.compat.v1.placeholder_with_default(t.constant([2.0, 2.0, 2.0]), [3],
                                                     name="scale")
        return t.multiply(x, scale, name="out")

    gd, outs = build_graph(body, x=[3])
    options = {"placeholder_with_default_to_placeholder": True} if convert else {}
    stripped = _strip(gd, outs, **options)
    scale = GraphIndex(stripped).nodes["scale"]
    if not convert:
        assert scale.op == "PlaceholderWithDefault"
        _same_outputs(gd, stripped, outs, [3])
        return
    assert scale.op == "Placeholder" and list(scale.input) == []
    assert scale.attr["dtype"].type == tf().float32.as_datatype_enum
    assert [d.size for d in scale.attr["shape"].shape.dim] == [3]
    feeds = {"x:0": np.ones(3, np.float32), "scale:0": np.array([1.0, 2.0, 3.0], np.float32)}
    np.testing.assert_array_equal(run_graph(stripped, feeds, outs)[0], [1.0, 2.0, 3.0])


@pytest.mark.skipif(not os.path.isdir(SHARED_MODELS), reason="shared models not present")
def test_real_model_loses_every_identity_and_keeps_its_outputs():
    from graphquant.graph_io import load_graph_def

    pb, meta, samples = real_model("mtcnn_onet")
    gd = load_graph_def(pb)
    outputs = [n for n, _ in meta["outputs"]]
    stripped = _strip(gd, outputs)
    assert op_histogram(gd)["Identity"] > 0 and "Identity" not in op_histogram(stripped)
    feeds = {meta["inputs"][0][0]: samples[:1]}
    for got, want in zip(run_graph(stripped, feeds, outputs), run_graph(gd, feeds, outputs)):
        assert rel_l2(got, want) == 0.0
