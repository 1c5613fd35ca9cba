"""Calibration: run the fp32 graph on calibration data and choose a range per tensor.

    from graphquant.calib_data import open_data
    from graphquant.calibrate import calibrate
    data = open_data("calib.npy", graph_def)                  # checked before any work
    ranges, stats = calibrate(graph_def, ["conv/Relu:0"], data, method="kl")
    ranges["conv/Relu:0"]                                     # (min, max) as Python floats

Statistics come from one TensorFlow session per calibration (never from
logs), reduced in numpy from the fetched tensors or, with ``in_graph=True``,
inside the run (see :func:`collect_statistics`), identically.  Per tensor, :class:`TensorStats` keeps the exact min and max, the number of
values and of non-finite values (left out of everything else), and a histogram:

* ``2 * HIST_BINS`` equal bins over ``[-bound, bound)``, where ``bound`` is the
  smallest power of two strictly above the largest ``|x|`` seen so far;
* when a batch brings a larger ``|x|``, ``bound`` doubles and each pair of bins
  merges into one.  Bin edges are power-of-two multiples, so binning a value
  directly at the final bound and binning it early then merging give the same
  bin: the final histogram depends only on the multiset of values, not on the
  order or batching of the samples.  Same data -> identical ranges.

Range methods (``method=``; ``methods={tensor: method}`` overrides per tensor):

* ``minmax`` (default) -- the exact data range ``(min, max)``.
* ``percentile`` -- ``(P(100-p), P(p))`` read from the histogram (within a bin
  width of ``numpy.percentile``), widened to contain 0; ``p=99.99`` by default.
* ``kl`` -- entropy calibration in the manner TensorRT describes: on the
  ``|x|`` histogram (full resolution; TensorRT uses 2048 bins) try the clip
  thresholds ``T`` from ``levels`` bins up, compare the clipped distribution P
  (outliers added to the last bin) with Q, the in-range part quantized to
  ``levels`` levels, and keep the ``T`` of least KL(P||Q); the zero bin is
  levelled with its neighbour first (see :func:`kl_threshold`).
* ``mse`` -- the ``T`` minimising the expected quantization error on the
  histogram: clipped values cost ``(|x| - T)**2``, values rounding to zero
  ``x**2``, other in-range values ``step**2 / 12``, ``step = T / (levels - 1)``.

For ``kl`` and ``mse``, one-signed tensors (e.g. after Relu) use ``[0, T]``
with ``2**num_bits`` levels, others ``[-T, T]`` with ``2**(num_bits-1)``
levels on ``|x|``; the range is then cut to the data range, so a side the
data never reaches keeps its exact bound (and ``max(|lo|, |hi|)``, what a
symmetric quantizer uses, is ``min(T, max|x|)``).  Every method but
``minmax`` returns a range containing 0.
"""

from __future__ import annotations

import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import (Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence,
                    Tuple)

import numpy as np
from tensorflow.core.framework import graph_pb2

from graphquant.errors import CalibrationDataError, GraphQuantError, NodeNotFoundError
from graphquant.execute import GraphRunner, import_graph
from graphquant.graph import GraphIndex, canonical_tensor, const_value, node_name, suggest_names
from graphquant.runtime import tf

METHODS = ("minmax", "kl", "percentile", "mse")
HIST_BINS = 8192            # bins per sign: >= 4096 bins between 0 and max|x|
KL_MAX_BINS = HIST_BINS     # the KL search runs on |x| merged to at most this many bins
_KL_BLOCK = 256             # thresholds evaluated at once
_KL_COARSE = 512            # KL first tries about this many thresholds, then refines
DEFAULT_PERCENTILE = 99.99
_TINY = 2.0 ** -40          # smallest histogram bound: all-zero tensors

Range = Tuple[float, float]
Progress = Callable[[int, Optional[int]], None]


# --------------------------------------------------------------------------- statistics
class TensorStats:
    """Streaming statistics of one tensor; see the module docstring for the histogram."""

    def __init__(self, name: str, histogram: bool = True):
        self.name = name
        self.count = 0                  # finite values seen
        self.nonfinite = 0              # NaN/Inf values seen (left out of everything)
        self.min = math.inf
        self.max = -math.inf
        self.shape: Optional[Tuple[int, ...]] = None   # shape of the first fetched value
        self.bound = _TINY
        self.counts = np.zeros(2 * HIST_BINS, np.int64) if histogram else None
        self.minmax_only = False        # every method gives the minmax range (no_histogram)

    # ---- accumulation
    def update(self, value) -> None:
        """Add every element of ``value`` (any shape) to the statistics."""
        x = np.asarray(value)
        if self.shape is None:
            self.shape = tuple(x.shape)
        if x.dtype.kind != "f":
            x = x.astype(np.float64)
        elif x.dtype.itemsize < 4:
            x = x.astype(np.float32)
        x = x.reshape(-1)
        if not x.size:
            return
        lo, hi = x.min(), x.max()
        if not (np.isfinite(lo) and np.isfinite(hi)):
            finite = np.isfinite(x)
            self.nonfinite += int(x.size - np.count_nonzero(finite))
            x = x[finite]
            if not x.size:
                return
            lo, hi = x.min(), x.max()
        self.count += int(x.size)
        self.min = min(self.min, float(lo))
        self.max = max(self.max, float(hi))
        if self.counts is None:
            return
        bound = _pow2_above(max(-float(lo), float(hi)))
        if bound > self.bound:
            self._grow(bound)
        scaled = x * x.dtype.type(HIST_BINS / self.bound)    # exact: a power-of-two scale
        np.floor(scaled, out=scaled)
        scaled += HIST_BINS       # exact: whole numbers in [0, 2 * HIST_BINS), cheaper in float
        self.counts += np.bincount(scaled.astype(np.intp), minlength=2 * HIST_BINS)

    def add_reduced(self, size: int, lo: float, hi: float, counts: Optional[np.ndarray] = None,
                    bound: Optional[float] = None) -> None:
        """Add a batch already reduced to its size, min, max and (optionally) its histogram
        binned at ``bound`` (as :meth:`update` would at that bound); all values finite."""
        if not size:
            return
        self.count += int(size)
        self.min = min(self.min, float(lo))
        self.max = max(self.max, float(hi))
        if self.counts is None:
            return
        if bound > self.bound:
            self._grow(bound)
        self.counts += _merge_up(np.asarray(counts, np.int64), bound, self.bound)

    def plus(self, c: float, name: str) -> "TensorStats":
        """The statistics of ``x + c`` (Python float arithmetic on min and max; the
        histogram moves each bin's centre, so it is exact to a bin width of the old and
        the new bound)."""
        out = TensorStats(name, histogram=self.counts is not None)
        out.count, out.nonfinite, out.shape = self.count, self.nonfinite, self.shape
        if not self.count:
            return out
        out.min, out.max = float(np.float32(self.min + c)), float(np.float32(self.max + c))
        if self.counts is not None:
            out._add_points(self.edges[:-1] + self.bin_width / 2 + c, self.counts)
        return out

    def padded(self, value: float, extra: int, name: str) -> "TensorStats":
        """The statistics once ``extra`` copies of ``value`` are added (a Pad's border)."""
        out = TensorStats(name, histogram=self.counts is not None)
        out.count, out.nonfinite, out.shape = self.count + extra, self.nonfinite, self.shape
        out.min, out.max = min(self.min, value), max(self.max, value)
        if self.counts is not None:
            out.bound = self.bound
            out.counts = self.counts.copy()
            out._add_points(np.array([value]), np.array([extra]))
        return out

    def _add_points(self, values: np.ndarray, counts: np.ndarray) -> None:
        used = counts > 0
        values, counts = values[used], counts[used]
        if not len(values):
            return
        bound = _pow2_above(float(np.abs(values).max()))
        if bound > self.bound:
            self._grow(bound)
        index = np.clip(np.floor(values * (HIST_BINS / self.bound)) + HIST_BINS,
                        0, 2 * HIST_BINS - 1).astype(np.intp)
        self.counts += np.bincount(index, weights=counts,
                                   minlength=2 * HIST_BINS).astype(np.int64)

    def _grow(self, bound: float) -> None:
        """Raise ``self.bound`` to ``bound`` (a larger power of two), merging bins."""
        self.counts = _merge_up(self.counts, self.bound, bound)
        self.bound = bound

    # ---- views
    @property
    def has_histogram(self) -> bool:
        return self.counts is not None

    @property
    def bin_width(self) -> float:
        return self.bound / HIST_BINS

    @property
    def edges(self) -> np.ndarray:
        """The ``2*HIST_BINS + 1`` bin edges of :attr:`counts`."""
        return (np.arange(2 * HIST_BINS + 1, dtype=np.float64) - HIST_BINS) * self.bin_width

    @property
    def absmax(self) -> float:
        return max(-self.min, self.max) if self.count else 0.0

    @property
    def one_signed(self) -> bool:
        """All values >= 0 (or all <= 0): quantize over [0, T] with every level."""
        return self.count > 0 and (self.min >= 0 or self.max <= 0)

    def magnitude_histogram(self) -> Tuple[np.ndarray, float]:
        """(counts of |x| in bins [i*w, (i+1)*w), w) -- both signs folded together."""
        self._need_histogram()
        n = HIST_BINS
        return self.counts[n:] + self.counts[:n][::-1], self.bin_width

    def percentile(self, q: float) -> float:
        """The ``q``-th percentile (0..100) of the values, within a bin width of numpy's."""
        self._need_histogram()
        value = histogram_percentile(self.counts, -self.bound, self.bin_width, q)
        return float(min(max(value, self.min), self.max))

    def summary(self) -> Dict[str, object]:
        """What the report shows about this tensor."""
        return {"tensor": self.name, "min": self.min if self.count else None,
                "max": self.max if self.count else None, "count": self.count,
                "nonfinite": self.nonfinite, "shape": list(self.shape or [])}

    def _need_histogram(self) -> None:
        if self.counts is None:
            raise GraphQuantError(f"tensor '{self.name}' was calibrated without a histogram",
                                  "collect statistics with histograms=True for kl, mse or "
                                  "percentile ranges")

    def __repr__(self) -> str:
        return (f"<TensorStats {self.name} n={self.count} min={self.min:g} max={self.max:g}"
                + (f" nonfinite={self.nonfinite}" if self.nonfinite else "") + ">")


class MeanMaps:
    """The mean over the calibration samples of whole tensors (every position kept), per
    group of feeds with equal input shapes, for statistics that are linear in a tensor.

    ``groups[key]`` is ``(samples, {tensor: mean})`` with each mean shaped like one
    sample (axis 0 of length 1).  A feed of ``b`` samples adds ``b / len(axis 0)`` times
    its axis-0 sum, so a tensor whose axis 0 holds several rows per sample (a MatMul
    input reshaped from ``[b, T, K]``) averages its rows the way a per-feed mean does.
    ``graph_def`` is the graph the tensors were measured in; ``check_feed`` (the
    first feed) and ``check_values`` (the tensors' values on it) let a user of
    the maps find out what a tensor of the same name computes in a graph
    rewritten since.  Feeds of more than :data:`MAX_GROUPS` distinct shapes make
    the maps unavailable (``groups`` None).
    """

    MAX_GROUPS = 4

    def __init__(self, graph_def: graph_pb2.GraphDef, tensors: Sequence[str]):
        self.graph_def = graph_def
        self.tensors = list(tensors)
        self.groups: Optional[Dict[tuple, list]] = {}
        self.per_row: set = set()   # axis 0 is not one row per sample: a mean over rows only
        self.check_feed: Optional[Dict[str, np.ndarray]] = None
        self.check_values: Dict[str, np.ndarray] = {}

    def add(self, feeds: Mapping[str, np.ndarray], values: Mapping[str, np.ndarray]) -> None:
        if self.check_feed is None:
            self.check_feed = {k: np.array(v) for k, v in feeds.items()}
            self.check_values = {name: np.array(values[name]) for name in self.tensors}
        if self.groups is None:
            return
        key = tuple(sorted((k, np.shape(v)[1:]) for k, v in feeds.items()))
        group = self.groups.get(key)
        if group is None:
            if len(self.groups) == self.MAX_GROUPS:
                self.groups = None
                return
            group = self.groups[key] = [0, {}]
        samples = _feed_samples(feeds)
        group[0] += samples
        sums = group[1]
        for name in self.tensors:
            value = np.asarray(values[name])
            if value.ndim == 0 or not value.shape[0]:
                continue
            part = value.sum(axis=0, keepdims=True, dtype=np.float64)
            if value.shape[0] != samples:
                part *= samples / value.shape[0]
                self.per_row.add(name)
            if name in sums and sums[name].shape == part.shape:
                sums[name] += part
            elif name in sums:       # a tensor whose shape varies inside one group
                sums[name] = None
            else:
                sums[name] = part

    def means(self) -> List[Tuple[int, Dict[str, np.ndarray]]]:
        """``[(samples, {tensor: mean as float32})]`` per group (empty when unavailable)."""
        out = []
        for samples, sums in (self.groups or {}).values():
            out.append((samples, {name: (total / samples).astype(np.float32)
                                  for name, total in sums.items() if total is not None}))
        return out


@dataclass
class CalibrationStats:
    """The statistics of every calibrated tensor, keyed by the names the caller gave."""

    tensors: Dict[str, TensorStats]
    num_samples: int = 0
    num_feeds: int = 0
    seconds_run: float = 0.0        # inside TensorFlow
    seconds_stats: float = 0.0      # accumulating statistics
    source: str = ""
    notes: List[str] = field(default_factory=list)
    mean_maps: Optional[MeanMaps] = None    # with ``mean_tensors=`` (bias correction)

    def __getitem__(self, name: str) -> TensorStats:
        return self.tensors[name]

    def unusable(self) -> List[str]:
        """Tensors with NaN/Inf values or none at all: keep them in fp32."""
        return [k for k, s in self.tensors.items() if s.nonfinite or not s.count]

    def summary(self) -> Dict[str, object]:
        return {"samples": self.num_samples, "feeds": self.num_feeds, "source": self.source,
                "seconds_run": round(self.seconds_run, 3),
                "seconds_stats": round(self.seconds_stats, 3),
                "tensors": [s.summary() for s in self.tensors.values()]}


def derived_statistics(graph_def: graph_pb2.GraphDef, tensor: str,
                       known: Mapping[str, TensorStats]) -> Optional[TensorStats]:
    """The statistics of ``tensor`` derived without running the graph, where it is
    ``x + c`` (AddV2/Add/Sub of a scalar Const) or a constant Pad of a tensor ``x``
    whose statistics are ``known`` (or derivable so), else None."""
    index = GraphIndex(graph_def)

    def derive(name: str, depth: int) -> Optional[TensorStats]:
        name = canonical_tensor(name)
        if name in known:
            return known[name]
        node = index.nodes.get(node_name(name))
        if node is None or depth > 8 or not name.endswith(":0"):
            return None
        inputs = [i for i in node.input if not i.startswith("^")]
        consts = [const_value(index.node(i)) if index.node(i).op == "Const" else None
                  for i in inputs]
        if node.op in ("AddV2", "Add", "Sub") and len(inputs) == 2:
            for k in (0, 1):
                c = consts[1 - k]
                if consts[k] is None and c is not None and np.size(c) == 1:
                    if node.op == "Sub" and k == 1:
                        return None           # c - x
                    x = derive(inputs[k], depth + 1)
                    c = float(np.reshape(c, ())) * (-1.0 if node.op == "Sub" else 1.0)
                    return None if x is None else x.plus(c, name)
        if node.op in ("Pad", "PadV2") and consts[0] is None and consts[1] is not None:
            value = float(np.reshape(consts[2], ())) if len(inputs) > 2 and consts[2] is not None \
                else 0.0
            x = derive(inputs[0], depth + 1)
            if x is None or x.shape is None or len(x.shape) != len(consts[1]):
                return None
            shape = np.array(x.shape, np.int64)
            padded = shape + np.asarray(consts[1], np.int64).sum(axis=1)
            per_value = x.count / max(int(np.prod(shape)), 1)     # values seen per position
            extra = int(round(per_value * (int(np.prod(padded)) - int(np.prod(shape)))))
            out = x.padded(value, extra, name)
            out.shape = tuple(int(d) for d in padded)
            return out
        return None

    return derive(tensor, 0)


def _merge_up(counts: np.ndarray, bound: float, new_bound: float) -> np.ndarray:
    """``counts`` binned over ``[-bound, bound)`` re-binned over ``[-new_bound, new_bound)``.

    Both are powers of two: each doubling merges bins pairwise, exactly.
    """
    if new_bound <= bound or not counts.any():
        return counts.copy() if new_bound <= bound else np.zeros_like(counts)
    n = HIST_BINS
    while bound < new_bound:
        merged = np.zeros_like(counts)
        merged[n // 2:n // 2 + n] = counts.reshape(n, 2).sum(axis=1)
        counts = merged
        bound *= 2.0
    return counts


def _pow2_above(a: float) -> float:
    """The smallest power of two strictly greater than ``a`` (at least ``_TINY``)."""
    if a < _TINY:
        return _TINY
    _, exponent = math.frexp(a)      # a = m * 2**e with 0.5 <= m < 1, so a < 2**e
    return math.ldexp(1.0, exponent)


# --------------------------------------------------------------------------- running
def collect_statistics(graph_def: graph_pb2.GraphDef, tensors: Sequence[str],
                       data: Iterable[Mapping[str, np.ndarray]], *, histograms: bool = True,
                       progress: Optional[Progress] = None,
                       threads: Optional[int] = None,
                       in_graph: bool = False,
                       mean_tensors: Sequence[str] = (),
                       no_histogram: Sequence[str] = ()) -> CalibrationStats:
    """Run ``graph_def`` on every feed of ``data``; return the statistics of ``tensors``.

    ``data`` is a :class:`~graphquant.calib_data.CalibrationData` (or any
    iterable of feed dicts).  ``progress(done_samples, total_samples)`` is
    called after each feed (total None when unknown).  Histograms cost a few
    passes over each tensor; leave them off for ``minmax`` alone.

    By default the tensors are fetched and reduced by :meth:`TensorStats.update`,
    in a worker thread while TensorFlow runs the next feed (one feed at a time,
    in order: the statistics are the same as reducing after each run); two
    feeds' fetched tensors are in memory at once (ResNet50, 225 tensors:
    ~140 MB per image).  ``in_graph=True`` reduces float32 tensors inside the
    TensorFlow run instead (:func:`_add_reductions`), so nothing large leaves
    the session; a batch where one of them holds NaN/Inf, and other dtypes,
    are still fetched whole.  Both give identical statistics; in-graph was
    slower here (Keras ResNet50, 225 tensors, 8 images, 4 runs each on a
    loaded 2-core machine: 10-16 s vs 5-11 s; with histograms 31-37 s vs
    9-12 s), hence off by default.

    ``mean_tensors``: float tensors whose whole mean over the samples is kept
    too (:class:`MeanMaps`, in ``stats.mean_maps``); they are fetched whole.
    ``no_histogram``: tensors that only need min and max even with
    ``histograms`` (binning every value was most of calibration's time:
    ResNet50, 37 M values an image, ~0.25 s of numpy against ~0.06 s for the run).
    """
    names = list(dict.fromkeys(tensors))
    fetches = list(dict.fromkeys(canonical_tensor(n) for n in names))
    means = list(dict.fromkeys(canonical_tensor(n) for n in mean_tensors))
    _check_tensor_names(graph_def, fetches + means)
    skip = {canonical_tensor(n) for n in no_histogram}
    stats = {f: TensorStats(f, histogram=histograms and f not in skip) for f in fetches}
    for f in skip & set(stats):
        stats[f].minmax_only = True
    if in_graph:
        reduced_graph, reduced, raw = _add_reductions(graph_def, fetches, histograms, skip)
    else:
        reduced_graph, reduced, raw = graph_def, [], fetches
    mean_maps = MeanMaps(graph_def, means) if means else None
    raw = raw + [m for m in means if m not in raw]
    run_names = [name for r in reduced for name in r.outputs] + raw
    total = getattr(data, "num_samples", None)
    done = feeds_run = 0
    run_seconds = 0.0
    # Grappler off: the graph runs as written (every calibrated tensor is
    # fetched, so there is little to fuse, and optimizing a large graph cost
    # more than the runs: ResNet50, 180 tensors, 4 feeds: 3.2 s CPU for the
    # first run and ~460 ms per run after, 0.9 s and ~260 ms without)
    with GraphRunner(reduced_graph, run_names, threads=threads, grappler=False) as runner, \
            _Accumulator(graph_def, stats, reduced, raw, threads, mean_maps) as accumulator, \
            ThreadPoolExecutor(max_workers=1) as worker:
        pending = None      # the previous feed's statistics, reduced while the next one runs
        for feeds in data:
            start = time.perf_counter()
            values = runner(feeds)
            run_seconds += time.perf_counter() - start
            if pending is not None:
                pending.result()
            pending = worker.submit(accumulator.add, feeds, values)
            feeds_run += 1
            done += _feed_samples(feeds)
            if progress:
                progress(done, total)
        if pending is not None:
            pending.result()
    if not feeds_run:
        raise CalibrationDataError("the calibration data yielded no feeds",
                                   "give at least one calibration sample")
    return CalibrationStats({n: stats[canonical_tensor(n)] for n in names}, done, feeds_run,
                            run_seconds + accumulator.seconds_run, accumulator.seconds_stats,
                            getattr(data, "source", ""), mean_maps=mean_maps)


class _Accumulator:
    """Adds one feed's fetched values to the statistics (in feed order: one at a time).

    Reduced tensors (``in_graph``) whose size/min/max/sum came out non-finite
    are fetched whole once more from a graph without reductions and added by
    :meth:`TensorStats.update`."""

    def __init__(self, graph_def, stats: Dict[str, TensorStats], reduced: List["_Reduction"],
                 raw: List[str], threads: Optional[int], mean_maps: Optional[MeanMaps] = None):
        self.graph_def, self.stats, self.reduced, self.raw = graph_def, stats, reduced, raw
        self.threads, self.mean_maps = threads, mean_maps
        self.fallback: Optional[GraphRunner] = None
        self.seconds_run = self.seconds_stats = 0.0

    def add(self, feeds: Mapping[str, np.ndarray], values: Sequence[np.ndarray]) -> None:
        start = time.perf_counter()
        redo = self._add_reduced(values[:sum(len(r.outputs) for r in self.reduced)])
        whole = dict(zip(self.raw, values[len(values) - len(self.raw):]))
        for tensor, value in whole.items():
            if tensor in self.stats:
                self.stats[tensor].update(value)
        if self.mean_maps is not None:
            self.mean_maps.add(feeds, whole)
        self.seconds_stats += time.perf_counter() - start
        if redo:
            self._add_whole(feeds, redo)

    def _add_reduced(self, values) -> List[str]:
        """Add the in-graph reductions; return the tensors to fetch whole instead."""
        redo = []
        position = 0
        for r in self.reduced:
            size, lo, hi, total_sum, *hist = values[position:position + len(r.outputs)]
            position += len(r.outputs)
            if not (np.isfinite(lo) and np.isfinite(hi) and np.isfinite(total_sum)):
                redo.append(r.tensor)        # NaN/Inf, or a sum that overflowed
            elif hist:
                self.stats[r.tensor].add_reduced(int(size), lo, hi, hist[0],
                                                 math.ldexp(1.0, int(hist[1])))
            else:
                self.stats[r.tensor].add_reduced(int(size), lo, hi)
        return redo

    def _add_whole(self, feeds, tensors: List[str]) -> None:
        if self.fallback is None:
            self.fallback = GraphRunner(self.graph_def, [r.tensor for r in self.reduced],
                                        threads=self.threads, grappler=False)
        start = time.perf_counter()
        whole = dict(zip(self.fallback.fetches, self.fallback(feeds)))
        self.seconds_run += time.perf_counter() - start
        for tensor in tensors:
            self.stats[tensor].update(whole[tensor])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.fallback is not None:
            self.fallback.close()


@dataclass
class _Reduction:
    tensor: str            # the calibrated tensor
    outputs: List[str]     # size, min, max, sum [, histogram counts, log2 of the bound]


_SCOPE = "graphquant_calibration"


def _add_reductions(graph_def: graph_pb2.GraphDef, fetches: Sequence[str], histograms: bool,
                    no_histogram=frozenset()):
    """``graph_def`` plus, per float32 tensor, ops reducing it to what TensorStats keeps.

    Per tensor: size, min, max and sum (a NaN/Inf anywhere makes one of them
    non-finite; then the batch is redone exactly in numpy).  With histograms:
    the exponent of the bound -- the smallest power of two above max|x|,
    read from the float's bits, so exact -- and ``bincount(floor(x * 2**13 /
    bound) + 2**13)``: the bins :meth:`TensorStats.update` computes.  Returns
    (graph_def, reductions, tensors to fetch whole).
    """
    t = tf()
    graph = import_graph(graph_def)       # a copy: the caller's GraphDef stays as it is
    reduced, raw = [], []
    with graph.as_default():
        min_exp = int(math.log2(_TINY))
        bins_exp = int(math.log2(HIST_BINS))
        for k, name in enumerate(fetches):
            tensor = graph.get_tensor_by_name(name)
            if tensor.dtype != t.float32:
                raw.append(name)
                continue
            with t.name_scope(f"{_SCOPE}/{k}"):
                flat = t.reshape(tensor, [-1])
                lo, hi = t.reduce_min(flat), t.reduce_max(flat)
                outs = [t.size(flat, out_type=t.int64), lo, hi, t.reduce_sum(flat)]
                if histograms and name not in no_histogram:
                    absmax = t.maximum(-lo, hi)
                    biased = t.bitwise.right_shift(t.bitcast(absmax, t.int32), 23) & 0xFF
                    bound_exp = t.maximum(biased - 126, min_exp)   # absmax < 2**bound_exp
                    scale = t.bitcast(t.bitwise.left_shift(bins_exp - bound_exp + 127, 23),
                                      t.float32)                   # 2**(13 - bound_exp)
                    index = t.cast(t.floor(flat * scale), t.int32) + HIST_BINS
                    index = t.clip_by_value(index, 0, 2 * HIST_BINS - 1)   # only NaN/Inf batches
                    outs += [t.math.bincount(index, minlength=2 * HIST_BINS,
                                             maxlength=2 * HIST_BINS, dtype=t.int64), bound_exp]
            reduced.append(_Reduction(name, [o.name for o in outs]))
    return graph.as_graph_def(), reduced, raw


def _check_tensor_names(graph_def: graph_pb2.GraphDef, fetches: Sequence[str]) -> None:
    index = GraphIndex(graph_def)
    for name in fetches:
        node = node_name(name)
        if node not in index:
            raise NodeNotFoundError(f"no tensor '{name}' in the graph",
                                    suggest_names(node, index.nodes))


def _feed_samples(feeds: Mapping[str, np.ndarray]) -> int:
    for value in feeds.values():
        shape = np.shape(value)
        if shape:
            return int(shape[0])
    return 1


def stderr_progress(done: int, total: Optional[int]) -> None:
    """A progress callback printing ``calibrating 12/32`` on stderr (one updating line)."""
    text = f"calibrating {done}/{total}" if total else f"calibrating {done}"
    if sys.stderr.isatty():
        sys.stderr.write("\r" + text + ("\n" if done == total else ""))
    elif done == total or not total or done % max(1, total // 10) == 0:
        sys.stderr.write(text + "\n")
    sys.stderr.flush()


class Calibration(NamedTuple):
    """What :func:`calibrate` returns: ``ranges, stats = calibrate(...)``."""

    ranges: Dict[str, Range]
    stats: CalibrationStats


def calibrate(graph_def: graph_pb2.GraphDef, tensors: Sequence[str],
              data: Iterable[Mapping[str, np.ndarray]], method: str = "minmax", *,
              methods: Optional[Mapping[str, str]] = None,
              percentile: float = DEFAULT_PERCENTILE, num_bits: int = 8,
              progress: Optional[Progress] = None, threads: Optional[int] = None,
              histograms: Optional[bool] = None, in_graph: bool = False,
              mean_tensors: Sequence[str] = (), no_histogram: Sequence[str] = ()
              ) -> Calibration:
    """Run the fp32 graph on ``data`` and return ``(ranges, stats)`` for ``tensors``.

    ``ranges`` maps each name in ``tensors`` (as given) to ``(min, max)`` chosen
    by ``method``, or ``methods[name]`` where given.  ``stats`` holds the raw
    statistics for the report and for re-computing ranges with another method
    (:func:`compute_ranges`) without running the graph again; histograms are
    collected unless every method is ``minmax`` (force with ``histograms=True``).
    ``in_graph``, ``mean_tensors``, ``no_histogram``: see :func:`collect_statistics`;
    a tensor without a histogram gets its ``minmax`` range.
    """
    methods = dict(methods or {})
    _check_options(method, methods, percentile, num_bits, tensors)
    if histograms is None:
        histograms = any(m != "minmax" for m in [method, *methods.values()])
    stats = collect_statistics(graph_def, tensors, data, histograms=histograms,
                               progress=progress, threads=threads, in_graph=in_graph,
                               mean_tensors=mean_tensors, no_histogram=no_histogram)
    return Calibration(compute_ranges(stats, method, methods=methods, percentile=percentile,
                                      num_bits=num_bits), stats)


def compute_ranges(stats: CalibrationStats, method: str = "minmax", *,
                   methods: Optional[Mapping[str, str]] = None,
                   percentile: float = DEFAULT_PERCENTILE,
                   num_bits: int = 8) -> Dict[str, Range]:
    """``{tensor: (min, max)}`` from collected statistics (see :func:`tensor_range`)."""
    methods = dict(methods or {})
    _check_options(method, methods, percentile, num_bits, stats.tensors)
    return {name: tensor_range(s, methods.get(name, method), percentile=percentile,
                               num_bits=num_bits)
            for name, s in stats.tensors.items()}


def _check_options(method, methods, percentile, num_bits, tensors) -> None:
    for m in [method, *methods.values()]:
        if m not in METHODS:
            raise GraphQuantError(f"unknown calibration method '{m}'",
                                  "use one of: " + ", ".join(METHODS))
    unknown = sorted(set(methods) - set(tensors))
    if unknown:
        raise GraphQuantError(f"per-tensor calibration methods name tensors that are not "
                              f"calibrated: {', '.join(unknown)}",
                              "name tensors from the calibrated list")
    if not 50.0 < percentile <= 100.0:
        raise GraphQuantError(f"percentile must be in (50, 100], got {percentile}",
                              "use e.g. 99.99 (the share of values kept inside the range)")
    if not 2 <= num_bits <= 16:
        raise GraphQuantError(f"num_bits must be between 2 and 16, got {num_bits}",
                              "use 8 for int8")


# --------------------------------------------------------------------------- ranges
def tensor_range(stats: TensorStats, method: str = "minmax", *,
                 percentile: float = DEFAULT_PERCENTILE, num_bits: int = 8) -> Range:
    """The range ``method`` chooses for one tensor (see the module docstring).

    ``minmax`` is the exact data range; the other methods return ranges that
    contain 0.  A tensor without finite values gets ``(0.0, 0.0)``.
    """
    if not stats.count:
        return (0.0, 0.0)
    if method == "minmax" or stats.minmax_only:
        return (stats.min, stats.max)
    if method == "percentile":
        lo = stats.percentile(100.0 - percentile) if stats.min < 0 else 0.0
        hi = stats.percentile(percentile) if stats.max > 0 else 0.0
        return (min(lo, 0.0), max(hi, 0.0))
    hist, width = stats.magnitude_histogram()
    levels = 2 ** num_bits if stats.one_signed else 2 ** (num_bits - 1)
    if method == "kl":
        threshold = kl_threshold(hist, width, levels)
    elif method == "mse":
        threshold = mse_threshold(hist, width, levels)
    else:
        raise GraphQuantError(f"unknown calibration method '{method}'",
                              "use one of: " + ", ".join(METHODS))
    return (min(max(-threshold, stats.min), 0.0), max(min(threshold, stats.max), 0.0))


def histogram_percentile(counts: np.ndarray, start: float, width: float, q: float) -> float:
    """The ``q``-th percentile of values binned in ``counts`` (bin i = [start+i*w, start+(i+1)*w)).

    Order statistics are spread evenly inside their bin; the answer lies in the
    bin holding numpy's linear-interpolation percentile (or at its edge).
    """
    counts = np.asarray(counts)
    total = int(counts.sum())
    if not total:
        raise ValueError("empty histogram")
    rank = q / 100.0 * (total - 1)
    cumulative = np.cumsum(counts)
    j = int(np.searchsorted(cumulative, rank, side="right"))
    j = min(j, len(counts) - 1)
    before = cumulative[j] - counts[j]
    frac = min(max((rank - before + 0.5) / counts[j], 0.0), 1.0)
    return float(start + (j + frac) * width)


def _trim(hist) -> np.ndarray:
    """``hist`` as float64 without its trailing empty bins."""
    h = np.asarray(hist, np.float64)
    nonzero = np.flatnonzero(h)
    return h[:nonzero[-1] + 1] if len(nonzero) else h[:0]


def kl_divergences(hist, levels: int, thresholds: Optional[np.ndarray] = None
                   ) -> Tuple[np.ndarray, np.ndarray]:
    """(thresholds in bins, KL(P||Q) for each) for a magnitude histogram; see :func:`kl_threshold`.

    ``thresholds`` (bin counts, default every one from ``levels`` to the last
    used bin) limits the evaluation to those.

    For a threshold of ``i`` bins: P = ``hist[:i]`` with everything above added
    to bin ``i-1``; Q splits ``hist[:i]`` into ``levels`` chunks (bin edges
    ``k*i//levels``) and spreads each chunk's in-range mass evenly over the bins
    where P is non-zero.  Both normalised.  KL is infinite when outlier mass
    lands in a chunk with no in-range mass.  Vectorised over thresholds with
    prefix sums: ``KL = (sum P log P - sum_c M_c log(S_c/Z_c)) / |P| - log|P| + log|Q|``.
    """
    h = _trim(hist)
    n = len(h)
    if n <= levels:
        return np.array([n]), np.zeros(1)
    total = h.sum()
    if thresholds is None:
        thresholds = np.arange(levels, n + 1)
    thresholds = np.asarray(thresholds, np.int64)
    prefix = np.concatenate([[0.0], np.cumsum(h)])
    prefix_nz = np.concatenate([[0], np.cumsum(h > 0)])
    prefix_hlogh = np.concatenate([[0.0], np.cumsum(_xlogx(h))])
    kl = np.empty(len(thresholds))
    chunk_index = np.arange(levels + 1)[None, :]
    for start in range(0, len(thresholds), _KL_BLOCK):      # bounded memory
        ii = thresholds[start:start + _KL_BLOCK]
        outliers = total - prefix[ii]
        last = h[ii - 1]
        p_log_p = prefix_hlogh[ii - 1] + _xlogx(last + outliers)
        bounds = (chunk_index * ii[:, None]) // levels
        chunk_mass = prefix[bounds[:, 1:]] - prefix[bounds[:, :-1]]          # S_c
        chunk_nz = (prefix_nz[bounds[:, 1:]] - prefix_nz[bounds[:, :-1]]).astype(np.float64)
        chunk_nz[:, -1] += (last == 0) & (outliers > 0)                      # Z_c
        p_mass = chunk_mass.copy()
        p_mass[:, -1] += outliers                                            # M_c
        with np.errstate(divide="ignore", invalid="ignore"):
            q_value = np.where(p_mass > 0, chunk_mass / np.maximum(chunk_nz, 1.0), 1.0)
            cross = np.where(p_mass > 0, p_mass * np.log(q_value), 0.0).sum(axis=1)
            kl[start:start + _KL_BLOCK] = ((p_log_p - cross) / total - np.log(total)
                                           + np.log(prefix[ii]))
    kl = np.where(np.isnan(kl), np.inf, kl)
    return thresholds, np.maximum(kl, 0.0)


def _xlogx(v: np.ndarray) -> np.ndarray:
    safe = np.where(v > 0, v, 1.0)
    return np.where(v > 0, v * np.log(safe), 0.0)


def kl_threshold(hist, width: float, levels: int = 128, max_bins: int = KL_MAX_BINS) -> float:
    """Clip threshold (in data units) of least KL divergence for a magnitude histogram.

    ``hist[i]`` counts ``|x|`` in ``[i*width, (i+1)*width)``.  The histogram is
    first merged pairwise until its used part has at most ``max_bins`` bins
    (TensorRT uses 2048 bins over ``[0, max|x|]``; the default keeps all of
    them, so a far outlier still leaves enough bins over the bulk of the
    data).  The first bin's count is replaced by the second's, as NVIDIA's
    pytorch-quantization does: otherwise the spike of exact zeros after a
    Relu, smeared over the first chunk by Q, makes the smallest threshold win.
    With more than ``_KL_COARSE`` candidates, every ``stride``-th threshold is
    tried first, then every one within a stride of the best (KL over
    thresholds is smooth at this resolution; the test compares with the
    exhaustive search).  Ties go to the smallest threshold.
    """
    h = _trim(hist).copy()
    if not len(h):
        return 0.0
    if len(h) > 1:
        h[0] = h[1]          # a spike of exact zeros (after Relu) must not decide T
    while len(h) > max_bins:
        if len(h) % 2:
            h = np.append(h, 0.0)
        h = h.reshape(-1, 2).sum(axis=1)
        width *= 2.0
    n = len(h)
    stride = max(1, (n - levels) // _KL_COARSE)
    if stride == 1:
        thresholds, kl = kl_divergences(h, levels)
    else:     # every stride-th threshold, then every one around the best of those
        coarse, coarse_kl = kl_divergences(h, levels, np.arange(levels, n + 1, stride))
        best = int(coarse[int(np.argmin(coarse_kl))])
        fine = np.arange(max(levels, best - stride + 1), min(n, best + stride - 1) + 1)
        fine_kl = kl_divergences(h, levels, fine)[1]
        thresholds = np.concatenate([coarse, fine])
        kl = np.concatenate([coarse_kl, fine_kl])
        order = np.argsort(thresholds, kind="stable")
        thresholds, kl = thresholds[order], kl[order]
    return float(thresholds[int(np.argmin(kl))] * width)


def mse_curve(hist, width: float, levels: int) -> Tuple[np.ndarray, np.ndarray]:
    """(thresholds in data units, expected squared error per value) for a magnitude histogram.

    Threshold ``T = k*width`` for ``k = 1..n``, quantization step
    ``T / (levels - 1)``; each bin's values sit at its centre, spread by
    ``width**2 / 12``.  Costs: ``(c - T)**2`` above ``T``, ``c**2`` for values
    rounding to zero, ``step**2 / 12`` for the rest.
    """
    h = _trim(hist)
    n = len(h)
    if not n:
        return np.zeros(1), np.zeros(1)
    centres = (np.arange(n) + 0.5) * width
    prefix0 = np.concatenate([[0.0], np.cumsum(h)])
    prefix1 = np.concatenate([[0.0], np.cumsum(h * centres)])
    prefix2 = np.concatenate([[0.0], np.cumsum(h * centres * centres)])
    k = np.arange(1, n + 1)
    t = k * width
    step = t / (levels - 1)
    to_zero = np.clip(np.ceil(step / (2 * width) - 0.5), 0, k).astype(np.int64)
    spread = width * width / 12.0
    zero_cost = prefix2[to_zero] + prefix0[to_zero] * spread
    round_cost = (prefix0[k] - prefix0[to_zero]) * step * step / 12.0
    above0 = prefix0[n] - prefix0[k]
    above1 = prefix1[n] - prefix1[k]
    above2 = prefix2[n] - prefix2[k]
    clip_cost = above2 - 2 * t * above1 + t * t * above0 + above0 * spread
    return t, (zero_cost + round_cost + clip_cost) / prefix0[n]


def mse_threshold(hist, width: float, levels: int = 128) -> float:
    """Clip threshold minimising :func:`mse_curve` (ties: the smallest)."""
    thresholds, mse = mse_curve(hist, width, levels)
    return float(thresholds[int(np.argmin(mse))])


def quantization_mse(stats: TensorStats, lo: float, hi: float, num_bits: int = 8) -> float:
    """Expected squared error per value when ``stats``' tensor is quantized to ``[lo, hi]``.

    ``2**num_bits`` uniform levels over ``[lo, hi]`` (which must contain 0);
    the error model of :func:`mse_curve`.  For comparing ranges per tensor
    (e.g. choose ``mse`` over ``minmax`` where it is measurably better) and
    for the report.
    """
    if not stats.count:
        return 0.0
    stats._need_histogram()
    if not lo <= 0.0 <= hi or hi == lo:
        raise ValueError(f"range ({lo}, {hi}) must contain 0 and be non-empty")
    counts = stats.counts.astype(np.float64)
    width = stats.bin_width
    centres = stats.edges[:-1] + width / 2
    step = (hi - lo) / (2 ** num_bits - 1)
    spread = width * width / 12.0
    cost = np.where(np.abs(centres) < step / 2, centres * centres + spread, step * step / 12.0)
    cost = np.where(centres > hi, (centres - hi) ** 2 + spread, cost)
    cost = np.where(centres < lo, (centres - lo) ** 2 + spread, cost)
    return float((cost * counts).sum() / counts.sum())
