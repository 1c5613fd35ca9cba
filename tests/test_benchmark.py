"""tools/benchmark.py on a tiny model: it runs, interleaves, and writes the JSON it promises.

No timing assertions (the CPU is shared): only structure and consistency.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from graphquant.errors import GraphQuantError
from graphquant.graph_io import save_graph_def
from graphquant.runtime import tf
from helpers import ROOT, build_graph
from tools import benchmark

ROW_KEYS = {"variant", "batch", "threads", "median_ms", "p25_ms", "p75_ms", "min_ms", "max_ms",
            "throughput", "rounds_ms"}
FAST = dict(warmup=1, rounds=3, runs=1, progress=False)


def _conv_graph(batch):
    t = tf()
    w = np.random.RandomState(0).randn(3, 3, 4, 8).astype(np.float32)
    return build_graph(lambda x: t.nn.relu(t.nn.conv2d(x, t.constant(w), 1, "SAME"), name="out"),
                       x=[batch, 16, 16, 4])[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    paths = {}
    for name, batch in (("fixed", 2), ("dynamic", None)):
        path = str(d / f"{name}.pb")
        save_graph_def(_conv_graph(batch), path)
        paths[name] = path
    return paths


def test_pair_interleaved_with_speedups(tiny):
    result = benchmark.benchmark(tiny["fixed"], tiny["fixed"], batch_sizes=[2, 4],
                                 threads=[1, 2], **FAST)
    assert set(result) >= {"graphs", "config", "environment", "results", "speedups", "notes"}
    assert result["config"]["batch_sizes"] == [2]  # the fixed batch wins
    assert any("batch sizes 4 skipped" in n for n in result["notes"])
    rows = result["results"]
    assert len(rows) == 4  # (fp32, int8) x threads 1, 2
    for row in rows:
        assert set(row) >= ROW_KEYS and len(row["rounds_ms"]) == 3
        assert row["min_ms"] <= row["p25_ms"] <= row["median_ms"] <= row["p75_ms"] <= row["max_ms"]
        assert row["throughput"] == pytest.approx(row["batch"] * 1000 / row["median_ms"])
    by = {(r["variant"], r["threads"]): r for r in rows}
    for s in result["speedups"]:
        assert s["int8_vs_fp32"] == pytest.approx(
            by[("fp32", s["threads"])]["median_ms"] / by[("int8", s["threads"])]["median_ms"])
    assert "int8" in benchmark.format_table(result)


def test_fp32_only_dynamic_batches(tiny):
    result = benchmark.benchmark(tiny["dynamic"], None, batch_sizes=[1, 3], threads=[2], **FAST)
    assert [(r["variant"], r["batch"]) for r in result["results"]] == [("fp32", 1), ("fp32", 3)]
    assert result["graphs"]["int8"] is None
    assert all("int8_vs_fp32" not in s for s in result["speedups"])


def test_real_inputs_from_npy(tiny, tmp_path):
    npy = str(tmp_path / "x.npy")
    np.save(npy, np.random.RandomState(1).randn(3, 16, 16, 4).astype(np.float32))
    specs = benchmark.input_specs(benchmark.load_graph_def(tiny["dynamic"]), ["x:0"])
    feeds = benchmark.make_feeds(specs, 5, npy, None, benchmark.load_graph_def(tiny["dynamic"]))
    x = np.load(npy)
    np.testing.assert_array_equal(feeds["x:0"], np.concatenate([x, x])[:5])  # repeated to 5
    result = benchmark.benchmark(tiny["dynamic"], None, batch_sizes=[5], data=npy, **FAST)
    assert result["config"]["data"] == npy


def test_onednn_off_child_process(tiny):
    result = benchmark.benchmark(tiny["fixed"], tiny["fixed"], threads=[2], onednn_off=True,
                                 **FAST)
    variants = [r["variant"] for r in result["results"]]
    assert variants == ["fp32", "int8", "fp32 (oneDNN off)"]
    assert result["config"]["interleaved"] == variants
    assert all(len(r["rounds_ms"]) == FAST["rounds"] for r in result["results"])
    speed = result["speedups"][0]
    assert {"int8_vs_fp32", "fp32_onednn_on_vs_off", "int8_vs_fp32_onednn_off"} <= set(speed)


def test_command_line_writes_json(tiny, tmp_path):
    out = str(tmp_path / "b.json")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "benchmark.py"),
                           tiny["dynamic"], tiny["dynamic"], "--batch_sizes=1,2", "--rounds=2",
                           "--warmup=1", "--runs=1", f"--json_out={out}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "median ms" in proc.stdout and "rounds" in proc.stderr  # table and progress
    with open(out) as f:
        result = json.load(f)
    assert [(r["variant"], r["batch"]) for r in result["results"]] == [
        ("fp32", 1), ("int8", 1), ("fp32", 2), ("int8", 2)]


def test_errors(tiny, tmp_path):
    other = str(tmp_path / "other.pb")
    save_graph_def(build_graph(lambda a: tf().identity(a * 2.0, name="b"), a=[1, 3])[0], other)
    with pytest.raises(GraphQuantError, match="lacks tensor"):
        benchmark.benchmark(tiny["fixed"], other, **FAST)
