"""Accuracy-aware conversion: keep the fewest most sensitive int8 islands in fp32 until a
fidelity target is met on validation data.

    result = convert("model.pb", calib="calib.npy", fidelity={"top1": 0.99},
                     validation="val.npy")
    result.report.fidelity        # target, measured value, fallbacks with their cost

Before/after, for the int8 islands in the order chosen below::

    before:  every island int8                        top-1 agreement 97.6% < 99%
    after:   islands 1..k of the order in fp32,       top-1 agreement >= 99%
             k the smallest found by bisection

Targets (``fidelity=``, a dict or the CLI text ``top1=0.99`` / ``rel_l2=0.02``):

* ``top1`` -- the smallest top-1 agreement with fp32 over the class-score
  outputs (2-D, more than one class) must be at least the value (a stricter
  count of the samples at risk was measured worse: :func:`top1_at_risk`);
* ``rel_l2`` -- the largest relative L2 error over the outputs (all
  validation samples together) must be at most the value.

Order: the all-int8 conversion is validated first; if it misses, what falling
each island alone back to fp32 removes from the outputs is measured on the
riskiest validation feeds without converting (:func:`fallback_effects`: fp32
copies of the islands fed into the island graph, exact for one island), and
:func:`fallback_order` picks the cheapest set (by multiply-adds) predicted to
meet the target (:class:`Prediction`, a smooth margin shortfall for top1);
the other islands follow by estimated output sensitivity
(:func:`output_sensitivity`).  On fer_mini_xception one fp32 MaxPool island
restores the one flipped validation face (the ranking by sensitivity needed
all 23 conv islands, 95% of the multiply-adds).  Top-1 margins are compared
as logit differences (log of Softmax outputs, :func:`margin_shrinks`).

Search: the predicted count is tried first, then bisection on ``k`` (each
step again at the predicted count when the prediction agrees with what was
measured), assuming that more fallbacks never hurt; ``k = N`` (every island
fp32) is validated last if the bisection ends there.  The effects of several
islands do not add up (on musicnn_MTT_vgg two islands predicted to meet
rel_l2 0.02 measure 0.0315), so when a count fails before any passing set is
known, the remaining islands' effects are measured again with that count's
fallbacks applied and the rest reordered by them (at most :data:`REMEASURES`
times; the failed islands stay first, so the bisection's interval holds): at
most ``3 + ceil(log2(N)) + 2`` conversions and validation runs for N > 1
(:func:`max_evaluations`).
Each fallback is reported with its own error and its share of the graph's
multiply-adds (what it costs in speed); the measured latency of the result
against the all-int8 graph is added when ``measure_speed`` is given.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

import numpy as np
from tensorflow.core.framework import graph_pb2

from graphquant import metrics
from graphquant.errors import GraphQuantError
from graphquant.execute import GraphRunner
from graphquant.graph import GraphIndex, const_value, parse_tensor_name

METRICS = ("top1", "rel_l2")


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


#: re-measurements of the islands' effects after a failed check (:func:`search`)
REMEASURES = 2


def max_evaluations(num_islands: int) -> int:
    """Conversions + validation runs the search needs at most for ``num_islands`` islands:
    all int8, the predicted count, a bisection, the all-fallbacks check, and up to
    :data:`REMEASURES` counts predicted again after a failed check (more than one
    island)."""
    if num_islands == 0:
        return 1
    return (3 + max(0, math.ceil(math.log2(num_islands)))
            + (REMEASURES if num_islands > 1 else 0))


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
    samples on axis 0): for top1 the smallest :func:`top1_at_risk` (Softmax outputs
    compared in log space), for rel_l2 the largest relative L2.  ``classes``: which
    outputs are class scores made by a Softmax (:func:`class_score_outputs`; default:
    every 2-D one, compared as they are)."""
    if target.metric == "rel_l2":
        return max(metrics.relative_l2(r, c) for r, c in zip(reference, candidate))
    log = classes is not None
    if classes is None:
        classes = [True] * len(reference)
    values = [top1_at_risk(r, c, log) for r, c, k in zip(reference, candidate, classes)
              if k and metrics.is_classification(r)]
    if not values:
        raise GraphQuantError("fidelity top1 needs an output of class scores (samples x "
                              "classes); none of the outputs is one",
                              "use --fidelity rel_l2=... for this graph")
    return min(values)


# --------------------------------------------------------------------------- top-1
def log_scores(scores: np.ndarray, log: bool) -> np.ndarray:
    """Scores whose differences are the logit differences: ``log`` of Softmax
    probabilities (floored at 1e-30), else the scores as they are."""
    scores = np.asarray(scores, np.float64)
    return np.log(np.maximum(scores, 1e-30)) if log else scores


def margin_shrinks(reference: np.ndarray, candidate: np.ndarray, log: bool
                   ) -> Tuple[np.ndarray, np.ndarray]:
    """(fp32 margins, how much the candidate shrinks them), per sample: the margin is the
    reference top-1 score minus the best other one (in log space for Softmax outputs:
    the logit difference), the shrink that margin minus the candidate's score of the
    same class minus its best other one (>= the margin: top-1 differs)."""
    ref, cand = log_scores(reference, log), log_scores(candidate, log)
    top = np.argmax(ref, axis=1)
    margin = _margins(ref, top)
    return margin, margin - _margins(cand, top)


#: a validation sample counts as a top-1 miss when int8 shrinks its fp32 margin by at least
#: this fraction of it (:func:`top1_at_risk`); 1: when its top-1 class changes
AT_RISK = 1.0


def top1_at_risk(reference: np.ndarray, candidate: np.ndarray, log: bool = False,
                 at_risk: float = AT_RISK) -> float:
    """Top-1 agreement counting as a miss every sample whose fp32 margin the candidate
    shrinks by at least ``at_risk`` of it (1: the plain agreement, a flipped sample has
    lost all of it).

    Measured with 0.5 (a sample that lost half its margin is at risk: the target must
    hold with the int8 error doubled), against the plain count (``tools/accuracy_table.py
    --configs=fid_top1_split``, held-out halves): mtcnn_rnet 97.6% -> 100% (3 islands,
    76% of the multiply-adds, instead of 1, 7.2%), but fer_mini_xception (both exports)
    100% -> 95.3%: the cheap islands that clear fer's validation faces at risk only draw
    its int8 error anew (its expected flip rate, every sample's margin shrink paired
    with every sample's margin, stays near 3% for any few fp32 islands) and flip two
    held-out faces.  With calibration on 32 faces and validation on the next 34, fer
    gets 96.0% on all 101 (plain count: 97.0%; 97.1% on the 35 unused faces either way).  A few dozen validation samples do not
    hold the borderline ones either way (rnet's validation half has no face with a logit
    margin below 0.16, its held-out half one of 0.028), so the plain count stays."""
    margin, shrink = margin_shrinks(reference, candidate, log)
    if not len(margin):
        return 1.0
    return 1.0 - float(np.mean(shrink >= at_risk * margin))


def run_outputs(graph_def: graph_pb2.GraphDef, outputs: Sequence[str], feeds) -> List[np.ndarray]:
    """Every output on all ``feeds`` (concatenated on axis 0)."""
    return _joined(_per_feed(graph_def, outputs, feeds))


def _per_feed(graph_def, outputs, feeds) -> List[List[np.ndarray]]:
    with GraphRunner(graph_def, outputs) as runner:
        return [runner(f) for f in feeds]


def _joined(per_feed: Sequence[Sequence[np.ndarray]]) -> List[np.ndarray]:
    return [np.concatenate([v[i] for v in per_feed]) for i in range(len(per_feed[0]))]


def _rows_of(per_feed: Sequence[Sequence[np.ndarray]], chosen: Sequence[int]
             ) -> List[np.ndarray]:
    """Per output, the indices of the rows of the ``chosen`` feeds in :func:`_joined`."""
    rows = []
    for i in range(len(per_feed[0])):
        starts = np.cumsum([0] + [len(v[i]) for v in per_feed])
        rows.append(np.concatenate([np.arange(starts[f], starts[f + 1]) for f in chosen]))
    return rows


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


# --------------------------------------------------------------------------- ranking
#: a sample's top-1 margin is worth restoring up to this fraction of its fp32 margin, an
#: output's relative L2 down to this fraction of the target (not beyond)
RESTORE = 0.5
#: the cost of an island is at least this share of the multiply-adds (pools, concats: the
#: Quantize/Dequantize steps around an fp32 island are not free)
COST_FLOOR = 0.005
#: validation feeds the island effects are measured on: the riskiest ones (top1: smallest
#: fp32 margin against the all-int8 change; rel_l2: largest all-int8 error)
EFFECT_FEEDS = {"top1": 16, "rel_l2": 8}
#: the join pass that changes values (a float output instead of an 8-bit one)
SKIP_REQUANTIZE = "skip_requantize_for_fp32_readers"
#: validation feeds for the output-sensitivity order of the islands the greedy leaves
SENSITIVITY_FEEDS = 8


FP32_PREFIX = "fp32_copy/"
FLOAT_PREFIX = "float_copy/"
#: int8 ops whose 8-bit output step the join passes drop when only fp32 ops read them
_INT8_OPS = ("_FusedQuantizedConv2D", "_FusedQuantizedDepthwiseConv2D", "_QuantizedMatMul")
#: passes whose islands exist only while int8 islands read them (when no int8 op feeds them)
READER_DRIVEN = ("quantize_pool", "quantize_pad")


def fp32_copies(fp32: graph_pb2.GraphDef, islands: graph_pb2.GraphDef,
                notes: Sequence[Mapping[str, object]]) -> Tuple[graph_pb2.GraphDef,
                                                                Dict[str, List[str]]]:
    """(``islands`` plus copies, {root: upstream roots whose 8-bit output step goes when
    that island alone is fp32}).

    The copies, per island of ``notes``: its fp32 nodes (prefixed :data:`FP32_PREFIX`;
    Consts the island graph no longer has are copied too), reading the island graph's
    tensors -- or, as the converted graph with the fallback has them: for an upstream
    int8 conv/matmul whose only int8 reader is this island, a copy of that op and its
    Dequantize (prefixed :data:`FLOAT_PREFIX`) which :data:`SKIP_REQUANTIZE` (run by
    :func:`fallback_effects`) turns into its float-output form; for an upstream pool or
    Pad island only this island read (:data:`READER_DRIVEN`), its fp32 copy."""
    fp32_ops = {n.name: n.op for n in fp32.node}
    fp32_nodes = {n.name: n for n in fp32.node}
    index = GraphIndex(islands)
    roots = {str(n["node"]) for n in notes}
    by_root = {str(n["node"]): n for n in notes}
    merged = graph_pb2.GraphDef()
    merged.CopyFrom(islands)
    copied: Set[str] = set()
    floats: Dict[str, List[str]] = {}

    def int8_nodes(root: str) -> Set[str]:
        """The island graph's nodes of the island ending at ``root`` (new or changed ones)."""
        found, todo = set(), [root]
        while todo:
            name = todo.pop()
            if name in found or (name != root and (name in roots or fp32_ops.get(name) ==
                                                   getattr(index.nodes.get(name), "op", 0))):
                continue
            found.add(name)
            node = index.nodes.get(name)
            todo += [parse_tensor_name(i).node for i in (node.input if node else [])]
        return found

    def float_copy(root: str, own: Set[str]) -> Optional[str]:
        dq = index.nodes.get(root)
        if dq is None or dq.op != "Dequantize" or root not in roots:
            return None
        producer = index.node(dq.input[0])
        readers = [r.name for r in index.consumer_nodes(root) if r.op == "QuantizeV2"]
        if (producer.op not in _INT8_OPS or not set(readers) <= own
                or b"Sum" in producer.attr["fused_ops"].list.s):
            return None       # (a Sum fusion keeps its 8-bit output and writes in place)
        if FLOAT_PREFIX + root not in copied:
            copied.add(FLOAT_PREFIX + root)
            for node, source in ((merged.node.add(), producer), (merged.node.add(), dq)):
                node.CopyFrom(source)
                node.name = FLOAT_PREFIX + source.name
            merged.node[-1].input[0] = FLOAT_PREFIX + producer.name
        return FLOAT_PREFIX + root

    def goes_fp32(root: str, own: Set[str]) -> bool:
        """A pool or Pad island that no int8 op feeds (int8 only because int8 islands read
        it) whose int8 readers are all in ``own``: fp32 too once they are."""
        if by_root.get(root, {}).get("pass") not in READER_DRIVEN:
            return False
        readers = index.consumer_nodes(root)
        fed = [index.node(q.input[0]).op for q in map(index.nodes.get, int8_nodes(root))
               if q.op == "QuantizeV2"]
        return "Dequantize" not in fed and all(r.op == "QuantizeV2" and r.name in own
                                               for r in readers)

    def copy(name: str, inside: Set[str], own: Set[str], upstream: List[str]) -> None:
        if FP32_PREFIX + name in copied:
            return
        copied.add(FP32_PREFIX + name)
        node = merged.node.add()
        node.CopyFrom(fp32_nodes[name])
        node.name = FP32_PREFIX + name
        for i, inp in enumerate(node.input):
            t = parse_tensor_name(inp)
            if t.node in inside or t.node not in index.nodes:
                copy(t.node, inside, own, upstream)
                node.input[i] = str(type(t)(FP32_PREFIX + t.node, t.port, t.control))
            elif goes_fp32(t.node, own):
                copy(t.node, set(by_root[t.node].get("nodes", [t.node])), int8_nodes(t.node),
                     upstream)
                node.input[i] = str(type(t)(FP32_PREFIX + t.node, t.port, t.control))
            elif float_copy(t.node, own):
                upstream.append(t.node)
                node.input[i] = str(type(t)(FLOAT_PREFIX + t.node, t.port, t.control))

    for note in notes:
        root = str(note["node"])
        nodes = set(note.get("nodes", [root]))
        floats[root] = []
        for name in sorted(nodes):
            copy(name, nodes, int8_nodes(root), floats[root])
        floats[root] = sorted(set(floats[root]))
    return merged, floats


def fallback_effects(fp32: graph_pb2.GraphDef, islands: graph_pb2.GraphDef,
                     outputs: Sequence[str], notes: Sequence[Mapping[str, object]], feeds,
                     ctx) -> Dict[str, List[np.ndarray]]:
    """{root: what falling that island alone back to fp32 removes from the all-int8 outputs}
    (int8 outputs minus outputs with the fallback, feeds concatenated on axis 0): the
    island graph run with the fp32 copy's result (:func:`fp32_copies`) fed in place of the
    island's, and the float results of the upstream ops that lose their 8-bit output in
    place of theirs.  ``ctx``: the conversion's context (options for the join pass).
    One run per island and feed, no conversion."""
    from graphquant.pipeline import PassContext, run_pipeline

    notes = list({str(n["node"]): n for n in notes}.values())     # one note per island
    merged, floats = fp32_copies(fp32, islands, notes)
    merged = run_pipeline(merged, [SKIP_REQUANTIZE], PassContext(
        inputs=ctx.inputs, outputs=list(outputs), options=dict(ctx.options)))
    roots = [str(n["node"]) for n in notes]
    ups = sorted({u for r in roots for u in floats[r]})
    changes: Dict[str, List[List[np.ndarray]]] = {r: [] for r in roots}
    fetch = ([FP32_PREFIX + r for r in roots] + [FLOAT_PREFIX + u for u in ups])
    with GraphRunner(merged, list(outputs) + fetch, grappler=False) as probe, \
            GraphRunner(merged, outputs, grappler=False) as inject:
        for feed in feeds:
            values = probe(feed)
            base = [v.astype(np.float64) for v in values[:len(outputs)]]
            copies = dict(zip(roots, values[len(outputs):]))
            up = dict(zip(ups, values[len(outputs) + len(roots):]))
            for root in roots:
                given = dict(feed, **{root: copies[root]}, **{u: up[u] for u in floats[root]})
                got = inject(given)
                changes[root].append([b - g for g, b in zip(got, base)])
    return {r: [np.concatenate([c[i] for c in changes[r]]) for i in range(len(outputs))]
            for r in roots if changes[r]}


def _probe_island_effects(notes, built, effects):
    """``effects`` of the islands as built (``built``: their int8 notes) per island of the
    probe (``notes``): the probe leaves residual Adds fp32, so a conv and the Add its Sum
    fusion takes in are one island as built and the conv alone in the probe; the conv
    falling back takes the whole built island with it."""
    owner = {m: str(n["node"]) for n in built for m in n.get("nodes", [n["node"]])}
    return {str(n["node"]): effects[owner[n["node"]]] for n in notes
            if owner.get(n["node"]) in effects}


def _power_order(prediction: Prediction, effects: Mapping[str, Sequence[np.ndarray]],
                 costs: Mapping[str, float]):
    """rel_l2 when the greedy finds no set: the islands by the squared error each removes
    alone per unit of cost, up to the first predicted to meet the target, the removals
    added up (powers, not vectors: on mtcnn_pnet the effects overshoot as vectors).
    ([], [all-int8 metric]) when even all of them are not predicted to meet it."""
    target = prediction.target
    base = [e * e for e in prediction._errors(prediction.change)]
    gains = {}
    for r in sorted(effects):
        alone = [e * e for e in prediction._errors([c - e for c, e in
                                                    zip(prediction.change, effects[r])])]
        gains[r] = [b - a for b, a in zip(base, alone)]
    score = {r: sum(max(g, 0.0) for g in gains[r]) / costs[r] for r in gains}
    order = [r for r in sorted(gains, key=lambda r: (-score[r], r)) if score[r] > 0]
    predicted, now = [math.sqrt(max(base))], list(base)
    for r in order:
        now = [n - g for n, g in zip(now, gains[r])]
        predicted.append(math.sqrt(max(0.0, max(now))))
    met = [k for k, v in enumerate(predicted) if target.met(v)]
    if not met:
        return [], predicted[:1]
    return order[:met[0]], predicted[:met[0] + 1]


def _margins(scores: np.ndarray, top: np.ndarray) -> np.ndarray:
    """Per row: the score of class ``top`` minus the best other score (<= 0: top-1 differs)."""
    rows = np.arange(len(top))
    other = scores.copy()
    other[rows, top] = -np.inf
    return scores[rows, top] - other.max(axis=1)


class Prediction:
    """The target's metric predicted for a set of fp32 islands from the measured all-int8
    outputs: their change from fp32 minus the islands' effects (:func:`fallback_effects`,
    exact for one island, assumed to add up for more), on the probed rows; the other
    rows keep their all-int8 values.

    :meth:`loss` is the smooth quantity the ranking lowers: for top1 each sample's margin
    shrink above ``1 -`` :data:`RESTORE` of its fp32 margin (a sample about to flip
    counts before it flips), for rel_l2 each output's squared error above
    :data:`RESTORE` of the target; a small term of the plain squared errors breaks
    ties.  ``rows[i]``: the probed rows of output ``i`` (samples on axis 0, feeds
    concatenated); ``log``: the class-score outputs are Softmax probabilities (margins
    in log space, :func:`log_scores`).
    """

    def __init__(self, target: FidelityTarget, reference: Sequence[np.ndarray],
                 int8: Sequence[np.ndarray], rows: Sequence[np.ndarray],
                 classes: Sequence[bool], log: bool = False):
        reference = [np.asarray(r, np.float64) for r in reference]
        int8 = [np.asarray(c, np.float64) for c in int8]
        self.target, self.log, self.rows = target, log, list(rows)
        self.full_ref, self.full_int8 = reference, int8
        self.ref = [r[k] for r, k in zip(reference, rows)]
        self.change = [c[k] - r for c, r, k in zip(int8, self.ref, rows)]
        self.ref2 = [max(float(np.sum(np.square(r))), 1e-30) for r in reference]
        self.rest2 = [float(np.sum(np.square(c - r))) - float(np.sum(np.square(d)))
                      for c, r, d in zip(int8, reference, self.change)]
        self.classes = [i for i, (k, r) in enumerate(zip(classes, reference))
                        if k and metrics.is_classification(r)]
        self.margin = {i: margin_shrinks(reference[i], reference[i], log)[0]
                       for i in self.classes}

    def _errors(self, change) -> List[float]:
        return [math.sqrt(max(0.0, rest + float(np.sum(np.square(c)))) / ref2)
                for c, rest, ref2 in zip(change, self.rest2, self.ref2)]

    def _candidate(self, i: int, change) -> np.ndarray:
        cand = self.full_int8[i].copy()
        cand[self.rows[i]] = self.ref[i] + change[i]
        return cand

    def metric(self, change: Sequence[np.ndarray]) -> float:
        if self.target.metric == "rel_l2":
            return max(self._errors(change))
        return min(top1_at_risk(self.full_ref[i], self._candidate(i, change), self.log)
                   for i in self.classes)

    def loss(self, change: Sequence[np.ndarray]) -> float:
        errors = self._errors(change)
        ties = 1e-3 * sum(e * e for e in errors)
        if self.target.metric == "rel_l2":
            floor = (RESTORE * self.target.value) ** 2
            return sum(max(e * e, floor) for e in errors) + ties
        return sum(float(np.sum(np.maximum(0.0, margin_shrinks(
            self.full_ref[i], self._candidate(i, change), self.log)[1] - (1.0 - RESTORE)
            * self.margin[i]))) for i in self.classes) + ties


def probe_feeds(target: FidelityTarget, reference: Sequence[Sequence[np.ndarray]],
                int8: Sequence[Sequence[np.ndarray]], classes: Sequence[bool],
                log: bool = False) -> List[int]:
    """Indices of the validation feeds the effects are measured on (outputs per feed
    given): the :data:`EFFECT_FEEDS` riskiest, in feed order.  top1: the largest share of
    a sample's fp32 margin that int8 takes away (:func:`margin_shrinks`); rel_l2: the
    largest share of the int8 squared error."""
    risk = []
    norms = [max(sum(float(np.sum(np.square(np.asarray(ref[i], np.float64))))
                     for ref in reference), 1e-30) for i in range(len(classes))]
    for ref, got in zip(reference, int8):
        pairs = [(np.asarray(r, np.float64), np.asarray(c, np.float64))
                 for r, c in zip(ref, got)]
        if target.metric == "top1":
            shares = [np.divide(d, np.maximum(m, 1e-12)) for m, d in (
                margin_shrinks(r, c, log) for (r, c), k in zip(pairs, classes)
                if k and metrics.is_classification(r))]
            risk.append(max([float(np.max(x)) for x in shares] or [0.0]))
        else:
            risk.append(sum(float(np.sum(np.square(c - r))) / norm
                            for (r, c), norm in zip(pairs, norms)))
    order = sorted(range(len(risk)), key=lambda i: (-risk[i], i))
    return sorted(order[:EFFECT_FEEDS[target.metric]])


def fallback_order(prediction: Prediction, effects: Mapping[str, Sequence[np.ndarray]],
                   costs: Mapping[str, float]):
    """(islands, predicted metric with the first k of them fp32 for k = 0..len(islands)):
    the cheapest set predicted to meet the target, [] if none is.

    Greedy, each step the island whose effect lowers :meth:`Prediction.loss` most per unit
    of cost (its multiply-adds) given the ones already chosen, up to the first step
    predicted to meet the target; the effects, measured one island at a time, stop adding
    up after a few steps on some graphs, so the prediction is trusted no further (the
    caller orders the rest by output sensitivity); rel_l2 without such a step tries
    :func:`_power_order`.  One island alone is predicted exactly: the cheapest one
    meeting the target replaces a dearer set."""
    target = prediction.target
    change = list(prediction.change)
    loss = prediction.loss(change)
    order, predicted, left = [], [prediction.metric(change)], sorted(effects)
    while left and not target.met(predicted[-1]):
        best = None
        for root in left:
            trial = [c - e for c, e in zip(change, effects[root])]
            value = (loss - prediction.loss(trial)) / costs[root]
            if best is None or value > best[0]:
                best = (value, root, trial)
        if best[0] <= 0:
            break
        _, root, change = best
        loss = prediction.loss(change)
        order.append(root)
        left.remove(root)
        predicted.append(prediction.metric(change))
    if not target.met(predicted[-1]):
        order, predicted = [], predicted[:1]
    alone = {r: prediction.metric([c - e for c, e in zip(prediction.change, effects[r])])
             for r in sorted(effects)}
    if not order and target.metric == "rel_l2":
        order, predicted = _power_order(prediction, effects, costs)
    singles = sorted((costs[r], r) for r, v in alone.items() if target.met(v))
    if singles and (not order or singles[0][0] < sum(costs[r] for r in order)):
        order, predicted = [singles[0][1]], [predicted[0], alone[singles[0][1]]]
    return order, predicted

def search(target: FidelityTarget, ranked: Sequence[Mapping[str, object]], errors,
           build: Callable[[Set[str]], graph_pb2.GraphDef], evaluate: Callable[
               [graph_pb2.GraphDef], float], macs: Mapping[str, int],
           predicted: Optional[Sequence[float]] = None,
           known: Optional[Mapping[int, float]] = None,
           remeasure: Optional[Callable[[int, Sequence[Mapping[str, object]]], Optional[
               Tuple[List[Mapping[str, object]], List[float]]]]] = None) -> FidelityResult:
    """Bisection over how many of the ``ranked`` islands stay fp32 (module docstring).

    ``build(exclude)`` converts with those node names kept fp32;
    ``evaluate(graph)`` returns the target's metric on the validation data.
    ``predicted[k]``: the metric predicted with the first ``k`` islands fp32; a step
    tries the fewest predicted to meet the target (while the prediction agrees with
    what was measured), as close as :func:`max_evaluations` allows, else the middle.
    ``known``: ``{k: metric}`` already measured (counted as evaluations).
    ``remeasure(k, ranked)``: called (at most :data:`REMEASURES` times) when the first
    ``k`` islands failed and no passing set is known yet; returns a new (order, predicted)
    of the same islands starting with those ``k`` -- the rest ordered by their effects
    measured with the ``k`` fallbacks applied -- or None to keep the order.  Only the
    order of untried counts changes, so the bisection's bound holds.
    """
    total_macs = max(sum(macs.values()), 1)
    tried: Dict[int, float] = dict(known or {})
    ranked = list(ranked)
    predicted = None if predicted is None else list(predicted)
    log = [{"fp32_islands": k, "measured": v} for k, v in sorted(tried.items())]

    def nodes_of(k: int) -> Set[str]:
        return {name for note in ranked[:k] for name in note.get("nodes", [note["node"]])}

    def check(k: int) -> bool:
        if k not in tried:
            tried[k] = evaluate(build(nodes_of(k)))
            log.append({"fp32_islands": k, "measured": tried[k]})
            if predicted is not None:
                log[-1]["predicted"] = float(predicted[k])
        return target.met(tried[k])

    n = len(ranked)
    budget = max_evaluations(n)
    best, rounds = 0, 0
    if not check(0) and n:
        lo, hi = 0, n          # check(lo) fails; hi passes, or is n and checked at the end
        while hi - lo > 1:
            probes = budget - len(tried) - (hi not in tried)    # one kept for check(n)
            mid = _next_probe(target, lo, hi, 2 ** (probes - 1), predicted)
            if check(mid):
                hi = mid
                continue
            lo = mid
            if remeasure is not None and hi == n and rounds < REMEASURES and n - lo > 1:
                rounds += 1
                again = remeasure(lo, ranked)
                if again is not None:
                    order, guess = again
                    assert len(order) == n and [r["node"] for r in order[:lo]] == [
                        r["node"] for r in ranked[:lo]]
                    ranked = list(order)
                    predicted = [tried[lo]] * (lo + 1) + list(guess[1:])
                    predicted += [predicted[-1]] * (n + 1 - len(predicted))
                    log[-1]["remeasured"] = True
        check(hi)
        best = hi
    fallbacks = []
    for note in ranked[:best]:
        nodes = list(note.get("nodes", [note["node"]]))
        m = sum(macs.get(name, 0) for name in nodes)
        fallbacks.append(Fallback(str(note["node"]), nodes, float(errors[note["node"]].own), m,
                                  m / total_macs))
    return FidelityResult(str(target), target.met(tried[best]), tried[best], tried[0], fallbacks,
                          log, budget)


def _next_probe(target: FidelityTarget, lo: int, hi: int, span: int,
                predicted: Optional[Sequence[float]]) -> int:
    """The next k to try in (lo, hi): the fewest predicted to meet the target if the
    prediction does not already claim ``lo`` meets it (measured: it does not), else the
    middle; kept within ``span`` of both ends so the rest of the bisection fits the bound."""
    guess = (lo + hi) // 2
    if predicted is not None and not target.met(predicted[lo]):
        guess = next((k for k in range(lo + 1, hi) if target.met(predicted[k])), guess)
    return min(max(guess, hi - span, lo + 1), lo + span, hi - 1)


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
    :attr:`FidelityResult.exclude` the caller adds to ``ctx.options['fp32_nodes']``)."""
    from graphquant.calib_data import open_data
    from graphquant.execute import tensor_shapes
    from graphquant.pipeline import ISLAND_PASSES, JOIN_PASSES, PassContext, run_pipeline

    target = parse_target(spec)
    outputs = ctx.outputs
    feeds = list(open_data(validation, original, inputs=ctx.inputs, image_spec=image_spec,
                           kind="validation"))
    base_exclude = set(ctx.options.get("fp32_nodes") or ())   # sensitivity's fallbacks

    def build(exclude: Set[str]) -> graph_pb2.GraphDef:
        c = PassContext(inputs=ctx.inputs, outputs=outputs,
                        options=dict(ctx.options, fp32_nodes=base_exclude | exclude))
        return run_pipeline(run_pipeline(fp32, ISLAND_PASSES, c), JOIN_PASSES, c)

    found = class_score_outputs(original, outputs)
    classes, log = found or [True] * len(outputs), found is not None
    reference = _per_feed(original, outputs, feeds)
    int8 = _per_feed(build(set()), outputs, feeds)
    last: Dict[str, object] = {}

    def evaluate(graph: graph_pb2.GraphDef) -> float:
        last["outputs"] = _per_feed(graph, outputs, feeds)
        return measure(target, _joined(reference), _joined(last["outputs"]), found)

    known = {0: measure(target, _joined(reference), _joined(int8), found)}
    notes = [n for n in probe_notes if n["node"] in errors and n["node"] not in base_exclude]
    macs = island_macs(fp32, ctx.options.get("shapes") or tensor_shapes(fp32))
    floor = COST_FLOOR * max(sum(macs.values()), 1)
    costs = {n["node"]: max(float(sum(macs.get(m, 0) for m in n.get("nodes", [n["node"]]))),
                            floor) for n in notes}
    by_root = {n["node"]: n for n in notes}
    ranked, predicted, rest = ranked_islands(errors, notes), None, None

    def ordered(kept: Sequence[Mapping[str, object]], current, rest):
        """(order, predicted) from the effects of the islands not in ``kept`` measured
        with ``kept`` fp32, given the validation outputs ``current`` of that conversion."""
        fixed = {str(n["node"]) for n in kept}
        exclude = base_exclude | {m for n in kept for m in n.get("nodes", [n["node"]])}
        c = PassContext(inputs=ctx.inputs, outputs=outputs,
                        options=dict(ctx.options, fp32_nodes=exclude))
        # the island graph computes what the converted graph does (the joins are exact)
        # once the int8 ops read by fp32 ones skip their 8-bit output step
        islands = run_pipeline(fp32, ISLAND_PASSES + [SKIP_REQUANTIZE], c)
        chosen = probe_feeds(target, reference, current, classes, log)
        left = [n for n in notes if n["node"] not in fixed]
        effects = _probe_island_effects(left, c.notes_of("int8"), fallback_effects(
            fp32, islands, outputs, c.notes_of("int8"), [feeds[i] for i in chosen], c))
        prediction = Prediction(target, _joined(reference), _joined(current),
                                _rows_of(reference, chosen), classes, log)
        order, guess = fallback_order(prediction, effects, {r: costs[r] for r in effects})
        tail = [by_root[r] for r in order] + [n for n in rest if n["node"] not in fixed
                                              and n["node"] not in order]
        return list(kept) + tail, guess + [guess[-1]] * (len(tail) - len(order))

    def remeasure(k: int, ranked_now):
        """:func:`search`'s hook: the order after the first ``k`` failed (outputs of the
        last evaluation), None when no set of the rest is predicted to meet the target."""
        order, guess = ordered(ranked_now[:k], last["outputs"], rest)
        if not target.met(min(guess) if target.metric == "rel_l2" else max(guess)):
            return None
        return order, guess

    if notes and not target.met(known[0]):
        rest = ranked_islands(errors, notes, output_sensitivity(
            fp32, outputs, errors, feeds[:SENSITIVITY_FEEDS]) or None)
        ranked, predicted = ordered([], int8, rest)
    result = search(target, ranked, errors, build, evaluate, macs, predicted, known,
                    remeasure if rest is not None else None)
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
