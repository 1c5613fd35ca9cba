"""graph_io: every bad input file is one clear graphquant error; saving is atomic and careful.

For each bad input, ``load_graph_def`` raises the expected error type with a
message naming the problem and a fix line, and ``graphquant optimize BAD -o OUT``
leaves the output directory exactly as it was (no output, no temporary file).

Known limit: a binary file cut exactly between two nodes is itself a valid,
smaller GraphDef (only the trailing ``versions`` record is missing, and
hand-built graphs lack it too), so it loads; cuts anywhere else are caught.
"""

import os

import numpy as np
import pytest
from google.protobuf import text_format
from tensorflow.core.framework import graph_pb2

from graphquant import cli
from graphquant.errors import InvalidGraphError, NotFrozenError, OutputPathError
from graphquant.graph import make_const, make_node
from graphquant.graph_io import load_graph_def, save_graph_def
from helpers import SHARED_MODELS, build_graph
from graphquant.runtime import tf

REAL_PB = os.path.join(SHARED_MODELS, "mtcnn_pnet.pb")
needs_real = pytest.mark.skipif(not os.path.exists(REAL_PB), reason="shared models not present")


def _small_graph():
    """x -> MatMul(x, weights) -> y, hand-built."""
    g = graph_pb2.GraphDef()
    g.node.extend([
        make_node("Placeholder", "x", dtype=np.float32),
        make_const("weights", np.ones([4, 2], np.float32)),
        make_node("MatMul", "y", ["x", "weights"], T=np.float32),
    ])
    return g


def _write(path, data):
    path.write_bytes(data if isinstance(data, bytes) else data.SerializeToString())
    return str(path)


def _with(*nodes):
    g = _small_graph()
    g.node.extend(nodes)
    return g


def _real_bytes():
    with open(REAL_PB, "rb") as f:
        return f.read()


# --------------------------------------------------------------------------- bad inputs
def _variables_v1(p):
    g = _small_graph()
    g.node[1].CopyFrom(make_node("VariableV2", "weights", dtype=np.float32, shape=[4, 2]))
    return _write(p / "v1.pb", g)


def _resource_variables(p):
    g = _small_graph()
    g.node[1].CopyFrom(make_node("ReadVariableOp", "weights", ["handle"], dtype=np.float32))
    g.node.add().CopyFrom(make_node("VarHandleOp", "handle", dtype=np.float32, shape=[4, 2],
                                    shared_name="w"))
    return _write(p / "v2.pb", g)


def _read_variable_only(p):
    g = _small_graph()
    g.node[1].CopyFrom(make_node("ReadVariableOp", "weights", ["h"], dtype=np.float32))
    g.node.add().CopyFrom(make_node("Placeholder", "h", dtype=tf().resource))
    return _write(p / "read_only.pb", g)


def _saved_model_dir(p):
    d = p / "saved"
    d.mkdir()
    (d / "saved_model.pb").write_bytes(b"\x08\x01")
    (d / "variables").mkdir()
    return str(d)


def _plain_dir(p):
    d = p / "models"
    d.mkdir()
    return str(d)


BAD_INPUTS = {
    "corrupt_bytes": (lambda p: _write(p / "corrupt.pb", np.random.RandomState(0).bytes(3000)),
                      InvalidGraphError, ["not a GraphDef or is truncated/corrupt"]),
    "zeros": (lambda p: _write(p / "zeros.pb", bytes(64)),
              InvalidGraphError, ["not a GraphDef or is truncated/corrupt"]),
    "truncated_half": (lambda p: _write(p / "half.pb", _real_bytes()[:len(_real_bytes()) // 2]),
                       InvalidGraphError, ["truncated/corrupt"]),
    "truncated_last_byte": (lambda p: _write(p / "cut.pb", _real_bytes()[:-1]),
                            InvalidGraphError, ["truncated/corrupt"]),
    "text_as_binary": (lambda p: _write(p / "README.pb", b"This is a README, not a graph.\n"),
                       InvalidGraphError, ["is a text file but not a text GraphDef", "This"]),
    "binary_named_pbtxt": (lambda p: _write(p / "noise.pbtxt", b"\x89PNG\r\n\x1a\n" + bytes(256)),
                           InvalidGraphError, ["not a GraphDef or is truncated/corrupt"]),
    "bad_text_graph": (lambda p: _write(p / "bad.pbtxt", b'node { name: "x" op: "Placeholder"'),
                       InvalidGraphError, ["is a text file but not a text GraphDef"]),
    "text_without_nodes": (lambda p: _write(p / "empty.pbtxt", b"versions { producer: 27 }\n"),
                           InvalidGraphError, ["GraphDef with no nodes"]),
    "variable_v2": (_variables_v1, NotFrozenError,
                    ["not frozen", "weights (VariableV2)", "freeze it first"]),
    "var_handle_op": (_resource_variables, NotFrozenError,
                      ["not frozen", "2 variable node(s)", "VarHandleOp", "ReadVariableOp"]),
    "read_variable_op": (_read_variable_only, NotFrozenError, ["weights (ReadVariableOp)"]),
    "duplicate_names": (lambda p: _write(p / "dup.pb", _with(make_const("x", np.zeros(1)))),
                        InvalidGraphError, ["duplicate node names: x"]),
    "dangling_input": (lambda p: _write(p / "dangling.pb", _with(
        make_node("Relu", "act", ["wieghts"], T=np.float32))),
        InvalidGraphError, ["'act' (Relu) reads 'wieghts'", "did you mean 'weights'?"]),
    "unknown_op": (lambda p: _write(p / "custom.pb", _with(
        make_node("MyFancyOp", "fancy", ["y"], T=np.float32))),
        InvalidGraphError, ["'fancy' has op 'MyFancyOp'", "does not know"]),
    "empty_file": (lambda p: _write(p / "empty.pb", b""), InvalidGraphError, ["is empty"]),
    "missing_file": (lambda p: str(p / "nowhere.pb"), InvalidGraphError, ["does not exist"]),
    "directory": (_plain_dir, InvalidGraphError, ["is a directory, not a GraphDef file"]),
    "saved_model_dir": (_saved_model_dir, InvalidGraphError,
                        ["is a SavedModel directory", "freeze it first"]),
}
NEEDS_REAL = {"truncated_half", "truncated_last_byte"}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_clear_error_and_writes_nothing(case, tmp_path, capsys):
    if case in NEEDS_REAL and not os.path.exists(REAL_PB):
        pytest.skip("shared models not present")
    make, error_type, needles = BAD_INPUTS[case]
    src = make(tmp_path)
    with pytest.raises(error_type) as info:
        load_graph_def(src)
    err = info.value
    assert type(err) is error_type
    for needle in needles:
        assert needle in str(err)
    assert err.fix  # every error says what to do

    before = sorted(os.listdir(tmp_path))
    out = tmp_path / "out.pb"
    assert cli.main(["optimize", src, "-o", str(out)]) == 2
    stderr = capsys.readouterr().err
    assert err.problem in stderr and "Traceback" not in stderr
    assert sorted(os.listdir(tmp_path)) == before


def test_not_frozen_fix_says_how_to_freeze(tmp_path):
    with pytest.raises(NotFrozenError) as info:
        load_graph_def(_variables_v1(tmp_path))
    assert info.value.fix.startswith("freeze it first")
    assert "tools/export.py" in info.value.fix
    assert "convert_variables_to_constants" in info.value.fix


@needs_real
def test_binary_and_text_load_by_content_whatever_the_extension(tmp_path):
    real = load_graph_def(REAL_PB)
    as_pbtxt = _write(tmp_path / "binary_inside.pbtxt", _real_bytes())
    as_pb = _write(tmp_path / "text_inside.pb", text_format.MessageToString(real).encode())
    assert load_graph_def(as_pbtxt) == real
    assert load_graph_def(as_pb) == real


# --------------------------------------------------------------------------- saving
@needs_real
@pytest.mark.parametrize("name", ["model.pb", "model.pbtxt"])
def test_round_trip(tmp_path, name):
    real = load_graph_def(REAL_PB)
    out = tmp_path / name
    save_graph_def(real, str(out))
    assert load_graph_def(str(out)) == real
    text = name.endswith(".pbtxt")
    assert out.read_bytes().startswith(b"node {") == text
    assert sorted(os.listdir(tmp_path)) == [name]


def test_save_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    out = tmp_path / "model.pb"
    out.write_bytes(b"previous version")

    def disk_full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(OutputPathError) as info:
        save_graph_def(_small_graph(), str(out))
    assert "No space left on device" in info.value.problem and info.value.fix
    assert out.read_bytes() == b"previous version"  # the old file is untouched
    assert sorted(os.listdir(tmp_path)) == ["model.pb"]  # no temporary left behind


def test_save_reports_a_directory_it_cannot_create_files_in(tmp_path, monkeypatch):
    import tempfile

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    with pytest.raises(OutputPathError, match="Permission denied"):
        save_graph_def(_small_graph(), str(tmp_path / "model.pb"))
    assert os.listdir(tmp_path) == []


def test_save_refuses_to_overwrite_the_input(tmp_path, monkeypatch):
    src = tmp_path / "model.pb"
    save_graph_def(_small_graph(), str(src))
    before = src.read_bytes()
    link = tmp_path / "link.pb"
    link.symlink_to(src)
    monkeypatch.chdir(tmp_path)
    for target in (str(src), "model.pb", os.path.join(str(tmp_path), ".", "model.pb"), str(link)):
        with pytest.raises(OutputPathError, match="is the input file; refusing to overwrite it"):
            save_graph_def(_small_graph(), target, input_path=str(src))
    assert src.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["link.pb", "model.pb"]


@pytest.mark.parametrize("where, needle", [
    (lambda p: p, "is a directory"),
    (lambda p: p / "missing_dir" / "out.pb", "does not exist"),
    (lambda p: p / "a_file" / "out.pb", "is a file, not a directory"),
])
def test_save_refuses_unusable_paths(tmp_path, where, needle):
    (tmp_path / "a_file").write_bytes(b"x")
    with pytest.raises(OutputPathError, match=needle) as info:
        save_graph_def(_small_graph(), str(where(tmp_path)))
    assert info.value.fix
    assert sorted(os.listdir(tmp_path)) == ["a_file"]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root writes into read-only directories, so there is nothing to refuse")
def test_save_refuses_a_read_only_directory(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(OutputPathError, match="permission denied"):
            save_graph_def(_small_graph(), str(ro / "out.pb"))
        assert os.listdir(ro) == []
    finally:
        ro.chmod(0o700)


def test_saved_graph_runs_the_same(tmp_path):
    t = tf()
    gd, outs = build_graph(lambda x: t.nn.relu(x * 2.0 - 1.0, name="out"), x=[3])
    save_graph_def(gd, str(tmp_path / "g.pb"))
    from graphquant.execute import run_graph

    x = np.array([-1.0, 0.5, 2.0], np.float32)
    got = run_graph(load_graph_def(str(tmp_path / "g.pb")), {"x:0": x}, outs)[0]
    np.testing.assert_array_equal(got, run_graph(gd, {"x:0": x}, outs)[0])


def test_shapes_are_inferred_on_the_light_copy_as_on_the_graph():
    from graphquant.execute import import_graph, tensor_shapes
    from graphquant.graph_io import light_copy

    w = np.random.default_rng(0).normal(size=(3, 3, 8, 16)).astype(np.float32)  # > 1 KB: light
    t = tf()
    gd, _ = build_graph(lambda x: t.reshape(t.nn.relu(t.nn.conv2d(x, t.constant(w), 2, "SAME")),
                                            [-1, 16 * 4 * 4]), x=[None, 8, 8, 8])
    light = light_copy(gd)
    assert light.ByteSize() < gd.ByteSize() // 4
    before = gd.SerializeToString(deterministic=True)
    shapes = tensor_shapes(gd)
    assert gd.SerializeToString(deterministic=True) == before
    graph = import_graph(gd)
    full = {op.name: (None if op.outputs[0].shape.rank is None else op.outputs[0].shape.as_list())
            for op in graph.get_operations() if op.outputs}
    assert shapes == full and shapes["Reshape"] == [None, 256]
