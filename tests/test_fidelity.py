"""fidelity: target parsing, the bisection's bound and result, convert(fidelity=...) end to end."""

import numpy as np
import pytest

from graphquant import metrics
from graphquant.convert import convert, graph_info
from graphquant.errors import GraphQuantError
from graphquant.execute import GraphRunner
from graphquant.fidelity import (REMEASURES, FidelityTarget, Prediction, fallback_effects,
                                 fallback_order, max_evaluations, measure, parse_target,
                                 ranked_islands, search, top1_at_risk)
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
    # 3 + ceil(log2 n), plus REMEASURES = 2 re-predicted counts for more than one island
    assert [max_evaluations(n) for n in (0, 1, 2, 8, 9, 1000)] == [1, 3, 6, 8, 9, 15]


@pytest.mark.parametrize("n,need,guess", [(27, 1, 1), (27, 1, 20), (27, 20, 1), (27, 27, 3),
                                          (100, 60, 59), (5, 3, None)])
def test_predicted_count_is_tried_first_and_the_bound_holds(n, need, guess):
    errors, notes = fake_islands(n)
    ranked = ranked_islands(errors, notes)
    calls = []

    def evaluate(k):
        calls.append(k)
        return 0.01 if k >= need else 0.5

    predicted = None if guess is None else [0.5] * guess + [0.01] * (n + 1 - guess)
    result = search(FidelityTarget("rel_l2", 0.02), ranked, errors, lambda ex: len(ex) // 2,
                    evaluate, {}, predicted, known={0: 0.5})
    assert len(result.fallbacks) == need and result.reached
    assert 0 not in calls and len(calls) + 1 <= max_evaluations(n)
    if guess is not None:
        assert calls[0] == guess


@pytest.mark.parametrize("n", [2, 3, 6, 17, 64])
@pytest.mark.parametrize("need", [1, 2, 5, "all", "never"])
@pytest.mark.parametrize("fixes", [0, 1, REMEASURES, REMEASURES + 3])
def test_remeasured_orders_keep_the_search_within_its_bound(n, need, fixes):
    """Every predicted count fails until the order has been re-measured ``fixes`` times;
    re-measuring puts the islands that meet the target (those named "good*") right after
    the failed ones and predicts that count.  The search stops within max_evaluations, and
    when the good islands reach the front in time it returns exactly those."""
    errors, notes = fake_islands(n)
    need_k = {"all": n, "never": n + 1}[need] if isinstance(need, str) else min(need, n)
    good = set(sorted(errors)[-need_k:]) if need_k <= n else set()   # last by own error
    ranked = ranked_islands(errors, notes)
    calls, hooks = [], []

    def evaluate(exclude):
        calls.append(len(exclude))
        return 0.01 if good and good <= {e for e in exclude if "/" not in e} else 0.5

    def remeasure(k, ranked_now):
        hooks.append(k)
        kept = ranked_now[:k]
        rest = [r for r in ranked_now[k:]]
        if len(hooks) < fixes or not good:
            rest = rest[::-1]
            return kept + rest, [0.5] + [0.01] * len(rest)      # predicted, wrongly, at k+1
        first = [r for r in rest if r["node"] in good]
        rest = first + [r for r in rest if r["node"] not in good]
        return kept + rest, [0.5] * len(first) + [0.01] * (len(rest) - len(first) + 1)

    predicted = [0.5] + [0.01] * n          # the first prediction: one island is enough
    result = search(FidelityTarget("rel_l2", 0.02), ranked, errors, lambda ex: ex, evaluate,
                    {}, predicted, None, remeasure)
    assert len(calls) <= max_evaluations(n) and len(hooks) <= REMEASURES
    assert len(result.evaluations) == len(calls)
    assert result.reached == bool(good)
    if good:
        chosen = {f.island for f in result.fallbacks}
        assert good <= chosen
        if fixes <= REMEASURES and need_k < n - 1:
            # found after the re-measure: the failed prefix plus the good islands, no more
            assert hooks and len(chosen) <= hooks[-1] + len(good)


def test_top1_counts_samples_that_lost_a_share_of_their_margin_as_misses():
    ref = np.array([[3.0, 1.0], [2.0, 1.0], [0.0, 4.0], [1.0, 0.5]])      # margins 2, 1, 4, .5
    shift = np.array([[-1.2, 0.0], [-0.4, 0.0], [0.0, 0.0], [0.0, 0.6]])
    # sample 0 lost 60% of its margin, sample 1 40%, sample 3 flipped
    assert top1_at_risk(ref, ref + shift) == metrics.topk_agreement(ref, ref + shift, 1) == 0.75
    assert top1_at_risk(ref, ref + shift, at_risk=0.5) == pytest.approx(1 - 2 / 4)
    assert top1_at_risk(ref, ref + shift, at_risk=0.3) == pytest.approx(1 - 3 / 4)
    assert top1_at_risk(ref, ref, at_risk=0.5) == 1.0
    assert top1_at_risk(ref, ref - shift, at_risk=0.5) == 1.0      # margins that grow: safe
    # Softmax outputs are compared in log space: the margins are logit differences
    soft = lambda z: np.exp(z) / np.exp(z).sum(1, keepdims=True)
    assert top1_at_risk(soft(ref), soft(ref + shift), log=True, at_risk=0.5) == \
        pytest.approx(0.5)
    assert measure(FidelityTarget("top1", 0.99), [soft(ref)], [soft(ref + shift)],
                   [True]) == pytest.approx(0.75)


def test_the_ranking_counts_a_sample_about_to_flip():
    """Two islands restore the flipped sample at the same cost; the one that also restores
    the sample that lost 60% of its margin (not flipped) goes first."""
    reference = [np.array([[0.9, 0.1], [0.52, 0.48], [0.2, 0.8], [0.7, 0.3]])]
    int8 = [np.array([[0.9, 0.1], [0.47, 0.53], [0.2, 0.8], [0.58, 0.42]])]
    unflip = np.zeros((4, 2))
    unflip[1] = [-0.05, 0.05]                                  # int8 minus fallback
    both = unflip.copy()
    both[3] = [-0.12, 0.12]
    target = FidelityTarget("top1", 0.99)
    prediction = Prediction(target, reference, int8, [np.arange(4)], [True])
    assert prediction.metric(prediction.change) == pytest.approx(0.75)
    assert prediction.loss([prediction.change[0] - both]) < prediction.loss(
        [prediction.change[0] - unflip])
    order, predicted = fallback_order(prediction, {"unflip": [unflip], "both": [both]},
                                      {"unflip": 1.0, "both": 1.0})
    assert order == ["both"] and predicted == [pytest.approx(0.75), 1.0]


def small_net():
    t = tf()
    rng = np.random.default_rng(0)
    c = lambda *shape: t.constant(rng.normal(0, 0.4, shape).astype(np.float32))

    def body(x):
        h = x
        for i in range(4):
            # named: a node called "Conv2D" in exclude= would mean every Conv2D (op type)
            h = t.nn.relu(t.nn.bias_add(t.nn.conv2d(h, c(3, 3, 8, 8), 1, "SAME",
                                                    name=f"conv{i}"), c(8), name=f"bias{i}"),
                          name=f"act{i}")
        return t.identity(t.nn.conv2d(h, c(1, 1, 8, 4), 1, "VALID", name="head"), name="out")
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


def test_ranking_prefers_the_cheap_island_that_fixes_the_flipped_sample():
    reference = [np.array([[0.6, 0.4], [0.52, 0.48], [0.1, 0.9]])]
    int8 = [np.array([[0.62, 0.38], [0.47, 0.53], [0.11, 0.89]])]      # row 1 flipped
    fix = np.array([[0.0, 0.0], [-0.05, 0.05], [0.0, 0.0]])             # int8 minus fallback
    effects = {"big": [fix * 1.2], "cheap": [fix], "useless": [np.zeros((3, 2))]}
    costs = {"big": 100.0, "cheap": 1.0, "useless": 1.0}
    target = FidelityTarget("top1", 0.99)
    prediction = Prediction(target, reference, int8, [np.arange(3)], [True])
    order, predicted = fallback_order(prediction, effects, costs)
    assert order == ["cheap"] and predicted == [pytest.approx(2 / 3), 1.0]   # then no gain


def test_fallback_effects_match_converting_with_that_island_fp32():
    from graphquant.fidelity import SKIP_REQUANTIZE
    from graphquant.pipeline import ISLAND_PASSES, JOIN_PASSES, PassContext, run_pipeline

    gd, outs = small_net()
    rng = np.random.default_rng(1)
    calib = [rng.normal(0, 1, (1, 10, 10, 8)).astype(np.float32) for _ in range(4)]
    feeds = [{"x:0": c} for c in calib[:2]]
    captured = {}

    def capture(original, fp32, ctx, errors, probe_notes, *args, **kwargs):
        captured.update(fp32=fp32, ctx=ctx, notes=[n for n in probe_notes if n["node"] in errors])
        raise KeyboardInterrupt
    import graphquant.fidelity as fidelity_mod
    original, fidelity_mod.choose_fallbacks = fidelity_mod.choose_fallbacks, capture
    try:
        with pytest.raises(KeyboardInterrupt):
            convert(gd, calib, outputs=outs, target="avx2", max_layer_error=None,
                    fidelity="rel_l2=0.001")
    finally:
        fidelity_mod.choose_fallbacks = original
    fp32, ctx, notes = captured["fp32"], captured["ctx"], captured["notes"]

    def converted(exclude):
        c = PassContext(inputs=ctx.inputs, outputs=outs, options=dict(ctx.options,
                                                                     exclude=set(exclude)))
        return run_pipeline(run_pipeline(fp32, ISLAND_PASSES, c), JOIN_PASSES, c)

    islands = run_pipeline(fp32, ISLAND_PASSES + [SKIP_REQUANTIZE], PassContext(
        inputs=ctx.inputs, outputs=outs, options=dict(ctx.options)))
    effects = fallback_effects(fp32, islands, outs, notes, feeds, ctx)
    assert set(effects) == {n["node"] for n in notes} and len(notes) == 5
    all_int8 = np.concatenate([GraphRunner(converted(()), outs)(f)[0] for f in feeds])
    for note in notes:
        runner = GraphRunner(converted(note["nodes"]), outs)
        fallback = np.concatenate([runner(f)[0] for f in feeds])
        assert np.abs(fallback - all_int8).max() > 0
        np.testing.assert_allclose(all_int8 - effects[note["node"]][0], fallback,
                                   atol=1e-4 * np.abs(fallback).max())


def test_residual_islands_get_the_effect_of_the_island_their_sum_fusion_builds():
    from graphquant.fidelity import _probe_island_effects
    probe = [{"node": "conv_b", "nodes": ["conv_b", "bias_b"]}, {"node": "conv_a"},
             {"node": "pool"}]
    built = [{"node": "add", "nodes": ["add", "conv_b", "bias_b"]}, {"node": "conv_a"}]
    effects = {"add": ["e_add"], "conv_a": ["e_a"]}
    assert _probe_island_effects(probe, built, effects) == {"conv_b": ["e_add"],
                                                            "conv_a": ["e_a"]}


def test_fidelity_on_a_residual_net_meets_the_target():
    t = tf()
    rng = np.random.default_rng(5)
    c = lambda *shape: t.constant(rng.normal(0, 0.3, shape).astype(np.float32))

    def body(x):
        h = t.nn.relu(t.nn.bias_add(t.nn.conv2d(x, c(3, 3, 8, 8), 1, "SAME", name="c0"),
                                    c(8), name="b0"), name="r0")
        for i in range(1, 3):
            y = t.nn.bias_add(t.nn.conv2d(h, c(3, 3, 8, 8), 1, "SAME", name=f"c{i}"), c(8),
                              name=f"b{i}")
            h = t.nn.relu(t.math.add(y, h, name=f"add{i}"), name=f"r{i}")
        return t.identity(t.nn.conv2d(h, c(1, 1, 8, 4), 1, "VALID", name="head"), name="out")
    gd, outs = build_graph(body, x=[1, 8, 8, 8])
    calib = [rng.normal(0, 1, (1, 8, 8, 8)).astype(np.float32) for _ in range(6)]
    val = [rng.normal(0, 1, (1, 8, 8, 8)).astype(np.float32) for _ in range(4)]
    plain = graph_info(convert(gd, calib, outputs=outs, target="avx2", max_layer_error=None,
                               fidelity="rel_l2=1", validation=val).graph_def)["fidelity"]
    goal = plain["all_int8"] / 3
    fid = graph_info(convert(gd, calib, outputs=outs, target="avx2", max_layer_error=None,
                             fidelity=f"rel_l2={goal}", validation=val).graph_def)["fidelity"]
    assert fid["reached"] and fid["measured"] <= goal and fid["fallbacks"]
    assert len(fid["evaluations"]) <= fid["max_evaluations"]
