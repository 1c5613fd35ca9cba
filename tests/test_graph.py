"""Graph core: tensor-name parsing, the GraphIndex (consumers, order, interface), consts."""

import os

import numpy as np
import pytest
from tensorflow.core.framework import attr_value_pb2, graph_pb2, tensor_shape_pb2, types_pb2

from graphquant.errors import InvalidGraphError, NodeNotFoundError
from graphquant.graph import (GraphIndex, TensorName, canonical_tensor, const_value,
                              control_inputs, data_inputs, make_const, make_node, node_name,
                              op_histogram, parse_tensor_name)
from helpers import REAL_MODELS, SHARED_MODELS, real_model


@pytest.mark.parametrize("text, node, port, control", [
    ("conv", "conv", 0, False),
    ("conv:0", "conv", 0, False),
    ("split:2", "split", 2, False),
    ("^init", "init", 0, True),
    ("scope/sub/op:13", "scope/sub/op", 13, False),
    ("odd:name", "odd:name", 0, False),  # not a port: the whole string is the node
])
def test_parse_tensor_name(text, node, port, control):
    t = parse_tensor_name(text)
    assert (t.node, t.port, t.control) == (node, port, control)
    assert node_name(text) == node


def test_tensor_name_formatting():
    assert str(TensorName("a")) == "a" and str(TensorName("a", 1)) == "a:1"
    assert str(TensorName("a", 0, True)) == "^a"
    assert canonical_tensor("a") == "a:0" and canonical_tensor("a:3") == "a:3"
    assert str(parse_tensor_name("x:2")) == "x:2"


def _graph(*nodes):
    g = graph_pb2.GraphDef()
    g.node.extend(nodes)
    return g


def _diamond():
    """x -> split (2 outputs); a = Relu(split:0); b = Neg(split:1); out = Add(a, b), ^a."""
    f32 = np.float32
    return _graph(
        make_node("Placeholder", "x", dtype=f32),
        make_const("axis", np.int32(0)),
        make_node("Split", "split", ["axis", "x"], T=f32, num_split=2),
        make_node("Relu", "a", ["split"], T=f32),
        make_node("Neg", "b", ["split:1", "^a"], T=f32),
        make_node("AddV2", "out", ["a", "b"], T=f32),
        make_node("NoOp", "init", ["^out"]),
    )


def test_data_and_control_inputs():
    b = GraphIndex(_diamond()).nodes["b"]
    assert data_inputs(b) == ["split:1"] and control_inputs(b) == ["^a"]


def test_consumers_by_node_and_by_port():
    index = GraphIndex(_diamond())
    names = lambda pairs: sorted((c.name, i) for c, i in pairs)  # noqa: E731
    assert names(index.consumers("split")) == [("a", 0), ("b", 0)]
    assert names(index.consumers("split:0")) == [("a", 0)]
    assert names(index.consumers("split:1")) == [("b", 0)]
    # control readers count for the node, not for one of its outputs
    assert names(index.consumers("a")) == [("b", 1), ("out", 0)]
    assert names(index.consumers("a", include_control=False)) == [("out", 0)]
    assert names(index.consumers("a:0")) == [("out", 0)]
    assert index.consumers("init") == []
    assert [n.name for n in index.consumer_nodes("a")] == ["b", "out"]  # graph order


def test_consumer_nodes_are_listed_once():
    g = _graph(make_node("Placeholder", "x", dtype=np.float32),
               make_node("Mul", "sq", ["x", "x"], T=np.float32))
    index = GraphIndex(g)
    assert [c.name for c in index.consumer_nodes("x")] == ["sq"]
    assert len(index.consumers("x")) == 2


def test_node_lookup_and_did_you_mean():
    index = GraphIndex(_diamond())
    assert index.node("split:1").name == "split"
    assert index.input_node(index.nodes["b"], 0).name == "split"
    with pytest.raises(NodeNotFoundError) as info:
        index.node("splt")
    assert "no node named 'splt'" in info.value.problem and "'split'" in info.value.fix


def test_topological_order_puts_producers_first_and_keeps_file_order_for_ties():
    g = _diamond()
    reversed_graph = _graph(*reversed(list(g.node)))
    for graph in (g, reversed_graph):
        order = GraphIndex(graph).topological_order()
        assert sorted(order) == sorted(n.name for n in g.node)
        position = {name: i for i, name in enumerate(order)}
        for node in graph.node:
            for inp in node.input:
                assert position[node_name(inp)] < position[node.name], (inp, node.name)
    # ties keep the file order: 'axis' and 'x' are both sources
    assert GraphIndex(g).topological_order()[:2] == ["x", "axis"]
    assert GraphIndex(reversed_graph).topological_order()[:2] == ["axis", "x"]


def test_cycle_is_a_clear_error_naming_the_loop():
    f32 = np.float32
    g = _graph(make_node("Placeholder", "x", dtype=f32),
               make_node("AddV2", "a", ["x", "c"], T=f32),
               make_node("Relu", "b", ["a"], T=f32),
               make_node("Neg", "c", ["b"], T=f32))
    with pytest.raises(InvalidGraphError) as info:
        GraphIndex(g).topological_order()
    problem = info.value.problem
    assert "the graph has a cycle" in problem
    loop = problem.split(": ", 1)[1].split(" (")[0].split(" -> ")
    assert loop[0] == loop[-1] and sorted(loop[:-1]) == ["a", "b", "c"]
    assert info.value.fix


def test_inputs_and_inferred_outputs():
    f32 = np.float32
    g = _graph(
        make_node("Placeholder", "x", dtype=f32),
        make_node("Placeholder", "unused_input", dtype=f32),
        make_const("flag_default", False),
        make_node("PlaceholderWithDefault", "training", ["flag_default"], dtype=types_pb2.DT_BOOL,
                  shape=attr_value_pb2.AttrValue(shape=tensor_shape_pb2.TensorShapeProto())),
        make_const("c", np.float32(1.0)),
        make_node("AddV2", "y", ["x", "c"], T=f32),
        make_node("Softmax", "probs", ["y"], T=f32),
        make_node("Relu", "side", ["x"], T=f32),
        make_node("Identity", "only_ordered", ["x"], T=f32),
        make_node("NoOp", "deps", ["^only_ordered"]),
        make_node("Assert", "check", ["flag_default", "c"], T=[f32]),
    )
    index = GraphIndex(g)
    assert index.inputs() == ["x", "unused_input"]  # a PlaceholderWithDefault has a default
    # nodes nobody reads; read only through a control edge counts as read
    assert index.inferred_outputs() == ["probs", "side"]


@pytest.mark.skipif(not os.path.isdir(SHARED_MODELS), reason="shared models not present")
@pytest.mark.parametrize("name", sorted(REAL_MODELS))
def test_inferred_interface_of_real_models_matches_their_metadata(name):
    from graphquant.graph_io import load_graph_def

    pb, meta, _ = real_model(name)
    index = GraphIndex(load_graph_def(pb))
    assert [canonical_tensor(n) for n in index.inputs()] == [n for n, _ in meta["inputs"]]
    assert [canonical_tensor(n) for n in index.inferred_outputs()] == \
        [n for n, _ in meta["outputs"]]
    assert len(index.topological_order()) == len(index.nodes)


def test_make_const_round_trips_values_and_dtypes():
    for value in (np.arange(6, dtype=np.float32).reshape(2, 3), np.int32(7),
                  np.array([True, False]), np.array([1.5], np.float64)):
        node = make_const("c", value)
        assert node.op == "Const"
        got = const_value(node)
        assert got.dtype == np.asarray(value).dtype and got.shape == np.shape(value)
        np.testing.assert_array_equal(got, value)


def test_make_node_attribute_kinds():
    node = make_node("Conv2D", "conv", ["x", "w"], T=np.float32, strides=[1, 2, 2, 1],
                     padding="SAME", use_cudnn_on_gpu=False, alpha=0.5, Tlist=[np.float32])
    assert list(node.input) == ["x", "w"]
    assert node.attr["T"].type == types_pb2.DT_FLOAT
    assert list(node.attr["strides"].list.i) == [1, 2, 2, 1]
    assert node.attr["padding"].s == b"SAME"
    assert node.attr["use_cudnn_on_gpu"].b is False and node.attr["alpha"].f == 0.5
    assert list(node.attr["Tlist"].list.type) == [types_pb2.DT_FLOAT]


def test_op_histogram_is_sorted_by_count_then_name():
    g = _diamond()
    assert list(op_histogram(g).items()) == [
        ("AddV2", 1), ("Const", 1), ("Neg", 1), ("NoOp", 1), ("Placeholder", 1), ("Relu", 1),
        ("Split", 1)]
    g.node.add().CopyFrom(make_node("Relu", "r2", ["a"], T=np.float32))
    assert list(op_histogram(g))[0] == "Relu"


def test_runner_errors_are_graphquant_errors():
    """A wrong feed or a failing op gives one line naming the problem, not a TF traceback."""
    import numpy as np
    import pytest

    from graphquant.errors import GraphQuantError
    from graphquant.execute import run_graph
    from graphquant.runtime import tf
    from helpers import build_graph

    t = tf()
    gd, outs = build_graph(lambda x: t.reshape(x, [3, -1], name="r"), x=[None])
    with pytest.raises(GraphQuantError, match="cannot feed"):
        run_graph(gd, {"x:0": np.zeros([2, 2], np.float32)}, outs)
    with pytest.raises(GraphQuantError, match="at node 'r'.*reshape|Input to reshape") as err:
        run_graph(gd, {"x:0": np.zeros([4], np.float32)}, outs)
    assert "Graph execution error" not in str(err.value)
