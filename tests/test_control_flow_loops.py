"""TF1 while loops (control flow v1): left as they are, in fp32; the graph around them int8.

A frozen ``tf.compat.v1.while_loop`` built with control flow v2 disabled is a
frame of Enter -> Merge -> Switch -> body -> NextIteration (back to the Merge)
and Switch -> Exit nodes.  ``GraphIndex.loop_frames`` finds every node of such
frames; the rewrite driver, the clean-up passes and calibration leave them
alone, the report lists them as fp32 "inside a TF1 while loop".  Here: the
frames found (nested too), the order with the back edges, and a graph
conv -> loop (matmul, optionally a conv) -> conv loaded, optimized and converted
by the library and the CLI: loop nodes byte-identical, the convs around the loop
int8, the loop computing exactly what the fp32 loop computes on its int8 input.
"""

import numpy as np
import pytest

from graphquant import cli
from graphquant.api import optimize
from graphquant.convert import convert
from graphquant.errors import InvalidGraphError
from graphquant.execute import run_graph
from graphquant.graph import (LOOP_BACK_EDGE_OPS, GraphIndex, make_node, node_name,
                              op_histogram)
from graphquant.graph_io import load_graph_def
from graphquant.inspect import fp32_weighted_nodes, int8_candidates
from graphquant.report import LOOP_REASON
from graphquant.runtime import tf
from helpers import build_graph, rel_l2

SAMPLES = np.random.RandomState(0).rand(6, 1, 8, 8, 3).astype(np.float32)
LOOP_OPS = {"Enter", "Merge", "Switch", "LoopCond", "NextIteration", "Exit"}


def _const(shape, seed, scale=0.3):
    return tf().constant(np.random.RandomState(seed).randn(*shape).astype(np.float32) * scale)


def _conv(x, channels, seed):
    t = tf()
    w = _const([3, 3, int(x.shape[-1]), channels], seed)
    return t.nn.relu(t.nn.bias_add(t.nn.conv2d(x, w, 1, "SAME"), _const([channels], seed + 100)))


def _v1(fn, **inputs):
    """build_graph with control flow v2 off: tf.while_loop makes Enter/Merge/.../Exit."""
    t = tf()
    was_v2 = t.compat.v1.control_flow_v2_enabled()
    t.compat.v1.disable_control_flow_v2()
    try:
        return build_graph(fn, **inputs)[0]
    finally:
        if was_v2:
            t.compat.v1.enable_control_flow_v2()


def _loop_graph(conv_in_loop: bool = False):
    """x -> conv -> while i < 3: v = relu(0.5 * (v @ m) [+ conv(v)]) -> conv -> out."""
    t = tf()

    def fn(x):
        y = _conv(x, 8, 1)
        m = _const([8, 8], 5)

        def body(i, v):
            mixed = t.reshape(t.matmul(t.reshape(v, [-1, 8]), m), [1, 8, 8, 8]) * 0.5
            if conv_in_loop:
                mixed = mixed + t.nn.conv2d(v, _const([3, 3, 8, 8], 7, 0.1), 1, "SAME")
            return i + 1, t.nn.relu(mixed)

        _, z = t.compat.v1.while_loop(lambda i, v: i < 3, body, [t.constant(0), y])
        return t.identity(_conv(z, 4, 2), name="out")

    return _v1(fn, x=[1, 8, 8, 3])


def _nested_loop_graph():
    """x -> while i < 2: (while j < 3: v = v * 0.5) + 1 -> out."""
    t = tf()

    def fn(x):
        def outer(i, v):
            _, inner = t.compat.v1.while_loop(lambda j, u: j < 3, lambda j, u: (j + 1, u * 0.5),
                                              [t.constant(0), v], name="inner")
            return i + 1, t.add(inner, 1.0, name="after_inner")

        _, z = t.compat.v1.while_loop(lambda i, v: i < 2, outer, [t.constant(0), x],
                                      name="outer")
        return t.identity(z, name="out")

    return _v1(fn, x=[1, 4])


def _loop_nodes(graph_def):
    return {n.name: n for n in graph_def.node if n.name.startswith("while/")}


# --------------------------------------------------------------------------- frames, order
def test_loop_frames_run_from_enter_to_exit():
    graph_def = _loop_graph()
    frames = GraphIndex(graph_def).loop_frames()
    assert set(frames) == set(_loop_nodes(graph_def))      # TF names every loop node while/
    assert set(frames.values()) == {("while/while_context",)}
    assert LOOP_OPS <= {n.op for n in graph_def.node if n.name in frames}
    # the body's Consts hang on a control edge from the loop: inside it too
    assert any(n.op == "Const" and n.input for n in graph_def.node if n.name in frames)
    # loop-free graphs have none
    assert GraphIndex(build_graph(lambda x: _conv(x, 4, 1), x=[1, 8, 8, 3])[0]).loop_frames() == {}


def test_nested_loops_get_nested_frames():
    graph_def = _nested_loop_graph()
    frames = GraphIndex(graph_def).loop_frames()
    outer = {n for n, s in frames.items() if len(s) == 1}
    inner = {n for n, s in frames.items() if len(s) == 2}
    assert inner and all(n.startswith("outer/inner/") for n in inner)
    assert {frames[n][0] for n in frames} == {"outer/while_context"}
    assert "outer/after_inner" in outer                  # after the inner Exit: outer frame
    assert {"outer/inner/Enter", "outer/inner/Exit_1"} <= inner
    assert {"outer/Enter", "outer/Exit_1"} <= outer
    # every other node of the loops is in one (root Consts feeding an Enter are not)
    assert {n.name for n in graph_def.node if n.name.startswith("outer/")} - set(frames) \
        <= {n.name for n in graph_def.node if n.op == "Const" and not n.input}
    assert "x" not in frames and "out" not in frames


@pytest.mark.parametrize("build", [_loop_graph, _nested_loop_graph])
def test_topological_order_leaves_out_only_the_back_edges(build):
    graph_def = build()
    order = GraphIndex(graph_def).topological_order()
    assert sorted(order) == sorted(n.name for n in graph_def.node)
    position = {name: i for i, name in enumerate(order)}
    back = 0
    for node in graph_def.node:
        for inp in node.input:
            src = node_name(inp)
            if GraphIndex(graph_def).nodes[src].op in LOOP_BACK_EDGE_OPS:
                back += 1
                assert node.op == "Merge" and position[src] > position[node.name]
            else:
                assert position[src] < position[node.name], (inp, node.name)
    assert back == sum(n.op in LOOP_BACK_EDGE_OPS for n in graph_def.node)


def test_a_cycle_not_closed_by_next_iteration_is_a_clear_error_at_load(tmp_path):
    f32 = np.float32
    graph_def = type(_loop_graph())()
    graph_def.node.extend([make_node("Placeholder", "x", dtype=f32),
                           make_node("AddV2", "a", ["x", "c"], T=f32),
                           make_node("Relu", "b", ["a"], T=f32),
                           make_node("Neg", "c", ["b"], T=f32)])
    path = tmp_path / "cycle.pb"
    path.write_bytes(graph_def.SerializeToString())
    with pytest.raises(InvalidGraphError) as info:
        load_graph_def(str(path))
    assert "the graph has a cycle" in info.value.problem and "NextIteration" in info.value.problem
    assert info.value.fix


# --------------------------------------------------------------------------- load, optimize
def test_a_tf1_loop_loads_and_optimize_leaves_it_as_it_was(tmp_path):
    graph_def = _loop_graph(conv_in_loop=True)
    path = tmp_path / "loop.pb"
    path.write_bytes(graph_def.SerializeToString())
    loaded = load_graph_def(str(path))
    for outputs in (["out"], None):    # None: the loop counter's unread Exit is an output too
        optimized, _ = optimize(loaded, outputs=outputs)
        assert _loop_nodes(optimized) == _loop_nodes(graph_def)
        feeds = {"x:0": SAMPLES[0]}
        want, = run_graph(graph_def, feeds, ["out:0"])
        got, = run_graph(optimized, feeds, ["out:0"])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_inspect_lists_the_loop_convs_as_fp32_with_the_reason():
    graph_def, _ = optimize(_loop_graph(conv_in_loop=True), outputs=["out"])
    candidates = int8_candidates(graph_def, protected=["out"])
    assert sorted(c.nodes[0] for c in candidates if c.kind == "conv") == ["Conv2D", "Conv2D_1"]
    left = {n.name: n.reason for n in fp32_weighted_nodes(graph_def, candidates)}
    assert left == {"while/Conv2D": LOOP_REASON, "while/MatMul": LOOP_REASON}


def test_a_loop_result_read_by_the_output_identity_keeps_its_exit():
    """Identity(loop result) as the graph output: the Identity stays (strip_debug_ops would
    otherwise rename its producer, the loop's Exit, to the output's name)."""
    t = tf()

    def fn(x):
        _, z = t.compat.v1.while_loop(lambda i, v: i < 3, lambda i, v: (i + 1, v * 0.9),
                                      [t.constant(0), _conv(x, 8, 1)])
        return t.identity(z, name="out")

    graph_def = _v1(fn, x=[1, 8, 8, 3])
    result = convert(graph_def, list(SAMPLES), outputs=["out"])
    by_name = {n.name: n for n in result.graph_def.node}
    assert by_name["out"].op == "Identity" and by_name["out"].input == ["while/Exit_1"]
    assert _loop_nodes(result.graph_def) == _loop_nodes(graph_def)
    assert [q["op"] for q in result.report.quantized] == ["Conv2D"]
    want, = run_graph(graph_def, {"x:0": SAMPLES[0]}, ["out:0"])
    got, = run_graph(result.graph_def, {"x:0": SAMPLES[0]}, ["out:0"])
    assert rel_l2(got, want) < 0.02


# --------------------------------------------------------------------------- convert
@pytest.fixture(scope="module", params=[False, True], ids=["matmul_loop", "conv_in_loop"])
def converted(request):
    graph_def = _loop_graph(conv_in_loop=request.param)
    result = convert(graph_def, list(SAMPLES), outputs=["out"])
    return request.param, graph_def, result


def test_loop_nodes_are_unchanged_and_the_convs_around_it_int8(converted):
    conv_in_loop, graph_def, result = converted
    int8 = result.graph_def
    assert _loop_nodes(int8) == _loop_nodes(graph_def)
    quantized = {q["node"]: q for q in result.report.quantized}
    assert sorted(q["op"] for q in quantized.values()) == ["Conv2D", "Conv2D"]
    assert not any(name.startswith("while/") for name in quantized)
    # the only fp32 Conv2D left is the loop's own; the MatMul inside stays MatMul
    assert op_histogram(int8).get("Conv2D", 0) == int(conv_in_loop)
    assert {n.name for n in int8.node if n.op == "Conv2D"} <= set(_loop_nodes(graph_def))
    assert op_histogram(int8)["_FusedQuantizedConv2D"] == 2
    # nothing inside the loop was calibrated
    assert not any(name.startswith("while/") and not name.startswith("while/Exit")
                   for name in result.report.tensors)


def test_the_report_lists_every_loop_op_as_fp32_with_the_reason(converted):
    conv_in_loop, graph_def, result = converted
    left = {f["node"]: f for f in result.report.fp32}
    loop = _loop_nodes(graph_def)
    for name, node in loop.items():
        if node.op in ("Const", "Identity", "Reshape"):   # plumbing: never listed
            continue
        assert left[name]["op"] == node.op
        assert left[name]["reason"].startswith(LOOP_REASON), left[name]
        assert "while/while_context" in left[name]["reason"]
    assert {"MatMul", "Conv2D" if conv_in_loop else "MatMul"} <= {
        left[n]["op"] for n in left if n in loop}
    assert result.report.compute_counts()["Conv2D"] == {"int8": 2, "fp32": int(conv_in_loop)}


def test_the_loop_computes_in_fp32_and_the_output_stays_close(converted):
    _, graph_def, result = converted
    int8 = result.graph_def
    quantized = {q["node"]: q for q in result.report.quantized}
    enter = _loop_nodes(graph_def)["while/Enter_1"].input[0]     # the first conv's output
    first_step = _step(quantized[node_name(enter)]["output_range"])
    last_step = _step(quantized["out"]["output_range"])
    for sample in SAMPLES[:3]:
        feeds = {"x:0": sample}
        loop_in, loop_out, out = run_graph(int8, feeds, [enter, "while/Exit_1:0", "out:0"])
        fp32_in, fp32_out = run_graph(graph_def, feeds, [enter, "out:0"])
        # the loop, fed the int8 graph's value, computes exactly what the fp32 loop does
        exact, = run_graph(graph_def, {enter: loop_in}, ["while/Exit_1:0"])
        np.testing.assert_array_equal(loop_out, exact)
        # the conv before the loop: within a few of its output's quantization steps
        # (measured: at most 1.2 steps here)
        assert np.abs(loop_in - fp32_in).max() <= 2.5 * first_step
        # after three iterations and the last conv: a few of the output's steps (measured:
        # at most 1.8), 2% relative L2 (measured: at most 0.4%)
        assert np.abs(out - fp32_out).max() <= 4 * last_step
        assert rel_l2(out, fp32_out) < 0.02


def _step(output_range):
    lo, hi = output_range
    return (hi - lo) / 255.0


def test_cli_convert_converts_around_the_loop_and_reports_it(capsys, tmp_path):
    src = tmp_path / "loop.pb"
    src.write_bytes(_loop_graph(conv_in_loop=True).SerializeToString())
    calib = tmp_path / "calib.npy"
    np.save(calib, SAMPLES[:, 0])
    out, report, saved = tmp_path / "int8.pb", tmp_path / "report.md", tmp_path / "sm"
    code = cli.main(["convert", str(src), "-o", str(out), "--calib", str(calib),
                     "--report", str(report), "--saved_model", str(saved), "--outputs", "out"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert "Traceback" not in err
    assert "Conv2D: 2 int8, 1 fp32" in stdout
    assert "NextIteration" in stdout                      # "left in fp32: ... NextIteration"
    text = report.read_text()
    assert LOOP_REASON in text and "while/NextIteration" in text and "while/Conv2D" in text
    int8 = load_graph_def(str(out))
    assert _loop_nodes(int8) == _loop_nodes(load_graph_def(str(src)))
    # the SavedModel runs the loop too, giving the int8 graph's output
    serve = tf().saved_model.load(str(saved)).signatures["serving_default"]
    got = serve(x=tf().constant(SAMPLES[0]))["out"].numpy()
    want, = run_graph(int8, {"x:0": SAMPLES[0]}, ["out:0"])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
