"""The op-type pattern matcher and the rewrite driver, on hand-built graphs."""

import numpy as np

from graphquant.graph import GraphIndex, data_inputs, make_node
from graphquant.pattern import Any, Const, OpTypePattern, Replacement, match_at, rewrite
from helpers import build_graph
from graphquant.runtime import tf


def _conv_bias_relu_graph():
    t = tf()

    def body(x):
        w = t.constant(np.ones([3, 3, 2, 4], np.float32), name="w")
        y = t.nn.conv2d(x, w, 1, "SAME", name="conv")
        y = t.nn.bias_add(y, t.constant(np.ones([4], np.float32), name="b"), name="bias")
        return t.nn.relu(y, name="relu")

    return build_graph(body, x=[1, 5, 5, 2])


CONV_BIAS_RELU = OpTypePattern("Relu|Relu6", name="act", inputs=[
    OpTypePattern("BiasAdd", name="bias_add", inputs=[
        OpTypePattern("Conv2D|DepthwiseConv2dNative", name="conv", inputs=[
            Any("x"), Const("w")]),
        Const("b")])])


def test_match_binds_every_named_node():
    gd, _ = _conv_bias_relu_graph()
    index = GraphIndex(gd)
    m = match_at(index, index.nodes["relu"], CONV_BIAS_RELU)
    assert m is not None
    assert {k: v.name for k, v in m.nodes.items()} == {
        "act": "relu", "bias_add": "bias", "conv": "conv", "x": "x", "w": "w", "b": "b"}
    assert [n.name for n in m.matched] == ["relu", "bias", "conv", "w", "b"]
    assert m.boundary == {"x"}


def test_alternatives_wildcards_and_arity():
    gd, _ = _conv_bias_relu_graph()
    index = GraphIndex(gd)
    assert match_at(index, index.nodes["relu"], OpTypePattern("Relu6|Relu", inputs=[Any()]))
    assert match_at(index, index.nodes["relu"], OpTypePattern("Relu6")) is None
    # arity must match exactly
    assert match_at(index, index.nodes["bias"], OpTypePattern("BiasAdd", inputs=[Any()])) is None
    # a constraint on the node
    wide = OpTypePattern("Conv2D", where=lambda n: n.attr["padding"].s == b"VALID")
    assert match_at(index, index.nodes["conv"], wide) is None


def test_commutative_tries_both_orders():
    t = tf()
    gd, _ = build_graph(lambda x: t.add(t.constant(2.0, name="c"), x, name="add"), x=[2])
    index = GraphIndex(gd)
    pat = OpTypePattern("Add|AddV2", inputs=[Any("x"), Const("c")])
    assert match_at(index, index.nodes["add"], pat) is None
    pat = OpTypePattern("Add|AddV2", inputs=[Any("x"), Const("c")], commutative=True)
    m = match_at(index, index.nodes["add"], pat)
    assert m["x"].name == "x" and m["c"].name == "c"


def test_same_name_twice_must_be_same_node():
    t = tf()
    gd, _ = build_graph(lambda x: t.multiply(x, x, name="sq"), x=[2])
    index = GraphIndex(gd)
    diamond = OpTypePattern("Mul", inputs=[Any("a"), Any("a")])
    assert match_at(index, index.nodes["sq"], diamond) is not None
    gd2, _ = build_graph(lambda x, y: t.multiply(x, y, name="xy"), x=[2], y=[2])
    index2 = GraphIndex(gd2)
    assert match_at(index2, index2.nodes["xy"], diamond) is None


def _fuse_to_identity_bias(match, ctx):
    """Replace Relu(BiasAdd(Conv)) by a single BiasAdd named like the root (for wiring tests)."""
    node = make_node("BiasAdd", match["act"].name, [match.tensor("x"), match["b"].name], T=np.float32)
    return Replacement(nodes=[node])


def test_rewrite_rewires_and_removes_matched_nodes():
    gd, _ = _conv_bias_relu_graph()
    out, count = rewrite(gd, CONV_BIAS_RELU, _fuse_to_identity_bias)
    assert count == 1
    names = {n.name: n for n in out.node}
    assert set(names) == {"x", "b", "relu"}
    assert names["relu"].op == "BiasAdd" and data_inputs(names["relu"]) == ["x", "b"]


def test_rewrite_vetoed_when_interior_node_is_read_elsewhere():
    t = tf()

    def body(x):
        w = t.constant(np.ones([1, 1, 2, 2], np.float32), name="w")
        y = t.nn.conv2d(x, w, 1, "SAME", name="conv")
        y = t.nn.bias_add(y, t.constant(np.ones([2], np.float32), name="b"), name="bias")
        return [t.nn.relu(y, name="relu"), t.identity(y, name="other")]

    gd, _ = build_graph(body, x=[1, 3, 3, 2])
    out, count = rewrite(gd, CONV_BIAS_RELU, _fuse_to_identity_bias)
    assert count == 0 and out is gd


def test_shared_const_is_kept_for_other_readers():
    t = tf()

    def body(x):
        w = t.constant(np.ones([1, 1, 2, 2], np.float32), name="w")
        b = t.constant(np.ones([2], np.float32), name="b")
        y = t.nn.relu(t.nn.bias_add(t.nn.conv2d(x, w, 1, "SAME", name="conv"), b, name="bias"),
                      name="relu")
        return [y, t.add(x, b, name="uses_b")]

    gd, _ = build_graph(body, x=[1, 3, 3, 2])
    out, count = rewrite(gd, CONV_BIAS_RELU, _fuse_to_identity_bias)
    assert count == 1
    names = {n.name for n in out.node}
    assert "b" in names and "w" not in names and "conv" not in names


def test_forward_rewires_readers_including_ports_and_chains():
    t = tf()

    def body(x):
        a = t.identity(x, name="id1")
        b = t.identity(a, name="id2")
        return t.nn.relu(b, name="out")

    gd, _ = build_graph(body, x=[2])
    pat = OpTypePattern("Identity", name="id", inputs=[Any("x")])
    out, count = rewrite(gd, pat, lambda m, c: Replacement(forward={m["id"].name: m.tensor("x")}))
    assert count == 2
    names = {n.name: n for n in out.node}
    assert "id1" not in names and "id2" not in names
    assert list(names["out"].input) == ["x"]


def test_protected_root_must_keep_its_name():
    t = tf()
    gd, _ = build_graph(lambda x: t.identity(x, name="out"), x=[2])
    pat = OpTypePattern("Identity", name="id", inputs=[Any("x")])
    _, count = rewrite(gd, pat, lambda m, c: Replacement(forward={m["id"].name: m.tensor("x")}),
                       protected={"out"})
    assert count == 0


def test_callback_returning_none_leaves_graph_untouched():
    gd, _ = _conv_bias_relu_graph()
    out, count = rewrite(gd, CONV_BIAS_RELU, lambda m, c: None)
    assert count == 0 and [n.name for n in out.node] == [n.name for n in gd.node]


def test_kept_subpattern_constrains_but_is_not_removed_or_vetoed():
    t = tf()

    def body(x):
        r = t.nn.relu(x, name="r")
        return [t.nn.relu6(r, name="r6"), t.identity(r, name="other")]

    gd, _ = build_graph(body, x=[2])
    pat = OpTypePattern("Relu6", name="r6", inputs=[OpTypePattern("Relu", name="r", keep=True,
                                                                  inputs=[Any("x")])])
    new = lambda m, c: Replacement(nodes=[make_node("Relu", m["r6"].name, [m["r"].name],
                                                    T=np.float32)])
    out, count = rewrite(gd, pat, new)
    assert count == 1
    names = {n.name: n for n in out.node}
    assert names["r"].op == "Relu" and names["r6"].op == "Relu" and "other" in names
    # a kept node of the wrong type still makes the match fail
    wrong = OpTypePattern("Relu6", inputs=[OpTypePattern("Sigmoid", keep=True)])
    assert rewrite(gd, wrong, new)[1] == 0
