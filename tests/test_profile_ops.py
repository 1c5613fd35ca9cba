"""tools/profile_ops.py on a tiny model: per-node and per-op times that add up (no timing bound)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from graphquant.graph_io import save_graph_def
from graphquant.runtime import tf
from helpers import ROOT, build_graph
from tools import profile_ops


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    t = tf()
    w = np.random.RandomState(0).randn(3, 3, 4, 8).astype(np.float32)
    graph_def = build_graph(
        lambda x: t.nn.relu(t.nn.conv2d(x, t.constant(w), 1, "SAME"), name="out"),
        x=[2, 16, 16, 4])[0]
    path = str(tmp_path_factory.mktemp("prof") / "tiny.pb")
    save_graph_def(graph_def, path)
    return path


def test_profile_counts_every_traced_node_once(tiny):
    r = profile_ops.profile(tiny, warmup=1, runs=2)
    assert r["batch"] == 2 and r["runs"] == 2
    assert any("Conv2D" in n["op"] for n in r["nodes"].values())
    assert sum(e["count"] for e in r["ops"].values()) == len(r["nodes"])
    assert r["total_ms"] == pytest.approx(sum(e["ms"] for e in r["ops"].values()))
    assert all(n["ms"] >= 0 for n in r["nodes"].values())
    table = profile_ops.format_table([r, r])
    assert "slowest nodes:" in table and "1.00x" in table


def test_cli_writes_json_and_rejects_bad_arguments(tiny, tmp_path):
    out = tmp_path / "p.json"
    run = subprocess.run([sys.executable, "tools/profile_ops.py", tiny, "--runs=1", "--warmup=1",
                          f"--json_out={out}"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert json.loads(out.read_text())[0]["graph"] == tiny
    bad = subprocess.run([sys.executable, "tools/profile_ops.py", tiny, "--outputs=nope:0"],
                         cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "error:" in bad.stderr and "Traceback" not in bad.stderr
