"""Bias correction: remove the mean output shift that weight quantization causes, per channel.

An int8 conv computes with ``Wq`` (the weights as the kernel reconstructs
them) instead of ``W``; its output moves by ``(Wq - W) * x``, whose mean over
the data is a per-channel constant (large when inputs have a large mean, as
after Relu or :mod:`graphquant.passes.shift_signed_activations`).  Measured
on the calibration data and subtracted from the int8 op's bias::

    Before:  x ─► int8 conv(Wq) + b                 mean error  E[(Wq - W) * x]  per channel
    After:   x ─► int8 conv(Wq) + b - E[(Wq - W) * x]           mean error 0 on the calibration data

The expectation is empirical: the fp32 graph runs once more with, for every
conv/depthwise/matmul with constant weights, a copy of the op applied to the
same input with weights ``Wq - W``, reduced in the graph to its mean per
output channel (so zero padding, strides and borders are accounted for
exactly).  ``Wq`` comes from :func:`graphquant.int8_rewrite.quantize_weights`
with the planned input signedness, i.e. exactly what the quantize passes will
use.  The fp32 graph is not changed: the corrections go to
``ctx.options['bias_corrections']`` (node name -> float per output channel)
and the quantize passes add them to the int8 op's bias
(:func:`graphquant.int8_rewrite.corrected_bias`), so a node that stays fp32
keeps its own bias.  Weights that quantize exactly get no correction.
"""

from __future__ import annotations

from typing import Dict, Iterable, Mapping, Optional, Tuple

import numpy as np
from tensorflow.core.framework import graph_pb2

from graphquant import quant_math
from graphquant.execute import GraphRunner
from graphquant.graph import make_const, make_node
from graphquant.int8_rewrite import quantize_weights, weighted_ops

SCOPE = "graphquant_bias_correction"


def dequantized_weights(qw: quant_math.QuantizedWeights, kind: str, shape,
                        transpose_b: bool = False) -> np.ndarray:
    """The float weights the kernel computes with, in the original layout."""
    view = quant_math.weight_channel_view(qw.values, kind, transpose_b).astype(np.float64)
    view = view * np.asarray(qw.step, np.float64)
    if kind == "depthwise":
        return view.reshape(shape)
    return view.T if kind == "matmul" and transpose_b else view


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


def bias_corrections(graph_def: graph_pb2.GraphDef, ranges, data, ctx,
                     limit: Optional[int] = None) -> Dict[str, np.ndarray]:
    """node name -> float correction to add to the int8 op's bias (``-E[(Wq - W) * x]``).

    ``ranges``: planned ranges (the input signedness decides the weight
    format); ``ctx.options`` carries target / per_tensor / pair_weights as for
    the quantize passes; ``limit``: at most this many feeds of ``data``.
    """
    deltas = weight_errors(graph_def, ranges, ctx)
    feeds = data if limit is None else (f for i, f in enumerate(data) if i < limit)
    return {name: (-shift).astype(np.float32)
            for name, shift in output_shifts(graph_def, deltas, feeds).items()}
