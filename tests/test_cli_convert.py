"""graphquant convert: the command end to end, and every bad input it must survive (issue 5.2).

Each bad input gives one clear message (``graphquant: error: ...`` and a ``fix:``
line, no traceback), exit code 2, and leaves the output directory as it was:
no graph, no report, no SavedModel, no temporary file.  Error paths run
``cli.main`` in-process (the same code as the command, faster); the success
path and determinism run the real ``python -m graphquant`` in fresh processes.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from google.protobuf import text_format

from graphquant import cli
from graphquant.execute import run_graph
from graphquant.graph import make_node, op_histogram
from graphquant.graph_io import load_graph_def
from graphquant.runtime import tf
from helpers import ROOT, build_graph, rel_l2

MODEL = os.path.join(ROOT, "models", "fer_mini_xception.pb")
INPUTS = os.path.join(ROOT, "models", "fer_mini_xception_inputs.npy")
RNG = np.random.RandomState(0)


# --------------------------------------------------------------------------- helpers
def _graphquant(*args, env=None):
    """``python -m graphquant ARGS`` in a fresh process; (code, stdout, stderr)."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "graphquant", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


def _main(capsys, *args):
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _assert_clear_error(code, err, *needles, after_progress=False):
    """Exit code 2 and one error with a fix; nothing else on stderr unless the failure came
    after calibration started (then its progress lines come first)."""
    assert code == 2, err
    if after_progress:
        assert all(line.startswith("calibrating ") for line in
                   err[:err.find("graphquant: error: ")].splitlines()), err
        err = err[err.find("graphquant: error: "):]
    assert err.startswith("graphquant: error: ") and err.count("graphquant: error") == 1, err
    assert "\n  fix: " in err, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def _listing(directory):
    return sorted(os.listdir(directory))


def _weights(shape, seed):
    return tf().constant(np.random.RandomState(seed).randn(*shape).astype(np.float32) * 0.3)


def _conv(x, channels, seed):
    t = tf()
    w = _weights([3, 3, int(x.shape[-1]), channels], seed)
    b = _weights([channels], seed + 100)
    return t.nn.relu(t.nn.bias_add(t.nn.conv2d(x, w, 1, "SAME"), b))


def _two_convs(x):
    return tf().identity(_conv(_conv(x, 8, 1), 4, 2), name="out")


def _save(tmp_path, graph_def, name="model.pb"):
    path = tmp_path / name
    path.write_bytes(graph_def.SerializeToString())
    return str(path)


def _samples(shape, n=6, seed=0):
    return np.random.RandomState(seed).rand(n, *shape).astype(np.float32)


@pytest.fixture
def tiny(tmp_path):
    """(model.pb, calib.npy, output path) of x[1,8,8,3] -> conv -> conv -> out."""
    graph_def, _ = build_graph(_two_convs, x=[1, 8, 8, 3])
    calib = tmp_path / "calib.npy"
    np.save(calib, _samples([8, 8, 3]))
    return _save(tmp_path, graph_def), str(calib), str(tmp_path / "out.pb")


def _convert_ok(capsys, src, calib, out, *flags):
    code, stdout, err = _main(capsys, "convert", src, "-o", out, "--calib", calib, *flags)
    assert code == 0, err
    assert "Traceback" not in err
    return stdout, err, load_graph_def(out)


def _close(fp32, int8, feeds, outputs, bound=0.08):
    for want, got in zip(run_graph(fp32, feeds, outputs), run_graph(int8, feeds, outputs)):
        assert want.shape == got.shape
        assert rel_l2(got, want) < bound


# --------------------------------------------------------------------------- success
def test_convert_tiny_graph_prints_progress_and_summary(capsys, tiny):
    src, calib, out = tiny
    stdout, err, int8 = _convert_ok(capsys, src, calib, out)
    assert f"converted {src} -> {out}" in stdout
    assert "Conv2D: 2 int8, 0 fp32" in stdout
    assert "calibration: auto on 6 samples" in stdout   # the library's default too
    assert "calibrating 6/6" in err              # progress on stderr, not stdout
    assert "Conv2D" not in op_histogram(int8)
    x = _samples([8, 8, 3], n=1, seed=5)
    _close(load_graph_def(src), int8, {"x:0": x}, ["out:0"])


def test_bundled_model_end_to_end_in_a_fresh_process(tmp_path):
    """The README quick start: convert with a Markdown report; the summary is printed."""
    out, report = tmp_path / "fer_int8.pb", tmp_path / "fer_report.md"
    code, stdout, err = _graphquant("convert", MODEL, "-o", str(out), "--calib", INPUTS,
                                    "--report", str(report))
    assert code == 0, err
    assert "Traceback" not in err and "calibrating 32/32" in err
    assert "Conv2D: 15 int8, 0 fp32" in stdout and "DepthwiseConv2dNative: 8 int8" in stdout
    assert f"report: {report}" in stdout
    text = report.read_text()
    assert text.startswith("# graphquant conversion report")
    # 6 + the fp32 Pad of shift_signed_activations (issue 6; its AddV2s fold into QuantizeV2s)
    assert "## Quantized (27)" in text and "## Left in fp32 (7)" in text
    faces = np.load(INPUTS)[:4]
    fp32, int8 = load_graph_def(MODEL), load_graph_def(str(out))
    errs = [rel_l2(run_graph(int8, {"input:0": f[None]}, ["Identity:0"])[0],
                   run_graph(fp32, {"input:0": f[None]}, ["Identity:0"])[0]) for f in faces]
    assert np.mean(errs) < 0.1


def test_converting_twice_gives_identical_bytes(tmp_path):
    """Two fresh processes (different hash seeds, report formats): byte-identical graphs."""
    outs = []
    for seed, report in (("1", "r.json"), ("2", "r.html")):
        out = tmp_path / f"int8_{seed}.pb"
        env = dict(os.environ, PYTHONHASHSEED=seed)
        code, _, err = _graphquant("convert", MODEL, "-o", str(out), "--calib", INPUTS,
                                   "--report", str(tmp_path / report), env=env)
        assert code == 0, err
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    assert len(outs[0]) > 10000


@pytest.mark.parametrize("flags, check", [
    (["--calibration", "kl"], lambda r: r["calibration"]["method"] == "kl"),
    (["--calibration", "percentile", "--percentile", "99.9"],
     lambda r: r["info"]["calibration"] == "percentile"),
    (["--per_tensor"], lambda r: r["info"]["per_channel"] is False),
    (["--target", "vnni"], lambda r: r["info"]["weight_max_level"] == 127),
    (["--exclude", "Conv2D"], lambda r: {f["op"] for f in r["fp32"]} >= {"Conv2D"}
     and not any(q["op"] == "Conv2D" for q in r["quantized"])),
    (["--calib_limit", "2"], lambda r: r["calibration"]["samples"] == 2),
    (["--max_layer_error", "none"], lambda r: len(r["quantized"]) == 2),
    (["--calibration", "minmax"], lambda r: r["info"]["calibration"] == "minmax"),
    (["--fidelity", "rel_l2=0.5"], lambda r: r["info"]["fidelity"]["target"] == "rel_l2=0.5"),
])
def test_flags_reach_the_conversion(capsys, tiny, tmp_path, flags, check):
    src, calib, out = tiny
    report = tmp_path / "report.json"
    _convert_ok(capsys, src, calib, out, "--report", report, *flags)
    assert check(json.loads(report.read_text()))


def test_inputs_and_outputs_flags(capsys, tmp_path):
    """--outputs picks an inner tensor: only what it needs is converted."""
    def fn(x):
        t = tf()
        inner = t.identity(_conv(x, 8, 1), name="inner")
        return t.identity(_conv(inner, 4, 2), name="out")

    graph_def, _ = build_graph(fn, x=[1, 8, 8, 3])
    src, calib = _save(tmp_path, graph_def), str(tmp_path / "c.npy")
    np.save(calib, _samples([8, 8, 3]))
    out = str(tmp_path / "o.pb")
    stdout, _, int8 = _convert_ok(capsys, src, calib, out, "--inputs", "x", "--outputs",
                                  "inner:0")
    assert "Conv2D: 1 int8, 0 fp32" in stdout
    _close(graph_def, int8, {"x:0": _samples([8, 8, 3], 1, 3)}, ["inner:0"])


def test_text_graph_named_pb_and_binary_named_pbtxt_both_convert(capsys, tmp_path):
    """Text vs binary is decided by content: a valid GraphDef loads under either name."""
    graph_def, _ = build_graph(_two_convs, x=[1, 8, 8, 3])
    calib = str(tmp_path / "c.npy")
    np.save(calib, _samples([8, 8, 3]))
    as_text = tmp_path / "text.pb"
    as_text.write_text(text_format.MessageToString(graph_def))
    as_binary = _save(tmp_path, graph_def, "binary.pbtxt")
    for src, out in ((str(as_text), "a.pb"), (as_binary, "b.pbtxt")):
        _, _, int8 = _convert_ok(capsys, src, calib, str(tmp_path / out))
        _close(graph_def, int8, {"x:0": _samples([8, 8, 3], 1, 4)}, ["out:0"])
    assert (tmp_path / "b.pbtxt").read_text().startswith("node {")   # .pbtxt output is text


def test_dynamic_batch_dimension(capsys, tmp_path):
    """Placeholder [None, 8, 8, 3]: calibrated in batches, the int8 graph takes any batch."""
    graph_def, _ = build_graph(_two_convs, x=[None, 8, 8, 3])
    src, calib = _save(tmp_path, graph_def), str(tmp_path / "c.npy")
    np.save(calib, _samples([8, 8, 3], n=11))
    _, _, int8 = _convert_ok(capsys, src, calib, str(tmp_path / "o.pb"))
    for batch in (1, 5):
        _close(graph_def, int8, {"x:0": _samples([8, 8, 3], batch, 7)}, ["out:0"])


def test_several_inputs_from_npz(capsys, tmp_path):
    def fn(a, b):
        t = tf()
        return t.identity(_conv(t.concat([_conv(a, 4, 1), _conv(b, 4, 2)], axis=3), 4, 3),
                          name="out")

    graph_def, _ = build_graph(fn, a=[1, 8, 8, 3], b=[1, 8, 8, 2])
    src = _save(tmp_path, graph_def)
    calib = str(tmp_path / "c.npz")
    np.savez(calib, a=_samples([8, 8, 3], 5, 1), **{"b:0": _samples([8, 8, 2], 5, 2)})
    stdout, _, int8 = _convert_ok(capsys, src, calib, str(tmp_path / "o.pb"))
    assert "Conv2D: 3 int8, 0 fp32" in stdout
    feeds = {"a:0": _samples([8, 8, 3], 1, 8), "b:0": _samples([8, 8, 2], 1, 9)}
    _close(graph_def, int8, feeds, ["out:0"])


def test_registered_op_without_int8_pattern_stays_fp32_and_is_reported(capsys, tmp_path):
    """Erf (TensorFlow knows it, graphquant has no int8 form): kept, reported, no crash."""
    graph_def, _ = build_graph(lambda x: tf().identity(tf().math.erf(_conv(x, 8, 1)), name="out"),
                               x=[1, 8, 8, 3])
    src, calib = _save(tmp_path, graph_def), str(tmp_path / "c.npy")
    np.save(calib, _samples([8, 8, 3]))
    report = tmp_path / "r.json"
    stdout, _, int8 = _convert_ok(capsys, src, calib, str(tmp_path / "o.pb"),
                                  "--report", report)
    assert "left in fp32: 1 Erf" in stdout
    left = json.loads(report.read_text())["fp32"]
    assert [(f["op"], f["reason"]) for f in left] == [("Erf", "no int8 pattern for this op")]
    assert op_histogram(int8)["Erf"] == 1
    _close(graph_def, int8, {"x:0": _samples([8, 8, 3], 1, 4)}, ["out:0"])


def test_const_only_graph_with_unhandled_op(capsys, tmp_path):
    """A graph of constants and an Erf: nothing to quantize, still a clean run."""
    def fn(x):
        t = tf()
        return t.identity(x + t.math.erf(t.constant(np.linspace(-1, 1, 4, dtype=np.float32))),
                          name="out")

    graph_def, _ = build_graph(fn, x=[1, 4])
    src, calib = _save(tmp_path, graph_def), str(tmp_path / "c.npy")
    np.save(calib, _samples([4]))
    stdout, _, int8 = _convert_ok(capsys, src, calib, str(tmp_path / "o.pb"))
    x = _samples([4], 1, 2)
    _close(graph_def, int8, {"x:0": x}, ["out:0"], bound=1e-6)


# --------------------------------------------------------------------------- control flow
def _cond_graph(v2: bool, conv_in_branch: bool = True):
    """conv -> cond(mean(x) > 0.5: [conv] * 2 | y - 1) -> conv; TF1 Switch/Merge or
    functional If."""
    t = tf()

    def fn(x):
        y = _conv(x, 8, 1)
        z = t.compat.v1.cond(t.reduce_mean(x) > 0.5,
                             lambda: (_conv(y, 8, 3) if conv_in_branch else y) * 2.0,
                             lambda: y - 1.0)
        return t.identity(_conv(z, 4, 2), name="out")

    was_v2 = t.compat.v1.control_flow_v2_enabled()
    (t.compat.v1.enable_control_flow_v2 if v2 else t.compat.v1.disable_control_flow_v2)()
    try:
        return build_graph(fn, x=[1, 8, 8, 3])[0]
    finally:
        (t.compat.v1.enable_control_flow_v2 if was_v2 else t.compat.v1.disable_control_flow_v2)()


def _while_graph(v2: bool):
    t = tf()

    def fn(x):
        y = _conv(x, 8, 1)
        _, z = t.compat.v1.while_loop(lambda i, v: i < 3, lambda i, v: (i + 1, v * 0.9),
                                      [t.constant(0), y])
        return t.identity(_conv(z, 4, 2), name="out")

    was_v2 = t.compat.v1.control_flow_v2_enabled()
    (t.compat.v1.enable_control_flow_v2 if v2 else t.compat.v1.disable_control_flow_v2)()
    try:
        return build_graph(fn, x=[1, 8, 8, 3])[0]
    finally:
        (t.compat.v1.enable_control_flow_v2 if was_v2 else t.compat.v1.disable_control_flow_v2)()


def _both_branches():
    low = _samples([8, 8, 3], 3, 1) * 0.5           # mean < 0.5: the else branch
    high = 0.5 + _samples([8, 8, 3], 3, 2) * 0.5    # mean > 0.5: the then branch
    return np.concatenate([low, high])


@pytest.mark.parametrize("v2, conv_in_branch, control_ops", [
    (False, False, {"Switch", "Merge"}),
    (False, True, {"Switch", "Merge"}),
    (True, True, {"StatelessIf"}),
])
def test_cond_is_left_fp32_and_the_rest_converted(capsys, tmp_path, v2, conv_in_branch,
                                                  control_ops):
    graph_def = _cond_graph(v2, conv_in_branch)
    assert control_ops <= set(op_histogram(graph_def))
    src, calib = _save(tmp_path, graph_def), str(tmp_path / "c.npy")
    samples = _both_branches()
    np.save(calib, samples)
    report = tmp_path / "r.json"
    _, _, int8 = _convert_ok(capsys, src, calib, str(tmp_path / "o.pb"), "--report", report)
    left = json.loads(report.read_text())["fp32"]
    assert control_ops <= {f["op"] for f in left}
    assert control_ops <= set(op_histogram(int8))
    if v2:   # the conv inside the If's branch function stays fp32, and the report says so
        reason = next(f["reason"] for f in left if f["op"] == "StatelessIf")
        assert "function bodies run as written, in fp32 (1 Conv2D inside)" in reason
    # the convs outside the control flow are int8
    assert sum(q["op"] == "Conv2D" for q in json.loads(report.read_text())["quantized"]) >= 2
    # one sample down each branch; the last conv's int8 input range spans both branches'
    # outputs, so a sample using one of them gets fewer steps: a looser bound than elsewhere
    for i in (0, 5):
        _close(graph_def, int8, {"x:0": samples[i:i + 1]}, ["out:0"], bound=0.15)


def test_functional_while_is_left_fp32_and_the_rest_converted(capsys, tmp_path):
    graph_def = _while_graph(v2=True)
    assert "StatelessWhile" in op_histogram(graph_def) or "While" in op_histogram(graph_def)
    src, calib = _save(tmp_path, graph_def), str(tmp_path / "c.npy")
    np.save(calib, _samples([8, 8, 3]))
    report = tmp_path / "r.json"
    stdout, _, int8 = _convert_ok(capsys, src, calib, str(tmp_path / "o.pb"), "--report", report)
    assert "Conv2D: 2 int8, 0 fp32" in stdout
    reasons = {f["op"]: f["reason"] for f in json.loads(report.read_text())["fp32"]}
    assert "fp32" in reasons.get("StatelessWhile", reasons.get("While", ""))
    _close(graph_def, int8, {"x:0": _samples([8, 8, 3], 1, 3)}, ["out:0"])


# --------------------------------------------------------------------------- bad graphs
def _corrupt(tmp_path):
    data = bytearray(open(MODEL, "rb").read()[:4000])
    data[100:200] = bytes(RNG.randint(0, 256, 100, dtype=np.uint8))
    return _write_bytes(tmp_path / "corrupt.pb", bytes(data))


def _truncated(tmp_path):
    data = open(MODEL, "rb").read()
    return _write_bytes(tmp_path / "truncated.pb", data[:len(data) // 2 + 7])


def _text_not_a_graph(tmp_path):
    return _write_bytes(tmp_path / "readme.pb", b"# a Markdown file\n\nnot a graph\n")


def _binary_named_text(tmp_path):
    return _write_bytes(tmp_path / "noise.pbtxt", bytes(RNG.randint(0, 256, 3000, np.uint8)))


def _not_frozen(tmp_path):
    graph_def, _ = build_graph(_two_convs, x=[1, 8, 8, 3])
    const = next(n for n in graph_def.node if n.op == "Const")
    const.CopyFrom(make_node("VariableV2", const.name, dtype=np.float32, shape=[3, 3, 3, 8]))
    return _save(tmp_path, graph_def, "variables.pb")


def _custom_op(tmp_path):
    graph_def, _ = build_graph(_two_convs, x=[1, 8, 8, 3])
    relu = next(n for n in graph_def.node if n.op == "Relu")
    relu.op = "MyCompanyFancyRelu"
    return _save(tmp_path, graph_def, "custom.pb")


def _write_bytes(path, data):
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("make_bad, needles", [
    (_corrupt, ["corrupt"]),
    (_truncated, ["truncated"]),
    (_text_not_a_graph, ["text file but not a text GraphDef"]),
    (_binary_named_text, ["not a GraphDef"]),
    (_not_frozen, ["not frozen", "VariableV2"]),
    (_custom_op, ["MyCompanyFancyRelu", "does not know"]),
    (lambda p: str(p / "missing.pb"), ["does not exist"]),
])
def test_bad_graph_files(capsys, tmp_path, tiny, make_bad, needles):
    _, calib, out = tiny
    src = make_bad(tmp_path)
    before = _listing(tmp_path)
    code, _, err = _main(capsys, "convert", src, "-o", out, "--calib", calib,
                         "--report", tmp_path / "r.html", "--saved_model", tmp_path / "sm")
    _assert_clear_error(code, err, *needles)
    assert _listing(tmp_path) == before


@pytest.mark.parametrize("flag, value, needles", [
    ("--inputs", "xx", ["no node named 'xx'", "did you mean 'x'"]),
    ("--outputs", "outt:0", ["no node named 'outt'", "did you mean 'out'"]),
    ("--outputs", "out:3", ["no tensor 'out:3'"]),
])
def test_names_that_do_not_exist_get_suggestions(capsys, tmp_path, tiny, flag, value, needles):
    src, calib, out = tiny
    before = _listing(tmp_path)
    code, _, err = _main(capsys, "convert", src, "-o", out, "--calib", calib, flag, value)
    _assert_clear_error(code, err, *needles)
    assert _listing(tmp_path) == before


# --------------------------------------------------------------------------- bad outputs
def _unwritable_dir(tmp_path):
    if os.geteuid() == 0:      # root writes anywhere os.access says; /proc refuses new files
        return "/proc/graphquant_out.pb"
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    return str(locked / "out.pb")


@pytest.mark.parametrize("args, needles", [
    (lambda p, src: ["-o", _unwritable_dir(p)], ["cannot write"]),
    (lambda p, src: ["-o", str(p)], ["is a directory"]),
    (lambda p, src: ["-o", src], ["is the input file"]),
    (lambda p, src: ["-o", str(p / "missing_dir" / "o.pb")], ["does not exist"]),
    (lambda p, src: ["-o", str(p / "o.pb"), "--report", str(p / "r.pdf")], [".md, .html or .json"]),
    (lambda p, src: ["-o", str(p / "o.md"), "--report", str(p / "o.md")], ["same path as -o"]),
    (lambda p, src: ["-o", str(p / "o.pb"), "--saved_model", str(p / "calib.npy")],
     ["is a file"]),
    (lambda p, src: ["-o", str(p / "o.pb"), "--saved_model", src], ["same path"]),
    (lambda p, src: ["-o", str(p / "o.pb"), "--saved_model", str(p)], ["is not empty"]),
    (lambda p, src: ["-o", str(p / "o.pb"), "--saved_model", str(p / "o.pb")], ["same path"]),
])
def test_bad_output_paths_fail_before_any_work(capsys, tmp_path, tiny, args, needles):
    """The calibration path does not exist either: the output error must come first."""
    src, _, _ = tiny
    before = _listing(tmp_path)
    code, _, err = _main(capsys, "convert", src, "--calib", tmp_path / "nothing.npy",
                         *args(tmp_path, src))
    _assert_clear_error(code, err, *needles)
    assert "nothing.npy" not in err
    assert _listing(tmp_path) == before


# --------------------------------------------------------------------------- bad calibration
def _calib(tmp_path, name, array):
    path = tmp_path / name
    np.save(path, array)
    return str(path)


def _with_nan(p):
    a = _samples([8, 8, 3])
    a[3, 1, 2, 0] = np.nan
    return _calib(p, "nan.npy", a)


def _with_inf(p):
    a = _samples([8, 8, 3])
    a[1, 0, 0, 1] = np.inf
    return _calib(p, "inf.npy", a)


@pytest.mark.parametrize("make_calib, needles", [
    (_with_nan, ["sample 3", "NaN"]),
    (_with_inf, ["sample 1", "Inf"]),
    (lambda p: _calib(p, "shape.npy", _samples([8, 3, 8])), ["expects samples of shape", "got"]),
    (lambda p: _calib(p, "rank.npy", _samples([8, 8])), ["expects samples of shape"]),
    (lambda p: _calib(p, "int.npy", np.zeros([4, 8, 8, 3], np.uint8)),
     ["uint8", "preprocessing"]),
    (lambda p: _calib(p, "str.npy", np.full([4, 8, 8, 3], "a")), ["dtype"]),
    (lambda p: _calib(p, "empty.npy", np.zeros([0, 8, 8, 3], np.float32)), ["no samples"]),
    (lambda p: str(p / "missing.npy"), ["does not exist"]),
    (lambda p: _write_bytes(p / "calib.csv", b"1,2,3\n"), ["neither .npy, .npz"]),
])
def test_bad_calibration_data(capsys, tmp_path, tiny, make_calib, needles):
    src, _, out = tiny
    calib = make_calib(tmp_path)
    before = _listing(tmp_path)
    code, _, err = _main(capsys, "convert", src, "-o", out, "--calib", calib,
                         "--report", tmp_path / "r.md")
    _assert_clear_error(code, err, *needles)
    assert _listing(tmp_path) == before


def test_npz_errors_for_several_inputs(capsys, tmp_path):
    def fn(a, b):
        return tf().identity(_conv(a, 4, 1) + _conv(b, 4, 2), name="out")

    src = _save(tmp_path, build_graph(fn, a=[1, 8, 8, 3], b=[1, 8, 8, 3])[0])
    npy = _calib(tmp_path, "one.npy", _samples([8, 8, 3]))
    typo = str(tmp_path / "typo.npz")
    np.savez(typo, a=_samples([8, 8, 3]), bb=_samples([8, 8, 3]))
    for calib, needles in ((npy, ["graph has 2 inputs", "np.savez"]),
                           (typo, ["named 'bb'", "did you mean 'b'"])):
        before = _listing(tmp_path)
        code, _, err = _main(capsys, "convert", src, "-o", tmp_path / "o.pb", "--calib", calib)
        _assert_clear_error(code, err, *needles)
        assert _listing(tmp_path) == before


@pytest.mark.parametrize("args, needles", [
    ([], ["needs calibration data", "--calib"]),
    (["--calib", "c.npy", "--max_layer_error", "-1"], ["--max_layer_error must be"]),
    (["--calib", "c.npy", "--calibration", "entropy"], ["calibration"]),
    (["--calib", "c.npy", "--target", "avx512"], ["target"]),
    (["--calib", "c.npy", "--calib_limit", "0"], ["calib_limit"]),
    (["--calib", "c.npy", "--passes", "a"], ["does not take --passes"]),
])
def test_usage_errors(capsys, tmp_path, tiny, args, needles):
    src, _, _ = tiny
    before = _listing(tmp_path)
    code, _, err = _main(capsys, "convert", src, "-o", tmp_path / "o.pb", *args)
    _assert_clear_error(code, err, *needles)
    assert _listing(tmp_path) == before


def test_a_failing_run_is_a_clear_error_without_traceback_in_a_fresh_process(tmp_path):
    """The real exit code and stderr of the command for one bad input (NaN samples)."""
    graph_def, _ = build_graph(_two_convs, x=[1, 8, 8, 3])
    src = _save(tmp_path, graph_def)
    calib = _with_nan(tmp_path)
    before = _listing(tmp_path)
    code, _, err = _graphquant("convert", src, "-o", str(tmp_path / "o.pb"), "--calib", calib)
    _assert_clear_error(code, err, "NaN")
    assert _listing(tmp_path) == before


def test_help_lists_convert_and_its_flags(capsys):
    code, out, _ = _main(capsys, "--help")
    assert code == 0 and "\n  convert " in out
    code, out, _ = _main(capsys, "convert", "--help")
    assert code == 0 and "usage: graphquant convert IN -o OUT --calib DATA" in out
    for flag in ("--calib=DATA", "--calibration=auto|minmax|kl|percentile|mse",
                 "--[no]per_tensor", "--[no]pair_weights", "--[no]shift_signed",
                 "--[no]bias_correction", "--[no]equalize", "--fidelity=TARGET",
                 "--validation=DATA",
                 "--target=auto|avx2|vnni", "--exclude=a,b", "--report=FILE",
                 "--saved_model=DIR", "--[no]measure_speed"):
        assert flag in out


# --------------------------------------------------------------------------- speed, atomicity
def test_measure_speed_adds_a_labelled_quick_estimate(capsys, tiny, tmp_path):
    src, calib, out = tiny
    report = tmp_path / "r.json"
    stdout, err, _ = _convert_ok(capsys, src, calib, out, "--measure_speed", "--report", report)
    speed = json.loads(report.read_text())["speed"]
    assert speed["fp32_ms"] > 0 and speed["int8_ms"] > 0 and speed["rounds"] >= 3
    assert speed["speedup"] == pytest.approx(speed["fp32_ms"] / speed["int8_ms"])
    assert "quick estimate" in speed["method"] and "tools/benchmark.py" in speed["method"]
    assert "speed-up (quick estimate): " in stdout


def test_a_failing_last_write_removes_the_outputs_already_written(capsys, tiny, tmp_path,
                                                                   monkeypatch):
    """Graph, SavedModel and report are all written or none is."""
    from graphquant import report_render
    from graphquant.errors import OutputPathError

    def disk_full(report, path):
        raise OutputPathError(f"writing '{path}' failed: No space left on device",
                              "check the free disk space and permissions")

    monkeypatch.setattr(report_render, "write_report", disk_full)
    src, calib, out = tiny
    before = _listing(tmp_path)
    code, _, err = _main(capsys, "convert", src, "-o", out, "--calib", calib,
                         "--report", tmp_path / "r.md", "--saved_model", tmp_path / "sm")
    _assert_clear_error(code, err, "No space left on device", after_progress=True)
    assert _listing(tmp_path) == before


# --------------------------------------------------------------------------- --fidelity
def test_cli_defaults_are_the_library_defaults_and_flags_turn_them_off(capsys, tiny,
                                                                        monkeypatch):
    import inspect
    import graphquant.convert as convert_mod
    seen = []
    real = convert_mod.convert
    monkeypatch.setattr(convert_mod, "convert", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    src, calib, out = tiny
    names = ("calibration", "pair_weights", "shift_signed", "bias_correction", "equalize",
             "fidelity", "validation")
    defaults = {n: p.default for n, p in inspect.signature(real).parameters.items()
                if n in names}
    _convert_ok(capsys, src, calib, out)
    assert {n: seen[-1][n] for n in names} == defaults
    _convert_ok(capsys, src, calib, out, "--nopair_weights", "--noshift_signed",
                "--nobias_correction", "--equalize", "--calibration", "minmax")
    assert {n: seen[-1][n] for n in names[:5]} == {
        "calibration": "minmax", "pair_weights": False, "shift_signed": False,
        "bias_correction": False, "equalize": True}


def test_fidelity_with_validation_data_meets_its_target(capsys, tiny, tmp_path):
    src, calib, out = tiny
    validation = _calib(tmp_path, "val.npy", _samples([8, 8, 3], n=4, seed=9))
    report = tmp_path / "r.json"
    _convert_ok(capsys, src, calib, out, "--fidelity", "rel_l2=0.2", "--validation",
                validation, "--report", report)
    fid = json.loads(report.read_text())["info"]["fidelity"]
    assert fid["target"] == "rel_l2=0.2"
    assert fid["reached"] and fid["measured"] <= 0.2
    assert fid["evaluations"] and len(fid["evaluations"]) <= fid["max_evaluations"]


@pytest.mark.parametrize("flags, needles", [
    (["--fidelity", "top1"], ["fidelity target", "top1=0.99"]),
    (["--fidelity", "speed=2"], ["unknown fidelity metric"]),
    (["--fidelity", "rel_l2=0.02", "--validation", "missing.npy"],
     ["validation data", "does not exist"]),
])
def test_bad_fidelity_arguments_fail_before_any_work(capsys, tiny, tmp_path, flags, needles):
    src, calib, out = tiny
    before = _listing(tmp_path)
    code, _, err = _main(capsys, "convert", src, "-o", out, "--calib", calib, *flags)
    _assert_clear_error(code, err, *needles)
    assert "calibrating" not in err              # no work started
    assert _listing(tmp_path) == before
