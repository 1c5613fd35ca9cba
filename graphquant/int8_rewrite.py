"""What every int8 rewrite pass does the same way: ranges, QuantizeV2 in, Dequantize out.

Each quantize pass rewrites one fp32 pattern into a self-contained int8 island::

    x ──► [fp32 pattern] ──► y         becomes
    x ──► QuantizeV2 ──► int8 op ──► Dequantize (named y) ──► readers of y

with every range a Const taken from the planned ranges (``ctx.options['ranges']``,
tensor name -> (min, max), see :mod:`graphquant.ranges`).  Because a tensor has
one planned range, the Dequantize that ends one island and the QuantizeV2 that
starts the next describe the same integers, and ``remove_dequantize_quantize_pairs``
joins the islands into int8 chains.  Signedness follows the range: a tensor that
can be negative is qint8, otherwise quint8.
"""

from __future__ import annotations

import collections
import functools
import hashlib
from dataclasses import dataclass, field
from typing import Iterator, List, Mapping, Optional, Tuple

from graphquant import int8_ops, pair_weights, quant_math
from graphquant.graph import GraphIndex, canonical_tensor, const_value, make_const
from graphquant.pattern import Match, RewriteContext

import numpy as np


def planned_range(ctx, tensor: str) -> Optional[Tuple[float, float]]:
    """The planned (min, max) of an fp32 tensor, or None if it was not calibrated."""
    ranges = ctx.options.get("ranges") or {}
    return ranges.get(canonical_tensor(tensor))


def quantize_weights(ctx, weights, kind: str, signed_input: bool, transpose_b: bool = False):
    """Weights quantized for the target in ``ctx.options['target']`` (avx2 when unset):
    the max level and multiple that keep the kernel exact there (:mod:`graphquant.target`);
    with ``ctx.options['pair_weights']``, u8-input convs and matmuls on avx2 get 8-bit
    weights with limited input-channel pairs (:mod:`graphquant.pair_weights`).

    A conversion asks this for each conv up to three times with the same arguments
    (bias correction, the sensitivity probe, the islands): results are remembered by
    weight bytes and format (:data:`_CACHE`), returned read-only."""
    from graphquant import target as target_mod

    tgt = ctx.options.get("target")
    name = tgt.name if tgt is not None else "avx2"
    per_channel = not ctx.options.get("per_tensor", False)
    weights = np.ascontiguousarray(weights, np.float32)
    rounded = ctx.options.get("rounded_weights")   # graphquant/weight_rounding.py
    if rounded:
        hit = rounded.get(rounded_key(weights, kind, signed_input, transpose_b))
        if hit is not None:
            return hit
    if uses_pair_weights(ctx, kind, signed_input):   # 8-bit weights, pairs limited (issue 6)
        fmt = ("pairs", kind, per_channel, transpose_b)
        compute = functools.partial(pair_weights.quantize_weights, weights, kind,
                                    per_channel=per_channel, transpose_b=transpose_b)
    else:
        max_level, multiple = target_mod.weight_format(name, kind, signed_input)
        fmt = ("levels", kind, per_channel, transpose_b, max_level, multiple)
        compute = functools.partial(quant_math.quantize_weights, weights, kind,
                                    per_channel=per_channel, max_level=max_level,
                                    multiple=multiple, transpose_b=transpose_b)
    return _CACHE.get(fmt, weights, compute)


def uses_pair_weights(ctx, kind: str, signed_input: bool) -> bool:
    """Whether :func:`quantize_weights` writes pair-limited 8-bit weights for this op."""
    tgt = ctx.options.get("target")
    return bool(ctx.options.get("pair_weights") and (tgt is None or tgt.name == "avx2")
                and not signed_input and kind in pair_weights.KINDS)


def rounded_key(weights, kind: str, signed_input: bool, transpose_b: bool = False) -> tuple:
    """Key of ``ctx.options['rounded_weights']`` (:mod:`graphquant.weight_rounding`): the
    float weights' bytes and the op's weight format."""
    weights = np.ascontiguousarray(weights, np.float32)
    return (kind, bool(signed_input), bool(transpose_b), weights.shape,
            hashlib.blake2b(weights.data, digest_size=16).digest())


class _WeightCache:
    """Quantized weights by (format, shape, digest of the float bytes); least recently
    used entries dropped beyond ``max_bytes`` of int8 values."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: "collections.OrderedDict[tuple, quant_math.QuantizedWeights]" = (
            collections.OrderedDict())

    def get(self, fmt: tuple, weights: np.ndarray, compute):
        key = fmt + (weights.shape, hashlib.blake2b(weights.data, digest_size=16).digest())
        hit = self._entries.get(key)
        if hit is not None:
            self._entries.move_to_end(key)
            return hit
        qw = compute()
        for value in vars(qw).values():
            if isinstance(value, np.ndarray):
                value.flags.writeable = False      # shared by every caller
        self._entries[key] = qw
        while (sum(q.values.nbytes for q in self._entries.values()) > self.max_bytes
               and len(self._entries) > 1):
            self._entries.popitem(last=False)
        return qw


_CACHE = _WeightCache(max_bytes=256 << 20)


def corrected_bias(ctx, node: str, bias: np.ndarray) -> np.ndarray:
    """``bias`` plus the correction ``ctx.options['bias_corrections'][node]`` (float per
    output channel, :mod:`graphquant.bias_correction`) for the int8 op replacing ``node``;
    without one, ``ctx.options['offset_bias_deltas'][node]`` (an offset input's
    ``-c * (sum Wq - sum W)``, :mod:`graphquant.passes.offset_residual_summands`, which a
    measured bias correction already contains)."""
    delta = (ctx.options.get("bias_corrections") or {}).get(node)
    if delta is None:
        delta = (ctx.options.get("offset_bias_deltas") or {}).get(node)
    return bias if delta is None else (bias + delta).astype(np.float32)


#: the ops whose weights the int8 passes quantize, by their kind in quant_math
WEIGHTED_OPS = {"Conv2D": "conv", "DepthwiseConv2dNative": "depthwise", "MatMul": "matmul"}


def weighted_ops(graph_def, ranges: Mapping[str, Tuple[float, float]],
                 kinds: Mapping[str, str] = WEIGHTED_OPS) -> Iterator[tuple]:
    """(node, kind, float32 weights, input range) of every op of ``kinds`` the int8
    passes may take, in graph order: float, NHWC (convs), not transpose_a (matmuls),
    Const weights, and a range in ``ranges`` for its input."""
    from tensorflow.core.framework import types_pb2

    index = GraphIndex(graph_def)
    for node in graph_def.node:
        kind = kinds.get(node.op)
        if kind is None or node.attr["T"].type != types_pb2.DT_FLOAT:
            continue
        if kind == "matmul" and node.attr["transpose_a"].b:
            continue
        if kind != "matmul" and node.attr["data_format"].s not in (b"", b"NHWC"):
            continue
        weights = index.node(node.input[1])
        x_range = ranges.get(canonical_tensor(node.input[0]))
        if weights.op == "Const" and x_range is not None:
            yield node, kind, const_value(weights).astype(np.float32), x_range


def excluded(ctx, match: Match) -> Optional[str]:
    """The reason a match must stay fp32: the user excluded one of its nodes
    (``exclude``: node names or op types) or convert's accuracy checks chose it
    (``fp32_nodes``: node names only -- a fallback node named like an op type,
    e.g. TF's default name "Conv2D", must not exclude every op of that type)."""
    excludes = set(ctx.options.get("exclude") or ())
    fallbacks = set(ctx.options.get("fp32_nodes") or ())
    for node in match.matched:
        if node.name in excludes or node.op in excludes:
            return f"excluded by --exclude ({node.name if node.name in excludes else node.op})"
        if node.name in fallbacks:
            return f"kept fp32 by the accuracy checks ({node.name})"
    return None


@dataclass
class Island:
    """Nodes of one int8 island under construction, named after its root."""

    rctx: RewriteContext
    root: str
    nodes: List = field(default_factory=list)

    def name(self, suffix: str) -> str:
        return self.rctx.fresh_name(f"{self.root}/{suffix}")

    def const(self, suffix: str, value, dtype=np.float32) -> str:
        node = make_const(self.name(suffix), np.asarray(value, dtype))
        self.nodes.append(node)
        return node.name

    def qconst(self, suffix: str, values, type_name: str) -> str:
        node = int8_ops.quantized_const(self.name(suffix), values, type_name)
        self.nodes.append(node)
        return node.name

    def weight_range_consts(self, suffix: str, qw) -> Tuple[str, str]:
        """The (min, max) weight-range inputs of an int8 conv/matmul: ONE Const of
        the per-channel bound ``max(|min_range|, |max_range|)`` read as both.

        The weights are symmetric and every TF 2.21 quantized conv/matmul kernel
        reads only ``max(|min_filter[c]|, |max_filter[c]|)`` (scales, bias scale,
        the qint32 output scale; oneDNN caches them keyed on the Consts), so a
        second vector would repeat the first with its sign flipped: sharing one
        halves their storage (MobileNetV2: 70 KB, 0.264 -> 0.259 of the fp32 .pb)
        and gives bit-identical outputs (tests/test_quantize_conv.py)."""
        bound = np.maximum(np.abs(qw.min_range), np.abs(qw.max_range))
        name = self.const(suffix, bound)
        return name, name

    def range_consts(self, suffix: str, rng: Tuple[float, float], signed: bool) -> Tuple[str, str]:
        lo, hi = quant_math.activation_range(rng[0], rng[1], signed)
        return self.const(f"{suffix}_min", lo), self.const(f"{suffix}_max", hi)

    def quantize(self, suffix: str, tensor: str, rng: Tuple[float, float]) -> "QTensor":
        """QuantizeV2 of an fp32 tensor with its planned range."""
        signed = quant_math.needs_signed(rng[0])
        lo, hi = self.range_consts(suffix, rng, signed)
        node = int8_ops.quantize_v2(self.name(suffix), tensor, lo, hi, signed)
        self.nodes.append(node)
        return QTensor(node.name, lo, hi, signed, rng)

    def dequantize(self, q: str, lo: str, hi: str, signed: bool) -> None:
        """The Dequantize that ends the island, named like the replaced root."""
        self.nodes.append(int8_ops.dequantize(self.root, q, lo, hi, signed))


@dataclass
class QTensor:
    """An int8 tensor inside an island: data, Const min/max names, signedness, range."""

    data: str
    min: str
    max: str
    signed: bool
    range: Tuple[float, float]

    @property
    def type_name(self) -> str:
        return "qint8" if self.signed else "quint8"

    @property
    def range_max(self) -> float:
        return quant_math.activation_range(self.range[0], self.range[1], self.signed)[1]


def note_weighted_int8(ctx, pass_name: str, match: Match, op, source_op: str, fused,
                       input_range, output_range, qw, weight_consts) -> None:
    """The int8 note of a conv/matmul island: what the report and the accuracy passes read
    (ranges, the weights' format and the names of the Consts the int8 op reads)."""
    ctx.note(pass_name, match.root.name, "quantized", kind="int8", op=source_op, int8_op=op.op,
             fused_ops=fused, input_range=list(input_range), output_range=list(output_range),
             weight_range=[float(qw.min_range.min()), float(qw.max_range.max())],
             per_channel=qw.per_channel, weight_max_level=qw.max_level,
             weight_consts=weight_consts,
             nodes=[n.name for n in match.matched if n.op != "Const"])
