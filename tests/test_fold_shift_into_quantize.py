"""fold_shift_into_quantize: AddV2(c) -> QuantizeV2 SCALED becomes one MIN_COMBINED QuantizeV2."""

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


@pytest.mark.parametrize("c", [97 * R / 255, 0.1234])
def test_shift_folds_and_keeps_the_integers(c):
    g = graph(c)
    out = folded(g)
    q = next(n for n in out.node if n.op == "QuantizeV2")
    assert q.name == "q" and q.attr["mode"].s == b"MIN_COMBINED" and q.input[0] == "x"
    assert not any(n.op == "AddV2" for n in out.node)
    rng = np.random.default_rng(0)
    x = (rng.uniform(-c - 0.3, R - c + 0.3, (4, 64, 64))).astype(np.float32)
    before = run_graph(g, {"x:0": x}, ["out:0"])[0]
    after = run_graph(out, {"x:0": x}, ["out:0"])[0]
    steps = np.abs(before - after) / (R / 255)
    assert steps.max() <= 1.0 + 1e-4 and np.mean(steps > 0.5) < 1e-3   # ties only


def test_a_quantize_whose_range_outputs_are_read_is_left():
    g = graph(0.5, read_range=True)
    out = folded(g, ["out:0", "range_out:0"])
    assert any(n.op == "AddV2" for n in out.node)
    assert next(n for n in out.node if n.op == "QuantizeV2").attr["mode"].s == b"SCALED"
