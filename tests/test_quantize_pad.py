"""quantize_pad: a zero Pad between int8 ops pads the integers (bit-exact); lone Pads stay fp32."""

import numpy as np

from graphquant.execute import run_graph
from graphquant.graph import GraphIndex, const_value
from graphquant.pipeline import QUANTIZE_PIPELINE
from graphquant.runtime import tf
from helpers import build_graph, run_in_fresh_python
from int8_helpers import ops, output_step, quantize_tiny

RNG = np.random.default_rng(9)
PADS = [[0, 0], [1, 1], [2, 1], [0, 0]]


def _stem_graph():
    """Keras ResNet's stem: conv + relu ─► zero Pad ─► 3x3/2 MaxPool ─► conv."""
    t = tf()
    w1 = RNG.normal(0, 0.3, [3, 3, 3, 8]).astype(np.float32)
    w2 = RNG.normal(0, 0.3, [1, 1, 8, 4]).astype(np.float32)

    def body(x):
        a = t.nn.relu(t.nn.conv2d(x, t.constant(w1), 1, "SAME"), name="a")
        p = t.pad(a, PADS, name="pad")
        m = t.nn.max_pool2d(p, 3, 2, "VALID", name="pool")
        return t.identity(t.nn.relu(t.nn.conv2d(m, t.constant(w2), 1, "SAME"), name="r"),
                          name="y")

    gd, outs = build_graph(body, x=[1, 9, 9, 3])
    return gd, outs, RNG.uniform(-1, 1, [1, 9, 9, 3]).astype(np.float32)


def test_pad_after_conv_pads_the_integers():
    gd, outs, x = _stem_graph()
    int8, ctx, ranges = quantize_tiny(gd, outs, {"x:0": x}, QUANTIZE_PIPELINE)
    index = GraphIndex(int8)
    pad = index.node(index.nodes["pool/int8"].input[0])
    assert pad.op == "ConcatV2" and pad.attr["T"].type == tf().quint8.as_datatype_enum
    assert "Pad" not in ops(int8)
    first = index.node(pad.input[1])            # rows padded first, then columns
    assert first.op == "ConcatV2"
    for concat in (first, pad):                 # (zeros, tensor, zeros, axis)
        before, after = index.node(concat.input[0]), index.node(concat.input[2])
        assert before.op == after.op == "Const"
        assert not const_value(before).any() and not const_value(after).any()
    conv = index.node(first.input[1])
    assert conv.op == "_FusedQuantizedConv2D"
    assert conv.attr["out_type"].type == tf().quint8.as_datatype_enum
    # no fp32 round trip around the Pad: the only QuantizeV2 is the graph input's
    assert ops(int8).count("QuantizeV2") == 1 and "Dequantize" not in ops(int8)
    assert [n["node"] for n in ctx.notes_of("int8") if n.get("op") == "Pad"] == ["pad"]
    # the Pad copies the conv's integers and puts zeros around them
    a_q, p_q = run_graph(int8, {"x:0": x}, [conv.name + ":0", pad.name + ":0"])
    assert np.array_equal(p_q, np.pad(a_q, PADS))
    # the end result within a few steps of fp32 (conv, pool, conv: three roundings)
    ref = run_graph(gd, {"x:0": x}, outs)[0]
    got = run_graph(int8, {"x:0": x}, outs)[0]
    step = output_step(ranges["r:0"], False) + output_step(ranges["a:0"], False)
    assert np.sqrt(np.mean((got - ref) ** 2)) < step


def test_pad_between_fp32_ops_stays_fp32():
    t = tf()
    gd, outs = build_graph(lambda x: t.nn.sigmoid(t.pad(t.nn.tanh(x), PADS, name="pad")),
                           x=[1, 4, 4, 2])
    x = RNG.uniform(0, 1, [1, 4, 4, 2]).astype(np.float32)
    int8, _, _ = quantize_tiny(gd, outs, {"x:0": x}, QUANTIZE_PIPELINE)
    assert GraphIndex(int8).nodes["pad"].op == "Pad"
    assert GraphIndex(int8).nodes["pad"].attr["T"].type == tf().float32.as_datatype_enum
    assert "ConcatV2" not in ops(int8)


def test_integer_pad_runs_in_a_fresh_default_python(tmp_path):
    gd, outs, x = _stem_graph()
    int8, _, _ = quantize_tiny(gd, outs, {"x:0": x}, QUANTIZE_PIPELINE)
    assert any(n.op == "ConcatV2" and n.attr["T"].type == tf().quint8.as_datatype_enum
               for n in int8.node)
    expect = run_graph(int8, {"x:0": x}, outs)[0]
    for got in run_in_fresh_python(int8, x, outs[0], tmp_path).values():
        np.testing.assert_array_equal(got, expect)
