"""tools/export.py: Keras 3 (.keras), tf_keras (.h5) and SavedModel -> frozen GraphDef."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from graphquant.errors import GraphQuantError
from graphquant.execute import run_graph
from graphquant.graph import VARIABLE_OPS
from graphquant.graph_io import load_graph_def
from graphquant.runtime import tf
from helpers import ROOT, rel_l2
from tools import export

X = np.random.RandomState(0).randn(3, 8, 8, 3).astype(np.float32)


def _tiny(keras):
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3)(inp)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, keras.layers.Dense(5)(x))


@pytest.fixture(scope="module")
def keras3_file(tmp_path_factory):
    tf()
    import keras

    model = _tiny(keras)
    path = str(tmp_path_factory.mktemp("k3") / "tiny.keras")
    model.save(path)
    return path, np.asarray(model(X, training=False))


@pytest.fixture(scope="module")
def tfkeras_file(tmp_path_factory):
    tf()
    import tf_keras

    model = _tiny(tf_keras)
    path = str(tmp_path_factory.mktemp("k2") / "tiny.h5")
    model.save(path)
    return path, np.asarray(model(X, training=False))


def _ops(path):
    return {n.op for n in load_graph_def(path).node}


def test_keras3_fixed_and_dynamic_batch(keras3_file, tmp_path):
    path, expected = keras3_file
    out = str(tmp_path / "fixed.pb")
    info = export.export(path, out, batch=1)
    assert info["source"] == "keras3"
    assert info["inputs"] == [["input:0", [1, 8, 8, 3]]]
    assert info["outputs"][0][1] == [1, 5]
    graph_def = load_graph_def(out)  # validates: frozen, no dangling inputs
    assert not {n.op for n in graph_def.node} & VARIABLE_OPS
    assert "Rsqrt" in _ops(out)  # Keras 3 decomposes batch-norm
    got = np.concatenate([run_graph(graph_def, {"input:0": X[i:i + 1]}, [info["outputs"][0][0]])[0]
                          for i in range(3)])
    assert rel_l2(got, expected) < 1e-5

    dyn = str(tmp_path / "dyn.pb")
    info = export.export(path, dyn, batch=None)
    assert info["inputs"][0][1] == [None, 8, 8, 3]
    got = run_graph(load_graph_def(dyn), {"input:0": X}, [info["outputs"][0][0]])[0]
    assert rel_l2(got, expected) < 1e-5


def test_tf_keras_h5_keeps_fused_batchnorm(tfkeras_file, tmp_path):
    path, expected = tfkeras_file
    out = str(tmp_path / "m.pb")
    info = export.export(path, out, batch=3, write_json=True)
    assert info["source"] == "tf_keras"
    assert "FusedBatchNormV3" in _ops(out)
    got = run_graph(load_graph_def(out), {"input:0": X}, [info["outputs"][0][0]])[0]
    assert rel_l2(got, expected) < 1e-5
    with open(str(tmp_path / "m.json")) as f:
        meta = json.load(f)
    assert meta["inputs"] == [["input:0", [3, 8, 8, 3]]] and meta["pb"] == "m.pb"


def test_saved_model_signature(tmp_path):
    t = tf()

    class Module(t.Module):
        def __init__(self):
            super().__init__()
            self.w = t.Variable(np.arange(6, dtype=np.float32).reshape(3, 2))

        @t.function(input_signature=[t.TensorSpec([None, 3], t.float32, name="features")])
        def __call__(self, features):
            return {"scores": t.matmul(features, self.w)}

    module = Module()
    saved = str(tmp_path / "sm")
    t.saved_model.save(module, saved, signatures=module.__call__)
    out = str(tmp_path / "sm.pb")
    info = export.export(saved, out, batch=2)
    assert info["source"] == "saved_model"
    assert info["inputs"] == [["features:0", [2, 3]]]
    x = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], np.float32)
    got = run_graph(load_graph_def(out), {"features:0": x}, [info["outputs"][0][0]])[0]
    np.testing.assert_allclose(got, x @ np.arange(6, dtype=np.float32).reshape(3, 2))

    with pytest.raises(GraphQuantError, match="no signature 'other'"):
        export.export(saved, str(tmp_path / "x.pb"), signature="other")


def test_clear_errors(tmp_path, keras3_file):
    with pytest.raises(GraphQuantError, match="does not exist"):
        export.export(str(tmp_path / "missing.keras"), str(tmp_path / "o.pb"))
    with pytest.raises(GraphQuantError, match="without saved_model.pb"):
        export.export(str(tmp_path), str(tmp_path / "o.pb"))
    with pytest.raises(GraphQuantError, match="not a positive integer"):
        export.parse_batch("sixteen")
    assert export.parse_batch("dynamic") is None and export.parse_batch("16") == 16
    assert not os.path.exists(str(tmp_path / "o.pb"))


def test_command_line_prints_names(keras3_file, tmp_path):
    path, _ = keras3_file
    out = str(tmp_path / "cli.pb")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "export.py"), path,
                           "-o", out, "--batch=dynamic"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "input   input:0" in proc.stdout and "[None, 8, 8, 3]" in proc.stdout
    assert "output  Identity:0" in proc.stdout
    assert os.path.exists(out)
