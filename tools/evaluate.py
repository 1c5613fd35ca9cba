"""How much did quantization change the answers? Compare two graphs on real inputs.

    python tools/evaluate.py fp32.pb int8.pb                       # zoo graph: ImageNet eval split
    python tools/evaluate.py fp32.pb int8.pb --data=inputs.npy     # any graph, samples in a file
    python tools/evaluate.py fp32.pb --limit=100                   # the reference alone (accuracy)

Both graphs get the same inputs; for every output the table gives relative L2,
SQNR (dB) and per-sample cosine similarity of the candidate against the
reference, and for class-score outputs the top-1 / top-5 agreement (the
reference's top-1 class among the candidate's top-k).  An output made by a
Softmax is also compared on the logits the Softmax reads (``logits`` in the
JSON, "logits of ..." rows) when the candidate has that tensor: on nets whose
logits lie close together (the random-weight zoo) softmax probabilities move
much more than the logits.  Metric definitions: graphquant/metrics.py.

Data (``--data``): a ``.npy``/``.npz`` file or a folder of images, read by
graphquant.calib_data.  Images need a preprocessing spec: ``--image_spec``, or
the ``preprocessing.image_spec`` of the reference graph's sidecar json (every
zoo graph has one; its default data is then ../shared/data/imagenet-samples).
``--split`` for image folders: ``eval`` skips the first 100 files by name (the
calibration split), ``calib`` takes only them, ``all`` takes every file.

Top-1 / top-5 accuracy against ImageNet labels is added when the images are
named ``<synset>_*`` and the output has 1000 classes (1001: a background class
at index 0, labels shifted by one): class index = position of the synset in
sorted order.
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools import common  # noqa: E402  (imports graphquant first)

from graphquant import metrics  # noqa: E402
from graphquant.errors import GraphQuantError  # noqa: E402
from graphquant.graph import GraphIndex  # noqa: E402
from graphquant.graph_io import load_graph_def  # noqa: E402

IMAGENET_DIR = os.path.join(os.environ.get(
    "GRAPHQUANT_SHARED", os.path.join(os.path.dirname(common._REPO), "shared")),
    "data", "imagenet-samples")
CALIB_COUNT = 100
_SYNSET = re.compile(r"^(n\d{8})_")


def split_window(split: str, limit: Optional[int]):
    """(skip, limit) in samples for ``--split`` and ``--limit``."""
    if split == "eval":
        return CALIB_COUNT, limit
    if split == "calib":
        return 0, CALIB_COUNT if limit is None else min(limit, CALIB_COUNT)
    if split == "all":
        return 0, limit
    raise GraphQuantError(f"unknown split '{split}'", "use --split=eval, calib or all")


def imagenet_labels(folder: str, files: Sequence[str], num_classes: int) -> Optional[np.ndarray]:
    """Class index of each file from its synset, or None if the files are not ImageNet-named."""
    from graphquant.calib_data import list_images

    if num_classes not in (1000, 1001):
        return None
    synsets = []
    for path in list_images(folder):
        match = _SYNSET.match(os.path.basename(path))
        if not match:
            return None
        synsets.append(match.group(1))
    position = {s: i for i, s in enumerate(sorted(set(synsets)))}
    if len(position) != 1000:
        return None
    offset = num_classes - 1000
    return np.array([position[_SYNSET.match(os.path.basename(p)).group(1)] + offset
                     for p in files], np.int64)


def run_outputs(runners, data, progress: bool = True) -> List[List[np.ndarray]]:
    """Each runner's outputs over every feed of ``data`` (read once), concatenated per output."""
    chunks: List[List[List[np.ndarray]]] = [[] for _ in runners]
    bar = common.Progress(data.num_samples, "evaluating", progress)
    for feeds in data:
        for runner, out in zip(runners, chunks):
            out.append(runner(feeds))
        bar.step(len(next(iter(feeds.values()))))
    return [[np.concatenate([c[i] for c in out]) for i in range(len(out[0]))] for out in chunks]


def evaluate(reference: str, candidate: Optional[str] = None, data: Optional[str] = None,
             image_spec: Optional[str] = None, split: str = "auto", limit: Optional[int] = None,
             inputs: Sequence[str] = (), outputs: Sequence[str] = (), batch_size: int = 16,
             threads: Optional[int] = None, labels: str = "auto", progress: bool = True) -> Dict:
    """Run both graphs on the data; return the result dict that ``--json_out`` writes."""
    from graphquant.calib_data import list_images, open_data
    from graphquant.execute import GraphRunner

    start = time.time()
    ref_def = load_graph_def(reference)
    ins, outs, meta = common.graph_interface(reference, ref_def, inputs, outputs)
    cand_def = None
    if candidate:
        cand_def = load_graph_def(candidate)
        common.check_same_interface(candidate, cand_def, ins, outs)
    preprocessing = (meta or {}).get("preprocessing") or {}
    if data is None:
        if not preprocessing:
            raise GraphQuantError(f"no --data given and '{reference}' has no sidecar json with "
                                  "a preprocessing spec", "pass --data=FILE.npy|.npz|FOLDER")
        data = IMAGENET_DIR
    is_folder = os.path.isdir(data)
    if split == "auto":
        split = "eval" if is_folder else "all"
    skip, take = split_window(split, limit)
    spec = image_spec or preprocessing.get("image_spec")
    dataset = open_data(data, ref_def, inputs=[i.split(":")[0] for i in ins], image_spec=spec,
                        skip=skip, limit=take, batch_size=batch_size, kind="validation")

    logits = common.softmax_logits(ref_def, outs)
    if cand_def is not None:   # compared only where the candidate computes them too
        present = GraphIndex(cand_def)
        logits = {o: t for o, t in logits.items() if t.split(":")[0] in present}
    fetches = list(outs) + list(logits.values())

    def runner(graph_def):
        return GraphRunner(graph_def, fetches, threads=threads)

    runners = [runner(ref_def)] + ([runner(cand_def)] if cand_def is not None else [])
    try:
        results = run_outputs(runners, dataset, progress)
    finally:
        for r in runners:
            r.close()
    ref_out = results[0]
    cand_out = results[1] if cand_def is not None else None

    truth = None
    if is_folder and labels != "none" and metrics.is_classification(ref_out[0]):
        start_i, stop_i = skip, len(list_images(data)) if take is None else skip + take
        files = list_images(data)[start_i:stop_i][:dataset.num_samples]
        truth = imagenet_labels(data, files, ref_out[0].shape[1])
        if truth is None and labels == "imagenet":
            raise GraphQuantError("--labels=imagenet but the images are not named <synset>_* "
                                  "or the output does not have 1000/1001 classes",
                                  "use --labels=auto or none")

    result = {
        "reference": os.path.abspath(reference),
        "candidate": os.path.abspath(candidate) if candidate else None,
        "data": {"source": dataset.source, "path": os.path.abspath(data), "split": split,
                 "samples": dataset.num_samples, "dropped": dataset.dropped},
        "inputs": ins, "outputs": {},
        "environment": common.environment(),
    }
    for i, name in enumerate(outs):
        out_labels = truth if i == 0 else None
        if cand_out is not None:
            entry = metrics.compare_outputs(ref_out[i], cand_out[i], out_labels)
        else:
            entry = {"shape": list(ref_out[i].shape)}
            if out_labels is not None:
                entry["reference_top1_accuracy"] = metrics.topk_accuracy(ref_out[i], out_labels, 1)
                entry["reference_top5_accuracy"] = metrics.topk_accuracy(ref_out[i], out_labels, 5)
        result["outputs"][name] = entry
    if cand_out is not None and logits:
        result["logits"] = {}
        for i, (name, tensor) in enumerate(logits.items(), start=len(outs)):
            entry = metrics.compare_outputs(ref_out[i], cand_out[i])
            result["logits"][name] = dict(entry, tensor=tensor)
    if truth is not None:
        result["labels"] = "imagenet synsets (sorted position" + (
            ", +1 background class)" if ref_out[0].shape[1] == 1001 else ")")
    if meta and "weights" in meta:
        result["reference_weights"] = meta["weights"]
    result["seconds"] = round(time.time() - start, 1)
    return result


def _fmt(value, pattern="{:.4g}") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return pattern.format(value)


def format_table(result: Dict) -> str:
    lines = [f"reference  {result['reference']}",
             f"candidate  {result['candidate'] or '(none: reference only)'}",
             f"data       {result['data']['source']}"]
    if result["candidate"]:
        header = (f"{'output':<24} {'shape':<14} {'rel L2':>9} {'SQNR dB':>8} {'cos mean':>9} "
                  f"{'cos min':>8} {'top-1 agr':>9} {'top-5 agr':>9}")
        lines += ["", header, "-" * len(header)]
        for name, m in result["outputs"].items():
            pct = "{:.2%}"
            lines.append(
                f"{name:<24} {'x'.join(map(str, m['shape'])):<14} {_fmt(m['relative_l2']):>9} "
                f"{_fmt(m['sqnr_db'], '{:.2f}'):>8} {_fmt(m['cosine']['mean'], '{:.6f}'):>9} "
                f"{_fmt(m['cosine']['min'], '{:.4f}'):>8} "
                f"{_fmt(m.get('top1_agreement'), pct):>9} {_fmt(m.get('top5_agreement'), pct):>9}")
        for name, m in result.get("logits", {}).items():
            lines.append(
                f"{'logits of ' + name:<24} {'x'.join(map(str, m['shape'])):<14} "
                f"{_fmt(m['relative_l2']):>9} {_fmt(m['sqnr_db'], '{:.2f}'):>8} "
                f"{_fmt(m['cosine']['mean'], '{:.6f}'):>9} {_fmt(m['cosine']['min'], '{:.4f}'):>8}")
    for name, m in result["outputs"].items():
        if "reference_top1_accuracy" in m:
            n = result["data"]["samples"]
            text = (f"top-1 accuracy ({result.get('labels', 'labels')}, {n} images): "
                    f"reference {m['reference_top1_accuracy']:.2%}")
            if "candidate_top1_accuracy" in m:
                text += f", candidate {m['candidate_top1_accuracy']:.2%}"
            text += f"; top-5: reference {m['reference_top5_accuracy']:.2%}"
            if "candidate_top5_accuracy" in m:
                text += f", candidate {m['candidate_top5_accuracy']:.2%}"
            lines += ["", text]
            if "random" in result.get("reference_weights", ""):
                lines.append("  (zoo weights are random: accuracy near chance, 0.1% / 0.5%, "
                             "is expected)")
    return "\n".join(lines)


def main(argv):
    from absl import flags

    f = flags.FLAGS
    argv = [argv[0]] + common.graph_paths(argv, "REFERENCE.pb [CANDIDATE.pb]",
                                          "python tools/evaluate.py fp32.pb int8.pb --data=...")
    result = evaluate(argv[1], argv[2] if len(argv) == 3 else None, f.data, f.image_spec,
                      f.split, f.limit, common.split_names(f.inputs),
                      common.split_names(f.outputs), f.batch_size, f.threads, f.labels,
                      not f.quiet)
    print(format_table(result))
    if f.json_out:
        common.write_json(f.json_out, result)
        print(f"\nwrote {f.json_out}")


def define_flags():
    from absl import flags

    flags.DEFINE_string("data", None, ".npy, .npz or image folder (default for zoo graphs: "
                        "../shared/data/imagenet-samples)")
    flags.DEFINE_string("image_spec", None, "image preprocessing spec (default: the reference "
                        "graph's sidecar json); see graphquant.calib_data.ImageSpec")
    flags.DEFINE_enum("split", "auto", ["auto", "eval", "calib", "all"],
                      "image folders: eval = all but the first 100 files by name, calib = those "
                      "100, all; auto = eval for folders, all for arrays")
    flags.DEFINE_integer("limit", None, "at most this many samples (after the split)")
    flags.DEFINE_string("inputs", None, "input names (default: sidecar json or Placeholders)")
    flags.DEFINE_string("outputs", None, "output tensor names (default: sidecar json or sinks)")
    flags.DEFINE_integer("batch_size", 16, "samples per run for graphs with a dynamic batch")
    flags.DEFINE_integer("threads", None, "TensorFlow intra-op threads (default: all cores)")
    flags.DEFINE_enum("labels", "auto", ["auto", "imagenet", "none"],
                      "accuracy against ImageNet synset labels (auto: when the data allows)")
    flags.DEFINE_string("json_out", None, "write the results as JSON here")
    flags.DEFINE_bool("quiet", False, "no progress on stderr")


if __name__ == "__main__":
    common.run_app(main, define_flags)
