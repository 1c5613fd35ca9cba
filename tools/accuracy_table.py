"""Effect of each accuracy technique on real models: convert, evaluate on held-out data, tabulate.

    python tools/accuracy_table.py                          # every model, every config
    python tools/accuracy_table.py --models=fer_mini_xception,mtcnn_rnet --configs=default,auto
    python tools/accuracy_table.py --json_out=/tmp/acc.json

Models: every graph in ../shared/models (calibrated on the first 16 samples
and evaluated on the rest when a file has more than 16, else calibrated and
evaluated on all of them -- there is nothing held out for 1-2 sample files),
and the zoo MobileNet v1/v2 (``mobilenet_v1``/``mobilenet_v2``: the b1 keras3
graphs in models/cache, calibrated on the first 100 ImageNet samples,
evaluated on the next ``--zoo_eval`` files).

Configs are named sets of :func:`graphquant.convert.convert` keywords
(:data:`CONFIGS`); a row per (model, config) gives the worst relative L2 over
the outputs, each output's relative L2, and top-1 agreement for class-score
outputs.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Dict, List

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools import common  # noqa: E402  (imports graphquant first)

REPO = common._REPO
SHARED = os.environ.get("GRAPHQUANT_SHARED", os.path.join(os.path.dirname(REPO), "shared"))
MODELS_DIR = os.path.join(SHARED, "models")
IMAGENET = os.path.join(SHARED, "data", "imagenet-samples")
ZOO = {
    "mobilenet_v1": "mobilenet_v1_a1_224px_seed0_bn100_r2_b1_keras3.pb",
    "mobilenet_v2": "mobilenet_v2_a1_224px_seed0_bn100_r2_b1_keras3.pb",
}
REAL = {
    "fer_mini_xception": "fer_inputs_101.npy",
    "fer_mini_xception_tfkeras": "fer_inputs_101.npy",
    "mtcnn_pnet": "mtcnn_pnet_inputs.npy",
    "mtcnn_rnet": "mtcnn_rnet_inputs.npy",
    "mtcnn_onet": "mtcnn_onet_inputs.npy",
    "musicnn_MTT_musicnn": "musicnn_input.npy",
    "musicnn_MTT_vgg": "musicnn_input.npy",
    "basic_pitch_nmp": "basic_pitch_input.npy",
    "rapidocr_cls_mobile_v2": "rapidocr_cls_mobile_v2_input_nhwc.npy",
    "rapidocr_det_ppocrv4": "rapidocr_det_ppocrv4_input_nhwc.npy",
}
CALIB_SAMPLES = 16

#: convert() keywords before issue 6's techniques (the configs below start from it)
OLD = {"calibration": "minmax", "pair_weights": False, "shift_signed": False,
       "bias_correction": False, "equalize": False, "center_channels": False}
#: issue 6's default: auto ranges, pair-limited 8-bit weights, shifted signed tensors, bias
#: correction, centred channels between convs
NEW = dict(OLD, calibration="auto", pair_weights=True, shift_signed=True, bias_correction=True,
           center_channels=True)


def _fid(target, validation="split"):
    return dict(NEW, fidelity=target, validation=validation)


#: config name -> convert() keywords
CONFIGS: Dict[str, dict] = {
    "default": {},                                   # whatever convert() defaults to now
    "old_default": OLD,
    "minmax": OLD, "mse": dict(OLD, calibration="mse"), "kl": dict(OLD, calibration="kl"),
    "auto": dict(OLD, calibration="auto"),
    "auto_pairs": dict(OLD, calibration="auto", pair_weights=True),
    "auto_pairs_bc": dict(OLD, calibration="auto", pair_weights=True, bias_correction=True),
    "auto_shift_pairs": dict(OLD, calibration="auto", pair_weights=True, shift_signed=True),
    "all": dict(NEW, calibration="minmax"),
    "all_auto": NEW,
    "all_auto_cle": dict(NEW, equalize=True),
    # channels between convs: scaled by least expected noise (passes/equalize_cross_layer.py),
    # centred on their ranges (passes/center_channels.py)
    "all_auto_nocenter": dict(NEW, center_channels=False),   # the default before center_channels
    "all_auto_aeq": dict(NEW, center_channels=False, equalize="activation"),
    "all_auto_center_aeq": dict(NEW, equalize="activation"),
    "weight_rounding": dict(NEW, weight_rounding=True),   # graphquant/weight_rounding.py
    "no_fallback": dict(OLD, max_layer_error=None),
    "all_auto_no_fallback": dict(NEW, max_layer_error=None),
    # fidelity, validated on the first half of the held-out samples and evaluated on the
    # other half (one-sample models: validated and evaluated on that sample)
    "fid_top1_split": _fid({"top1": 0.99}),
    "fid_rel05_split": _fid({"rel_l2": 0.05}),
    "fid_rel02_split": _fid({"rel_l2": 0.02}),
    "all_auto_split": dict(NEW, validation="split_only"),
}


#: fp32 graph on noisy inputs (no conversion): config name -> input noise relative L2
NOISE = {"fp32_noise_0.003": 0.003, "fp32_noise_0.01": 0.01}


def load_model(name: str, zoo_eval: int):
    """(pb path, input names, output names, calib feeds, eval feeds)."""
    from graphquant.calib_data import open_data
    from graphquant.graph_io import load_graph_def

    if name in ZOO:
        pb = os.path.join(REPO, "models", "cache", ZOO[name])
    else:
        pb = os.path.join(MODELS_DIR, name + ".pb")
    graph_def = load_graph_def(pb)
    ins, outs, meta = common.graph_interface(pb, graph_def, (), ())
    names = [i.split(":")[0] for i in ins]
    if name in ZOO:
        spec = meta["preprocessing"]["image_spec"]
        calib = list(open_data(IMAGENET, graph_def, inputs=names, image_spec=spec, limit=100))
        evals = list(open_data(IMAGENET, graph_def, inputs=names, image_spec=spec, skip=100,
                               limit=zoo_eval, kind="validation"))
    else:
        samples = np.load(os.path.join(MODELS_DIR, REAL[name]))
        feeds = [{ins[0]: s[None]} for s in samples]
        if len(feeds) > CALIB_SAMPLES:
            calib, evals = feeds[:CALIB_SAMPLES], feeds[CALIB_SAMPLES:]
        else:
            calib, evals = feeds, feeds
    return pb, graph_def, outs, calib, evals


def run_all(graph_def, outs, feeds) -> List[np.ndarray]:
    from graphquant.execute import GraphRunner

    with GraphRunner(graph_def, outs) as runner:
        values = [runner(f) for f in feeds]
    return [np.concatenate([v[i] for v in values]) for i in range(len(outs))]


def measure(name: str, configs: List[str], zoo_eval: int, log=print) -> List[Dict]:
    from graphquant import metrics
    from graphquant.convert import convert
    from graphquant.fidelity import class_score_outputs

    pb, graph_def, outs, calib, evals = load_model(name, zoo_eval)
    # top-1 only for softmax outputs (MTCNN's box/landmark regressions are N x 4 / N x 10)
    classes = class_score_outputs(graph_def, outs) or ["Sigmoid" not in o for o in outs]
    reference = run_all(graph_def, outs, evals)
    # real models with held-out samples: top-1 also on every shipped sample (fer: all 101)
    every = calib + evals if name not in ZOO and evals is not calib else None
    reference_every = run_all(graph_def, outs, every) if every else None
    rows = []
    for config in configs:
        if config.startswith("fp32_noise"):
            rows.append(noise_row(name, config, graph_def, outs, evals, reference, classes,
                                  len(calib)))
            log(format_row(rows[-1]))
            continue
        start = time.time()
        kwargs = dict(CONFIGS[config])
        held, ref = evals, reference
        if kwargs.get("validation") == "eval":
            kwargs["validation"] = evals
        elif kwargs.get("validation") == "split" and len(evals) > 1:
            half = len(evals) // 2                   # validate on one half, evaluate the other
            kwargs["validation"], held = evals[:half], evals[half:]
            ref = [r[half * (len(r) // len(evals)):] for r in reference]
        elif kwargs.get("validation") == "split":
            kwargs["validation"] = evals
        if kwargs.get("validation") == "split_only":
            del kwargs["validation"]
            if len(evals) > 1:
                half = len(evals) // 2
                held, ref = evals[half:], [r[half * (len(r) // len(evals)):] for r in reference]
        result = convert(graph_def, calib, outputs=outs, **kwargs)
        seconds = time.time() - start
        got = run_all(result.graph_def, outs, held)
        row = {"model": name, "config": config, "calib": len(calib), "eval": len(held),
               "convert_seconds": round(seconds, 1), "outputs": {}}
        for out, r, c, k in zip(outs, ref, got, classes):
            entry = {"rel_l2": metrics.relative_l2(r, c)}
            if k and metrics.is_classification(r) and r.shape[1] <= 1000:
                entry["top1"] = metrics.topk_agreement(r, c, 1)
            row["outputs"][out] = entry
        if every:
            for out, r, c, k in zip(outs, reference_every,
                                    run_all(result.graph_def, outs, every), classes):
                if "top1" in row["outputs"][out]:
                    row["outputs"][out]["top1_every"] = metrics.topk_agreement(r, c, 1)
                    row["outputs"][out]["every"] = len(r)
        row["worst_rel_l2"] = max(e["rel_l2"] for e in row["outputs"].values())
        tops = [e["top1"] for e in row["outputs"].values() if "top1" in e]
        row["top1"] = min(tops) if tops else None
        row["fp32_islands"] = sum(1 for n in result.report.fp32
                                  if "int8 error" in str(n.get("reason", "")))
        counts = result.report.compute_counts()
        row["compute_int8"] = sum(c["int8"] for c in counts.values())
        row["compute_fp32"] = sum(c["fp32"] for c in counts.values())
        row["int8_islands"] = len(result.report.quantized)
        own = [q["own_sqnr_db"] for q in result.report.quantized
               if np.isfinite(q.get("own_sqnr_db", np.nan))]
        if own:   # per-layer error on the calibration data (sensitivity probe)
            row["own_sqnr_db_median"] = float(np.median(own))
            row["own_sqnr_db_min"] = float(np.min(own))
        fid = result.report.info.get("fidelity")
        if fid:
            row["fidelity"] = fid
            row["fp32_islands"] = (f"{len(fid['fallbacks'])} ({fid['fp32_macs_share']:.1%} "
                                   f"MACs, {len(fid['evaluations'])}/{fid['max_evaluations']} "
                                   "evals)")
        rows.append(row)
        log(format_row(row))
    return rows


def noise_row(name, config, graph_def, outs, evals, reference, classes, calib) -> Dict:
    """The fp32 graph itself on its evaluation inputs plus Gaussian noise of relative L2
    ``NOISE[config]`` (seeded): how far the outputs move under a perturbation of the input
    (8-bit rounding of an image is about 0.003), the floor under any int8 error."""
    from graphquant import metrics

    level = NOISE[config]
    rng = np.random.default_rng(0)
    noisy = []
    for feed in evals:
        noisy.append({k: (v + rng.normal(0, level * np.sqrt(np.mean(np.square(v))), v.shape)
                          ).astype(v.dtype) for k, v in feed.items()})
    got = run_all(graph_def, outs, noisy)
    row = {"model": name, "config": config, "calib": calib, "eval": len(evals),
           "convert_seconds": 0.0, "outputs": {}, "fp32_islands": "-"}
    for out, r, c, k in zip(outs, reference, got, classes):
        entry = {"rel_l2": metrics.relative_l2(r, c)}
        if k and metrics.is_classification(r) and r.shape[1] <= 1000:
            entry["top1"] = metrics.topk_agreement(r, c, 1)
        row["outputs"][out] = entry
    row["worst_rel_l2"] = max(e["rel_l2"] for e in row["outputs"].values())
    tops = [e["top1"] for e in row["outputs"].values() if "top1" in e]
    row["top1"] = min(tops) if tops else None
    return row


def format_row(row: Dict) -> str:
    top1 = "-" if row["top1"] is None else f"{row['top1']:.2%}"
    per = " ".join(f"{k.split(':')[0]}={v['rel_l2']:.4f}" for k, v in row["outputs"].items())
    ops = f"{row.get('compute_int8', '?')}/{row.get('compute_fp32', '?')}"
    return (f"| {row['model']} | {row['config']} | {row['worst_rel_l2']:.4f} | {top1} | "
            f"{row['fp32_islands']} | {ops} | {per} | {row['calib']}/{row['eval']} |")


HEADER = ("| model | config | worst relL2 | top-1 agr | fp32 islands | compute ops int8/fp32 "
          "| relL2 per output | calib/eval |\n|---|---|---|---|---|---|---|---|")


def _names(text) -> List[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def main(argv):
    from absl import flags

    f = flags.FLAGS
    models = _names(f.models) or list(REAL) + list(ZOO)
    configs = _names(f.configs) or ["default"]
    print(HEADER, flush=True)
    rows = []
    for name in models:
        rows += measure(name, configs, f.zoo_eval, log=lambda s: print(s, flush=True))
    if f.json_out:
        common.write_json(f.json_out, {"rows": rows, "environment": common.environment()})


def define_flags():
    from absl import flags

    flags.DEFINE_string("models", None, "comma-separated model names (default: all)")
    flags.DEFINE_string("configs", "default", "comma-separated config names: "
                        + ", ".join(list(CONFIGS) + list(NOISE)))
    flags.DEFINE_integer("zoo_eval", 100, "ImageNet evaluation images for the zoo models")
    flags.DEFINE_string("json_out", None, "write the rows as JSON here")


if __name__ == "__main__":
    common.run_app(main, define_flags)
