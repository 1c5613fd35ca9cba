"""convert end to end on a real model: every conv int8, fidelity, determinism, fresh process."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from graphquant.convert import convert, graph_info
from graphquant.errors import CalibrationDataError
from graphquant.execute import GraphRunner
from graphquant.graph_io import load_graph_def, save_graph_def
from helpers import ROOT, rel_l2, run_in_fresh_python

MODEL = os.path.join(ROOT, "models", "fer_mini_xception.pb")
INPUTS = os.path.join(ROOT, "models", "fer_mini_xception_inputs.npy")


@pytest.fixture(scope="module")
def converted():
    samples = np.load(INPUTS)
    return convert(MODEL, list(samples[:16]), target="avx2"), samples


def test_every_conv_is_int8_and_the_report_says_so(converted):
    result, _ = converted
    counts = result.report.compute_counts()
    assert counts["Conv2D"] == {"int8": 15, "fp32": 0}
    assert counts["DepthwiseConv2dNative"] == {"int8": 8, "fp32": 0}
    ops = {n.op for n in result.graph_def.node}
    assert not ops & {"Conv2D", "DepthwiseConv2dNative", "MaxPool"}
    left = {f["op"] for f in result.report.fp32}
    assert left <= {"AddV2", "Mean", "Softmax", "Pad"}     # Pad, AddV2: shifts (issue 6)
    assert all(f["reason"] for f in result.report.fp32)
    info = graph_info(result.graph_def)
    assert info["target"] == "avx2" and info["weight_max_level"] == 63
    assert result.report.bytes_after < 0.5 * result.report.bytes_before


def test_outputs_close_to_fp32_on_held_out_faces(converted):
    result, samples = converted
    fp32 = GraphRunner(load_graph_def(MODEL), ["Identity:0"])
    int8 = GraphRunner(result.graph_def, ["Identity:0"])
    errs = [rel_l2(int8({"input:0": x[None]})[0], fp32({"input:0": x[None]})[0])
            for x in samples[16:]]
    assert np.mean(errs) < 0.1


def test_conversion_is_deterministic(converted):
    result, samples = converted
    again = convert(MODEL, list(samples[:16]), target="avx2")
    assert again.graph_def.SerializeToString(deterministic=True) == \
        result.graph_def.SerializeToString(deterministic=True)


def test_converted_graph_runs_in_a_fresh_default_python(converted, tmp_path):
    """A user's plain `python` with default TensorFlow settings runs the int8 graph."""
    result, samples = converted
    path = tmp_path / "int8.pb"
    save_graph_def(result.graph_def, str(path))
    np.save(tmp_path / "x.npy", samples[:2])
    code = (
        "import numpy as np, tensorflow as tf\n"
        f"gd = tf.compat.v1.GraphDef(); gd.ParseFromString(open({str(path)!r}, 'rb').read())\n"
        "g = tf.Graph()\n"
        "with g.as_default(): tf.graph_util.import_graph_def(gd, name='')\n"
        "s = tf.compat.v1.Session(graph=g)\n"
        f"x = np.load({str(tmp_path / 'x.npy')!r})\n"
        "print(s.run('Identity:0', {'input:0': x[:1]}).tolist())\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_ENABLE_ONEDNN")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    probs = np.array(json.loads(r.stdout.strip().splitlines()[-1]))
    expect = GraphRunner(result.graph_def, ["Identity:0"])({"input:0": samples[:1]})[0]
    np.testing.assert_allclose(probs, expect, atol=1e-6)


def test_bad_calibration_data_fails_before_any_work():
    bad = np.load(INPUTS)[:4].copy()
    bad[2, 5, 5, 0] = np.nan
    with pytest.raises(CalibrationDataError, match="NaN"):
        convert(MODEL, list(bad))


def test_every_emitted_op_runs_in_a_fresh_default_python(tmp_path):
    """Conv+Sum, depthwise, matmul, both pools, concat, int32 outputs: no oneDNN setting needed."""
    from graphquant.runtime import tf
    from helpers import build_graph

    t = tf()
    rng = np.random.default_rng(0)
    c = lambda *shape: t.constant(rng.normal(0, 0.3, shape).astype(np.float32))

    def body(x):
        a = t.nn.relu(t.nn.conv2d(x, c(3, 3, 4, 8), 1, "SAME"))
        h = t.nn.relu(t.nn.conv2d(a, c(3, 3, 8, 8), 1, "SAME"))
        b = t.nn.relu(t.add(t.nn.conv2d(h, c(3, 3, 8, 8), 1, "SAME"), a))      # Sum fusion
        d = t.nn.relu(t.nn.depthwise_conv2d(b, c(3, 3, 8, 1), [1, 1, 1, 1], "SAME"))
        p = t.nn.max_pool2d(d, 2, 2, "VALID")
        q = t.nn.avg_pool2d(t.nn.relu(t.nn.conv2d(d, c(1, 1, 8, 8), 1, "SAME")), 2, 2, "VALID")
        cat = t.concat([p, q], axis=3)
        flat = t.reshape(t.nn.relu(t.nn.conv2d(cat, c(1, 1, 16, 4), 1, "SAME")), [2, -1])
        return t.nn.softmax(t.nn.bias_add(t.linalg.matmul(flat, c(64, 5)), c(5)), name="out")

    gd, outs = build_graph(body, x=[2, 8, 8, 4])
    x = rng.uniform(0, 1, [6, 2, 8, 8, 4]).astype(np.float32)
    result = convert(gd, list(x), outputs=outs, target="avx2")
    ops = {n.op for n in result.graph_def.node}
    assert {"_FusedQuantizedConv2D", "_FusedQuantizedDepthwiseConv2D", "_QuantizedMatMul",
            "QuantizedMaxPool", "QuantizedAvgPool", "ConcatV2"} <= ops
    assert not ops & {"Conv2D", "MatMul", "DepthwiseConv2dNative", "MaxPool", "AvgPool"}
    sums = [n for n in result.graph_def.node if b"Sum" in list(n.attr["fused_ops"].list.s)]
    assert len(sums) == 1
    expect = GraphRunner(result.graph_def, ["out:0"])({"x:0": x[0]})[0]
    for got in run_in_fresh_python(result.graph_def, x[0], "out:0", tmp_path).values():
        np.testing.assert_allclose(got, expect, atol=0.02)  # AvgPool rounds 1 step differently
