"""remove_unused_nodes: only what the outputs depend on stays (plus the graph's inputs)."""

import numpy as np
import pytest

from graphquant.errors import NodeNotFoundError
from graphquant.execute import run_graph
from graphquant.graph import GraphIndex, data_inputs
from graphquant.pipeline import PassContext, get_pass, run_pipeline
from graphquant.runtime import tf
from helpers import build_graph

remove_unused_nodes = get_pass("remove_unused_nodes")


def _graph():
    t = tf()

    def body(x, unused):
        w = t.constant(np.full([3], 2.0, np.float32), name="w")
        t.constant(np.zeros([100], np.float32), name="orphan")
        t.nn.relu(x, name="dead_branch")
        t.no_op(name="noop")
        keep = t.multiply(x, w, name="scaled")
        return t.add(keep, 1.0, name="out")

    return build_graph(body, x=[3], unused=[3])


def test_only_nodes_the_outputs_need_stay_and_inputs_are_kept():
    gd, outs = _graph()
    ctx = PassContext.for_graph(gd, inputs=["x", "unused"], outputs=outs)
    pruned = remove_unused_nodes(gd, ctx)
    nodes = GraphIndex(pruned).nodes
    assert set(nodes) == {"x", "unused", "w", "scaled", "out", "out/y"}
    assert data_inputs(nodes["out"]) == ["scaled", "out/y"]
    assert [n.name for n in pruned.node] == [n.name for n in gd.node if n.name in nodes]
    x = np.array([1.0, -2.0, 3.0], np.float32)
    feeds = {"x:0": x, "unused:0": x}
    np.testing.assert_array_equal(run_graph(pruned, feeds, outs)[0],
                                  run_graph(gd, feeds, outs)[0])


def test_outputs_are_inferred_when_not_given():
    gd, _ = _graph()
    ctx = PassContext.for_graph(gd)  # outputs: unread non-NoOp, non-Const nodes
    assert ctx.outputs == ["dead_branch:0", "out:0"]
    nodes = GraphIndex(remove_unused_nodes(gd, ctx)).nodes
    assert "dead_branch" in nodes and "noop" not in nodes and "orphan" not in nodes


def test_control_inputs_of_kept_nodes_are_kept():
    t = tf()

    def body(x):
        side = t.nn.relu(x, name="side")
        with t.control_dependencies([side]):
            return t.identity(x, name="out")

    gd, outs = build_graph(body, x=[2])
    pruned = remove_unused_nodes(gd, PassContext.for_graph(gd, outputs=outs))
    assert "side" in GraphIndex(pruned).nodes


def test_after_strip_debug_ops_the_assertion_guard_goes():
    t = tf()

    def body(x):
        check = t.debugging.Assert(t.reduce_all(t.math.is_finite(x)), [x], name="check")
        with t.control_dependencies([check]):
            return t.nn.relu(x, name="out")

    gd, outs = build_graph(body, x=[2])
    ctx = PassContext.for_graph(gd, outputs=outs)
    cleaned = run_pipeline(gd, ["strip_debug_ops", "remove_unused_nodes"], ctx)
    assert {n.op for n in cleaned.node} == {"Placeholder", "Relu"}


def test_an_output_naming_no_node_is_an_error_not_an_empty_graph():
    gd, _ = _graph()
    ctx = PassContext.for_graph(gd, outputs=["outt:0"])
    with pytest.raises(NodeNotFoundError) as info:
        remove_unused_nodes(gd, ctx)
    assert "'outt:0'" in info.value.problem and "'out'" in info.value.fix
