"""Accuracy-aware conversion: keep the fewest most sensitive int8 islands in fp32 until a
fidelity target is met on validation data.

    result = convert("model.pb", calib="calib.npy", fidelity={"top1": 0.99},
                     validation="val.npy")
    result.report.fidelity        # target, measured value, fallbacks with their cost

Before/after, for the list of int8 islands ranked by the sensitivity probe
(:mod:`graphquant.sensitivity`: own relative L2 error, largest first)::

    before:  every island int8                        top-1 agreement 96.5% < 99%
    after:   islands 1..k of the ranking in fp32,     top-1 agreement >= 99%
             k the smallest found by bisection

Targets (``fidelity=``, a dict or the CLI text ``top1=0.99`` / ``rel_l2=0.02``):

* ``top1`` -- the smallest top-1 agreement with fp32 over the class-score
  outputs (2-D, more than one class) must be at least the value;
* ``rel_l2`` -- the largest relative L2 error over the outputs (all
  validation samples together) must be at most the value.

Search: ``k = 0`` (all int8) is tried first, then ``k = N`` (every ranked
island fp32: if even that misses, the target cannot be met by fallbacks and
the all-fp32 islands result is kept with a note), then bisection on ``k``,
assuming that more fallbacks never hurt: at most ``2 + ceil(log2(N))``
conversions and validation runs (:func:`max_evaluations`).  Each fallback is
reported with its own error and its share of the graph's multiply-adds (what
it costs in speed); the measured latency of the result against the all-int8
graph is added when ``measure_speed`` is given.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Set, Union

import numpy as np
from tensorflow.core.framework import graph_pb2

from graphquant import metrics
from graphquant.errors import GraphQuantError
from graphquant.execute import GraphRunner
from graphquant.graph import GraphIndex, const_value, parse_tensor_name

METRICS = ("top1", "rel_l2")
PROBE_FEEDS = 8      # validation feeds for the output-sensitivity ranking


@dataclass(frozen=True)
class FidelityTarget:
    metric: str      # top1 | rel_l2
    value: float

    def met(self, measured: float) -> bool:
        return measured >= self.value if self.metric == "top1" else measured <= self.value

    def __str__(self) -> str:
        return f"{self.metric}={self.value:g}"


def parse_target(spec: Union[str, Mapping[str, float], FidelityTarget]) -> FidelityTarget:
    """``{"top1": 0.99}``, ``"top1=0.99"``, ``{"rel_l2": 0.02}`` or ``"relL2=0.02"``."""
    if isinstance(spec, FidelityTarget):
        return spec
    given = spec
    if isinstance(spec, str):
        key, sep, value = spec.partition("=")
        try:
            spec = {key.strip(): float(value)} if sep else None
        except ValueError:
            spec = None
    if not isinstance(spec, Mapping) or len(spec) != 1:
        raise GraphQuantError(f"cannot read the fidelity target {given!r}",
                              "give one metric and value: top1=0.99 or rel_l2=0.02")
    (key, value), = spec.items()
    metric = {"top1": "top1", "top-1": "top1", "rel_l2": "rel_l2", "rell2": "rel_l2",
              "relative_l2": "rel_l2"}.get(str(key).lower())
    if metric is None:
        raise GraphQuantError(f"unknown fidelity metric '{key}'",
                              "use top1 (agreement with fp32) or rel_l2 (relative L2 error)")
    value = float(value)
    if metric == "top1" and not 0.0 < value <= 1.0 or metric == "rel_l2" and value <= 0.0:
        raise GraphQuantError(f"fidelity {metric}={value:g} is out of range",
                              "top1 is a fraction in (0, 1] (0.99 = 99%), rel_l2 a positive "
                              "number (0.02 = 2%)")
    return FidelityTarget(metric, value)


def max_evaluations(num_islands: int) -> int:
    """Conversions + validation runs the search needs at most for ``num_islands`` islands."""
    return 1 if num_islands == 0 else 2 + max(0, math.ceil(math.log2(num_islands)))


def class_score_outputs(graph_def: graph_pb2.GraphDef, outputs: Sequence[str]
                        ) -> Optional[List[bool]]:
    """Per output, whether it is class scores: made by a Softmax (through Identity ops).
    None when no output is (then every 2-D output counts, :func:`measure`).  MTCNN's
    RNet/ONet return box offsets and landmarks (N x 4, N x 10) next to their softmax:
    the "top-1" of a regression output means nothing."""
    index = GraphIndex(graph_def)
    flags = []
    for out in outputs:
        node = index.nodes.get(parse_tensor_name(out).node)
        while node is not None and node.op == "Identity" and node.input:
            node = index.nodes.get(parse_tensor_name(node.input[0]).node)
        flags.append(node is not None and node.op == "Softmax")
    return flags if any(flags) else None


def measure(target: FidelityTarget, reference: Sequence[np.ndarray],
            candidate: Sequence[np.ndarray], classes: Optional[Sequence[bool]] = None
            ) -> float:
    """The target's metric for candidate outputs against reference outputs (per output,
    samples on axis 0): min top-1 agreement, or max relative L2.  ``classes``: which
    outputs are class scores (:func:`class_score_outputs`; default: every 2-D one)."""
    if target.metric == "rel_l2":
        return max(metrics.relative_l2(r, c) for r, c in zip(reference, candidate))
    if classes is None:
        classes = [True] * len(reference)
    values = [metrics.topk_agreement(r, c, 1) for r, c, k in zip(reference, candidate, classes)
              if k and metrics.is_classification(r)]
    if not values:
        raise GraphQuantError("fidelity top1 needs an output of class scores (samples x "
                              "classes); none of the outputs is one",
                              "use --fidelity rel_l2=... for this graph")
    return min(values)


def run_outputs(graph_def: graph_pb2.GraphDef, outputs: Sequence[str], feeds) -> List[np.ndarray]:
    with GraphRunner(graph_def, outputs) as runner:
        values = [runner(f) for f in feeds]
    return [np.concatenate([v[i] for v in values]) for i in range(len(outputs))]


# --------------------------------------------------------------------------- cost
def island_macs(fp32: graph_pb2.GraphDef, shapes: Mapping[str, Optional[list]]
                ) -> Dict[str, int]:
    """Multiply-adds per sample of every Conv2D / depthwise / MatMul node (0 if unknown)."""
    index = GraphIndex(fp32)
    macs = {}
    for node in fp32.node:
        if node.op not in ("Conv2D", "DepthwiseConv2dNative", "MatMul"):
            continue
        w_node = index.node(node.input[1])
        out = shapes.get(node.name)
        if w_node.op != "Const" or not out or any(d is None for d in out[1:]):
            macs[node.name] = 0
            continue
        w = const_value(w_node).shape
        if node.op == "MatMul":
            k = w[1] if node.attr["transpose_b"].b else w[0]
            macs[node.name] = int(np.prod(out[1:])) * int(k)
        elif node.op == "Conv2D":
            macs[node.name] = int(np.prod(out[1:])) * int(w[0] * w[1] * w[2])
        else:
            macs[node.name] = int(np.prod(out[1:])) * int(w[0] * w[1])
    return macs


# --------------------------------------------------------------------------- search
@dataclass
class Fallback:
    island: str              # island root (node name)
    nodes: List[str]         # its fp32 nodes
    own_error: float         # relative L2 measured by the probe
    macs: int                # multiply-adds per sample it puts back in fp32
    macs_share: float        # of the graph's conv/matmul multiply-adds


@dataclass
class FidelityResult:
    target: str
    reached: bool
    measured: float                  # the metric of the chosen conversion
    all_int8: float                  # the metric with every island int8
    fallbacks: List[Fallback]
    evaluations: List[Dict[str, float]] = field(default_factory=list)   # k, metric
    max_evaluations: int = 0
    latency_ms: Optional[Dict[str, float]] = None

    @property
    def exclude(self) -> Set[str]:
        return {n for f in self.fallbacks for n in f.nodes}

    def to_dict(self) -> Dict[str, object]:
        return {"target": self.target, "reached": self.reached, "measured": self.measured,
                "all_int8": self.all_int8, "evaluations": self.evaluations,
                "max_evaluations": self.max_evaluations, "latency_ms": self.latency_ms,
                "fallbacks": [vars(f) for f in self.fallbacks],
                "fp32_macs_share": sum(f.macs_share for f in self.fallbacks)}


def ranked_islands(errors, probe_notes, scores: Optional[Mapping[str, float]] = None
                   ) -> List[Dict[str, object]]:
    """Island notes by decreasing ``scores`` (default: own error; ties: name), only islands
    the probe measured."""
    notes = {n["node"]: n for n in probe_notes if n["node"] in errors}
    key = scores if scores is not None else {r: errors[r].own for r in notes}
    return [notes[r] for r in sorted(notes, key=lambda r: (-key.get(r, 0.0), r))]


def output_sensitivity(fp32: graph_pb2.GraphDef, outputs: Sequence[str], errors,
                       feeds, projections: int = 4, seed: int = 0) -> Dict[str, float]:
    """Estimated output error power each island's own int8 noise causes, first order.

    For island output ``y`` with own noise of mean power ``s2 = own**2 * mean(y**2)``
    (the probe's relative error), white noise ``e`` reaches the outputs as ``J e``
    with ``E|J e|**2 = s2 * |J|_F**2``; ``|J|_F**2 = E_r |J^T r|**2`` over random
    Gaussian ``r``, one gradient of ``r . outputs`` per projection.  {} when
    TensorFlow has no gradient for an op of the graph (rank by own error then).
    """
    from graphquant.execute import import_graph
    from graphquant.graph import canonical_tensor
    from graphquant.runtime import tf

    t = tf()
    graph = import_graph(fp32)
    roots = sorted(errors)
    with graph.as_default():
        outs = [graph.get_tensor_by_name(canonical_tensor(o)) for o in outputs]
        ys = [graph.get_tensor_by_name(canonical_tensor(r)) for r in roots]
        rs = [t.compat.v1.placeholder(t.float32, o.shape) for o in outs]
        loss = t.add_n([t.reduce_sum(t.cast(o, t.float32) * r) for o, r in zip(outs, rs)])
        try:
            grads = t.compat.v1.gradients(loss, ys)
        except (LookupError, ValueError, TypeError):
            return {}
        keep = [i for i, g in enumerate(grads) if g is not None]
        fetch = [t.reduce_sum(t.square(grads[i])) for i in keep]
        power = [t.reduce_mean(t.square(ys[i])) for i in keep]
    rng = np.random.default_rng(seed)
    jac = np.zeros(len(keep))
    mean_sq = np.zeros(len(keep))
    count = 0
    with t.compat.v1.Session(graph=graph) as session:
        for feed in feeds:
            fd = {graph.get_tensor_by_name(canonical_tensor(k)): v for k, v in feed.items()}
            for _ in range(projections):
                for r, o in zip(rs, outs):
                    shape = [d if d is not None else 1 for d in o.shape.as_list()]
                    fd[r] = rng.normal(size=shape).astype(np.float32)
                g, p = session.run([fetch, power], fd)
                jac += np.asarray(g, np.float64)
                mean_sq += np.asarray(p, np.float64)
                count += 1
    if not count:
        return {}
    return {roots[i]: float(errors[roots[i]].own ** 2 * mean_sq[j] / count * jac[j] / count)
            for j, i in enumerate(keep)}


def search(target: FidelityTarget, ranked: Sequence[Mapping[str, object]], errors,
           build: Callable[[Set[str]], graph_pb2.GraphDef], evaluate: Callable[
               [graph_pb2.GraphDef], float], macs: Mapping[str, int]) -> FidelityResult:
    """Bisection over how many of the ``ranked`` islands stay fp32 (module docstring).

    ``build(exclude)`` converts with those node names kept fp32;
    ``evaluate(graph)`` returns the target's metric on the validation data.
    """
    total_macs = max(sum(macs.values()), 1)
    tried: Dict[int, float] = {}

    def nodes_of(k: int) -> Set[str]:
        return {name for note in ranked[:k] for name in note.get("nodes", [note["node"]])}

    def check(k: int) -> bool:
        if k not in tried:
            tried[k] = evaluate(build(nodes_of(k)))
        return target.met(tried[k])

    n = len(ranked)
    if check(0) or n == 0:
        best = 0
    elif not check(n):
        best = n
    else:
        lo, hi = 0, n                 # check(lo) fails, check(hi) passes
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if check(mid):
                hi = mid
            else:
                lo = mid
        best = hi
    fallbacks = []
    for note in ranked[:best]:
        nodes = list(note.get("nodes", [note["node"]]))
        m = sum(macs.get(name, 0) for name in nodes)
        fallbacks.append(Fallback(str(note["node"]), nodes, float(errors[note["node"]].own), m,
                                  m / total_macs))
    return FidelityResult(str(target), target.met(tried[best]), tried[best], tried[0], fallbacks,
                          [{"fp32_islands": k, "measured": v} for k, v in sorted(tried.items())],
                          max_evaluations(n))


def latency_ms(graphs: Mapping[str, graph_pb2.GraphDef], outputs: Sequence[str], feed,
               rounds: int = 15) -> Dict[str, float]:
    """Median latency (ms) of each graph on one feed, runs interleaved (a rough figure on a
    shared machine)."""
    runners = {k: GraphRunner(g, outputs) for k, g in graphs.items()}
    times: Dict[str, List[float]] = {k: [] for k in graphs}
    try:
        for r in runners.values():
            r(feed)
        for _ in range(rounds):
            for k, r in runners.items():
                start = time.perf_counter()
                r(feed)
                times[k].append((time.perf_counter() - start) * 1000)
    finally:
        for r in runners.values():
            r.close()
    return {k: float(np.median(v)) for k, v in times.items()}


# --------------------------------------------------------------------------- convert()
def choose_fallbacks(original: graph_pb2.GraphDef, fp32: graph_pb2.GraphDef, ctx, errors,
                     probe_notes, spec, validation, *, image_spec=None,
                     measure_speed: bool = False) -> FidelityResult:
    """What :func:`graphquant.convert.convert` runs for ``fidelity=``: the search on the
    ``validation`` data (any form ``calib`` takes), building with copies of ``ctx``;
    notes every fallback in ``ctx`` (kind fp32) and returns the result (whose
    :attr:`FidelityResult.exclude` the caller adds to ``ctx.options['exclude']``)."""
    from graphquant.calib_data import open_data
    from graphquant.execute import tensor_shapes
    from graphquant.pipeline import ISLAND_PASSES, JOIN_PASSES, PassContext, run_pipeline

    target = parse_target(spec)
    feeds = list(open_data(validation, original, inputs=ctx.inputs, image_spec=image_spec,
                           kind="validation"))
    reference = run_outputs(original, ctx.outputs, feeds)
    base_exclude = set(ctx.options.get("exclude") or ())
    graphs: Dict[int, graph_pb2.GraphDef] = {}

    def build(exclude: Set[str]) -> graph_pb2.GraphDef:
        c = PassContext(inputs=ctx.inputs, outputs=ctx.outputs,
                        options=dict(ctx.options, exclude=base_exclude | exclude))
        graph = run_pipeline(run_pipeline(fp32, ISLAND_PASSES, c), JOIN_PASSES, c)
        graphs[len(exclude)] = graph
        return graph

    classes = class_score_outputs(original, ctx.outputs)

    def evaluate(graph: graph_pb2.GraphDef) -> float:
        return measure(target, reference, run_outputs(graph, ctx.outputs, feeds), classes)

    scores = output_sensitivity(fp32, ctx.outputs, errors, feeds[:PROBE_FEEDS])
    ranked = ranked_islands(errors, [n for n in probe_notes if n["node"] not in base_exclude],
                            scores or None)
    macs = island_macs(fp32, ctx.options.get("shapes") or tensor_shapes(fp32))
    result = search(target, ranked, errors, build, evaluate, macs)
    if measure_speed and result.fallbacks:
        chosen = build(result.exclude)
        result.latency_ms = latency_ms({"all_int8": build(set()), "with_fallbacks": chosen},
                                       ctx.outputs, feeds[0])
    for f in result.fallbacks:
        for name in f.nodes:
            ctx.note("fidelity", name, f"kept in fp32 for fidelity {target}: island {f.island}, "
                     f"own int8 error {f.own_error:.2%}, {f.macs_share:.1%} of the multiply-adds",
                     kind="fp32")
    return result
