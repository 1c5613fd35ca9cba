"""What a conversion did, for the user: quantized nodes, fp32 nodes and why, ranges, sizes.

Built from the passes' notes (``ctx.note(..., kind="int8" | "fp32")``) and from
the graphs themselves, so an op no pass knows about still gets a line: every
node of the clean fp32 graph that is still in the output graph, unchanged, is
listed with the reason a pass gave, or "no int8 pattern for this op" when none
did.

Nodes inside a TF1 while loop are listed with :data:`LOOP_REASON` (no pass
touches a loop: :meth:`graphquant.graph.GraphIndex.loop_frames`).

Each quantized entry also carries ``weights``: a summary of the int8 weights
the rewrite emitted, read from the output graph (the Consts its int8 note names
in ``weight_consts``, as the kernel reads them: integers times
max(|min|, |max|) / 127 per channel) -- per-channel max |w|, integer levels, and
their SQNR against the clean fp32 graph's weights -- and the names of its
``input_tensor`` / ``output_tensor``, whose calibration statistics
(min, max, count, a 32-bin histogram when collected) are in ``tensors``.
Rendering as Markdown, HTML or JSON: :mod:`graphquant.report_render`
(``report.write(path)``, by extension).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import numpy as np

from graphquant.graph import (GraphIndex, canonical_tensor, const_value, data_inputs,
                              op_histogram)

# ops that carry no compute worth quantizing: never listed as "left in fp32"
_PLUMBING = frozenset({
    "Const", "Placeholder", "Identity", "QuantizeV2", "Dequantize", "NoOp", "Shape", "Pack",
    "StridedSlice", "Reshape", "Squeeze", "ExpandDims", "Cast",
})
COMPUTE_OPS = frozenset({"Conv2D", "DepthwiseConv2dNative", "MatMul", "Conv2DBackpropInput",
                         "BatchMatMulV2", "BatchMatMul"})
_TF1_CONTROL_FLOW = frozenset({"Switch", "Merge", "RefSwitch", "RefMerge"})
LOOP_REASON = "inside a TF1 while loop: the loop runs as written, in fp32"
_WEIGHT_KINDS = {"Conv2D": "conv", "DepthwiseConv2dNative": "depthwise", "MatMul": "matmul"}
HISTOGRAM_BINS = 32   # bins of the per-tensor histograms kept in the report


@dataclass
class ConversionReport:
    info: Dict[str, object]
    quantized: List[Dict[str, object]] = field(default_factory=list)
    fp32: List[Dict[str, object]] = field(default_factory=list)
    notes: List[Dict[str, object]] = field(default_factory=list)
    ops_before: Dict[str, int] = field(default_factory=dict)
    ops_after: Dict[str, int] = field(default_factory=dict)
    bytes_before: int = 0
    bytes_after: int = 0
    calibration: Dict[str, object] = field(default_factory=dict)
    inputs: List[str] = field(default_factory=list)     # input node names used
    outputs: List[str] = field(default_factory=list)    # output tensor names used
    tensors: Dict[str, Dict[str, object]] = field(default_factory=dict)  # calibrated tensors
    speed: Optional[Dict[str, object]] = None           # graphquant.speed.quick_speedup
    files: Dict[str, str] = field(default_factory=dict)  # set by the CLI: input, output...

    @classmethod
    def build(cls, original, fp32, int8, ctx, stats, info) -> "ConversionReport":
        fp32_nodes = {n.name: n for n in fp32.node}
        int8_nodes = {n.name: n for n in int8.node}
        fp32_index = GraphIndex(fp32)
        in_loop = fp32_index.loop_frames()
        order = {name: i for i, name in enumerate(fp32_index.topological_order())}
        quantized = sorted((_with_weights(dict(note), fp32_nodes, int8_nodes)
                            for note in ctx.notes_of("int8")),
                           key=lambda q: (order.get(q["node"], len(order)), q["node"]))
        reasons = {}
        for note in ctx.notes_of("fp32"):
            reasons.setdefault(note["node"], note)
        kept = {(n.name, n.op) for n in int8.node}
        fp32_left = []
        for node in fp32.node:  # nodes of the clean fp32 graph still there, unchanged
            if node.op in _PLUMBING or (node.name, node.op) not in kept:
                continue
            note = reasons.get(node.name)
            reason = (LOOP_REASON + f" (frame '{in_loop[node.name][-1]}')"
                      if node.name in in_loop else
                      note["message"] if note else _default_reason(node, fp32))
            fp32_left.append({"node": node.name, "op": node.op, "reason": reason})
        tensors = {name: tensor_summary(s)
                   for name, s in (getattr(stats, "tensors", {}) or {}).items()}
        calibration = {"samples": getattr(stats, "num_samples", None),
                       "tensors": len(tensors), "method": info.get("calibration"),
                       "feeds": getattr(stats, "num_feeds", None),
                       "source": getattr(stats, "source", ""),
                       "seconds": round(getattr(stats, "seconds_run", 0.0)
                                        + getattr(stats, "seconds_stats", 0.0), 3),
                       "nonfinite_tensors": sorted(n for n, t in tensors.items()
                                                   if t["nonfinite"])}
        return cls(info=dict(info), quantized=quantized, fp32=fp32_left,
                   notes=ctx.notes_of("note"), ops_before=op_histogram(original),
                   ops_after=op_histogram(int8), bytes_before=original.ByteSize(),
                   bytes_after=int8.ByteSize(), calibration=calibration,
                   inputs=list(ctx.inputs), outputs=list(ctx.outputs), tensors=tensors)

    def compute_counts(self) -> Dict[str, Dict[str, int]]:
        """Per compute op type (Conv2D, MatMul...): how many became int8 / stayed fp32."""
        done = Counter(q["op"] for q in self.quantized if q.get("op") in COMPUTE_OPS)
        left = Counter(f["op"] for f in self.fp32 if f["op"] in COMPUTE_OPS)
        return {op: {"int8": done.get(op, 0), "fp32": left.get(op, 0)}
                for op in sorted(set(done) | set(left))}

    def to_dict(self) -> Dict[str, object]:
        return asdict(self)

    def to_json(self) -> str:
        from graphquant.report_render import to_json

        return to_json(self)

    def to_markdown(self) -> str:
        from graphquant.report_render import to_markdown

        return to_markdown(self)

    def to_html(self) -> str:
        from graphquant.report_render import to_html

        return to_html(self)

    def write(self, path: str) -> None:
        """Write the report to ``path`` (.md, .html or .json), atomically."""
        from graphquant.report_render import write_report

        write_report(self, path)

    def worst_layers(self, n: int = 3) -> List[Dict[str, object]]:
        """The ``n`` quantized entries of lowest own SQNR (measured ones only)."""
        measured = [q for q in self.quantized if _finite(q.get("own_sqnr_db"))]
        return sorted(measured, key=lambda q: (q["own_sqnr_db"], q["node"]))[:n]

    def summary(self) -> str:
        """A few lines for the end of a CLI run."""
        lines = []
        for op, c in self.compute_counts().items():
            lines.append(f"  {op}: {c['int8']} int8, {c['fp32']} fp32")
        other = Counter(q["op"] for q in self.quantized if q.get("op") not in COMPUTE_OPS)
        if other:
            lines.append("  also int8: "
                         + ", ".join(f"{n} {op}" for op, n in sorted(other.items())))
        left = Counter(f["op"] for f in self.fp32)
        if left:
            ranked = sorted(left.items(), key=lambda kv: (-kv[1], kv[0]))
            lines.append("  left in fp32: " + ", ".join(f"{n} {op}" for op, n in ranked))
        ratio = self.bytes_after / max(self.bytes_before, 1)
        lines.append(f"  size: {self.bytes_before / 1e6:.2f} MB -> {self.bytes_after / 1e6:.2f} MB "
                     f"({ratio:.2f}x)")
        lines.append(f"  target: {self.info.get('target')} ({self.info.get('target_description')})")
        cal = self.calibration
        if cal.get("method"):
            lines.append(f"  calibration: {cal['method']} on {cal.get('samples')} samples")
        worst = self.worst_layers(1)
        if worst:
            w = worst[0]
            lines.append(f"  lowest layer SQNR: {w['own_sqnr_db']:.1f} dB own, "
                         f"{w.get('accumulated_sqnr_db', math.nan):.1f} dB accumulated "
                         f"({w['op']} {w['node']})")
        if self.speed and self.speed.get("speedup"):
            lines.append(f"  speed-up (quick estimate): {self.speed['speedup']:.2f}x")
        return "\n".join(lines)


def _default_reason(node, graph_def) -> str:
    """Why a node no pass wrote about is still fp32."""
    if node.op in _TF1_CONTROL_FLOW:
        return "TF1 control flow (Switch/Merge): kept as is, in fp32"
    functions = [a.func.name for a in node.attr.values() if a.HasField("func")]
    functions += [f.name for a in node.attr.values() if a.HasField("list") for f in a.list.func]
    if functions:
        library = {f.signature.name: f for f in graph_def.library.function}
        inside = Counter(n.op for name in functions if name in library
                         for n in library[name].node_def if n.op in COMPUTE_OPS)
        detail = ", ".join(f"{n} {op}" for op, n in sorted(inside.items()))
        return ("control flow / function call: its function bodies run as written, in fp32"
                + (f" ({detail} inside)" if detail else ""))
    if node.op in _NO_INT8_KERNEL:
        return _NO_INT8_KERNEL[node.op]
    if node.op in COMPUTE_OPS:
        return "not matched by any int8 pattern (see notes)"
    return "no int8 pattern for this op"


_NO_INT8_KERNEL = {
    op: "TensorFlow 2.21 has no int8 kernel for this op" for op in
    ("Conv2DBackpropInput", "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3", "Conv3D")}


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def tensor_summary(stats) -> Dict[str, object]:
    """min, max, count, NaN/Inf count, shape and (when collected) a coarse histogram
    over [min, max] of one :class:`~graphquant.calibrate.TensorStats`."""
    out = {"min": stats.min if stats.count else None, "max": stats.max if stats.count else None,
           "count": int(stats.count), "nonfinite": int(stats.nonfinite),
           "shape": list(stats.shape or []), "histogram": None}
    if stats.count and getattr(stats, "counts", None) is not None and stats.max > stats.min:
        counts = stats.counts
        used = np.flatnonzero(counts)
        centres = stats.edges[used] + stats.bin_width / 2
        hist, _ = np.histogram(np.clip(centres, stats.min, stats.max), bins=HISTOGRAM_BINS,
                               range=(stats.min, stats.max), weights=counts[used])
        out["histogram"] = [int(round(c)) for c in hist]
    return out


def _with_weights(note: Dict[str, object], fp32_nodes, int8_nodes) -> Dict[str, object]:
    """``note`` plus its input/output tensor names and a summary of the int8 weights it
    emitted (module docstring); no summary when they are not in the output graph."""
    from graphquant import quant_math

    note["output_tensor"] = canonical_tensor(str(note["node"]))
    compute = next((fp32_nodes[n] for n in note.get("nodes", [note["node"]])
                    if n in fp32_nodes and fp32_nodes[n].op in COMPUTE_OPS), None)
    if compute is None:
        root = fp32_nodes.get(str(note["node"]))
        if root is not None and data_inputs(root):
            note["input_tensor"] = canonical_tensor(data_inputs(root)[0])
        return note
    inputs = data_inputs(compute)
    note["input_tensor"] = canonical_tensor(inputs[0])
    kind = _WEIGHT_KINDS.get(compute.op)
    producer = fp32_nodes.get(inputs[1].split(":")[0].lstrip("^")) if len(inputs) > 1 else None
    consts = note.get("weight_consts") or {}
    emitted = [int8_nodes.get(str(consts.get(key))) for key in ("values", "min", "max")]
    if kind is None or producer is None or producer.op != "Const" or None in emitted:
        return note
    transpose_b = kind == "matmul" and compute.attr["transpose_b"].b
    try:
        view = quant_math.weight_channel_view(
            np.asarray(const_value(producer), np.float32), kind, transpose_b).astype(np.float64)
        q = _integers(const_value(emitted[0]))
        step = quant_math.kernel_weight_step(const_value(emitted[1]), const_value(emitted[2]))
        used = quant_math.weight_channel_view(q, kind, transpose_b) * step.astype(np.float64)
        if used.shape != view.shape:
            return note
    except (ValueError, IndexError, TypeError):  # a layout we cannot summarise: leave it out
        return note
    absmax = np.abs(used).reshape(-1, used.shape[-1]).max(axis=0)
    err = float(np.linalg.norm(used - view) / max(np.linalg.norm(view), 1e-30))
    note["weights"] = {"shape": list(q.shape), "channels": int(absmax.size),
                       "absmax_min": float(absmax.min()),
                       "absmax_median": float(np.median(absmax)),
                       "absmax_max": float(absmax.max()),
                       "levels": _levels(q), "rel_l2": err,
                       "sqnr_db": math.inf if err <= 0 else -20.0 * math.log10(err)}
    return note


def _integers(value: np.ndarray) -> np.ndarray:
    """A qint8 Const's values as int64 (TensorFlow reads them as a one-field record)."""
    value = np.asarray(value)
    if value.dtype.names:
        value = value[value.dtype.names[0]]
    return value.astype(np.int64)


def _levels(q: np.ndarray) -> int:
    """Positive integer levels the weights use: the largest |q| in units of the integers'
    common step (7-bit weights: 63; 126 in steps of 2: also 63)."""
    magnitudes = np.abs(q[q != 0])
    if not magnitudes.size:
        return 0
    return int(magnitudes.max() // np.gcd.reduce(magnitudes))
