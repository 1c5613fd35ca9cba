"""How much faster is the int8 graph? Time fp32 and int8 graphs of one model in one process.

    python tools/benchmark.py fp32.pb int8.pb                   # batch from the graph, 2 threads
    python tools/benchmark.py fp32.pb int8.pb --batch_sizes=1,16 --threads=1,2 --onednn_off
    python tools/benchmark.py fp32.pb --json_out=fp32.json          # fp32 alone

For every (batch size, thread count): both graphs are loaded, warmed up
(``--warmup`` runs each), then timed in ``--rounds`` interleaved rounds
(fp32, int8, fp32, int8, ...), each round ``--runs`` back-to-back runs whose
mean is that round's latency.  Reported per graph: median latency over the
rounds, the interquartile range (p25..p75) and min..max, throughput
(samples/s at the median), and the int8/fp32 speed-up ``fp32 median / int8
median`` of rounds measured side by side.

The fp32 baseline is measured with oneDNN on (``TF_ENABLE_ONEDNN_OPTS=1``,
which graphquant sets before TensorFlow loads; on AMD CPUs TensorFlow's own
default is off).  ``--onednn_off`` adds the fp32 graph with oneDNN off,
labelled ``fp32 (oneDNN off)``.  The setting is read once, when TensorFlow
loads, so that graph runs in a child process started with
``TF_ENABLE_ONEDNN_OPTS=0``; the child loads and warms up its graph, then
times one round whenever this process asks, so its rounds are interleaved
with the others (fp32, int8, fp32 oneDNN off, fp32, ...) and never overlap
them.  The int8 graph is never run with oneDNN off: the legacy fused int8
kernels need it.

Inputs (``--data``): ``random`` (standard normal, seeded; default), a
``.npy``/``.npz`` file or an image folder with the graph's preprocessing spec
(read with graphquant.calib_data; the first samples are used, repeated as
needed).  A graph with a fixed batch size runs at that size only; other
``--batch_sizes`` are skipped with a note.  On a shared CPU the numbers are
noisy: look at the spread, and never compare runs from different sessions.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools import common  # noqa: E402  (imports graphquant first)

from graphquant.errors import GraphQuantError  # noqa: E402
from graphquant.graph_io import load_graph_def  # noqa: E402

FP32, INT8, FP32_OFF = "fp32", "int8", "fp32 (oneDNN off)"


def input_specs(graph_def, inputs: Sequence[str]):
    from graphquant.calib_data import graph_input_specs

    return graph_input_specs(graph_def, [i.split(":")[0] for i in inputs])


def fixed_batch(specs) -> Optional[int]:
    sizes = {s.fixed_batch for s in specs if s.shape}
    if None in sizes or not sizes:
        return None
    if len(sizes) > 1:
        raise GraphQuantError("the graph's inputs have different fixed batch sizes",
                              "benchmark a graph exported with one batch size")
    return sizes.pop()


def make_feeds(specs, batch: int, data: str, image_spec: Optional[str], graph_def,
               seed: int = 0) -> Dict[str, np.ndarray]:
    """One feed dict of ``batch`` samples per input: random or taken from ``data``."""
    feeds = {}
    if data == "random":
        rng = np.random.RandomState(seed)
        for spec in specs:
            if spec.shape is None or any(d is None for d in spec.shape[1:]):
                raise GraphQuantError(f"input '{spec.name}' has shape {spec.shape}: cannot make "
                                      "random inputs of unknown size",
                                      "pass --data=FILE.npy with real samples")
            shape = (batch,) + tuple(spec.shape[1:])
            if spec.dtype.kind == "f":
                feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
            else:
                feeds[spec.name] = rng.randint(0, 2, shape).astype(spec.dtype)
        return feeds
    from graphquant.calib_data import open_data

    dataset = open_data(data, graph_def, inputs=[s.name.split(":")[0] for s in specs],
                        image_spec=image_spec, limit=batch, batch_size=batch,
                        kind="benchmark")
    pieces = {s.name: [] for s in specs}
    for feed in dataset:
        for name, value in feed.items():
            pieces[name].append(value)
    for name, parts in pieces.items():
        samples = np.concatenate(parts)
        reps = -(-batch // len(samples))
        feeds[name] = np.concatenate([samples] * reps)[:batch]
    return feeds


def summarize(times_ms: Sequence[float], batch: int) -> Dict:
    t = np.asarray(times_ms, np.float64)
    median = float(np.median(t))
    return {"median_ms": median, "p25_ms": float(np.percentile(t, 25)),
            "p75_ms": float(np.percentile(t, 75)), "min_ms": float(t.min()),
            "max_ms": float(t.max()), "throughput": batch * 1000.0 / median,
            "rounds_ms": [float(x) for x in t]}


def time_round(runner, feeds, runs: int) -> float:
    start = time.perf_counter()
    for _ in range(runs):
        runner(feeds)
    return (time.perf_counter() - start) * 1000.0 / runs


class OneDnnOffChild:
    """The fp32 graph in a child process with TF_ENABLE_ONEDNN_OPTS=0, timing rounds on request.

    Protocol on the child's stdin/stdout, one line each: the child prints
    ``GQ ready <onednn 0|1>`` once warmed up, then answers each ``round``
    with ``GQ ms <latency>``; ``quit`` (or end of input) ends it.
    """

    def __init__(self, fp32: str, batch: int, threads: int, warmup: int, runs: int,
                 child_flags: Sequence[str] = ()):
        env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="0")
        cmd = [sys.executable, os.path.abspath(__file__), fp32, "--serve",
               f"--batch_sizes={batch}", f"--threads={threads}", f"--warmup={warmup}",
               f"--runs={runs}"] + list(child_flags)
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        words = self._answer()
        if words[:1] != ["ready"]:
            self.close()
            raise GraphQuantError(f"the oneDNN-off child did not start (said {words})",
                                  "run it alone: TF_ENABLE_ONEDNN_OPTS=0 python "
                                  f"tools/benchmark.py {fp32}")
        if words[1:] != ["0"]:
            self.close()
            raise GraphQuantError("the oneDNN-off child still had oneDNN on",
                                  "check that nothing forces TF_ENABLE_ONEDNN_OPTS=1")

    def _answer(self) -> List[str]:
        for line in self.proc.stdout:
            if line.startswith("GQ "):
                return line.split()[1:]
        raise GraphQuantError("the oneDNN-off child process ended early (see its errors above)",
                              "run it alone: TF_ENABLE_ONEDNN_OPTS=0 python tools/benchmark.py "
                              "FP32.pb")

    def round(self) -> float:
        self.proc.stdin.write("round\n")
        self.proc.stdin.flush()
        return float(self._answer()[1])

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def serve(fp32: str, batch: int, threads: int, data: str, image_spec: Optional[str],
          warmup: int, runs: int, inputs: Sequence[str], outputs: Sequence[str]) -> None:
    """The child's side of :class:`OneDnnOffChild`."""
    from graphquant.execute import GraphRunner
    from graphquant.runtime import onednn_enabled

    graph_def = load_graph_def(fp32)
    ins, outs, meta = common.graph_interface(fp32, graph_def, inputs, outputs)
    if image_spec is None and data != "random" and meta:
        image_spec = (meta.get("preprocessing") or {}).get("image_spec")
    feeds = make_feeds(input_specs(graph_def, ins), batch, data, image_spec, graph_def)
    with GraphRunner(graph_def, outs, threads=threads) as runner:
        for _ in range(warmup):
            runner(feeds)
        print(f"GQ ready {int(onednn_enabled())}", flush=True)
        for line in sys.stdin:
            if line.strip() != "round":
                break
            print(f"GQ ms {time_round(runner, feeds, runs)!r}", flush=True)


def benchmark_pair(graphs: Dict[str, object], outputs: Sequence[str], inputs: Sequence[str],
                   batch: int, threads: int, data: str, image_spec: Optional[str],
                   warmup: int, rounds: int, runs: int, progress: bool = True,
                   off_child: Optional[Dict] = None) -> List[Dict]:
    """Interleaved timing of the graphs (variant name -> GraphDef) at one batch and thread count.

    ``off_child``: keyword arguments for :class:`OneDnnOffChild` (``fp32``,
    ``child_flags``) to interleave the fp32 graph with oneDNN off as well.
    """
    from graphquant.execute import GraphRunner

    first = next(iter(graphs.values()))
    feeds = make_feeds(input_specs(first, inputs), batch, data, image_spec, first)
    times: Dict[str, List[float]] = {name: [] for name in graphs}
    label = f"batch {batch}, {threads} thread{'s' if threads != 1 else ''}"
    runners, child = {}, None
    try:
        if off_child is not None:
            if progress:
                sys.stderr.write(f"{label}: starting the oneDNN-off child process\n")
            child = OneDnnOffChild(batch=batch, threads=threads, warmup=warmup, runs=runs,
                                   **off_child)
            times[FP32_OFF] = []
        runners = {name: GraphRunner(g, outputs, threads=threads) for name, g in graphs.items()}
        bar = common.Progress(warmup * len(runners), f"{label}: warm-up", progress)
        for runner in runners.values():
            for _ in range(warmup):
                runner(feeds)
                bar.step()
        bar = common.Progress(rounds, f"{label}: rounds", progress)
        for _ in range(rounds):
            for name, runner in runners.items():
                times[name].append(time_round(runner, feeds, runs))
            if child is not None:
                times[FP32_OFF].append(child.round())
            bar.step()
    finally:
        for runner in runners.values():
            runner.close()
        if child is not None:
            child.close()
    return [dict(variant=name, batch=batch, threads=threads, **summarize(t, batch))
            for name, t in times.items()]


def speedups(rows: List[Dict]) -> List[Dict]:
    """int8 vs fp32 (and fp32 oneDNN on vs off) median-latency ratios per batch and threads."""
    out = []
    keys = sorted({(r["batch"], r["threads"]) for r in rows})
    for batch, threads in keys:
        by = {r["variant"]: r for r in rows if (r["batch"], r["threads"]) == (batch, threads)}
        entry = {"batch": batch, "threads": threads}
        if FP32 in by and INT8 in by:
            entry["int8_vs_fp32"] = by[FP32]["median_ms"] / by[INT8]["median_ms"]
        if FP32 in by and FP32_OFF in by:
            entry["fp32_onednn_on_vs_off"] = by[FP32_OFF]["median_ms"] / by[FP32]["median_ms"]
        if INT8 in by and FP32_OFF in by:
            entry["int8_vs_fp32_onednn_off"] = by[FP32_OFF]["median_ms"] / by[INT8]["median_ms"]
        out.append(entry)
    return out


def benchmark(fp32: str, int8: Optional[str] = None, batch_sizes: Sequence[int] = (),
              threads: Sequence[int] = (2,), data: str = "random", image_spec: Optional[str] = None,
              warmup: int = 3, rounds: int = 10, runs: int = 3, onednn_off: bool = False,
              inputs: Sequence[str] = (), outputs: Sequence[str] = (),
              progress: bool = True) -> Dict:
    """Time the graphs; return the dict ``--json_out`` writes."""
    from graphquant.runtime import onednn_enabled

    fp32_def = load_graph_def(fp32)
    ins, outs, meta = common.graph_interface(fp32, fp32_def, inputs, outputs)
    graphs = {FP32: fp32_def}
    if int8:
        int8_def = load_graph_def(int8)
        common.check_same_interface(int8, int8_def, ins, outs)
        graphs[INT8] = int8_def
    if image_spec is None and data != "random" and meta:
        image_spec = (meta.get("preprocessing") or {}).get("image_spec")

    fixed = fixed_batch(input_specs(fp32_def, ins))
    notes = []
    batches = list(batch_sizes) or [fixed or 1]
    if fixed is not None:
        skipped = [b for b in batches if b != fixed]
        if skipped:
            notes.append(f"the graph has a fixed batch of {fixed}: batch sizes "
                         f"{', '.join(map(str, skipped))} skipped")
        batches = [fixed]
    label = FP32 if onednn_enabled() else FP32_OFF
    if label != FP32:
        graphs = {FP32: fp32_def}  # a child (or a user) with oneDNN off: fp32 only
        notes.append("oneDNN is off in this process (TF_ENABLE_ONEDNN_OPTS != 1)")
    off_child = None
    if onednn_off and onednn_enabled():
        child_flags = [f"--data={data}", "--inputs=" + ",".join(ins),
                       "--outputs=" + ",".join(outs)]
        if image_spec:
            child_flags.append(f"--image_spec={image_spec}")
        off_child = {"fp32": fp32, "child_flags": child_flags}
    rows = []
    for batch in batches:
        for n_threads in threads:
            rows += benchmark_pair(graphs, outs, ins, batch, n_threads, data, image_spec,
                                   warmup, rounds, runs, progress, off_child)
    return {
        "graphs": {FP32: os.path.abspath(fp32), INT8: os.path.abspath(int8) if int8 else None},
        "inputs": ins, "outputs": outs,
        "config": {"batch_sizes": batches, "threads": list(threads), "data": data,
                   "warmup": warmup, "rounds": rounds, "runs_per_round": runs,
                   "interleaved": list(graphs) + ([FP32_OFF] if off_child else [])},
        "environment": common.environment(),
        "results": rows,
        "speedups": speedups(rows),
        "notes": notes,
    }


def format_table(result: Dict) -> str:
    env = result["environment"]
    lines = [f"{env['date']}  {env['cpu']} ({env['cpu_count']} cores)  "
             f"TensorFlow {env['tensorflow']}",
             f"fp32  {result['graphs'][FP32]}",
             f"int8  {result['graphs'][INT8] or '(none)'}", ""]
    header = (f"{'batch':>5} {'thr':>3}  {'graph':<18} {'median ms':>10} {'p25..p75 ms':>17} "
              f"{'min..max ms':>17} {'samples/s':>10} {'vs fp32':>8}")
    lines += [header, "-" * len(header)]
    ratios = {(s["batch"], s["threads"]): s for s in result["speedups"]}
    for row in result["results"]:
        s = ratios.get((row["batch"], row["threads"]), {})
        ratio = {INT8: s.get("int8_vs_fp32"), FP32: 1.0,
                 FP32_OFF: (1 / s["fp32_onednn_on_vs_off"]) if "fp32_onednn_on_vs_off" in s
                 else None}.get(row["variant"])
        lines.append(
            f"{row['batch']:>5} {row['threads']:>3}  {row['variant']:<18} "
            f"{row['median_ms']:>10.2f} {row['p25_ms']:>8.2f}..{row['p75_ms']:<8.2f} "
            f"{row['min_ms']:>8.2f}..{row['max_ms']:<8.2f} {row['throughput']:>10.1f} "
            f"{'-' if ratio is None else f'{ratio:.2f}x':>8}")
    lines.append("")
    lines.append("vs fp32 = fp32 (oneDNN on) median / this median (>1: faster)")
    for note in result["notes"]:
        lines.append("note: " + note)
    return "\n".join(lines)


def main(argv):
    from absl import flags

    f = flags.FLAGS
    argv = [argv[0]] + common.graph_paths(argv, "FP32.pb [INT8.pb]",
                                          "python tools/benchmark.py fp32.pb int8.pb")
    from tools.export import parse_batch

    batches = [parse_batch(b) for b in f.batch_sizes]
    if any(b is None for b in batches):
        raise GraphQuantError("--batch_sizes takes integers", "e.g. --batch_sizes=1,16")
    inputs, outputs = common.split_names(f.inputs), common.split_names(f.outputs)
    if f.serve:  # the oneDNN-off child of another benchmark.py
        serve(argv[1], batches[0], int(f.threads[0]), f.data, f.image_spec, f.warmup, f.runs,
              inputs, outputs)
        return
    int8 = argv[2] if len(argv) == 3 else None
    result = benchmark(argv[1], int8, batches, [int(t) for t in f.threads], f.data, f.image_spec,
                       f.warmup, f.rounds, f.runs, f.onednn_off, inputs, outputs, not f.quiet)
    print(format_table(result))
    if f.json_out:
        common.write_json(f.json_out, result)
        print(f"\nwrote {f.json_out}")


def define_flags():
    from absl import flags

    flags.DEFINE_list("batch_sizes", [], "batch sizes for graphs with a dynamic batch "
                      "(default: the graph's fixed batch, else 1)")
    flags.DEFINE_list("threads", ["2"], "TensorFlow intra-op thread counts to try")
    common.define_data_flags()
    flags.DEFINE_integer("warmup", 3, "untimed runs per graph before timing")
    flags.DEFINE_integer("rounds", 10, "interleaved timed rounds")
    flags.DEFINE_integer("runs", 3, "runs per round (their mean is the round's latency)")
    flags.DEFINE_bool("onednn_off", False, "also time fp32 with oneDNN off (child process)")
    flags.DEFINE_bool("serve", False, "internal: be the oneDNN-off child (rounds on request)")
    flags.DEFINE_bool("quiet", False, "no progress on stderr")


if __name__ == "__main__":
    common.run_app(main, define_flags)
