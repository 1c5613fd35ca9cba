"""Bias correction: remove the mean output shift that weight quantization causes, per channel.

An int8 conv computes with ``Wq`` (the weights as the kernel reconstructs
them) instead of ``W``; its output moves by ``(Wq - W) * x``, whose mean over
the data is a per-channel constant (large when inputs have a large mean, as
after Relu or :mod:`graphquant.passes.shift_signed_activations`).  Measured
on the calibration data and subtracted from the int8 op's bias::

    Before:  x ─► int8 conv(Wq) + b                 mean error  E[(Wq - W) * x]  per channel
    After:   x ─► int8 conv(Wq) + b - E[(Wq - W) * x]           mean error 0 on the calibration data

The op is linear in its input, so the mean over the samples of
``op(x, Wq - W)`` is ``op(E[x], Wq - W)``, with ``E[x]`` the mean of the whole
input tensor over the samples, every position kept (zero padding, strides and
borders stay exact).  Calibration keeps those means
(:class:`graphquant.calibrate.MeanMaps`, ``mean_maps=``), so the corrections
come from ONE run of the fp32 graph with, per op, a copy applied to ``E[x]``
with weights ``Wq - W``, reduced to its mean per output channel::

    E[x] (fed) ─► op(Wq - W) ─► Mean over batch and positions ─► shift per channel

Tensors may have changed since calibration (the shift of
:mod:`graphquant.passes.shift_signed_activations`): a first run on the
calibration's first feed finds each measured tensor that now computes the
measured one plus a constant (:func:`constant_offset`; a MaxPool after a shift,
a BiasAdd that absorbed one), fed as its mean plus that constant.  An input
that is not measured gets its mean in the same run from measured means through
ops that commute with the mean (:data:`LINEAR_OPS`: pads, adds of constants,
reshapes, average pools, convs...).  An input reached neither way, or
calibration without means, gets the empirical mean instead: the graph runs on
each calibration feed with the copies applied to the op's real input
(:func:`output_shifts`).  ``Wq`` comes from
:func:`graphquant.int8_rewrite.quantize_weights` with the planned input signedness, i.e. exactly what the quantize passes will
use.  The fp32 graph is not changed: the corrections go to
``ctx.options['bias_corrections']`` (node name -> float per output channel)
and the quantize passes add them to the int8 op's bias
(:func:`graphquant.int8_rewrite.corrected_bias`), so a node that stays fp32
keeps its own bias.  Weights that quantize exactly get no correction.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np
from tensorflow.core.framework import graph_pb2, types_pb2

from graphquant import quant_math
from graphquant.execute import GraphRunner
from graphquant.graph import (GraphIndex, canonical_tensor, data_inputs, make_const, make_node,
                              node_name, parse_tensor_name)
from graphquant.int8_rewrite import WEIGHTED_OPS, quantize_weights, weighted_ops

SCOPE = "graphquant_bias_correction"


def dequantized_weights(qw: quant_math.QuantizedWeights, kind: str, shape,
                        transpose_b: bool = False) -> np.ndarray:
    """The float weights the kernel computes with, in the original layout."""
    view = quant_math.weight_channel_view(qw.values, kind, transpose_b).astype(np.float64)
    view = view * np.asarray(qw.step, np.float64)
    if kind == "depthwise":
        return view.reshape(shape)
    return view.T if kind == "matmul" and transpose_b else view


def mean_tensors(graph_def: graph_pb2.GraphDef) -> List[str]:
    """The inputs whose means bias correction needs: input 0 of every float conv,
    depthwise conv or matmul with Const weights (for ``calibrate(mean_tensors=...)``)."""
    index = GraphIndex(graph_def)
    wanted = {}
    for node in graph_def.node:
        if (node.op in WEIGHTED_OPS and node.attr["T"].type == types_pb2.DT_FLOAT
                and len(data_inputs(node)) > 1 and index.node(node.input[1]).op == "Const"):
            wanted[canonical_tensor(node.input[0])] = None
    return list(wanted)


def _candidates(graph_def, ranges) -> Dict[str, Tuple[str, np.ndarray, bool]]:
    """node name -> (kind, float weights, signed input) of every op the int8 passes may take."""
    return {node.name: (kind, w, quant_math.needs_signed(x_range[0]))
            for node, kind, w, x_range in weighted_ops(graph_def, ranges)}


def weight_errors(graph_def, ranges, ctx) -> Dict[str, np.ndarray]:
    """node name -> ``Wq - W`` for every candidate op (see the module docstring)."""
    deltas = {}
    for name, (kind, w, signed) in _candidates(graph_def, ranges).items():
        node = next(n for n in graph_def.node if n.name == name)
        tb = kind == "matmul" and node.attr["transpose_b"].b
        qw = quantize_weights(ctx, w, kind, signed, transpose_b=tb)
        deltas[name] = (dequantized_weights(qw, kind, w.shape, tb) - w).astype(np.float32)
    return deltas


def _probe_graph(graph_def, deltas) -> Tuple[graph_pb2.GraphDef, Dict[str, str]]:
    """graph_def plus, per op, ``mean over all but the channel axis of op(x, delta)``."""
    probe = graph_pb2.GraphDef()
    probe.CopyFrom(graph_def)
    nodes = {n.name: n for n in graph_def.node}
    fetches = {}
    for k, (name, delta) in enumerate(sorted(deltas.items())):
        if not np.any(delta):
            continue
        scope = f"{SCOPE}/{k}"
        copy = probe.node.add()
        copy.CopyFrom(nodes[name])
        copy.name = f"{scope}/op"
        del copy.input[:]
        copy.input.extend([nodes[name].input[0], f"{scope}/delta"])
        probe.node.add().CopyFrom(make_const(f"{scope}/delta", delta))
        axes = [0] if nodes[name].op == "MatMul" else [0, 1, 2]
        probe.node.add().CopyFrom(make_const(f"{scope}/axes", np.array(axes, np.int32)))
        probe.node.add().CopyFrom(make_node("Mean", f"{scope}/mean", [copy.name, f"{scope}/axes"],
                                            T=np.float32, Tidx=np.int32, keep_dims=False))
        fetches[name] = f"{scope}/mean:0"
    return probe, fetches


def output_shifts(graph_def: graph_pb2.GraphDef, deltas: Mapping[str, np.ndarray],
                  data: Iterable[Mapping[str, np.ndarray]]) -> Dict[str, np.ndarray]:
    """node name -> mean of ``op(x, delta)`` per output channel over ``data``."""
    probe, fetches = _probe_graph(graph_def, deltas)
    if not fetches:
        return {}
    names = sorted(fetches)
    sums: Dict[str, np.ndarray] = {}
    count = 0
    with GraphRunner(probe, [fetches[n] for n in names], grappler=False) as runner:
        for feed in data:
            weight = next(iter(np.shape(v)[0] for v in feed.values() if np.ndim(v)), 1)
            for name, value in zip(names, runner(feed)):
                sums[name] = sums.get(name, 0.0) + weight * value.astype(np.float64)
            count += weight
    return {name: s / max(count, 1) for name, s in sums.items()}


# op -> which inputs carry data (the others must be Const) for an op f with
# E[f(x, ...)] = f(E[x], ...): affine in its data inputs
_ALL = None
LINEAR_OPS = {
    "Identity": _ALL, "AddV2": _ALL, "Add": _ALL, "Sub": _ALL, "BiasAdd": _ALL, "Neg": _ALL,
    "Pad": (0,), "PadV2": (0,), "Reshape": (0,), "Transpose": (0,), "Squeeze": (0,),
    "ExpandDims": (0,), "AvgPool": (0,), "Conv2D": (0,), "DepthwiseConv2dNative": (0,),
    "MatMul": (0,), "Mul": "one", "ConcatV2": "all_but_last",
}
_MAX_DEPTH = 64
# a tensor computes "what calibration measured + c" when, on the check feed, its value minus
# the measured one is one constant to this fraction of the tensors' magnitude.  Unchanged
# tensors deep in a rewritten graph differ by float rounding (ResNet50's last block after
# offset_residual_summands: 1.1e-4); a shift moves a tensor by >= 1% of it.  What is let
# through moves a mean by at most this fraction, far below the correction's own size.
_OFFSET_TOLERANCE = 1e-3


def constant_offset(measured: np.ndarray, now: np.ndarray) -> Optional[float]:
    """``c`` when ``now == measured + c`` (within :data:`_OFFSET_TOLERANCE`), else None."""
    if np.shape(measured) != np.shape(now) or not np.size(now):
        return None
    diff = np.asarray(now, np.float64) - np.asarray(measured, np.float64)
    c = float(diff.mean())
    scale = max(float(np.abs(measured).max()), float(np.abs(now).max()), 1e-30)
    return c if float(np.abs(diff - c).max()) <= _OFFSET_TOLERANCE * scale else None


class _MeanSources:
    """Which measured means give each op input's mean (see the module docstring).

    ``offsets``: measured tensor -> ``c`` where the graph's tensor of that name
    computes the measured one plus ``c`` (0 when unchanged; ``-lo`` after a shift)."""

    def __init__(self, graph_def, offsets: Mapping[str, float], per_row):
        self.index = GraphIndex(graph_def)
        self.offsets, self.per_row = offsets, per_row
        self.memo: Dict[str, Optional[frozenset]] = {}

    def of_input(self, node) -> Optional[frozenset]:
        """The measured tensors to feed for ``node``'s data input 0, or None."""
        x = canonical_tensor(node.input[0])
        if x in self.offsets:
            return frozenset([x])     # a MatMul input may be a mean over rows (per_row)
        return self._of(x, 0)

    def _of(self, tensor: str, depth: int) -> Optional[frozenset]:
        if tensor in self.memo:
            return self.memo[tensor]
        result = None
        node = self.index.nodes.get(node_name(tensor))
        if node is None or depth > _MAX_DEPTH:
            pass
        elif tensor in self.offsets and tensor not in self.per_row:
            result = frozenset([tensor])
        elif node.op == "Const":
            result = frozenset()
        elif node.op in LINEAR_OPS and parse_tensor_name(tensor).port == 0:
            result = self._through(node, depth)
        self.memo[tensor] = result
        return result

    def _through(self, node, depth: int) -> Optional[frozenset]:
        inputs = data_inputs(node)
        rule = LINEAR_OPS[node.op]
        if rule == "all_but_last":
            data, const = inputs[:-1], inputs[-1:]
        elif rule == "one":
            variable = [i for i in inputs if self.index.node(i).op != "Const"]
            if len(variable) > 1:
                return None
            data, const = variable, [i for i in inputs if i not in variable]
        elif rule is _ALL:
            data, const = inputs, []
        else:
            data = [inputs[k] for k in rule]
            const = [i for k, i in enumerate(inputs) if k not in rule]
        if any(self.index.node(i).op != "Const" for i in const):
            return None
        leaves = set()
        for inp in data:
            found = self._of(canonical_tensor(inp), depth + 1)
            if found is None:
                return None
            leaves |= found
        return frozenset(leaves)


def shifts_from_means(graph_def: graph_pb2.GraphDef, deltas: Mapping[str, np.ndarray],
                      mean_maps) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
    """(node name -> mean of ``op(x, delta)`` per output channel, from the measured
    means; the deltas of ops whose input mean cannot be had that way).

    One session: a run on the calibration's check feed finds what each measured
    tensor computes now (:func:`constant_offset`), then one run per group of
    feed shapes on the means."""
    groups = mean_maps.means() if mean_maps is not None else []
    if not groups or mean_maps.check_feed is None or not deltas:
        return {}, dict(deltas)
    probe, fetches = _probe_graph(graph_def, deltas)
    present = {n.name for n in graph_def.node}
    measured = sorted(t for t in mean_maps.check_values if node_name(t) in present)
    with GraphRunner(probe, [], grappler=False) as runner:
        now = runner.fetch(mean_maps.check_feed, measured)
        offsets = {}
        for tensor, value in zip(measured, now):
            c = constant_offset(mean_maps.check_values[tensor], value)
            if c is not None:
                offsets[tensor] = c
        sources = _MeanSources(graph_def, offsets, mean_maps.per_row)
        nodes = {n.name: n for n in graph_def.node}
        feeds_of = {}
        for name in sorted(fetches):
            found = sources.of_input(nodes[name])
            if found is not None and all(t in means for _, means in groups for t in found):
                feeds_of[name] = found
        rest = {n: d for n, d in deltas.items() if n not in feeds_of}
        names = sorted(feeds_of)
        if not names:
            return {}, rest
        leaves = sorted(set().union(*(feeds_of[n] for n in names)))
        totals: Dict[str, np.ndarray] = {}
        count = 0
        for samples, means in groups:
            feeds = {}
            for leaf in leaves:
                shape = runner.graph.get_tensor_by_name(leaf).shape
                dim0 = shape[0] if shape.rank else None
                mean = means[leaf] + np.float32(offsets[leaf])
                feeds[leaf] = np.broadcast_to(mean, (dim0 or 1,) + mean.shape[1:])
            for name, value in zip(names, runner.fetch(feeds, [fetches[n] for n in names])):
                totals[name] = totals.get(name, 0.0) + samples * value.astype(np.float64)
            count += samples
    return {name: total / count for name, total in totals.items()}, rest


def bias_corrections(graph_def: graph_pb2.GraphDef, ranges, data, ctx,
                     limit: Optional[int] = None, mean_maps=None) -> Dict[str, np.ndarray]:
    """node name -> float correction to add to the int8 op's bias (``-E[(Wq - W) * x]``).

    ``ranges``: planned ranges (the input signedness decides the weight
    format); ``ctx.options`` carries target / per_tensor / pair_weights as for
    the quantize passes; ``mean_maps``: the calibration's
    :class:`~graphquant.calibrate.MeanMaps` (one run instead of one per feed);
    ``limit``: at most this many feeds of ``data`` where ops need the feeds.
    """
    deltas = {n: d for n, d in weight_errors(graph_def, ranges, ctx).items() if np.any(d)}
    shifts, rest = shifts_from_means(graph_def, deltas, mean_maps)
    if rest:
        feeds = data if limit is None else (f for i, f in enumerate(data) if i < limit)
        shifts.update(output_shifts(graph_def, rest, feeds))
    return {name: (-shift).astype(np.float32) for name, shift in sorted(shifts.items())}
