"""The graphquant command: optimize and inspect on the bundled model, and every way to misuse it.

Success paths run the real entry point in a fresh process (``python -m graphquant``
and the installed console script); error paths run ``cli.main`` in-process
(same code, faster) and a few also as a process, to see the real exit code and
that no traceback reaches the user.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from tensorflow.core.framework import graph_pb2

from graphquant import cli
from graphquant.execute import run_graph
from graphquant.graph import make_const, make_node, op_histogram
from graphquant.graph_io import load_graph_def
from helpers import ROOT, rel_l2

MODEL = os.path.join(ROOT, "models", "fer_mini_xception.pb")
INPUTS = os.path.join(ROOT, "models", "fer_mini_xception_inputs.npy")


def _graphquant(*args, console_script=None):
    """Run the command in a fresh process from the repository root; (code, stdout, stderr)."""
    cmd = [console_script] if console_script else [sys.executable, "-m", "graphquant"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd + list(args), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def _main(capsys, *args):
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _assert_clear_error(code, err, *needles):
    assert code == 2
    assert err.startswith("graphquant: error: "), err
    assert "\n  fix: " in err, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def _files(directory):
    return sorted(os.listdir(directory))


# --------------------------------------------------------------------------- success
def test_optimize_bundled_model_via_python_m(tmp_path):
    out = tmp_path / "fer_opt.pb"
    code, stdout, stderr = _graphquant("optimize", MODEL, "-o", str(out))
    assert code == 0, stderr
    assert "Traceback" not in stderr
    original, optimized = load_graph_def(MODEL), load_graph_def(str(out))
    before, after = op_histogram(original), op_histogram(optimized)
    # the before/after histogram is printed, one row per op with both counts
    assert f"nodes:   {len(original.node)} -> {len(optimized.node)}" in stdout
    row = next(line.split() for line in stdout.splitlines() if line.split()[:1] == ["Identity"])
    assert row[1:3] == [str(before["Identity"]), str(after.get("Identity", 0))]
    assert "Identity" not in after
    # and the optimized graph computes what the original does on real faces
    faces = np.load(INPUTS)[:4]
    for face in faces:
        want, = run_graph(original, {"input:0": face[None]}, ["Identity:0"])
        got, = run_graph(optimized, {"input:0": face[None]}, ["Identity:0"])
        assert rel_l2(got, want) < 1e-4


def test_inspect_bundled_model_via_python_m():
    code, stdout, stderr = _graphquant("inspect", MODEL, "--all")
    assert code == 0, stderr
    lines = stdout.splitlines()
    assert any(line.split() == ["input:0", "float32", "[1,", "64,", "64,", "1]"] for line in lines)
    assert any(line.split() == ["Identity:0", "float32", "[1,", "7]"] for line in lines)
    # 15 Conv2D + 8 depthwise convs and 4 MaxPools are int8 candidates
    summary = next(line for line in lines if "int8 candidates" in line)
    assert "15 conv" in summary and "8 depthwise_conv" in summary and "4 pool" in summary
    listed = [line.split() for line in lines if line.startswith("    ") and
              line.split()[0] in ("conv", "depthwise_conv", "pool")]
    assert len(listed) == 27


def test_console_script_entry_point(tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), "graphquant")
    if not os.path.exists(script):
        pytest.skip("graphquant is not pip-installed in this environment (no console script)")
    code, _, err = _graphquant("inspect", str(tmp_path / "missing.pb"), console_script=script)
    _assert_clear_error(code, err, "does not exist")


def test_help_lists_subcommands_and_flags(capsys):
    code, out, _ = _main(capsys, "--help")
    assert code == 0
    for name in ("optimize", "inspect"):
        assert f"\n  {name} " in out
    code, out, _ = _main(capsys, "optimize", "--help")
    assert code == 0
    assert "usage: graphquant optimize IN -o OUT" in out
    for flag in ("-o, --output", "--inputs", "--outputs", "--[no]debug"):
        assert flag in out


def test_no_subcommand_prints_usage_and_fails(capsys):
    code, out, _ = _main(capsys)
    assert code == 2 and out.startswith("usage: graphquant")


# --------------------------------------------------------------------------- usage errors
@pytest.mark.parametrize("argv, needles", [
    (["optimise", "x.pb"], ["unknown subcommand 'optimise'", "graphquant optimize"]),
    (["optimize", MODEL], ["no output path given", "-o OUT.pb"]),
    (["optimize", MODEL, "-o"], ["Missing value for flag -o"]),
    (["optimize", "--bogus", MODEL], ["Unknown command line flag 'bogus'"]),
    (["optimize", MODEL, "extra.pb", "-o", "out.pb"], ["takes 1 positional argument"]),
    (["inspect", MODEL, "-o", "out.pb"], ["does not take --output"]),
    (["optimize", MODEL, "-o", "out.pb", "--passes", "strip_debug_ops,fold_everything"],
     ["no pass named 'fold_everything'", "known passes: "]),
])
def test_usage_errors(capsys, tmp_path, monkeypatch, argv, needles):
    monkeypatch.chdir(tmp_path)
    code, _, err = _main(capsys, *argv)
    _assert_clear_error(code, err, *needles)
    assert _files(tmp_path) == []


# --------------------------------------------------------------------------- bad graphs
def _write(path, graph_def):
    path.write_bytes(graph_def.SerializeToString())
    return str(path)


def _small_graph():
    g = graph_pb2.GraphDef()
    g.node.extend([
        make_node("Placeholder", "x", dtype=np.float32, shape=_shape([1, 4])),
        make_const("w", np.ones([4, 2], np.float32)),
        make_node("MatMul", "y", ["x", "w"], T=np.float32),
    ])
    return g


def _shape(dims):
    from tensorflow.core.framework import attr_value_pb2, tensor_shape_pb2

    shape = tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in dims])
    return attr_value_pb2.AttrValue(shape=shape)


def _truncated(tmp_path):
    data = open(MODEL, "rb").read()
    path = tmp_path / "truncated.pb"
    path.write_bytes(data[: len(data) // 3])
    return str(path)


def _not_a_graph(tmp_path):
    path = tmp_path / "notes.pb"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    return str(path)


def _empty(tmp_path):
    path = tmp_path / "empty.pb"
    path.write_bytes(b"")
    return str(path)


def _not_frozen(tmp_path):
    g = _small_graph()
    g.node[1].CopyFrom(make_node("VariableV2", "w", dtype=np.float32, shape=_shape([4, 2])))
    return _write(tmp_path / "variables.pb", g)


def _duplicate_names(tmp_path):
    g = _small_graph()
    g.node.add().CopyFrom(make_const("w", np.zeros([4, 2], np.float32)))
    return _write(tmp_path / "duplicates.pb", g)


def _dangling_input(tmp_path):
    g = _small_graph()
    g.node[2].input[1] = "weights_gone"
    return _write(tmp_path / "dangling.pb", g)


@pytest.mark.parametrize("make_bad, needles", [
    (lambda p: str(p / "missing.pb"), ["does not exist"]),
    (_empty, ["is empty"]),
    (_truncated, ["truncated"]),
    (_not_a_graph, ["not a GraphDef"]),
    (_not_frozen, ["not frozen", "VariableV2", "freeze it first"]),
    (_duplicate_names, ["duplicate node names: w"]),
    (_dangling_input, ["reads 'weights_gone'"]),
], ids=["missing", "empty", "truncated", "not_a_graph", "not_frozen", "duplicate_names",
        "dangling_input"])
@pytest.mark.parametrize("command", ["optimize", "inspect"])
def test_bad_graph_gives_one_clear_error_and_no_output(capsys, tmp_path, make_bad, needles,
                                                       command):
    src = make_bad(tmp_path)
    before = _files(tmp_path)
    out = tmp_path / "out.pb"
    argv = [command, src] + (["-o", str(out)] if command == "optimize" else [])
    code, stdout, err = _main(capsys, *argv)
    _assert_clear_error(code, err, *needles)
    assert _files(tmp_path) == before  # no output file, no temporary left behind


def test_bad_graph_as_a_process_exits_2_without_traceback(tmp_path):
    out = tmp_path / "out.pb"
    code, stdout, err = _graphquant("optimize", _truncated(tmp_path), "-o", str(out))
    _assert_clear_error(code, err, "truncated")
    assert stdout == "" and not out.exists()


# --------------------------------------------------------------------------- bad names and paths
@pytest.mark.parametrize("flag, value, needles", [
    ("--outputs", "Identiy:0", ["no node named 'Identiy'", "did you mean 'Identity'"]),
    ("--inputs", "inptu", ["no node named 'inptu'", "did you mean 'input'"]),
    ("--outputs", "Identity:3", ["there is no tensor 'Identity:3'"]),
])
def test_unknown_names_are_reported_with_a_suggestion(capsys, tmp_path, flag, value, needles):
    out = tmp_path / "out.pb"
    code, _, err = _main(capsys, "optimize", MODEL, "-o", str(out), flag, value)
    _assert_clear_error(code, err, *needles)
    assert _files(tmp_path) == []
    code, _, err = _main(capsys, "inspect", MODEL, flag, value)
    _assert_clear_error(code, err, *needles)


def test_refuses_to_overwrite_the_input(capsys, tmp_path):
    src = tmp_path / "model.pb"
    src.write_bytes(open(MODEL, "rb").read())
    before = src.read_bytes()
    for target in (str(src), os.path.join(str(tmp_path), ".", "model.pb")):
        code, _, err = _main(capsys, "optimize", str(src), "-o", target)
        _assert_clear_error(code, err, "is the input file; refusing to overwrite it")
    assert src.read_bytes() == before and _files(tmp_path) == ["model.pb"]


@pytest.mark.parametrize("target, needles", [
    (lambda p: str(p), ["is a directory"]),
    (lambda p: str(p / "no_such_dir" / "out.pb"), ["does not exist"]),
])
def test_unusable_output_path(capsys, tmp_path, target, needles):
    code, _, err = _main(capsys, "optimize", MODEL, "-o", target(tmp_path))
    _assert_clear_error(code, err, *needles)
    assert _files(tmp_path) == []


def test_explicit_names_and_pass_list(capsys, tmp_path):
    out = tmp_path / "out.pbtxt"
    code, stdout, err = _main(capsys, "optimize", MODEL, "-o", str(out), "--inputs", "input",
                              "--outputs", "Identity:0", "--passes",
                              "strip_debug_ops,remove_unused_nodes", "--debug")
    assert code == 0, err
    assert "outputs: Identity:0" in stdout
    assert "pass strip_debug_ops" in err and "pass remove_unused_nodes" in err
    graph = load_graph_def(str(out))  # text form, chosen by the extension
    assert "Identity" in [n.name for n in graph.node]  # the output keeps its name
    assert "Identity" not in op_histogram(graph)
