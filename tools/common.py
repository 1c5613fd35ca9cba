"""Shared by tools/benchmark.py and tools/evaluate.py: graph interface, progress, CLI wrapper."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # run as scripts: make graphquant and models importable
    sys.path.insert(0, _REPO)

import graphquant  # noqa: E402,F401  (TensorFlow settings before TensorFlow loads)
from graphquant.errors import GraphQuantError  # noqa: E402
from graphquant.graph import GraphIndex, canonical_tensor  # noqa: E402


def sidecar(pb_path: str) -> Optional[Dict]:
    """The ``MODEL.json`` next to ``MODEL.pb`` (zoo, export --json, ../shared/models), if any."""
    path = os.path.splitext(pb_path)[0] + ".json"
    if not os.path.exists(path):
        return None
    with open(path) as f:
        meta = json.load(f)
    return meta if isinstance(meta, dict) else None


def split_names(text) -> List[str]:
    if not text:
        return []
    if isinstance(text, str):
        text = text.split(",")
    return [canonical_tensor(t.strip()) for t in text if t and t.strip()]


def graph_interface(pb_path: str, graph_def, inputs: Sequence[str] = (),
                    outputs: Sequence[str] = ()) -> Tuple[List[str], List[str], Optional[Dict]]:
    """(input tensor names, output tensor names, sidecar json) of a graph.

    Given names win; then the sidecar json's ``inputs``/``outputs``; then the
    graph's Placeholders and the nodes nobody consumes.
    """
    meta = sidecar(pb_path)
    index = GraphIndex(graph_def)
    ins = list(inputs) or ([canonical_tensor(n) for n, _ in meta["inputs"]]
                           if meta and meta.get("inputs") else
                           [canonical_tensor(n) for n in index.inputs()])
    outs = list(outputs) or ([canonical_tensor(n) for n, _ in meta["outputs"]]
                             if meta and meta.get("outputs") else
                             [canonical_tensor(n) for n in index.inferred_outputs()])
    for name in ins + outs:
        if name.split(":")[0] not in index:
            from graphquant.graph import suggest_names

            raise GraphQuantError(f"'{pb_path}' has no tensor '{name}'",
                                  suggest_names(name.split(":")[0], index.nodes))
    if not ins or not outs:
        raise GraphQuantError(f"cannot tell the inputs/outputs of '{pb_path}'",
                              "pass --inputs and --outputs")
    return ins, outs, meta


def softmax_logits(graph_def, outputs: Sequence[str]) -> Dict[str, str]:
    """Output -> the tensor its Softmax reads (through Identity ops), for outputs a
    Softmax makes.  Softmax turns small logit changes into large probability
    changes where the logits are close (random-weight zoo nets): the logits are
    the fair place to measure a candidate's error as well."""
    index = GraphIndex(graph_def)
    found = {}
    for out in outputs:
        node = index.nodes.get(out.split(":")[0])
        while node is not None and node.op == "Identity" and node.input:
            node = index.nodes.get(node.input[0].split(":")[0])
        if node is not None and node.op == "Softmax" and node.input:
            found[out] = canonical_tensor(node.input[0])
    return found


def check_same_interface(name: str, graph_def, inputs: Sequence[str],
                         outputs: Sequence[str]) -> None:
    """The candidate graph must read and produce the tensors the reference does."""
    index = GraphIndex(graph_def)
    missing = [t for t in list(inputs) + list(outputs) if t.split(":")[0] not in index]
    if missing:
        raise GraphQuantError(
            f"'{name}' lacks tensor(s) {', '.join(missing)} of the reference graph",
            "compare graphs with the same interface (graphquant convert keeps the names), "
            "or pass --inputs/--outputs")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> Dict:
    from graphquant.runtime import onednn_enabled, tf

    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cpu": cpu_name(),
            "cpu_count": os.cpu_count(), "tensorflow": tf().__version__,
            "onednn": onednn_enabled(), "python": platform.python_version()}


class Progress:
    """``label  i/total`` on stderr, rewritten in place at most every half second."""

    def __init__(self, total: int, label: str, enabled: bool = True):
        self.total, self.label, self.enabled = total, label, enabled
        self.done, self._last, self._start = 0, 0.0, time.time()

    def step(self, n: int = 1) -> None:
        self.done += n
        now = time.time()
        if self.enabled and (now - self._last > 0.5 or self.done >= self.total):
            self._last = now
            sys.stderr.write(f"\r{self.label}  {self.done}/{self.total}  "
                             f"({now - self._start:.0f} s)")
            if self.done >= self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


def write_json(path: str, data: Dict) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=_jsonable)
    os.replace(tmp, path)


def _jsonable(value):
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def graph_paths(argv, usage: str, example: str) -> List[str]:
    """The one or two graph paths after the script's name, or a usage error."""
    if len(argv) not in (2, 3):
        raise GraphQuantError(f"expected {usage}", example)
    return list(argv[1:])


def define_data_flags() -> None:
    """--data, --image_spec, --inputs, --outputs, --json_out: the tools' shared input flags."""
    from absl import flags

    flags.DEFINE_string("data", "random", "random, or a .npy/.npz file or image folder")
    flags.DEFINE_string("image_spec", None, "image preprocessing spec (default: sidecar json)")
    flags.DEFINE_string("inputs", None, "input names (default: sidecar json or Placeholders)")
    flags.DEFINE_string("outputs", None, "output tensor names (default: sidecar json or sinks)")
    flags.DEFINE_string("json_out", None, "write the results as JSON here")


def run_app(main, define_flags) -> None:
    """absl app with graphquant errors printed as ``error: ... fix: ...`` (exit status 2)."""
    from absl import app

    define_flags()

    def _main(argv):
        try:
            main(argv)
        except GraphQuantError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)

    app.run(_main)
