"""The model zoo: frozen fp32 ImageNet classifiers built from keras.applications.

    python -m models.zoo --all                 # every zoo graph (5 models x 2 styles x batch 1, 16)
    python -m models.zoo --model=mobilenet_v1 --alpha=0.25 --size=128 --style=keras3,tfkeras
    python -m models.zoo --list                # what is in the cache

No pretrained weights can be downloaded here, so each network is built with
``weights=None`` from a fixed seed and then its batch-norm moving statistics
are re-estimated on real ImageNet photos (the first ``bn_images`` files, by
name, of ``../shared/data/imagenet-samples`` -- the calibration split): one
forward pass in training mode over all of them with momentum 0 sets every
moving mean and variance to the statistics of that layer's input, so at
inference each batch-norm output is centred and scaled as in a trained net.
The weights are random, so top-1 accuracy is at chance level; the point is
realistic activation ranges for quantization.  The classifier head is random
too: the softmax is nearly uniform and the top-1 margin tiny (MobileNet v1:
median top-1 minus top-2 log-probability 0.05), so top-1 *agreement* between
fp32 and int8 is a far harsher test here than on a trained net -- judge zoo
fidelity by SQNR, relative L2 and cosine similarity.

Two export styles, because users hand us both:

* ``keras3``: the ``keras`` package (Keras 3); batch-norm freezes into
  Mul/AddV2/Rsqrt/Sub;
* ``tfkeras``: the legacy tf.keras (the ``tf_keras`` package, which is what
  ``tf.keras`` is under ``TF_USE_LEGACY_KERAS=1``); batch-norm freezes into
  ``FusedBatchNormV3``.

Both Keras libraries are imported directly in one process (``import keras``
and ``import tf_keras``), so no environment variable has to be set before
TensorFlow loads.  The network and its batch-norm statistics are built once
with Keras 3; the tf_keras model of the same architecture receives those very
weights, so both styles compute the same function.

Every graph lands in ``models/cache/`` (git-ignored, never committed) as
``KEY.pb`` with ``KEY.json`` beside it: inputs, outputs, shapes, the
preprocessing spec (see :func:`preprocessing_spec`), the label convention,
the op histogram and the check of the frozen graph against the Keras model.
``KEY`` names every option, so changing one builds a new graph.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # tools.export and graphquant live in the repository root
    sys.path.insert(0, _REPO)

import graphquant  # noqa: E402,F401  (TensorFlow settings before TensorFlow loads)
from graphquant.errors import GraphQuantError  # noqa: E402
from graphquant.runtime import tf  # noqa: E402

ROOT = _REPO
CACHE_DIR = os.environ.get("GRAPHQUANT_ZOO_CACHE", os.path.join(ROOT, "models", "cache"))
SHARED = os.environ.get("GRAPHQUANT_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))
IMAGENET_DIR = os.path.join(SHARED, "data", "imagenet-samples")
CALIB_COUNT = 100  # first 100 files by name = calibration split, the other 900 = evaluation
RECIPE_VERSION = 2  # bump when a change to this file changes the graphs it builds


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One keras.applications network and how its inputs are prepared."""

    application: str  # constructor name in keras.applications
    default_size: int
    preprocessing: str  # keras.applications preprocess_input mode: caffe, tf or torch
    has_alpha: bool = False  # width multiplier (MobileNets)


ARCHITECTURES: Dict[str, Architecture] = {
    "resnet50": Architecture("ResNet50", 224, "caffe"),
    "resnet101": Architecture("ResNet101", 224, "caffe"),
    "inception_v3": Architecture("InceptionV3", 299, "tf"),
    "mobilenet_v1": Architecture("MobileNet", 224, "tf", has_alpha=True),
    "mobilenet_v2": Architecture("MobileNetV2", 224, "tf", has_alpha=True),
}
STYLES = ("keras3", "tfkeras")


@dataclasses.dataclass(frozen=True)
class ZooOptions:
    """Everything that determines a zoo graph (and so its cache key)."""

    model: str
    style: str = "keras3"
    alpha: float = 1.0
    size: Optional[int] = None  # None: the architecture's default
    batch: Optional[int] = 1  # None: dynamic batch
    seed: int = 0
    bn_images: int = CALIB_COUNT

    def __post_init__(self):
        if self.model not in ARCHITECTURES:
            raise GraphQuantError(f"unknown zoo model '{self.model}'",
                                  "choose one of " + ", ".join(ARCHITECTURES))
        if self.style not in STYLES:
            raise GraphQuantError(f"unknown export style '{self.style}'",
                                  "choose keras3 or tfkeras")
        if self.alpha != 1.0 and not ARCHITECTURES[self.model].has_alpha:
            raise GraphQuantError(f"{self.model} has no width multiplier (alpha)",
                                  "use --alpha only with mobilenet_v1 / mobilenet_v2")
        if not 1 <= self.bn_images <= CALIB_COUNT:
            raise GraphQuantError(f"bn_images={self.bn_images} is outside 1..{CALIB_COUNT}",
                                  "batch-norm statistics come from the calibration split only")
        if self.batch is not None and self.batch < 1:
            raise GraphQuantError(f"batch={self.batch} must be positive (None = dynamic)",
                                  "pass --batch=1, 16 or dynamic")

    @property
    def arch(self) -> Architecture:
        return ARCHITECTURES[self.model]

    @property
    def input_size(self) -> int:
        return self.size or self.arch.default_size

    def weights_key(self) -> str:
        """The part of the key that fixes the weights (not the style or the batch)."""
        alpha = f"_a{self.alpha:g}" if self.arch.has_alpha else ""
        return (f"{self.model}{alpha}_{self.input_size}px_seed{self.seed}_bn{self.bn_images}"
                f"_r{RECIPE_VERSION}")

    def key(self) -> str:
        batch = "bdyn" if self.batch is None else f"b{self.batch}"
        return f"{self.weights_key()}_{batch}_{self.style}"

    def as_dict(self) -> Dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- preprocessing
CROP_FRACTION = 0.875  # the central 87.5%: shorter side to size / 0.875, then the central window


def preprocessing_spec(mode: str, size: int, label_offset: int = 0) -> Dict:
    """How an image file becomes the model's input (stored as "preprocessing" in each .json).

    ``image_spec`` is a :class:`graphquant.calib_data.ImageSpec` string, so
    ``graphquant convert --calib DIR`` and tools/evaluate.py read images exactly
    as the zoo did when it estimated the batch-norm statistics: decode as RGB,
    resize the shorter side to ``round(size / 0.875)`` (256 for 224), cut the
    central ``size`` x ``size`` window, then ``mode`` as keras.applications'
    ``preprocess_input``: caffe = BGR minus the ImageNet mean, tf = pixels / 127.5 - 1,
    torch = (pixels / 255 - mean) / std.  ``labels``: class index = position
    of the synset in sorted order, plus ``label_offset`` (1 with a background class).
    """
    from graphquant.calib_data import ImageSpec

    presets = {
        "caffe": {"order": "bgr", "mean": (103.939, 116.779, 123.68)},
        "tf": {"mean": (127.5,), "scale": 1 / 127.5},
        "torch": {"mean": (123.675, 116.28, 103.53), "std": (58.395, 57.12, 57.375)},
    }
    if mode not in presets:
        raise GraphQuantError(f"unknown preprocessing mode '{mode}'",
                              "use caffe, tf or torch (as keras.applications preprocess_input)")
    spec = ImageSpec(size=(size, size), shorter=int(round(size / CROP_FRACTION)),
                     resize="bilinear", layout="nhwc", **presets[mode])
    return {
        "image_spec": str(spec),
        "mode": mode,
        "size": [size, size],
        "layout": "NHWC",
        "labels": {"dataset": "imagenet", "num_classes": 1000 + label_offset,
                   "label_offset": label_offset, "index": "sorted_synset_position"},
    }


def imagenet_files(split: str = "calib", data_dir: str = IMAGENET_DIR) -> List[str]:
    """Sorted ImageNet sample paths: ``calib`` (first 100 by name), ``eval`` (the rest), ``all``."""
    files = sorted(glob.glob(os.path.join(data_dir, "*.JPEG")))
    if not files:
        raise GraphQuantError(f"no *.JPEG images in '{data_dir}'",
                              "set GRAPHQUANT_SHARED to the folder holding data/imagenet-samples")
    if split == "all":
        return files
    if split == "calib":
        return files[:CALIB_COUNT]
    if split == "eval":
        return files[CALIB_COUNT:]
    raise GraphQuantError(f"unknown split '{split}'", "use calib, eval or all")


def synset_labels(files: Sequence[str], data_dir: str = IMAGENET_DIR,
                  label_offset: int = 0) -> np.ndarray:
    """Class index of each file: its synset's position among all sorted synsets (+ offset)."""
    synsets = sorted({os.path.basename(p).split("_")[0] for p in imagenet_files("all", data_dir)})
    position = {s: i for i, s in enumerate(synsets)}
    return np.array([position[os.path.basename(p).split("_")[0]] + label_offset for p in files],
                    np.int64)


def load_images(files: Sequence[str], spec: Dict) -> np.ndarray:
    """(N, H, W, 3) float32 inputs from image files, prepared as ``spec`` (a zoo json's) says."""
    from graphquant.calib_data import ImageSpec, load_image

    image_spec = ImageSpec.parse(spec["image_spec"])
    height, width = spec["size"]
    return np.stack([load_image(p, image_spec, height, width) for p in files])


# --------------------------------------------------------------------------- building
def _keras_module(style: str):
    tf()  # TensorFlow settings first
    if style == "keras3":
        import keras  # noqa: PLC0415

        return keras
    try:
        import tf_keras  # noqa: PLC0415
    except ImportError:  # pragma: no cover - depends on the environment
        raise GraphQuantError("the tfkeras export style needs the tf-keras package",
                              "pip install 'tf-keras>=2.21,<2.22'") from None
    return tf_keras


def _new_model(opts: ZooOptions, style: str):
    keras = _keras_module(style)
    keras.utils.set_random_seed(opts.seed)
    kwargs = {"weights": None, "input_shape": (opts.input_size, opts.input_size, 3),
              "classes": 1000}
    if opts.arch.has_alpha:
        kwargs["alpha"] = opts.alpha
    return getattr(keras.applications, opts.arch.application)(**kwargs)


def _batchnorm_layers(model) -> List:
    return [layer for layer in model.layers if type(layer).__name__ == "BatchNormalization"]


def reestimate_batchnorm(model, images: np.ndarray) -> None:
    """Set every batch-norm's moving mean/variance to the statistics of its input on ``images``.

    One training-mode pass with momentum 0: in that pass each batch-norm
    normalizes with the batch statistics, which are therefore exactly the
    statistics its input has once the earlier layers use their new moving
    values -- so inference on ``images`` reproduces the training-mode pass.
    """
    layers = _batchnorm_layers(model)
    saved = [layer.momentum for layer in layers]
    try:
        for layer in layers:
            layer.momentum = 0.0
        # Traced, not eager: the graph frees each activation once used (ResNet-50 on 100
        # images peaks at ~2 GB this way, ~16 GB eagerly).
        tf().function(lambda x: model(x, training=True))(images)
    finally:
        for layer, momentum in zip(layers, saved):
            layer.momentum = momentum


def weights_path(opts: ZooOptions, cache_dir: str = CACHE_DIR) -> str:
    return os.path.join(cache_dir, opts.weights_key() + ".weights.npz")


def spec_for(opts: ZooOptions) -> Dict:
    return preprocessing_spec(opts.arch.preprocessing, opts.input_size)


def build_weights(opts: ZooOptions, cache_dir: str = CACHE_DIR, log=print) -> str:
    """Seeded Keras 3 network with re-estimated batch-norm statistics, saved as .npz (cached)."""
    path = weights_path(opts, cache_dir)
    if os.path.exists(path):
        return path
    os.makedirs(cache_dir, exist_ok=True)
    start = time.time()
    model = _new_model(opts, "keras3")
    files = imagenet_files("calib")[:opts.bn_images]
    images = load_images(files, spec_for(opts))
    log(f"  {opts.weights_key()}: re-estimating {len(_batchnorm_layers(model))} batch-norms "
        f"on {len(files)} images")
    reestimate_batchnorm(model, images)
    weights = model.get_weights()
    tmp = path + ".tmp.npz"
    np.savez(tmp, *weights)
    os.replace(tmp, path)
    log(f"  {opts.weights_key()}: weights ready ({time.time() - start:.0f} s)")
    return path


def keras_model(opts: ZooOptions, cache_dir: str = CACHE_DIR, log=print):
    """The Keras model (Keras 3 or tf_keras, by ``opts.style``) with the zoo weights."""
    path = build_weights(opts, cache_dir, log)
    with np.load(path) as data:
        weights = [data[f"arr_{i}"] for i in range(len(data.files))]
    model = _new_model(opts, opts.style)
    shapes = [tuple(w.shape) for w in model.get_weights()]
    if shapes != [w.shape for w in weights]:
        raise GraphQuantError(
            f"{opts.style} {opts.arch.application} does not have the weight layout of the "
            "Keras 3 model the zoo weights come from",
            "use --style=keras3, or check that tf-keras and keras are the versions in setup.py")
    model.set_weights(weights)
    return model


def graph_paths(opts: ZooOptions, cache_dir: str = CACHE_DIR) -> Tuple[str, str]:
    base = os.path.join(cache_dir, opts.key())
    return base + ".pb", base + ".json"


def _cached(opts: ZooOptions, cache_dir: str) -> bool:
    pb, meta = graph_paths(opts, cache_dir)
    if not (os.path.exists(pb) and os.path.exists(meta)):
        return False
    with open(meta) as f:
        return json.load(f).get("options") == opts.as_dict()


def build(opts: ZooOptions, cache_dir: str = CACHE_DIR, force: bool = False,
          log=print) -> Tuple[str, str]:
    """Build (or find in the cache) one zoo graph; returns (pb path, json path)."""
    from graphquant.execute import run_graph
    from graphquant.graph import op_histogram
    from graphquant.graph_io import save_graph_def
    from tools.export import freeze_keras_model

    pb_path, json_path = graph_paths(opts, cache_dir)
    if not force and _cached(opts, cache_dir):
        return pb_path, json_path
    start = time.time()
    model = keras_model(opts, cache_dir, log)
    graph_def, inputs, outputs = freeze_keras_model(model, opts.batch)
    save_graph_def(graph_def, pb_path)

    # The frozen graph must reproduce the Keras 3 model the weights come from.
    reference = model if opts.style == "keras3" else keras_model(
        dataclasses.replace(opts, style="keras3"), cache_dir, log)
    check_files = imagenet_files("calib")[:opts.batch or 2]
    x = load_images(check_files, spec_for(opts))
    expected = np.asarray(reference(x, training=False))
    got = run_graph(graph_def, {inputs[0]: x}, outputs)[0]
    diff = float(np.max(np.abs(got - expected)))
    rel = float(np.linalg.norm(got - expected) / max(np.linalg.norm(expected), 1e-30))
    if rel > 1e-4:
        raise GraphQuantError(f"{opts.key()}: frozen graph differs from the Keras model "
                              f"(relative L2 {rel:.2e})", "report this zoo recipe as broken")

    input_shape = [opts.batch, opts.input_size, opts.input_size, 3]
    meta = {
        "name": opts.key(),
        "pb": os.path.basename(pb_path),
        "pb_bytes": os.path.getsize(pb_path),
        "sha256": _sha256(pb_path),
        "options": opts.as_dict(),
        "application": f"keras.applications.{opts.arch.application}",
        "style": opts.style,
        "batchnorm_form": "FusedBatchNormV3" if opts.style == "tfkeras" else "Mul/AddV2/Rsqrt/Sub",
        "inputs": [[inputs[0], input_shape]],
        "outputs": [[outputs[0], [opts.batch, 1000]]],
        "output_kind": "softmax probabilities over the 1000 ImageNet classes",
        "preprocessing": spec_for(opts),
        "batchnorm_statistics": {
            "images": f"first {opts.bn_images} files by name of data/imagenet-samples "
                      "(calibration split)",
            "method": "one training-mode pass with momentum 0",
        },
        "weights": f"random (weights=None), seed {opts.seed}; accuracy is at chance level",
        "n_nodes": len(graph_def.node),
        "op_histogram": op_histogram(graph_def),
        "frozen_vs_keras": {"images": len(check_files), "max_abs_diff": diff, "rel_l2": rel,
                            "ref_absmax": float(np.max(np.abs(expected)))},
        "versions": {"tensorflow": tf().__version__,
                     "keras": _keras_module(opts.style).__version__},
        "build_seconds": round(time.time() - start, 1),
    }
    tmp = json_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, json_path)
    log(f"  {opts.key()}: {len(graph_def.node)} nodes, {meta['pb_bytes'] / 1e6:.1f} MB, "
        f"frozen vs Keras rel L2 {rel:.1e} ({meta['build_seconds']:.0f} s)")
    return pb_path, json_path


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def all_options(batches: Sequence[Optional[int]] = (1, 16)) -> List[ZooOptions]:
    """The standard zoo: every architecture x both export styles x ``batches``."""
    return [ZooOptions(model=m, style=s, batch=b)
            for m in ARCHITECTURES for b in batches for s in STYLES]


# --------------------------------------------------------------------------- command line
def _define_flags():
    from absl import flags

    flags.DEFINE_bool("all", False, "build every zoo graph: all models x both styles x --batches")
    flags.DEFINE_list("model", [], "zoo models: " + ", ".join(ARCHITECTURES))
    flags.DEFINE_list("style", list(STYLES), "export styles: keras3, tfkeras")
    flags.DEFINE_list("batches", ["1", "16"], "batch sizes (integers or 'dynamic')")
    flags.DEFINE_float("alpha", 1.0, "MobileNet width multiplier")
    flags.DEFINE_integer("size", None, "input height = width (default: the model's own)")
    flags.DEFINE_integer("seed", 0, "weight initialisation seed")
    flags.DEFINE_integer("bn_images", CALIB_COUNT, "calibration images for batch-norm statistics")
    flags.DEFINE_string("cache_dir", CACHE_DIR, "where graphs are cached")
    flags.DEFINE_bool("force", False, "rebuild even when cached")
    flags.DEFINE_bool("list", False, "list the cached graphs and exit")


def _list_cache(cache_dir: str) -> None:
    metas = sorted(glob.glob(os.path.join(cache_dir, "*.json")))
    if not metas:
        print(f"no zoo graphs in {cache_dir}")
    for meta_path in metas:
        with open(meta_path) as f:
            meta = json.load(f)
        print(f"{meta['pb']:<60} {meta['pb_bytes'] / 1e6:7.1f} MB  input {meta['inputs'][0]}")


def main(argv):
    from absl import flags

    from tools.export import parse_batch

    f = flags.FLAGS
    if len(argv) > 1:
        raise GraphQuantError(f"unexpected arguments {argv[1:]}", "use flags, e.g. --all")
    if f.list:
        _list_cache(f.cache_dir)
        return
    batches = [parse_batch(b) for b in f.batches]
    if f.all:
        todo = [dataclasses.replace(o, seed=f.seed, bn_images=f.bn_images)
                for o in all_options(batches)]
    elif f.model:
        todo = [ZooOptions(model=m, style=s, alpha=f.alpha, size=f.size, batch=b, seed=f.seed,
                           bn_images=f.bn_images)
                for m in f.model for b in batches for s in f.style]
    else:
        raise GraphQuantError("nothing to build", "pass --all or --model=NAME[,NAME]")
    for i, opts in enumerate(todo, 1):
        print(f"[{i}/{len(todo)}] {opts.key()}", flush=True)
        pb_path, _ = build(opts, f.cache_dir, f.force, log=lambda s: print(s, flush=True))
        print(f"  -> {pb_path}", flush=True)


def run():
    from tools import common  # the repository root is on sys.path for `python -m models.zoo`

    common.run_app(main, _define_flags)


if __name__ == "__main__":
    run()
