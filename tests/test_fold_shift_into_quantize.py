"""fold_shift_into_quantize: AddV2(c) -> QuantizeV2 SCALED becomes QuantizeV2 MIN_FIRST, same ints."""

import numpy as np
import pytest
from tensorflow.core.framework import graph_pb2

from graphquant import int8_ops as ops
from graphquant.execute import run_graph
from graphquant.graph import make_const, make_node
from graphquant.pipeline import PassContext, run_pipeline
from graphquant.runtime import tf

R = 4.0


def graph(c, read_range=False):
    g = graph_pb2.GraphDef()
    nodes = [make_node("Placeholder", "x", dtype=tf().float32), make_const("c", np.float32(c)),
             make_node("AddV2", "shifted", ["x", "c"], T=np.float32),
             make_const("lo", np.float32(0.0)), make_const("hi", np.float32(R)),
             ops.quantize_v2("q", "shifted", "lo", "hi", signed=False),
             ops.dequantize("out", "q", "lo", "hi", signed=False)]
    if read_range:
        nodes.append(make_node("Identity", "range_out", ["q:1"], T=np.float32))
    g.node.extend(nodes)
    return g


def folded(g, outputs=("out:0",)):
    ctx = PassContext.for_graph(g, outputs=list(outputs))
    return run_pipeline(g, ["fold_shift_into_quantize", "remove_unused_nodes"], ctx)


def test_whole_step_shift_folds_and_keeps_the_integers():
    c = 97 * R / 255
    g = graph(c)
    out = folded(g)
    q = next(n for n in out.node if n.op == "QuantizeV2")
    assert q.name == "q" and q.attr["mode"].s == b"MIN_FIRST" and q.input[0] == "x"
    assert not any(n.op == "AddV2" for n in out.node)
    rng = np.random.default_rng(0)
    x = (rng.uniform(-c - 0.3, R - c + 0.3, (4, 64, 64))).astype(np.float32)
    before = run_graph(g, {"x:0": x}, ["out:0"])[0]
    after = run_graph(out, {"x:0": x}, ["out:0"])[0]
    steps = np.abs(before - after) / (R / 255)
    assert steps.max() <= 1.0 + 1e-4 and np.mean(steps > 0.5) < 1e-3   # ties only


@pytest.mark.parametrize("c,read_range", [(0.1234, False), (97 * R / 255, True)])
def test_other_shifts_and_read_ranges_are_left(c, read_range):
    g = graph(c, read_range)
    outs = ["out:0"] + (["range_out:0"] if read_range else [])
    out = folded(g, outs)
    assert any(n.op == "AddV2" for n in out.node)
    assert next(n for n in out.node if n.op == "QuantizeV2").attr["mode"].s == b"SCALED"
