"""tools/evaluate.py on tiny graphs: metrics equal those computed directly, labels, CLI, errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from graphquant import metrics
from graphquant.errors import GraphQuantError
from graphquant.execute import run_graph
from graphquant.graph_io import save_graph_def
from graphquant.runtime import tf
from helpers import ROOT, SHARED, build_graph
from tools import evaluate

IMAGENET = os.path.join(SHARED, "data", "imagenet-samples")
RNG = np.random.RandomState(0)
W_CONV = RNG.randn(3, 3, 3, 4).astype(np.float32)
W_FC = RNG.randn(4, 1000).astype(np.float32)


def _classifier(noise=0.0):
    """input (1, 8, 8, 3) -> conv -> relu -> mean -> matmul (1000 classes); weights + noise."""
    t = tf()
    fc = W_FC + noise * np.random.RandomState(1).randn(*W_FC.shape).astype(np.float32)

    def fn(input):
        y = t.nn.relu(t.nn.conv2d(input, t.constant(W_CONV), 1, "SAME"))
        y = t.reduce_mean(y, axis=[1, 2])
        return t.identity(t.matmul(y, t.constant(fc)), name="scores")

    return build_graph(fn, input=[1, 8, 8, 3])[0]


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    paths = []
    for name, noise in (("fp32.pb", 0.0), ("int8.pb", 0.05)):
        path = str(d / name)
        save_graph_def(_classifier(noise), path)
        paths.append(path)
    x = RNG.randn(12, 8, 8, 3).astype(np.float32)
    npy = str(d / "x.npy")
    np.save(npy, x)
    return paths[0], paths[1], npy, x


def test_metrics_match_a_direct_computation(graphs):
    ref, cand, npy, x = graphs
    result = evaluate.evaluate(ref, cand, data=npy, progress=False)
    assert result["data"]["samples"] == 12 and result["data"]["split"] == "all"
    assert list(result["outputs"]) == ["scores:0"]

    def outputs(path):
        from graphquant.graph_io import load_graph_def

        g = load_graph_def(path)
        return np.concatenate([run_graph(g, {"input:0": s[None]}, ["scores:0"])[0] for s in x])

    expected = metrics.compare_outputs(outputs(ref), outputs(cand))
    got = result["outputs"]["scores:0"]
    for key in ("relative_l2", "sqnr_db", "top1_agreement", "top5_agreement"):
        assert got[key] == pytest.approx(expected[key], rel=1e-9), key
    assert got["cosine"]["mean"] == pytest.approx(expected["cosine"]["mean"])
    assert 0 < got["relative_l2"] < 1  # the candidate really differs
    assert "reference_top1_accuracy" not in got  # no labels for a .npy


def test_identical_graphs_agree_exactly(graphs):
    ref, _, npy, _ = graphs
    got = evaluate.evaluate(ref, ref, data=npy, limit=5, progress=False)["outputs"]["scores:0"]
    assert got["relative_l2"] == 0.0 and got["sqnr_db"] == float("inf")
    assert got["top1_agreement"] == 1.0 and got["shape"] == [5, 1000]


@pytest.mark.skipif(not os.path.isdir(IMAGENET), reason="imagenet samples not present")
def test_imagenet_folder_split_and_labels(graphs):
    ref, cand, _, _ = graphs
    spec = "size=8,8;shorter=10;mean=127.5;scale=1/127.5"
    result = evaluate.evaluate(ref, cand, data=IMAGENET, image_spec=spec, limit=6,
                               progress=False)
    assert result["data"]["split"] == "eval" and result["data"]["samples"] == 6
    assert "files 100..105" in result["data"]["source"]
    files = sorted(f for f in os.listdir(IMAGENET) if f.endswith(".JPEG"))
    synsets = sorted({f.split("_")[0] for f in files})
    labels = np.array([synsets.index(f.split("_")[0]) for f in files[100:106]])
    assert labels.tolist() == list(range(100, 106))  # one image per class, sorted

    from graphquant.calib_data import ImageSpec, load_image
    from graphquant.graph_io import load_graph_def

    images = np.stack([load_image(os.path.join(IMAGENET, f), ImageSpec.parse(spec), 8, 8)
                       for f in files[100:106]])
    scores = np.concatenate([run_graph(load_graph_def(ref), {"input:0": s[None]},
                                       ["scores:0"])[0] for s in images])
    out = result["outputs"]["scores:0"]
    assert out["reference_top1_accuracy"] == pytest.approx(metrics.topk_accuracy(scores, labels))
    assert out["reference_top5_accuracy"] == pytest.approx(
        metrics.topk_accuracy(scores, labels, 5))
    assert "candidate_top1_accuracy" in out

    calib = evaluate.evaluate(ref, None, data=IMAGENET, image_spec=spec, split="calib",
                              limit=3, progress=False)
    assert "files 0..2" in calib["data"]["source"]
    assert set(calib["outputs"]["scores:0"]) >= {"reference_top1_accuracy", "shape"}


def test_errors(graphs, tmp_path):
    ref, _, npy, _ = graphs
    other = str(tmp_path / "other.pb")
    save_graph_def(build_graph(lambda a: tf().identity(a * 2.0, name="b"), a=[1, 3])[0], other)
    with pytest.raises(GraphQuantError, match="lacks tensor"):
        evaluate.evaluate(ref, other, data=npy, progress=False)
    with pytest.raises(GraphQuantError, match="no --data"):
        evaluate.evaluate(ref, None, progress=False)
    with pytest.raises(GraphQuantError, match="unknown split"):
        evaluate.split_window("test", None)


def test_command_line_table_and_json(graphs, tmp_path):
    ref, cand, npy, _ = graphs
    out = str(tmp_path / "r.json")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "evaluate.py"), ref, cand,
                           f"--data={npy}", f"--json_out={out}", "--limit=4"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "SQNR dB" in proc.stdout and "scores:0" in proc.stdout
    assert "evaluating" in proc.stderr  # progress
    with open(out) as f:
        result = json.load(f)
    assert set(result) >= {"reference", "candidate", "data", "outputs", "environment"}
    assert result["data"]["samples"] == 4


def test_softmax_outputs_are_also_compared_on_their_logits(tmp_path):
    """A Softmax output gets a second comparison on the logits it reads: the same
    metrics as computing them directly on the logits tensor of both graphs."""
    from graphquant.graph_io import load_graph_def

    t = tf()
    paths = []
    for name, noise in (("ref.pb", 0.0), ("cand.pb", 0.05)):
        fc = W_FC + noise * np.random.RandomState(2).randn(*W_FC.shape).astype(np.float32)

        def fn(input, fc=fc):
            y = t.reduce_mean(t.nn.relu(t.nn.conv2d(input, t.constant(W_CONV), 1, "SAME")),
                              axis=[1, 2])
            return t.nn.softmax(t.matmul(y, t.constant(fc), name="logits"), name="probs")

        path = str(tmp_path / name)
        save_graph_def(build_graph(fn, input=[1, 8, 8, 3])[0], path)
        paths.append(path)
    x = RNG.randn(6, 8, 8, 3).astype(np.float32)
    npy = str(tmp_path / "x.npy")
    np.save(npy, x)
    result = evaluate.evaluate(*paths, data=npy, outputs=["probs:0"], progress=False)
    assert list(result["outputs"]) == ["probs:0"]
    assert result["logits"]["probs:0"]["tensor"] == "logits:0"

    def logits(path):
        g = load_graph_def(path)
        return np.concatenate([run_graph(g, {"input:0": s[None]}, ["logits:0"])[0] for s in x])

    expected = metrics.compare_outputs(logits(paths[0]), logits(paths[1]))
    assert result["logits"]["probs:0"]["relative_l2"] == pytest.approx(
        expected["relative_l2"], rel=1e-9)
    assert 0 < expected["relative_l2"] < 1
    assert "logits of probs:0" in evaluate.format_table(result)
    # a graph without a Softmax has no logits entry
    assert "logits" not in evaluate.evaluate(paths[0], paths[1], data=npy,
                                             outputs=["logits:0"], progress=False)
