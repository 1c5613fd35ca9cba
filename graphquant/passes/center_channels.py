"""center_channels: per-channel offsets between a depthwise conv and the unpadded conv reading it.

Before::

    x ─► Depthwise(W1) ─► [BiasAdd(b1)] ─► y ─► Conv2D(W2, no zero padding) ─► BiasAdd(b2) ─► z

After (per channel c of y, ``m[c]`` the middle of its calibrated range ``[lo[c], hi[c]]``)::

    x ─► Depthwise(W1) ─► BiasAdd(b1 - m) ─► y - m ─► Conv2D(W2) ─► BiasAdd(b2 + W2·m) ─► z
                                                                        (z unchanged)

``W2·m`` sums each output channel's weights times ``m`` over its window and
input channels; every window of the second conv lies inside ``y`` (VALID, or
a 1x1 kernel), so each of its outputs reads ``m`` in full and this is an fp32
identity (tests/test_center_channels.py).  Without a BiasAdd after conv1 one
is added (named ``<conv1>/centered``; the int8 conv takes it as its bias).

Why: the tensor between is 8-bit per tensor, its step set by the span of all
channels together, ``max(hi) - min(lo)`` (a signed tensor is stored shifted,
``shift_signed_activations``).  A depthwise conv's output channels (no
nonlinearity before the pointwise conv that reads it, as in Keras'
SeparableConv2D) sit at different offsets; centred, the span is the widest
single channel's, ``max(hi - lo)``: 0.58-0.93 of the step on
fer_mini_xception's separable convs.  Unlike a rescaling
(:mod:`graphquant.passes.equalize_cross_layer`) it widens no channel's share
of the range, so a channel whose unseen data exceed its calibrated range has
the same room as before.

Chains are :func:`~graphquant.passes.equalize_cross_layer.find_pairs`' with
nothing but a BiasAdd between the convs; conv2 is a Conv2D read only by a
BiasAdd with a Const bias.  Per-channel statistics come from
``ctx.options['channel_stats']`` (tensor -> ``ChannelStats``, computed on the
calibration data by :func:`graphquant.accuracy.before_calibration`); a pair
is centred when the step drops to :data:`MAX_STEP_RATIO` of today's or less.
Centred, the widest channel touches both ends of the range, so unseen data
beyond its calibrated extremes clip where they had room before: a small gain
does not pay for that (fer's 0.91 and 0.93 pairs add nothing to its 0.58-0.72
ones).  conv1 is a depthwise conv: on a Conv2D producer (MobileNetV2's
project -> expand 1x1 convs, step 0.73-0.80) centring came out slightly worse
(relL2 0.0916 -> 0.0926 on 100 ImageNet images, 0.0933 -> 0.0940 on 400;
BUILD_NOTES).
A depthwise conv1 with EXPLICIT padding and no BiasAdd is left alone
(TensorFlow's oneDNN depthwise + EXPLICIT padding + BiasAdd crashes).
"""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
from tensorflow.core.framework import graph_pb2

from graphquant.graph import GraphIndex, const_value, make_const, make_node
from graphquant.passes.equalize_cross_layer import ChannelStats, Pair, activation_step, find_pairs
from graphquant.pipeline import register_pass

PASS = "center_channels"
MAX_STEP_RATIO = 0.75    # centre a tensor when its 8-bit step drops at least this much


def _unpadded(conv2, w2) -> bool:
    """No window of conv2 reads zero padding."""
    return conv2.attr["padding"].s == b"VALID" or tuple(w2.shape[:2]) == (1, 1)


def _bias_reader(index: GraphIndex, name: str):
    readers = index.consumers(f"{name}:0")
    if len(readers) != 1 or len(index.consumers(name)) != 1:
        return None
    node, i = readers[0]
    if node.op != "BiasAdd" or i != 0 or index.node(node.input[1]).op != "Const":
        return None
    return node


def find_centerable(graph_def: graph_pb2.GraphDef, protected=()) -> List[Pair]:
    """conv1 -> [BiasAdd] -> unpadded Conv2D -> BiasAdd chains (module docstring)."""
    index = GraphIndex(graph_def)
    out = []
    for pair in find_pairs(graph_def, protected):
        if len(pair.chain) != (2 if pair.bias else 1):
            continue                        # a Relu / MaxPool between: offsets do not commute
        conv1, conv2 = index.node(pair.conv1), index.node(pair.conv2)
        if conv1.op != "DepthwiseConv2dNative":
            continue                        # MobileNetV2's project -> expand 1x1s: worse
        if conv2.op != "Conv2D" or _bias_reader(index, pair.conv2) is None:
            continue
        if not _unpadded(conv2, const_value(index.node(conv2.input[1]))):
            continue
        if (pair.bias is None and conv1.op == "DepthwiseConv2dNative"
                and conv1.attr["padding"].s == b"EXPLICIT"):
            continue
        out.append(pair)
    return out


def centered(stats: ChannelStats) -> ChannelStats:
    """The statistics with each channel moved by minus the middle of its range."""
    m = (stats.lo + stats.hi) / 2
    lo, hi = stats.lo - m, stats.hi - m
    # mean x**2 is kept as it was (the mean of x is not collected; the step does not use it)
    return ChannelStats(np.maximum(-lo, hi), stats.sq, bool(np.any(lo < 0)), lo, hi)


def offsets(stats: Optional[ChannelStats]) -> Optional[np.ndarray]:
    """``m`` for one pair, or None where centring does not make the step finer."""
    if stats is None or not np.all(np.isfinite(stats.lo)) or not np.all(np.isfinite(stats.hi)):
        return None
    before, after = activation_step(stats), activation_step(centered(stats))
    if after > MAX_STEP_RATIO * before:
        return None
    return (stats.lo + stats.hi) / 2


def _set_const_input(graph: Dict[str, object], node, name: str, value: np.ndarray) -> None:
    graph[name] = make_const(name, value.astype(np.float32))
    node.input[1] = name


def center_pair(graph: Dict[str, object], index: GraphIndex, pair: Pair, m: np.ndarray) -> None:
    """Move channel c of the tensor between by ``-m[c]``; conv2's bias takes it back."""
    conv2 = graph[pair.conv2]
    w2 = const_value(graph[conv2.input[1]]).astype(np.float64)
    bias2 = graph[_bias_reader(index, pair.conv2).name]
    b2 = const_value(graph[bias2.input[1]]).astype(np.float64).reshape(-1)
    _set_const_input(graph, bias2, f"{bias2.name}/centered_bias",
                     b2 + np.einsum("hwio,i->o", w2, m))
    if pair.bias:
        bias1 = graph[pair.bias]
        b1 = const_value(graph[bias1.input[1]]).astype(np.float64).reshape(-1)
        _set_const_input(graph, bias1, f"{pair.bias}/centered_bias", b1 - m)
        return
    name = f"{pair.conv1}/centered"
    graph[f"{name}/bias"] = make_const(f"{name}/bias", (-m).astype(np.float32))
    graph[name] = make_node("BiasAdd", name, [pair.conv1, f"{name}/bias"], T=np.float32,
                            data_format=b"NHWC")
    conv2.input[0] = name


@register_pass(PASS)
def center_channels(graph_def, ctx):
    pairs = find_centerable(graph_def, ctx.protected)
    stats = ctx.options.get("channel_stats") or {}
    chosen = [(p, offsets(stats.get(p.between))) for p in pairs]
    chosen = [(p, m) for p, m in chosen if m is not None]
    if not chosen:
        return graph_def
    index = GraphIndex(graph_def)
    out = graph_pb2.GraphDef()
    out.CopyFrom(graph_def)
    graph = {n.name: n for n in out.node}
    existing = set(graph)
    for pair, m in chosen:
        st = stats[pair.between]
        ratio = activation_step(centered(st)) / activation_step(st)
        center_pair(graph, index, pair, m)
        ctx.note(PASS, pair.conv2, f"channels from {pair.conv1} centred (offsets "
                 f"{m.min():.3g}..{m.max():.3g}): 8-bit step x{ratio:.2f}")
    out.node.extend(n for name, n in graph.items() if name not in existing)
    from graphquant.pipeline import run_pipeline

    return run_pipeline(out, ["remove_unused_nodes"], ctx)
