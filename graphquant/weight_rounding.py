"""Error-compensating weight rounding: each weight rounded knowing how the layer's inputs correlate.

Round-to-nearest makes every weight's error as small as it can be on its own;
what the network sees is the error of the layer's *output*, ``X (Wq - W)``,
whose square summed over the calibration data is, per output channel ``c``,

    e_c = d_c^T H d_c,      d_c = Wq[:, c] - W[:, c],      H = X^T X

(``X``: the layer's input patches, one row per output position, columns in
the weights' ``[h, w, in]`` order; a matmul's input rows).  Rounding the
inputs one at a time and moving the not-yet-rounded weights of the same
channel to cancel the error just made (the optimal-brain-quantization update,
in GPTQ's blocked Cholesky form) lowers ``e_c`` well below round-to-nearest
when inputs are correlated (image patches, overlapping windows)::

    before:  q = rint(W / step)                          per weight
    after:   for i in inputs:  q_i = project(W'_i / step)
                               W'_{>i} -= (W'_i - q_i step) * U_{i,>i} / U_{i,i}
             (U: upper Cholesky factor of (H + damping)^-1)

The step per channel (hence ``min/max_filter``) is the one the target's
quantizer chose; only the integers change, and ``project`` keeps them in the
target's format, so results stay exact on the CPU: ``|q| <= L`` on a multiple
of ``M`` (:func:`graphquant.target.weight_format`), or with
:mod:`graphquant.pair_weights` ``|q| <= 127`` and ``|q[2k] + q[2k+1]| <= 128``
(the second of a pair is rounded into what its partner left).  Per channel the
result is kept only where ``e_c`` is below round-to-nearest's on the same
data, so it is never worse there.

``H`` comes from one extra run of the fp32 graph per calibration feed with,
for every candidate op, its input patches (``ExtractImagePatches``) and their
Gram matrix in the graph.  Work grows as positions x inputs^2 per feed plus
inputs^2 x outputs per op, and the graph runs once more per feed: at most
:data:`MAX_FEEDS` feeds, fewer where those runs would take more than half of
:data:`COST_BUDGET` multiply-adds, and ops cheapest first until the budget is
spent (small models: every op; large ones: those that fit, or none).  The result
is ``ctx.options['rounded_weights']``
(:func:`graphquant.int8_rewrite.rounded_key` -> QuantizedWeights), read by
:func:`graphquant.int8_rewrite.quantize_weights`, so bias correction, the
sensitivity probe and the quantize passes all use the same integers.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Callable, Dict, Iterable, List, Mapping, Tuple

import numpy as np
from tensorflow.core.framework import graph_pb2

from graphquant import pair_weights
from graphquant.execute import GraphRunner, tensor_shapes
from graphquant.graph import canonical_tensor, make_const, make_node
from graphquant.int8_rewrite import quantize_weights, rounded_key, uses_pair_weights, weighted_ops
from graphquant import quant_math

SCOPE = "graphquant_weight_rounding"
#: damping added to H's diagonal, relative to its mean (keeps the Cholesky factor finite)
DAMPING = 0.01
#: inputs rounded between two full updates of the remaining weights
BLOCK = 128
#: multiply-add equivalents (fp32 runs of the graph, Gram matrices, rounding) per conversion
COST_BUDGET = 4e9
#: input noise assumed per element, in units of the input's own rounding noise (step^2/12):
#: the errors of the int8 ops upstream add to it
NOISE_FACTOR = 4.0
#: calibration feeds the Gram matrices are summed over at most
MAX_FEEDS = 16
#: multiply-add equivalent of the per-input Python work of :func:`round_columns`
ROW_COST = 2e5
KINDS = {"Conv2D": "conv", "MatMul": "matmul"}

Project = Callable[[int, np.ndarray, np.ndarray], np.ndarray]


def round_columns(z: np.ndarray, hessian: np.ndarray, project: Project,
                  damping: float = DAMPING) -> np.ndarray:
    """Integers for scaled weights ``z`` [inputs, channels] (``W / step``), rounded input
    by input with the error compensated on the later inputs through ``hessian``
    [inputs, inputs] (``X^T X``).  ``project(i, values, q)`` returns row ``i``'s
    integers for ``values`` given the rows already rounded in ``q``."""
    k = z.shape[0]
    h = np.array(hessian, np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    h[np.diag_indices(k)] += damping * float(np.mean(np.diag(h)))
    u = np.linalg.cholesky(np.linalg.inv(h)).T      # (H + damping)^-1 = U^T U, U upper
    z = np.array(z, np.float64)
    q = np.zeros_like(z)
    for b0 in range(0, k, BLOCK):
        b1 = min(b0 + BLOCK, k)
        err = np.zeros((b1 - b0, z.shape[1]))
        for i in range(b0, b1):
            q[i] = project(i, z[i], q)
            err[i - b0] = (z[i] - q[i]) / u[i, i]
            z[i + 1:b1] -= np.outer(u[i, i + 1:b1], err[i - b0])
        z[b1:] -= u[b0:b1, b1:].T @ err
    return q


def output_error(q: np.ndarray, z: np.ndarray, hessian: np.ndarray) -> np.ndarray:
    """Per channel ``(q - z)^T H (q - z)``: the layer's squared output error (in steps)."""
    d = np.asarray(q, np.float64) - np.asarray(z, np.float64)
    return np.einsum("kn,kn->n", np.asarray(hessian, np.float64) @ d, d)


def level_projector(max_level: int, multiple: int = 1) -> Project:
    """Nearest multiple of ``multiple`` within ``+-max_level``."""
    def project(i, values, q):
        return np.clip(multiple * np.rint(values / multiple), -max_level, max_level)
    return project


def pair_projector(channels_in: int) -> Project:
    """Nearest integer within ``+-127`` whose sum with its pair partner (input channels
    ``2k``, ``2k+1`` of the same kernel position; rows in ``[h, w, in]`` order) stays
    within ``+-128``."""
    limit, pair_limit = pair_weights.MAX_LEVEL, pair_weights.MAX_PAIR_SUM

    def project(i, values, q):
        r = np.rint(values)
        if i % channels_in % 2 == 0:
            return np.clip(r, -limit, limit)
        partner = q[i - 1]
        return np.clip(r, np.maximum(-limit, -pair_limit - partner),
                       np.minimum(limit, pair_limit - partner))
    return project


@dataclass
class Candidate:
    node: str
    kind: str
    weights: np.ndarray          # float, original layout
    signed_input: bool
    transpose_b: bool
    positions: int               # rows of X per feed
    inputs: int                  # K
    input_step: float            # the int8 input's step (its rounding noise: step^2 / 12)

    @property
    def channels(self) -> int:
        return int(self.weights.shape[-2] if self.transpose_b else self.weights.shape[-1])

    @property
    def macs(self) -> float:
        """Multiply-adds of the op itself per feed."""
        return float(self.positions) * self.inputs * self.channels

    def cost(self, feeds: int) -> float:
        """Its Gram matrix over ``feeds`` feeds, the inverse, the rounding."""
        k = float(self.inputs)
        return feeds * self.positions * k * k + k * k * self.channels + k ** 3 + k * ROW_COST


def candidates(graph_def: graph_pb2.GraphDef, ranges, exclude=()) -> List[Candidate]:
    """The convs/matmuls with constant weights and a planned input range (what the int8
    passes take), NHWC, not excluded."""
    shapes = tensor_shapes(graph_def)
    out = []
    for node, kind, w, x_range in weighted_ops(graph_def, ranges, KINDS):
        if node.name in exclude:
            continue
        y_shape = shapes.get(node.name)
        if kind == "conv":
            x_shape = shapes.get(canonical_tensor(node.input[0]).split(":")[0])
            if (not y_shape or any(d is None for d in y_shape[1:3]) or not x_shape
                    or x_shape[-1] != w.shape[2]):
                continue
            positions, inputs = int(np.prod(y_shape[1:3])), int(np.prod(w.shape[:3]))
        else:
            positions, inputs = 1, int(w.shape[1] if node.attr["transpose_b"].b else w.shape[0])
        signed = quant_math.needs_signed(x_range[0])
        step = float(quant_math.activation_scale(
            quant_math.activation_range(x_range[0], x_range[1], signed)[1], signed))
        out.append(Candidate(node.name, kind, w, signed,
                             kind == "matmul" and node.attr["transpose_b"].b, positions, inputs,
                             step))
    return out


def _gram_nodes(node, c: Candidate, scope: str) -> List:
    """Nodes computing ``X^T X`` of ``node``'s input, the last one named ``scope/gram``."""
    x = node.input[0]
    nodes = []
    if c.kind == "conv":
        padding = node.attr["padding"].s.decode()
        if padding == "EXPLICIT":
            pads = np.array(node.attr["explicit_paddings"].list.i, np.int32).reshape(4, 2)
            nodes += [make_const(f"{scope}/paddings", pads),
                      make_node("Pad", f"{scope}/pad", [x, f"{scope}/paddings"],
                                T=np.float32, Tpaddings=np.int32)]
            x, padding = f"{scope}/pad", "VALID"
        kh, kw = c.weights.shape[:2]
        dil = list(node.attr["dilations"].list.i) or [1, 1, 1, 1]
        nodes.append(make_node("ExtractImagePatches", f"{scope}/patches", [x],
                               T=np.float32, ksizes=[1, kh, kw, 1],
                               strides=list(node.attr["strides"].list.i),
                               rates=[1, dil[1], dil[2], 1], padding=padding))
        nodes += [make_const(f"{scope}/shape", np.array([-1, c.inputs], np.int32)),
                  make_node("Reshape", f"{scope}/rows", [f"{scope}/patches", f"{scope}/shape"],
                            T=np.float32, Tshape=np.int32)]
        x = f"{scope}/rows"
    nodes += [make_node("MatMul", f"{scope}/gram", [x, x], T=np.float32,
                        transpose_a=True, transpose_b=False),
              make_const(f"{scope}/axis", np.array([0], np.int32)),
              make_node("Sum", f"{scope}/sum", [x, f"{scope}/axis"], T=np.float32,
                        Tidx=np.int32, keep_dims=False),
              make_node("Shape", f"{scope}/rows_shape", [x], T=np.float32, out_type=np.int32)]
    return nodes


def hessians(graph_def: graph_pb2.GraphDef, chosen: List[Candidate],
             data: Iterable[Mapping[str, np.ndarray]], centered: bool = False
             ) -> Dict[str, Tuple[np.ndarray, int]]:
    """node -> (``X^T X`` summed over ``data`` (float64), rows of ``X``); ``centered``: of
    ``X`` minus its column means (what is left of the output error once bias correction
    has removed its mean per channel)."""
    probe = graph_pb2.GraphDef()
    probe.CopyFrom(graph_def)
    nodes = {n.name: n for n in graph_def.node}
    fetches = []
    for k, c in enumerate(chosen):
        for n in _gram_nodes(nodes[c.node], c, f"{SCOPE}/{k}"):
            probe.node.add().CopyFrom(n)
        fetches += [f"{SCOPE}/{k}/{part}:0" for part in ("gram", "sum", "rows_shape")]
    grams = [np.zeros((c.inputs, c.inputs)) for c in chosen]
    sums = [np.zeros(c.inputs) for c in chosen]
    rows = np.zeros(len(chosen))
    with GraphRunner(probe, fetches, grappler=False) as runner:
        for feed in data:
            values = runner(feed)
            for i in range(len(chosen)):
                grams[i] += values[3 * i]
                sums[i] += values[3 * i + 1]
                rows[i] += values[3 * i + 2][0]
    if centered:
        grams = [g - np.outer(s, s) / max(n, 1) for g, s, n in zip(grams, sums, rows)]
    return {c.node: (g, int(n)) for c, g, n in zip(chosen, grams, rows)}


def round_weights(qw: quant_math.QuantizedWeights, weights: np.ndarray, kind: str,
                  hessian: np.ndarray, project: Project, transpose_b: bool = False,
                  check: np.ndarray = None) -> quant_math.QuantizedWeights:
    """``qw`` (round-to-nearest, its steps kept) with each channel's integers replaced by the
    error-compensating rounding for ``hessian`` where that has less output error on
    ``check`` (other data's Gram matrix; default ``hessian``)."""
    view = quant_math.weight_channel_view(np.asarray(weights, np.float64), kind, transpose_b)
    channels = view.shape[-1]
    z = view.reshape(-1, channels) / np.broadcast_to(np.asarray(qw.step, np.float64), [channels])
    nearest = quant_math.weight_channel_view(qw.values, kind, transpose_b).reshape(-1, channels)
    q = round_columns(z, hessian, project)
    check = hessian if check is None else check
    better = output_error(q, z, check) < output_error(nearest, z, check)
    best = np.where(better[None, :], q, nearest).astype(np.int8).reshape(view.shape)
    values = best.T if kind == "matmul" and transpose_b else best
    return replace(qw, values=np.ascontiguousarray(values.reshape(qw.values.shape)))


def rounded_weights(graph_def: graph_pb2.GraphDef, ranges, data, ctx,
                    budget: float = COST_BUDGET, centered: bool = True
                    ) -> Dict[tuple, quant_math.QuantizedWeights]:
    """:func:`graphquant.int8_rewrite.rounded_key` -> weights rounded against the
    calibration inputs, for the candidate ops cheapest first within ``budget``;
    ``centered``: against the inputs' covariance (bias correction follows and removes
    the mean error)."""
    ops = candidates(graph_def, ranges, ctx.options.get("exclude") or ())
    feeds = list(itertools.islice(data, MAX_FEEDS))
    forward = sum(c.macs for c in ops)      # one fp32 run of the graph, roughly
    if forward:   # feeds the graph can run on within half the budget
        feeds = feeds[:int(budget / 2 // forward)]
    chosen, spent = [], forward * len(feeds)
    for c in sorted(ops, key=lambda c: (c.cost(len(feeds)), c.node)):
        if not feeds or spent + c.cost(len(feeds)) > budget:
            break
        chosen.append(c)
        spent += c.cost(len(feeds))
    if not chosen:
        return {}
    # rounded on the even feeds, kept per channel where better on the odd ones (one feed:
    # both on it): the rounding fits its data, and 16 faces are few for that
    fit = hessians(graph_def, chosen, feeds[::2], centered)
    held = hessians(graph_def, chosen, feeds[1::2], centered) if len(feeds) > 1 else fit
    out = {}
    for c in chosen:
        qw = quantize_weights(ctx, c.weights, c.kind, c.signed_input, transpose_b=c.transpose_b)
        if uses_pair_weights(ctx, c.kind, c.signed_input):
            channels_in = c.weights.shape[2] if c.kind == "conv" else c.inputs
            project = pair_projector(channels_in)
        else:
            project = level_projector(qw.max_level, qw.multiple)
        # the int8 op reads X + n, n its input's rounding noise (and upstream int8 error):
        # E|(Wq - W) X + Wq n|^2 ~ d^T (X^T X + rows * var(n) I) d + const
        noisy = [g + np.eye(c.inputs) * (NOISE_FACTOR * rows * c.input_step ** 2 / 12.0)
                 for g, rows in (fit[c.node], held[c.node])]
        out[rounded_key(c.weights, c.kind, c.signed_input, c.transpose_b)] = round_weights(
            qw, c.weights, c.kind, noisy[0], project, c.transpose_b, check=noisy[1])
    return out
