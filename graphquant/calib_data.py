"""Calibration and validation data: files, image folders or Python iterables -> feed dicts.

    from graphquant.calib_data import open_data
    data = open_data("calib.npy", graph_def)          # checks everything, runs nothing
    for feeds in data:                                 # {"input:0": array with its batch axis}
        runner(feeds)

Sources (``source`` argument of :func:`open_data`):

* ``.npy`` -- one array, first axis = samples, for a single-input graph.  An
  array of shape ``(N, B, ...)`` (each sample already carrying the graph's batch
  axis) is accepted too and flattened to ``N*B`` samples.
* ``.npz`` -- one array per graph input, keyed by input name with or without
  ``:0`` (``np.savez(path, **{"input": x})``); all with the same number of samples.
* a folder of images (``.jpg .jpeg .png .gif .bmp``, not recursive, other files
  ignored) with a preprocessing spec (:class:`ImageSpec`), single 4-D input only.
  Files are taken in sorted name order, so ``skip``/``limit`` pick a
  reproducible split: the ImageNet calibration split is ``limit=100`` of
  ../shared/data/imagenet-samples, its evaluation split ``skip=100``.
* a Python iterable (library API) of arrays (single-input graph), lists of
  arrays in input order, or dicts keyed by input name.  Each item is one feed,
  *with* the batch axis, like TFLite's ``representative_dataset``; an item
  lacking the batch axis is taken as one sample.  Items are fed as given (no
  re-batching); the iterable is consumed once, when the data is opened.

``skip`` and ``limit`` count samples (items for an iterable).

Batching: when the graph has a fixed batch ``B`` (every shared model: ``B=1``),
samples are fed ``B`` at a time and a remainder of fewer than ``B`` samples is
dropped (``data.dropped`` says how many); when the batch axis is dynamic they
are fed ``batch_size`` at a time (the last feed may be smaller).

Everything is checked when the data is opened, before any graph runs, and each
problem is one :class:`CalibrationDataError` naming the input, the sample and a
fix: missing or unreadable file, no samples, NaN/Inf, wrong rank or shape
(expected vs got), a dtype that cannot be used, an unknown input name in an
``.npz`` (with the closest name), a missing input, a ``.npy`` or image folder
for a multi-input graph.  Image files are checked for an image signature up
front; one that still fails to decode fails when it is read, naming the file.

Dtype policy (data dtype -> graph input dtype):

* float -> float: cast (float64 -> float32 is fine); a value that overflows the
  target type is an error, like NaN/Inf.
* integer or bool -> float: **refused**.  The values would be exact, but integer
  data for a float input nearly always means the model's preprocessing (e.g.
  ``/255`` or ``-127.5``) was not applied, which silently ruins the ranges.
  Convert and preprocess it yourself, or give image files with a spec.
* integer -> integer: cast when every value fits the target type.
* float -> integer, anything -> bool except bool, strings, objects: refused.
"""

from __future__ import annotations

import difflib
import os
import zipfile
from dataclasses import dataclass, field, replace
from typing import (Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence,
                    Tuple, Union)

import numpy as np
from tensorflow.core.framework import graph_pb2

from graphquant.errors import CalibrationDataError
from graphquant.execute import import_graph
from graphquant.graph import INPUT_OPS, GraphIndex, canonical_tensor, node_name
from graphquant.runtime import tf

DEFAULT_BATCH_SIZE = 8          # samples per feed when the graph's batch axis is dynamic
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")
_IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM")
_SCAN_CHUNK = 256               # samples per chunk when scanning arrays for NaN/Inf
# decoded image feeds kept in memory (bytes): a conversion reads its calibration data
# several times (calibration, accuracy steps, sensitivity probe), decoding is the slow part
IMAGE_CACHE_BYTES = 512 << 20

Shape = Optional[Tuple[Optional[int], ...]]


# --------------------------------------------------------------------------- graph inputs
@dataclass(frozen=True)
class InputSpec:
    """One graph input: canonical tensor name, static shape (None = unknown rank), dtype."""

    name: str
    shape: Shape
    dtype: np.dtype

    @property
    def rank(self) -> Optional[int]:
        return None if self.shape is None else len(self.shape)

    @property
    def fixed_batch(self) -> Optional[int]:
        """The batch size the graph insists on, or None when the batch axis is dynamic."""
        if not self.shape:
            return None
        return self.shape[0]

    @property
    def sample_shape(self) -> Shape:
        """Shape of one sample: the input shape without its batch axis."""
        return None if self.shape is None else self.shape[1:]


def graph_input_specs(graph_def: graph_pb2.GraphDef,
                      inputs: Optional[Sequence[str]] = None) -> List[InputSpec]:
    """The :class:`InputSpec` of each graph input (all Placeholders when ``inputs`` is empty).

    Placeholders are read from their ``dtype``/``shape`` attributes; any other
    tensor named in ``inputs`` is looked up by importing the graph.
    """
    from tensorflow.python.framework import dtypes

    index = GraphIndex(graph_def)
    names = list(inputs) if inputs else index.inputs()
    specs, others = [], []
    for name in names:
        node = index.node(name)   # NodeNotFoundError with suggestions
        tensor = canonical_tensor(name)
        if node.op in INPUT_OPS and tensor.endswith(":0"):
            shape: Shape = None
            if "shape" in node.attr and not node.attr["shape"].shape.unknown_rank:
                shape = tuple(d.size if d.size >= 0 else None
                              for d in node.attr["shape"].shape.dim)
            dtype = np.dtype(dtypes.as_dtype(node.attr["dtype"].type).as_numpy_dtype)
            specs.append(InputSpec(tensor, shape, dtype))
        else:
            specs.append(None)
            others.append((len(specs) - 1, tensor))
    if others:
        graph = import_graph(graph_def)
        for i, tensor in others:
            tt = graph.get_tensor_by_name(tensor)
            shape = None if tt.shape.rank is None else tuple(tt.shape.as_list())
            specs[i] = InputSpec(tensor, shape, np.dtype(tt.dtype.as_numpy_dtype))
    return specs


# --------------------------------------------------------------------------- image spec
_RESIZE_METHODS = ("bilinear", "nearest", "bicubic", "area", "lanczos3", "lanczos5",
                   "gaussian", "mitchellcubic")
# keras.applications.imagenet_utils.preprocess_input modes
_PRESETS = {
    "tf": {"mean": (127.5,), "scale": 1 / 127.5},
    "caffe": {"order": "bgr", "mean": (103.939, 116.779, 123.68)},
    "torch": {"mean": (123.675, 116.28, 103.53), "std": (58.395, 57.12, 57.375)},
}
SPEC_HELP = ("image spec: 'key=value;key=value', keys size=H,W | resize="
             + "|".join(_RESIZE_METHODS)
             + " | crop=FRACTION | shorter=N | mean=V or V1,V2,V3 | std=V or V1,V2,V3 | scale=V"
             " (e.g. 1/127.5) | order=rgb|bgr | layout=nhwc|nchw | preset=tf|caffe|torch; "
             "example: 'size=224,224;mean=127.5;scale=1/127.5'")


@dataclass(frozen=True)
class ImageSpec:
    """How an image file becomes a model input.

    Steps, in order: decode to 8-bit RGB (or gray for a 1-channel input); keep
    the central ``crop`` fraction (TF-slim style, e.g. 0.875) **or** resize the
    shorter side to ``shorter`` pixels keeping the aspect ratio and cut the
    central ``size`` window (ResNet style, e.g. shorter=256 for size 224);
    otherwise resize to ``size`` with ``resize``; reorder channels to ``order``;
    then ``x = (pixel - mean) / std * scale`` with pixels in 0..255, per channel
    where three values are given.  ``size`` defaults to the graph input's
    height and width, ``layout`` to what the input shape shows (NCHW when the
    channel count sits on axis 1).

    As a string (:meth:`parse`, and ``str(spec)`` gives it back)::

        size=224,224;mean=127.5;scale=1/127.5;order=rgb;resize=bilinear;crop=0.875

    ``preset=tf|caffe|torch`` sets mean/std/scale/order like
    ``keras.applications``' ``preprocess_input`` modes; keys after it override.
    """

    size: Optional[Tuple[int, int]] = None
    resize: str = "bilinear"
    crop: float = 1.0
    shorter: Optional[int] = None
    mean: Tuple[float, ...] = (0.0,)
    std: Tuple[float, ...] = (1.0,)
    scale: float = 1.0
    order: str = "rgb"
    layout: Optional[str] = None

    def __post_init__(self):
        if self.resize not in _RESIZE_METHODS:
            _spec_error(f"unknown resize method '{self.resize}'")
        if not 0.0 < self.crop <= 1.0:
            _spec_error(f"crop must be a fraction in (0, 1], got {self.crop}")
        if self.crop != 1.0 and self.shorter is not None:
            _spec_error("crop and shorter are two ways to crop; give one of them")
        if self.shorter is not None and self.shorter <= 0:
            _spec_error(f"shorter must be a positive size in pixels, got {self.shorter}")
        if self.size is not None and (len(self.size) != 2 or min(self.size) <= 0):
            _spec_error(f"size must be two positive numbers H,W, got {self.size}")
        for key in ("mean", "std"):
            if len(getattr(self, key)) not in (1, 3):
                _spec_error(f"{key} takes one value or three (one per channel)")
        if any(s == 0 for s in self.std):
            _spec_error("std must not be 0")
        if self.order not in ("rgb", "bgr"):
            _spec_error(f"order must be rgb or bgr, got '{self.order}'")
        if self.layout not in (None, "nhwc", "nchw"):
            _spec_error(f"layout must be nhwc or nchw, got '{self.layout}'")

    @classmethod
    def parse(cls, text: Union[str, "ImageSpec"]) -> "ImageSpec":
        """An :class:`ImageSpec` from its string form (see the class docstring)."""
        if isinstance(text, ImageSpec):
            return text
        values: Dict[str, Any] = {}
        for part in (p.strip() for p in str(text).split(";")):
            if not part:
                continue
            key, sep, value = (s.strip() for s in part.partition("="))
            if not sep or not value:
                _spec_error(f"'{part}' is not key=value")
            key = key.lower()
            if key == "preset":
                if value not in _PRESETS:
                    _spec_error(f"unknown preset '{value}' (known: {', '.join(_PRESETS)})")
                values.update(_PRESETS[value])
            elif key == "size":
                nums = _numbers(key, value, int)
                values["size"] = (nums[0], nums[0]) if len(nums) == 1 else tuple(nums)
            elif key in ("mean", "std"):
                values[key] = tuple(_numbers(key, value, float))
            elif key in ("scale", "crop"):
                nums = _numbers(key, value, float)
                if len(nums) != 1:
                    _spec_error(f"{key} takes one number")
                values[key] = nums[0]
            elif key == "shorter":
                values[key] = _numbers(key, value, int)[0]
            elif key in ("resize", "order", "layout"):
                values[key] = value.lower()
            else:
                _spec_error(f"unknown key '{key}'")
        return cls(**values)

    def __str__(self) -> str:
        parts = []
        if self.size:
            parts.append(f"size={self.size[0]},{self.size[1]}")
        parts.append(f"resize={self.resize}")
        if self.crop != 1.0:
            parts.append(f"crop={self.crop:g}")
        if self.shorter is not None:
            parts.append(f"shorter={self.shorter}")
        parts.append("mean=" + ",".join(f"{m:g}" for m in self.mean))
        parts.append("std=" + ",".join(f"{s:g}" for s in self.std))
        parts.append(f"scale={self.scale!r}")
        parts.append(f"order={self.order}")
        if self.layout:
            parts.append(f"layout={self.layout}")
        return ";".join(parts)

    @property
    def is_identity(self) -> bool:
        """True when pixel values pass through unchanged (0..255)."""
        return (all(m == 0 for m in self.mean) and all(s == 1 for s in self.std)
                and self.scale == 1.0)


def _numbers(key: str, value: str, kind) -> list:
    out = []
    for item in value.split(","):
        try:
            num, _, den = item.partition("/")
            number = float(num) / float(den) if den else float(num)
        except (ValueError, ZeroDivisionError):
            _spec_error(f"{key}: '{item.strip()}' is not a number")
        if kind is int:
            if number != int(number):
                _spec_error(f"{key}: '{item.strip()}' is not a whole number")
            number = int(number)
        out.append(number)
    return out


def _spec_error(problem: str):
    raise CalibrationDataError(f"bad image preprocessing spec: {problem}", SPEC_HELP)


def load_image(path: str, spec: ImageSpec, height: int, width: int,
               channels: int = 3) -> np.ndarray:
    """Decode and preprocess one image file -> float32 array (height, width, channels).

    TensorFlow ops only (``tf.io.decode_image``, ``tf.image.resize``), in eager mode.
    """
    t = tf()
    try:
        with open(path, "rb") as f:
            contents = f.read()
        image = t.io.decode_image(contents, channels=channels, dtype=t.uint8,
                                  expand_animations=False)
    except (OSError, t.errors.OpError) as exc:
        message = getattr(exc, "message", None) or str(exc)
        raise CalibrationDataError(
            f"cannot read image '{path}': {message.strip().splitlines()[0]}",
            "remove or replace the file, or use skip/limit to leave it out") from None
    image = t.cast(image, t.float32)
    if spec.shorter is not None:
        h, w = int(image.shape[0]), int(image.shape[1])
        ratio = spec.shorter / min(h, w)
        new_h, new_w = max(height, round(h * ratio)), max(width, round(w * ratio))
        image = t.image.resize(image, (new_h, new_w), method=spec.resize)
        top, left = (new_h - height) // 2, (new_w - width) // 2
        image = image[top:top + height, left:left + width, :]
    else:
        if spec.crop != 1.0:
            image = t.image.central_crop(image, spec.crop)
        image = t.image.resize(image, (height, width), method=spec.resize)
    x = image.numpy().astype(np.float32)
    if spec.order == "bgr" and channels == 3:
        x = x[..., ::-1]
    mean = np.asarray(spec.mean, np.float32)
    std = np.asarray(spec.std, np.float32)
    if channels == 1:
        mean, std = mean[:1], std[:1]
    return ((x - mean) / std * np.float32(spec.scale)).astype(np.float32)


# --------------------------------------------------------------------------- the data object
class CalibrationData:
    """Checked data for a graph's inputs; iterating yields one feed dict per graph run.

    Attributes: ``inputs`` (the :class:`InputSpec` list), ``num_samples`` (fed
    samples), ``dropped`` (samples left out to fill fixed-size batches),
    ``source`` (a one-line description for reports).  ``len(data)`` is the
    number of feeds.  The object can be iterated any number of times, always in
    the same order.
    """

    def __init__(self, inputs: List[InputSpec], feeds: List[Any],
                 load: Callable[[Any], Dict[str, np.ndarray]], num_samples: int,
                 source: str, dropped: int = 0):
        self.inputs = inputs
        self._feeds = feeds
        self._load = load
        self.num_samples = num_samples
        self.dropped = dropped
        self.source = source

    def __len__(self) -> int:
        return len(self._feeds)

    def __iter__(self) -> Iterator[Dict[str, np.ndarray]]:
        for key in self._feeds:
            yield self._load(key)

    def __repr__(self) -> str:
        return f"<CalibrationData {self.source}>"


def open_data(source: Union[str, "os.PathLike[str]", Iterable[Any]],
              graph_def: Optional[graph_pb2.GraphDef] = None, *,
              inputs: Optional[Sequence[str]] = None,
              specs: Optional[Sequence[InputSpec]] = None,
              image_spec: Union[None, str, ImageSpec] = None,
              skip: int = 0, limit: Optional[int] = None,
              batch_size: int = DEFAULT_BATCH_SIZE,
              kind: str = "calibration") -> CalibrationData:
    """Check ``source`` against the graph's inputs and return it as :class:`CalibrationData`.

    Give ``graph_def`` (and optionally ``inputs``, the input names) or ``specs``
    directly.  ``image_spec`` is required for a folder of images.  ``kind``
    ("calibration" or "validation") only changes the wording of errors.
    Raises :class:`CalibrationDataError` for every problem listed in the
    module docstring, before anything runs.
    """
    if specs is None:
        if graph_def is None:
            raise TypeError("open_data needs graph_def or specs")
        specs = graph_input_specs(graph_def, inputs)
    specs = list(specs)
    if not specs:
        raise CalibrationDataError("the graph has no inputs (no Placeholder) to feed",
                                   "name the tensors to feed with --inputs")
    if skip < 0 or (limit is not None and limit < 0):
        raise CalibrationDataError(f"skip and limit must be >= 0 (got skip={skip}, limit={limit})",
                                   "give a number of samples, e.g. limit=100")
    if batch_size < 1:
        raise CalibrationDataError(f"batch_size must be >= 1, got {batch_size}",
                                   "give a positive batch size")
    ctx = _Context(specs, kind, skip, limit, batch_size)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            return _open_images(path, image_spec, ctx)
        if not os.path.exists(path):
            raise CalibrationDataError(f"{kind} data '{path}' does not exist",
                                       "check the path (a .npy, .npz or a folder of images)")
        lower = path.lower()
        if lower.endswith(".npy"):
            return _open_npy(path, ctx)
        if lower.endswith(".npz"):
            return _open_npz(path, ctx)
        raise CalibrationDataError(
            f"{kind} data '{path}' is neither .npy, .npz nor a folder",
            "save the samples with np.save (one input) or np.savez (several), or give a folder "
            "of images with an image spec")
    if isinstance(source, (np.ndarray, Mapping)):
        raise CalibrationDataError(
            f"{kind} data must be an iterable of feeds, got a single {type(source).__name__}",
            "wrap it in a list: [x] (one feed), or save the samples to a .npy/.npz file")
    try:
        iterator = iter(source)
    except TypeError:
        raise CalibrationDataError(
            f"{kind} data of type {type(source).__name__} is not a path or an iterable",
            "give a .npy/.npz path, a folder of images, or an iterable of arrays/dicts") from None
    return _open_iterable(iterator, ctx)


@dataclass
class _Context:
    specs: List[InputSpec]
    kind: str
    skip: int
    limit: Optional[int]
    batch_size: int
    names: Dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        for spec in self.specs:
            self.names[spec.name] = spec.name
            self.names[node_name(spec.name)] = spec.name

    def window(self, n: int) -> Tuple[int, int]:
        """(start, stop) of the samples kept by skip/limit out of ``n``."""
        start = min(self.skip, n)
        stop = n if self.limit is None else min(n, start + self.limit)
        return start, stop

    def resolve(self, key: str, what: str) -> str:
        """Canonical input name for a user key (``x`` or ``x:0``)."""
        if key in self.names:
            return self.names[key]
        close = difflib.get_close_matches(key, list(self.names), n=1, cutoff=0.4)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise CalibrationDataError(
            f"{what} has an array named '{key}', which is not an input of the graph "
            f"(inputs: {', '.join(s.name for s in self.specs)})",
            f"{hint}key each array by its input name, with or without ':0'")


# --------------------------------------------------------------------------- arrays
def _open_npy(path: str, ctx: _Context) -> CalibrationData:
    if len(ctx.specs) > 1:
        raise CalibrationDataError(
            f"'{path}' is a .npy (one array) but the graph has {len(ctx.specs)} inputs: "
            + ", ".join(s.name for s in ctx.specs),
            "save one array per input in a .npz: np.savez(path, "
            + ", ".join(f"{node_name(s.name)}=..." for s in ctx.specs) + ")")
    array = _load_npy(path)
    return _from_arrays({ctx.specs[0].name: array}, ctx, f"'{path}'")


def _open_npz(path: str, ctx: _Context) -> CalibrationData:
    try:
        archive = np.load(path, allow_pickle=False)
        if not hasattr(archive, "files"):
            raise ValueError("it holds a single array, not an archive")
        with archive:
            raw = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        raise CalibrationDataError(f"cannot read '{path}' as a .npz archive: {exc}",
                                   "write it with np.savez(path, input_name=array, ...)") from None
    what = f"'{path}'"
    arrays: Dict[str, np.ndarray] = {}
    for key, value in raw.items():
        name = ctx.resolve(key, what)
        if name in arrays:
            raise CalibrationDataError(f"{what} holds two arrays for input '{name}'",
                                       "keep one array per input")
        arrays[name] = value
    missing = [s.name for s in ctx.specs if s.name not in arrays]
    if missing:
        raise CalibrationDataError(
            f"{what} has no array for input(s) {', '.join(missing)} "
            f"(it holds: {', '.join(sorted(raw)) or 'nothing'})",
            "add one array per graph input, keyed by the input name")
    return _from_arrays(arrays, ctx, what)


def _load_npy(path: str) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        if not isinstance(array, np.ndarray):
            array.close()
            raise ValueError("it is a .npz archive, not a single array")
        return array
    except (OSError, ValueError, EOFError) as exc:
        raise CalibrationDataError(f"cannot read '{path}' as a .npy array: {exc}",
                                   "write it with np.save(path, array) (numeric dtype, "
                                   "no pickled objects)") from None


def _from_arrays(arrays: Dict[str, np.ndarray], ctx: _Context, what: str) -> CalibrationData:
    """Samples along axis 0 of each array -> feeds of the graph's batch size."""
    shaped = {s.name: _as_samples(s, arrays[s.name], what, ctx) for s in ctx.specs}
    counts = {name: len(a) for name, a in shaped.items()}
    if len(set(counts.values())) > 1:
        raise CalibrationDataError(
            f"{what}: the inputs have different numbers of samples: "
            + ", ".join(f"{k}: {v}" for k, v in counts.items()),
            "give every input the same number of samples along the first axis")
    total = next(iter(counts.values()))
    start, stop = ctx.window(total)
    if stop <= start:
        _no_samples(ctx, what, total)
    window = {name: a[start:stop] for name, a in shaped.items()}
    casts = {s.name: _check_values(s, window[s.name], what, start) for s in ctx.specs}

    batch, fixed = _batch_plan(ctx)
    n = stop - start
    if fixed and n < batch:
        raise CalibrationDataError(
            f"{what} holds {n} sample(s) but the graph takes a fixed batch of {batch}",
            f"give at least {batch} samples (a multiple of {batch} uses them all)")
    usable = n - n % batch if fixed else n
    feeds = [(i, min(i + batch, usable)) for i in range(0, usable, batch)]

    def load(key):
        lo, hi = key
        out = {}
        for s in ctx.specs:
            part = np.asarray(window[s.name][lo:hi])
            if s.rank == 0:
                part = part[0]
            out[s.name] = part.astype(casts[s.name], copy=False)
        return out

    description = _describe(what, n, total, ctx, usable)
    return CalibrationData(ctx.specs, feeds, load, usable, description, dropped=n - usable)


def _as_samples(spec: InputSpec, array, what: str, ctx: _Context):
    """Check rank and shape; return the array with samples along axis 0 (maybe a view)."""
    if array.ndim == 0:
        raise CalibrationDataError(
            f"{what}: input '{spec.name}' got a scalar, not samples",
            f"give an array with the samples along the first axis, shape {_fmt_samples(spec)}")
    if spec.rank is None:
        return array
    if spec.rank == 0:
        if array.ndim != 1:
            raise CalibrationDataError(
                f"{what}: input '{spec.name}' is a scalar, so the data should be a 1-D array "
                f"of N values; got shape {_fmt(array.shape)}", "give one value per sample")
        return array
    if array.ndim == spec.rank + 1:     # (N, B, ...): each sample carries the batch axis
        array = array.reshape((-1,) + tuple(array.shape[2:]))
    if array.ndim != spec.rank or not _matches(array.shape[1:], spec.sample_shape):
        raise CalibrationDataError(
            f"{what}: input '{spec.name}' expects samples of shape {_fmt(spec.sample_shape)} "
            f"(graph input shape {_fmt(spec.shape)}, first axis = batch), so an array of shape "
            f"{_fmt_samples(spec)}; got shape {_fmt(array.shape)}",
            f"give an array of shape {_fmt_samples(spec)} with the N samples along the first "
            "axis" + (" (check the layout: NHWC vs NCHW)" if array.ndim == 4 else ""))
    return array


def _check_values(spec: InputSpec, array, what: str, offset: int) -> np.dtype:
    """Check dtype and NaN/Inf/overflow over every sample; return the dtype to cast to."""
    src, dst = np.dtype(array.dtype), spec.dtype
    where = f"{what}: input '{spec.name}'"
    if src.kind not in "biuf" or dst.kind not in "biuf":
        raise CalibrationDataError(f"{where} has dtype {src} but the graph expects {dst}",
                                   f"give numeric data as {dst}")
    if dst.kind == "f" and src.kind in "biu":
        raise CalibrationDataError(
            f"{where} expects {dst} but the data is {src}: integer data for a float input "
            "usually means the model's preprocessing (scaling, mean) was not applied",
            f"preprocess the samples as the model expects and save them as {dst} "
            "(e.g. x.astype('float32') / 255), or give image files with an image spec")
    if dst.kind in "iu" and src.kind not in "iu":
        raise CalibrationDataError(f"{where} expects {dst} but the data is {src}",
                                   f"give integer data (x.astype('{dst}') if the values are whole)")
    if dst.kind == "b" and src.kind != "b":
        raise CalibrationDataError(f"{where} expects bool but the data is {src}",
                                   "give a bool array")
    if src.kind == "f":
        for lo in range(0, len(array), _SCAN_CHUNK):
            block = np.asarray(array[lo:lo + _SCAN_CHUNK])
            with np.errstate(over="ignore"):
                cast = block.astype(dst)
            bad = ~np.isfinite(cast).reshape(len(block), -1).all(axis=1)
            if bad.any():
                i = int(np.argmax(bad))
                sample = block[i]
                if np.isnan(sample).any():
                    kind = "NaN"
                elif not np.isfinite(sample).all():
                    kind = "Inf"
                else:
                    kind = (f"a value too large for {dst} "
                            f"({np.abs(sample.astype(np.float64)).max():g})")
                total = _count_bad(array, dst)
                raise CalibrationDataError(
                    f"{where} sample {offset + lo + i} (0-based) contains {kind}"
                    + (f"; {total} samples are affected" if total > 1 else ""),
                    "remove or repair those samples before calibrating")
    elif src.kind in "iu" and dst.kind in "iu" and not np.can_cast(src, dst):
        info = np.iinfo(dst)
        lo, hi = (int(array.min()), int(array.max())) if len(array) else (0, 0)
        if lo < info.min or hi > info.max:
            raise CalibrationDataError(
                f"{where} expects {dst} but the data ({src}) holds values {lo}..{hi}, "
                f"outside {info.min}..{info.max}", f"give values that fit {dst}")
    return dst


def _count_bad(array, dst) -> int:
    total = 0
    for lo in range(0, len(array), _SCAN_CHUNK):
        with np.errstate(over="ignore"):
            block = np.asarray(array[lo:lo + _SCAN_CHUNK]).astype(dst)
        total += int((~np.isfinite(block).reshape(len(block), -1).all(axis=1)).sum())
    return total


def _batch_plan(ctx: _Context) -> Tuple[int, bool]:
    """(samples per feed, whether that size is fixed by the graph)."""
    if any(s.rank == 0 for s in ctx.specs):
        return 1, True
    fixed = {s.fixed_batch for s in ctx.specs if s.fixed_batch is not None}
    if len(fixed) > 1:
        raise CalibrationDataError(
            "the graph inputs have different fixed batch sizes: "
            + ", ".join(f"{s.name} {_fmt(s.shape)}" for s in ctx.specs),
            "export the graph with one batch size for every input")
    if fixed:
        return fixed.pop(), True
    return ctx.batch_size, False


def _no_samples(ctx: _Context, what: str, total: int):
    if total == 0:
        raise CalibrationDataError(f"{what} holds no samples",
                                   f"give at least one {ctx.kind} sample")
    raise CalibrationDataError(
        f"{what} holds {total} samples but skip={ctx.skip} leaves none"
        + (f" (limit={ctx.limit})" if ctx.limit is not None else ""),
        f"use skip < {total}" if ctx.limit != 0 else "use limit >= 1")


def _describe(what: str, n: int, total: int, ctx: _Context, usable: int) -> str:
    text = f"{usable} samples from {what}"
    if (ctx.skip or n < total):
        text += f" (samples {ctx.skip}..{ctx.skip + n - 1} of {total})"
    if usable < n:
        text += f", {n - usable} dropped to fill fixed batches"
    return text


# --------------------------------------------------------------------------- images
def list_images(folder: str) -> List[str]:
    """Image files directly in ``folder``, sorted by name (the order skip/limit count in)."""
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")
                  and os.path.isfile(os.path.join(folder, f)))


def _open_images(folder: str, image_spec, ctx: _Context) -> CalibrationData:
    what = f"image folder '{folder}'"
    if len(ctx.specs) != 1:
        raise CalibrationDataError(
            f"{what} can feed one input, but the graph has {len(ctx.specs)}: "
            + ", ".join(s.name for s in ctx.specs),
            "give a .npz with one array per input instead")
    if image_spec is None:
        raise CalibrationDataError(f"{what} needs a preprocessing spec (how pixels become "
                                   "model inputs)", SPEC_HELP)
    spec = ImageSpec.parse(image_spec)
    input_spec = ctx.specs[0]
    layout, height, width, channels = _image_geometry(input_spec, spec, what)
    if input_spec.dtype.kind != "f" and not spec.is_identity:
        raise CalibrationDataError(
            f"input '{input_spec.name}' is {input_spec.dtype}, which cannot hold the normalised "
            f"pixels of spec '{spec}'", "drop mean/std/scale from the spec for an integer input")
    try:
        files = list_images(folder)
    except OSError as exc:
        raise CalibrationDataError(f"cannot list {what}: {exc}", "check the permissions") from None
    if not files:
        others = sorted({os.path.splitext(f)[1].lower() or "(none)" for f in os.listdir(folder)})
        raise CalibrationDataError(
            f"{what} holds no image files ({', '.join(IMAGE_EXTENSIONS)})"
            + (f"; it holds extensions {', '.join(others)}" if others else " (it is empty)"),
            "put .jpg/.png images in it, or give a .npy/.npz")
    total = len(files)
    start, stop = ctx.window(total)
    if stop <= start:
        _no_samples(ctx, what, total)
    files = files[start:stop]
    for path in files:
        _check_image_file(path)

    batch, fixed = _batch_plan(ctx)
    if fixed and len(files) < batch:
        raise CalibrationDataError(
            f"{what}: {len(files)} image(s) selected but the graph takes a fixed batch of {batch}",
            f"select at least {batch} images")
    usable = len(files) - len(files) % batch if fixed else len(files)
    feeds = [(i, min(i + batch, usable)) for i in range(0, usable, batch)]
    spec = replace(spec, size=(height, width), layout=layout)

    def decode(key):
        lo, hi = key
        images = np.stack([load_image(p, spec, height, width, channels) for p in files[lo:hi]])
        if layout == "nchw":
            images = images.transpose(0, 3, 1, 2)
        if input_spec.dtype.kind != "f":
            images = np.clip(np.round(images), 0, 255)
        return images.astype(input_spec.dtype)

    decoded: Dict[Any, np.ndarray] = {}
    budget = [IMAGE_CACHE_BYTES]

    def load(key):
        images = decoded.get(key)
        if images is None:
            images = decode(key)
            if images.nbytes <= budget[0]:     # kept read-only: every reader shares it
                budget[0] -= images.nbytes
                images.flags.writeable = False
                decoded[key] = images
        return {input_spec.name: images}

    description = f"{usable} images from '{folder}'"
    if ctx.skip or ctx.limit is not None:
        description += f" (files {start}..{stop - 1} of {total} by name)"
    description += f", spec '{spec}'"
    return CalibrationData(ctx.specs, feeds, load, usable, description,
                           dropped=len(files) - usable)


def _image_geometry(spec: InputSpec, image_spec: ImageSpec, what: str):
    """(layout, height, width, channels) for feeding images to ``spec``."""
    if spec.rank != 4:
        raise CalibrationDataError(
            f"{what}: images need a 4-D input (batch, height, width, channels), but input "
            f"'{spec.name}' has shape {_fmt(spec.shape)}",
            "give the samples as a .npy/.npz instead")
    shape = spec.shape
    layout = image_spec.layout
    if layout is None:
        layout = "nchw" if shape[1] in (1, 3) and shape[3] not in (1, 3) else "nhwc"
    h, w, c = (shape[2], shape[3], shape[1]) if layout == "nchw" else (shape[1], shape[2], shape[3])
    if c not in (1, 3):
        raise CalibrationDataError(
            f"{what}: input '{spec.name}' {_fmt(shape)} read as {layout.upper()} has "
            f"{c if c is not None else 'an unknown number of'} channels; images give 1 or 3",
            "set layout=nhwc or layout=nchw in the image spec, or give a .npy/.npz")
    if image_spec.size is not None:
        size = image_spec.size
        if (h is not None and h != size[0]) or (w is not None and w != size[1]):
            raise CalibrationDataError(
                f"{what}: spec size={size[0]},{size[1]} but input '{spec.name}' takes "
                f"{h}x{w} images ({_fmt(shape)}, {layout.upper()})",
                f"use size={h},{w} or leave size out")
        h, w = size
    if h is None or w is None:
        raise CalibrationDataError(
            f"{what}: input '{spec.name}' {_fmt(shape)} has no fixed height/width",
            "give size=H,W in the image spec")
    return layout, int(h), int(w), int(c)


def _check_image_file(path: str) -> None:
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise CalibrationDataError(f"cannot read image '{path}': {exc.strerror or exc}",
                                   "check the file's permissions, or remove it") from None
    if not head.startswith(_IMAGE_SIGNATURES):
        raise CalibrationDataError(
            f"'{path}' is not a JPEG, PNG, GIF or BMP image"
            + (" (the file is empty)" if not head else ""),
            "remove or replace the file, or use skip/limit to leave it out")


# --------------------------------------------------------------------------- iterables
def _open_iterable(iterator: Iterator[Any], ctx: _Context) -> CalibrationData:
    what = f"{ctx.kind} item"
    feeds: List[Dict[str, np.ndarray]] = []
    total = 0
    for index, item in enumerate(iterator):
        total += 1
        if index < ctx.skip:
            continue
        if ctx.limit is not None and len(feeds) >= ctx.limit:
            break
        feeds.append(_item_feed(item, index, ctx))
    if not feeds:
        _no_samples(ctx, f"the {ctx.kind} iterable", total)
    samples = sum(_feed_batch(f, ctx) for f in feeds)
    description = f"{samples} samples in {len(feeds)} feeds from a Python iterable"
    return CalibrationData(ctx.specs, list(range(len(feeds))), feeds.__getitem__, samples,
                           description)


def _item_feed(item, index: int, ctx: _Context) -> Dict[str, np.ndarray]:
    what = f"{ctx.kind} item {index}"
    if isinstance(item, Mapping):
        named = {}
        for key, value in item.items():
            name = ctx.resolve(str(key), what)
            named[name] = value
        missing = [s.name for s in ctx.specs if s.name not in named]
        if missing:
            raise CalibrationDataError(f"{what} has no value for input(s) {', '.join(missing)}",
                                       "give every graph input in each item")
    elif isinstance(item, (list, tuple)):
        if len(item) != len(ctx.specs):
            raise CalibrationDataError(
                f"{what} holds {len(item)} arrays but the graph has {len(ctx.specs)} inputs "
                f"({', '.join(s.name for s in ctx.specs)})",
                "give one array per input, in input order, or a dict keyed by input name")
        named = {s.name: v for s, v in zip(ctx.specs, item)}
    else:
        if len(ctx.specs) != 1:
            raise CalibrationDataError(
                f"{what} is one array but the graph has {len(ctx.specs)} inputs "
                f"({', '.join(s.name for s in ctx.specs)})",
                "yield a dict keyed by input name (or a list in input order)")
        named = {ctx.specs[0].name: item}
    feed = {}
    for spec in ctx.specs:
        try:
            array = np.asarray(named[spec.name])
        except (ValueError, TypeError) as exc:
            raise CalibrationDataError(f"{what}: input '{spec.name}' is not an array: {exc}",
                                       "yield numpy arrays") from None
        if spec.rank is not None and spec.rank > 0 and array.ndim == spec.rank - 1:
            array = array[None]          # one sample without its batch axis
        if spec.rank is not None and (array.ndim != spec.rank
                                      or not _matches(array.shape, spec.shape)):
            raise CalibrationDataError(
                f"{what}: input '{spec.name}' expects a feed of shape {_fmt(spec.shape)} "
                f"(with the batch axis); got shape {_fmt(array.shape)}",
                f"yield arrays of shape {_fmt(spec.shape)}")
        if spec.rank and array.shape[0] == 0:
            raise CalibrationDataError(f"{what}: input '{spec.name}' holds an empty batch",
                                       "yield at least one sample per item")
        samples = array if spec.rank else array[None]
        dtype = _check_values(spec, samples, what, 0)
        feed[spec.name] = array.astype(dtype, copy=False)
    return feed


def _feed_batch(feed: Dict[str, np.ndarray], ctx: _Context) -> int:
    for spec in ctx.specs:
        if spec.rank:
            return int(feed[spec.name].shape[0])
    return 1


# --------------------------------------------------------------------------- formatting
def _matches(got: Sequence[int], expected: Shape) -> bool:
    if expected is None:
        return True
    return len(got) == len(expected) and all(e is None or g == e for g, e in zip(got, expected))


def _fmt(shape: Shape) -> str:
    if shape is None:
        return "(unknown rank)"
    dims = ["?" if d is None else str(d) for d in shape]
    return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"


def _fmt_samples(spec: InputSpec) -> str:
    if spec.sample_shape is None:
        return "(N, ...)"
    return "(" + ", ".join(["N"] + ["?" if d is None else str(d) for d in spec.sample_shape]) + ")"
