"""--saved_model DIR: a SavedModel with a serving signature that plain TensorFlow loads and runs.

The SavedModels are written by ``graphquant convert`` (in-process) and loaded
in a FRESH Python with default TensorFlow settings (no graphquant import, no
TF_ENABLE_ONEDNN_OPTS) through ``tf.saved_model.load``; its outputs are
compared with the int8 GraphDef run here.  One child process loads every
SavedModel of the test (TensorFlow's start-up dominates).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from graphquant import cli
from graphquant.errors import OutputPathError
from graphquant.execute import run_graph
from graphquant.graph_io import load_graph_def
from graphquant.runtime import tf
from graphquant.saved_model import check_saved_model_path, signature_key, signature_keys
from helpers import ROOT, build_graph, rel_l2

MODEL = os.path.join(ROOT, "models", "fer_mini_xception.pb")
INPUTS = os.path.join(ROOT, "models", "fer_mini_xception_inputs.npy")

CHILD = r"""
import json, sys
import numpy as np
import tensorflow as tf
jobs = json.loads(sys.argv[1])
for job in jobs:
    model = tf.saved_model.load(job["dir"])
    fn = model.signatures["serving_default"]
    feeds = dict(np.load(job["feeds"]))
    out = fn(**{k: tf.constant(v) for k, v in feeds.items()})
    np.savez(job["result"], **{k: v.numpy() for k, v in out.items()})
    print(job["dir"], sorted(out), flush=True)
"""


def _two_inputs_dynamic_batch(**phs):
    t = tf()
    a, b = phs["scope/a"], phs["b"]
    w = t.constant(np.random.RandomState(0).randn(3, 3, 3, 4).astype(np.float32) * 0.3)
    y = t.nn.relu(t.nn.conv2d(a, w, 1, "SAME")) + b
    return [t.identity(y, name="out/sum"), t.reduce_max(y, axis=[1, 2], name="peak")]


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """[(SavedModel dir, int8 GraphDef, feeds by tensor name, fetches, keys)] + child outputs."""
    tmp = tmp_path_factory.mktemp("saved_models")
    cases = []
    # 1. the bundled real model, fixed batch 1
    sm = tmp / "fer_sm"
    assert cli.main(["convert", MODEL, "-o", str(tmp / "fer.pb"), "--calib", INPUTS,
                     "--saved_model", str(sm)]) == 0
    faces = np.load(INPUTS)[:1]
    cases.append((sm, load_graph_def(str(tmp / "fer.pb")), {"input:0": faces},
                  ["Identity:0"]))
    # 2. two inputs (one in a name scope), a dynamic batch, two outputs
    graph_def, _ = build_graph(_two_inputs_dynamic_batch, **{"scope/a": [None, 6, 6, 3],
                                                             "b": [None, 6, 6, 4]})
    (tmp / "two.pb").write_bytes(graph_def.SerializeToString())
    rng = np.random.RandomState(1)
    np.savez(tmp / "two.npz", **{"scope/a": rng.rand(5, 6, 6, 3).astype(np.float32),
                                 "b": rng.rand(5, 6, 6, 4).astype(np.float32)})
    sm2 = tmp / "two_sm"
    sm2.mkdir()                                        # an existing empty directory is fine
    assert cli.main(["convert", str(tmp / "two.pb"), "-o", str(tmp / "two_int8.pb"),
                     "--calib", str(tmp / "two.npz"), "--outputs", "out/sum:0,peak:0",
                     "--saved_model", str(sm2)]) == 0
    feeds = {"scope/a:0": rng.rand(3, 6, 6, 3).astype(np.float32),       # batch 3
             "b:0": rng.rand(3, 6, 6, 4).astype(np.float32)}
    cases.append((sm2, load_graph_def(str(tmp / "two_int8.pb")), feeds, ["out/sum:0", "peak:0"]))

    jobs = []
    for i, (directory, _, feeds, fetches) in enumerate(cases):
        keys = signature_keys([name.split(":")[0] for name in feeds], fetches)
        by_tensor = {v: k for k, v in keys["inputs"].items()}
        np.savez(tmp / f"feeds{i}.npz", **{by_tensor[n]: v for n, v in feeds.items()})
        jobs.append({"dir": str(directory), "feeds": str(tmp / f"feeds{i}.npz"),
                     "result": str(tmp / f"result{i}.npz")})
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_ENABLE_ONEDNN_OPTS", "PYTHONPATH")}     # TensorFlow's defaults
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(jobs)], env=env,
                          capture_output=True, text=True, timeout=600, cwd=str(tmp))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [dict(np.load(job["result"])) for job in jobs]
    return cases, results


def test_fresh_process_runs_the_saved_models_like_the_graph(saved_models):
    cases, results = saved_models
    for (_, int8, feeds, fetches), result in zip(cases, results):
        keys = signature_keys([n.split(":")[0] for n in feeds], fetches)["outputs"]
        want = run_graph(int8, feeds, fetches)
        assert sorted(result) == sorted(keys)
        for key, tensor in keys.items():
            got = result[key]
            expected = want[fetches.index(tensor)]
            assert got.shape == expected.shape
            assert rel_l2(got, expected) < 1e-5      # same int8 kernels; fp32 ops may differ
                                                      # in the last bit with oneDNN off


def test_signature_keys_are_named_after_the_graph_tensors(saved_models):
    cases, results = saved_models
    assert sorted(results[0]) == ["Identity"]
    assert sorted(results[1]) == ["out_sum", "peak"]
    assert signature_keys(["scope/a", "b"], ["out/sum:0", "peak:0"]) == {
        "inputs": {"scope_a": "scope/a:0", "b": "b:0"},
        "outputs": {"out_sum": "out/sum:0", "peak": "peak:0"}}


@pytest.mark.parametrize("name, is_output, key", [
    ("logits:0", True, "logits"), ("split:1", True, "split_1"), ("model/input", False,
                                                                   "model_input"),
    ("1st", False, "t_1st"), ("a.b-c", False, "a_b_c")])
def test_signature_key(name, is_output, key):
    assert signature_key(name, is_output) == key


def test_clashing_keys_get_a_suffix():
    keys = signature_keys(["a/b", "a_b"], ["a/b:1", "a_b_1:0"])
    assert sorted(keys["inputs"]) == ["a_b", "a_b_2"]
    assert sorted(keys["outputs"]) == ["a_b_1", "a_b_1_2"]


def test_saved_model_directory_checks(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    (tmp_path / "file").write_text("x")
    for path, needle in ((tmp_path / "full", "not empty"), (tmp_path / "file", "is a file"),
                         (tmp_path / "no" / "dir", "does not exist"), ("", "no SavedModel")):
        with pytest.raises(OutputPathError, match=needle):
            check_saved_model_path(str(path))
    check_saved_model_path(str(tmp_path / "new"))          # fine, and creates nothing
    assert sorted(os.listdir(tmp_path)) == ["file", "full"]
