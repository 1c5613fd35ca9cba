"""Where a graph spends its time, per op type and per node (TensorFlow step stats).

    python tools/profile_ops.py int8.pb                       # one graph
    python tools/profile_ops.py fp32.pb int8.pb --runs=10     # both, side by side per op type
    python tools/profile_ops.py int8.pb --json_out=prof.json

Each graph runs ``--warmup`` times untraced, then ``--runs`` times with a full
trace (``RunOptions(trace_level=FULL_TRACE)``); a node's time is the median of
its traced op times.  Tracing adds its own overhead, so the totals are op
times, not latencies: use tools/benchmark.py for speed-ups and this tool to
see which ops the time goes to.  Inputs as in tools/benchmark.py
(``--data=random`` seeded, or a .npy/.npz/image folder).
"""

from __future__ import annotations

import collections
import os
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools import common  # noqa: E402  (imports graphquant first)
from tools.benchmark import fixed_batch, input_specs, make_feeds  # noqa: E402

from graphquant.graph_io import load_graph_def  # noqa: E402


def _op_of(node_stats) -> str:
    """The kernel's op type (after TensorFlow's own rewrites, e.g. _MklNativeFusedConv2D)."""
    label = node_stats.timeline_label or ""
    if " = " in label:
        return label.split(" = ", 1)[1].split("(", 1)[0].strip()
    return label.split("(", 1)[0].strip() or node_stats.node_name


def profile(pb_path: str, batch: Optional[int] = None, threads: int = 2, warmup: int = 3,
            runs: int = 5, data: str = "random", image_spec: Optional[str] = None,
            inputs: Sequence[str] = (), outputs: Sequence[str] = ()) -> Dict:
    """{"nodes": {name: {"op", "ms"}}, "ops": {op: {"ms", "count"}}, "total_ms"} of one graph."""
    from graphquant.execute import import_graph
    from graphquant.runtime import tf

    t = tf()
    graph_def = load_graph_def(pb_path, validate=False)
    ins, outs, _ = common.graph_interface(pb_path, graph_def, inputs, outputs)
    specs = input_specs(graph_def, ins)
    batch = batch or fixed_batch(specs) or 1
    feeds = make_feeds(specs, batch, data, image_spec, graph_def)
    config = t.compat.v1.ConfigProto(intra_op_parallelism_threads=threads,
                                     inter_op_parallelism_threads=1)
    times: Dict[str, List[float]] = collections.defaultdict(list)
    ops: Dict[str, str] = {}
    with t.compat.v1.Session(graph=import_graph(graph_def), config=config) as sess:
        for _ in range(warmup):
            sess.run(outs, feeds)
        options = t.compat.v1.RunOptions(trace_level=t.compat.v1.RunOptions.FULL_TRACE)
        for _ in range(runs):
            meta = t.compat.v1.RunMetadata()
            sess.run(outs, feeds, options=options, run_metadata=meta)
            for device in meta.step_stats.dev_stats:
                for ns in device.node_stats:
                    times[ns.node_name].append(
                        (ns.op_end_rel_micros - ns.op_start_rel_micros) / 1000.0)
                    ops[ns.node_name] = _op_of(ns)
    nodes = {name: {"op": ops[name], "ms": float(np.median(v))} for name, v in times.items()}
    by_op: Dict[str, Dict] = {}
    for node in nodes.values():
        entry = by_op.setdefault(node["op"], {"ms": 0.0, "count": 0})
        entry["ms"] += node["ms"]
        entry["count"] += 1
    return {"graph": pb_path, "batch": batch, "threads": threads, "runs": runs,
            "total_ms": sum(n["ms"] for n in nodes.values()), "ops": by_op, "nodes": nodes}


def format_table(results: Sequence[Dict], top: int = 15) -> str:
    lines = []
    for r in results:
        lines.append(f"{r['graph']}: batch {r['batch']}, {r['threads']} threads, op time "
                     f"{r['total_ms']:.2f} ms (median of {r['runs']} traced runs per node)")
        lines.append(f"  {'op':<36} {'ms':>9} {'share':>6} {'nodes':>6}")
        for op, e in sorted(r["ops"].items(), key=lambda kv: (-kv[1]["ms"], kv[0]))[:top]:
            share = 100.0 * e["ms"] / max(r["total_ms"], 1e-9)
            lines.append(f"  {op:<36} {e['ms']:>9.3f} {share:>5.1f}% {e['count']:>6}")
        lines.append("  slowest nodes:")
        for name, n in sorted(r["nodes"].items(), key=lambda kv: (-kv[1]["ms"], kv[0]))[:top]:
            lines.append(f"    {n['ms']:>8.3f} ms  {n['op']:<28} {name}")
        lines.append("")
    if len(results) == 2 and results[1]["total_ms"] > 0:
        lines.append(f"op time {results[0]['graph']} / {results[1]['graph']}: "
                     f"{results[0]['total_ms'] / results[1]['total_ms']:.2f}x")
    return "\n".join(lines)


def main(argv):
    from absl import flags

    f = flags.FLAGS
    paths = common.graph_paths(argv, "GRAPH.pb [GRAPH2.pb]",
                               "python tools/profile_ops.py fp32.pb int8.pb")
    results = [profile(path, f.batch, f.threads, f.warmup, f.runs, f.data, f.image_spec,
                       common.split_names(f.inputs), common.split_names(f.outputs))
               for path in paths]
    print(format_table(results, f.top))
    if f.json_out:
        common.write_json(f.json_out, results)
        print(f"wrote {f.json_out}")


def define_flags():
    from absl import flags

    flags.DEFINE_integer("batch", None, "batch size (default: the graph's fixed batch, else 1)")
    flags.DEFINE_integer("threads", 2, "TensorFlow intra-op threads")
    flags.DEFINE_integer("warmup", 3, "untraced runs first")
    flags.DEFINE_integer("runs", 5, "traced runs (a node's time is its median)")
    flags.DEFINE_integer("top", 15, "rows per table")
    common.define_data_flags()


if __name__ == "__main__":
    common.run_app(main, define_flags)
