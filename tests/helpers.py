"""Helpers for tests: build tiny graphs with TensorFlow ops, load the shared real models."""

from __future__ import annotations

import json
import os

import numpy as np

import graphquant  # noqa: F401
from graphquant.runtime import tf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("GRAPHQUANT_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))
SHARED_MODELS = os.path.join(SHARED, "models")

# name -> inputs .npy (first axis = samples, each graph takes a batch of 1)
REAL_MODELS = {
    "basic_pitch_nmp": "basic_pitch_input.npy",
    "fer_mini_xception": "fer_inputs_101.npy",
    "fer_mini_xception_tfkeras": "fer_inputs_101.npy",
    "mtcnn_onet": "mtcnn_onet_inputs.npy",
    "mtcnn_pnet": "mtcnn_pnet_inputs.npy",
    "mtcnn_rnet": "mtcnn_rnet_inputs.npy",
    "musicnn_MTT_musicnn": "musicnn_input.npy",
    "musicnn_MTT_vgg": "musicnn_input.npy",
    "rapidocr_cls_mobile_v2": "rapidocr_cls_mobile_v2_input_nhwc.npy",
    "rapidocr_det_ppocrv4": "rapidocr_det_ppocrv4_input_nhwc.npy",
}


def real_model(name: str):
    """(pb path, metadata dict, input samples array) of a model in ../shared/models."""
    pb = os.path.join(SHARED_MODELS, name + ".pb")
    with open(os.path.join(SHARED_MODELS, name + ".json")) as f:
        meta = json.load(f)
    samples = np.load(os.path.join(SHARED_MODELS, REAL_MODELS[name]))
    return pb, meta, samples


def build_graph(fn, **inputs):
    """GraphDef of ``fn(**placeholders)``; ``inputs`` maps names to shapes (float32).

    ``fn`` builds ops with ``tf.*`` and returns the output tensor(s); constants
    made with ``tf.constant`` become Const nodes.  Returns (graph_def, output
    tensor names).
    """
    t = tf()
    graph = t.Graph()
    with graph.as_default():
        phs = {name: t.compat.v1.placeholder(t.float32, shape, name=name)
               for name, shape in inputs.items()}
        outs = fn(**phs)
        if not isinstance(outs, (list, tuple)):
            outs = [outs]
    return graph.as_graph_def(), [o.name for o in outs]


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def run_in_fresh_python(graph_def, x: np.ndarray, fetch: str, tmp_path) -> dict:
    """Run ``graph_def`` on ``{'x:0': x}`` in a new ``python`` that imports TensorFlow itself
    (no graphquant), once with TF_ENABLE_ONEDNN_OPTS unset and once with it 0: the setting
    (None or "0") -> the fetched array.  A failing process fails the test with its stderr."""
    import subprocess
    import sys

    from graphquant.graph_io import save_graph_def

    path, x_path = os.path.join(tmp_path, "fresh.pb"), os.path.join(tmp_path, "fresh_x.npy")
    save_graph_def(graph_def, path)
    np.save(x_path, x)
    code = (
        "import numpy as np, tensorflow as tf\n"
        f"gd = tf.compat.v1.GraphDef(); gd.ParseFromString(open({path!r}, 'rb').read())\n"
        "g = tf.Graph()\n"
        "with g.as_default(): tf.graph_util.import_graph_def(gd, name='')\n"
        f"x = np.load({x_path!r})\n"
        f"print(tf.compat.v1.Session(graph=g).run({fetch!r}, {{'x:0': x}}).tolist())\n")
    results = {}
    for setting in (None, "0"):
        env = {k: v for k, v in os.environ.items() if not k.startswith("TF_ENABLE_ONEDNN")}
        if setting is not None:
            env["TF_ENABLE_ONEDNN_OPTS"] = setting
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        results[setting] = np.array(json.loads(r.stdout.strip().splitlines()[-1]))
    return results
