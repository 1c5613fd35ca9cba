"""fidelity: target parsing, the bisection's bound and result, convert(fidelity=...) end to end."""

import numpy as np
import pytest

from graphquant.convert import convert, graph_info
from graphquant.errors import GraphQuantError
from graphquant.execute import GraphRunner
from graphquant.fidelity import (FidelityTarget, max_evaluations, measure, parse_target,
                                 ranked_islands, search)
from graphquant.runtime import tf
from graphquant.sensitivity import IslandError
from helpers import build_graph, rel_l2


@pytest.mark.parametrize("spec,expect", [
    ({"top1": 0.99}, FidelityTarget("top1", 0.99)), ("top1=0.99", FidelityTarget("top1", 0.99)),
    ("relL2=0.02", FidelityTarget("rel_l2", 0.02)),
    ({"rel_l2": 0.05}, FidelityTarget("rel_l2", 0.05))])
def test_targets_parse(spec, expect):
    assert parse_target(spec) == expect


@pytest.mark.parametrize("spec", ["top1", "top1=x", {"acc": 0.9}, "top1=1.5", "rel_l2=-1",
                                  {"top1": 0.9, "rel_l2": 0.1}])
def test_bad_targets_say_how_to_write_them(spec):
    with pytest.raises(GraphQuantError) as err:
        parse_target(spec)
    assert err.value.fix


def test_measure_top1_and_rel_l2():
    ref = [np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])]
    cand = [np.array([[0.8, 0.2], [0.3, 0.7], [0.4, 0.6], [0.3, 0.7]])]
    assert measure(FidelityTarget("top1", 0.99), ref, cand) == 0.75
    assert measure(FidelityTarget("rel_l2", 0.1), ref, cand) == pytest.approx(rel_l2(cand, ref))
    with pytest.raises(GraphQuantError):
        measure(FidelityTarget("top1", 0.9), [np.zeros([4, 1, 3, 3])], [np.zeros([4, 1, 3, 3])])


def fake_islands(n):
    errors = {f"n{i:03d}": IslandError(own=1.0 / (i + 1), accumulated=0.0) for i in range(n)}
    notes = [{"node": f"n{i:03d}", "nodes": [f"n{i:03d}", f"n{i:03d}/bias"]} for i in range(n)]
    return errors, notes


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 17, 64, 100])
@pytest.mark.parametrize("need", [0, 1, 7, "all", "never"])
def test_bisection_finds_the_fewest_fallbacks_within_its_bound(n, need):
    errors, notes = fake_islands(n)
    ranked = ranked_islands(errors, notes)
    assert [r["node"] for r in ranked] == sorted(errors)     # own error decreasing
    k_needed = {"all": n, "never": n + 1}.get(need, need)
    calls = []

    def build(exclude):
        return len(exclude) // 2              # the "graph": how many islands are fp32

    def evaluate(k):
        calls.append(k)
        return 0.01 if k >= k_needed else 0.5   # monotone rel_l2

    result = search(FidelityTarget("rel_l2", 0.02), ranked, errors, build, evaluate, {})
    assert len(calls) == len(set(calls)) <= max_evaluations(n)
    assert result.reached == (k_needed <= n)
    assert len(result.fallbacks) == min(k_needed, n)
    assert [f.island for f in result.fallbacks] == [r["node"] for r in ranked[:len(
        result.fallbacks)]]
    assert result.exclude == {m for f in result.fallbacks for m in f.nodes}


def test_max_evaluations_is_logarithmic():
    assert [max_evaluations(n) for n in (0, 1, 2, 8, 9, 1000)] == [1, 2, 3, 5, 6, 12]


def small_net():
    t = tf()
    rng = np.random.default_rng(0)
    c = lambda *shape: t.constant(rng.normal(0, 0.4, shape).astype(np.float32))

    def body(x):
        h = x
        for i in range(4):
            h = t.nn.relu(t.nn.bias_add(t.nn.conv2d(h, c(3, 3, 8, 8), 1, "SAME"), c(8)))
        return t.identity(t.nn.conv2d(h, c(1, 1, 8, 4), 1, "VALID"), name="out")
    return build_graph(body, x=[1, 10, 10, 8])


def test_convert_keeps_the_fewest_islands_fp32_that_meet_the_target():
    gd, outs = small_net()
    rng = np.random.default_rng(1)
    calib = [rng.normal(0, 1, (1, 10, 10, 8)).astype(np.float32) for _ in range(6)]
    val = [rng.normal(0, 1, (1, 10, 10, 8)).astype(np.float32) for _ in range(6)]
    ref = GraphRunner(gd, outs)

    def error(graph_def):
        got = GraphRunner(graph_def, outs)
        return rel_l2(np.concatenate([got({"x:0": v})[0] for v in val]),
                      np.concatenate([ref({"x:0": v})[0] for v in val]))

    plain = convert(gd, calib, outputs=outs, target="avx2", max_layer_error=None)
    all_int8 = error(plain.graph_def)
    loose = convert(gd, calib, outputs=outs, target="avx2", max_layer_error=None,
                    fidelity={"rel_l2": all_int8 * 1.5}, validation=val)
    assert graph_info(loose.graph_def)["fidelity"]["fallbacks"] == []
    goal = all_int8 / 2
    tight = convert(gd, calib, outputs=outs, target="avx2", max_layer_error=None,
                    fidelity=f"rel_l2={goal}", validation=val, measure_fallback_speed=True)
    fid = graph_info(tight.graph_def)["fidelity"]
    assert fid["reached"] and 0 < len(fid["fallbacks"]) < 5
    assert len(fid["evaluations"]) <= fid["max_evaluations"]
    assert error(tight.graph_def) == pytest.approx(fid["measured"], rel=1e-6) and \
        fid["measured"] <= goal
    assert set(fid["latency_ms"]) == {"all_int8", "with_fallbacks"}
    assert 0 < fid["fp32_macs_share"] < 1
    kept = {f["node"] for f in tight.report.fp32 if "fidelity" in f["reason"]}
    assert kept and all(any(n.name == k for n in tight.graph_def.node) for k in kept)


def test_top1_counts_softmax_outputs_only():
    from graphquant.fidelity import class_score_outputs
    t = tf()
    w = np.random.default_rng(3).normal(0, 1, [6, 4]).astype(np.float32)

    def body(x):
        box = t.linalg.matmul(x, t.constant(w), name="box")           # regression, N x 4
        prob = t.identity(t.nn.softmax(box[:, :2]), name="prob")      # class scores
        return box, prob

    gd, outs = build_graph(body, x=[3, 6])
    assert class_score_outputs(gd, outs) == [False, True]
    assert class_score_outputs(gd, outs[:1]) is None              # none: every 2-D output
    ref = [np.array([[0.1, 0.9, 0.0, 0.0]] * 2), np.array([[0.2, 0.8]] * 2)]
    cand = [np.array([[0.9, 0.1, 0.0, 0.0]] * 2), np.array([[0.3, 0.7]] * 2)]
    target = FidelityTarget("top1", 0.99)
    assert measure(target, ref, cand, [False, True]) == 1.0      # the box "top-1" ignored
    assert measure(target, ref, cand) == 0.0
