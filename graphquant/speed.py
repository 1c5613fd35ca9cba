"""A quick fp32 vs int8 timing for the conversion report (``graphquant convert --measure_speed``).

    from graphquant.speed import quick_speedup
    speed = quick_speedup(fp32_graph_def, int8_graph_def, feeds, outputs)
    speed["speedup"]          # fp32 median latency / int8 median latency

The logic of ``tools/benchmark.py`` in small: both graphs loaded in this
process, warmed up, then timed in interleaved rounds (fp32, int8, fp32, ...),
each round the mean of ``runs`` back-to-back runs; the speed-up is the ratio
of the median round latencies.  A few rounds on one feed: a quick estimate,
labelled as such in the report.  ``tools/benchmark.py`` is the proper
measurement (more rounds, batch sizes, thread counts, spread, oneDNN off).
"""

from __future__ import annotations

import time
from typing import Dict, Mapping, Sequence

import numpy as np
from tensorflow.core.framework import graph_pb2

from graphquant.execute import GraphRunner


def quick_speedup(fp32: graph_pb2.GraphDef, int8: graph_pb2.GraphDef,
                  feeds: Mapping[str, np.ndarray], outputs: Sequence[str], *,
                  warmup: int = 2, rounds: int = 5, runs: int = 3) -> Dict[str, object]:
    """Median latency (ms) of each graph on ``feeds`` over interleaved rounds, and their ratio."""
    if warmup < 0 or rounds < 1 or runs < 1:
        raise ValueError("warmup >= 0, rounds >= 1 and runs >= 1 required")
    runners = {"fp32": GraphRunner(fp32, outputs), "int8": GraphRunner(int8, outputs)}
    times = {name: [] for name in runners}
    try:
        for runner in runners.values():
            for _ in range(warmup):
                runner(feeds)
        for _ in range(rounds):
            for name, runner in runners.items():
                start = time.perf_counter()
                for _ in range(runs):
                    runner(feeds)
                times[name].append((time.perf_counter() - start) * 1000.0 / runs)
    finally:
        for runner in runners.values():
            runner.close()
    fp32_ms, int8_ms = (float(np.median(times[k])) for k in ("fp32", "int8"))
    batch = int(next(iter(feeds.values())).shape[0]) if feeds else 0
    return {"fp32_ms": fp32_ms, "int8_ms": int8_ms, "speedup": fp32_ms / max(int8_ms, 1e-9),
            "rounds": rounds, "runs_per_round": runs, "batch": batch,
            "method": "quick estimate: interleaved rounds in one process "
                      "(tools/benchmark.py for a proper measurement)"}
