"""What a conversion did, for the user: quantized nodes, fp32 nodes and why, ranges, sizes.

Built from the passes' notes (``ctx.note(..., kind="int8" | "fp32")``) and from
the graphs themselves, so an op no pass knows about still gets a line: every
node of the clean fp32 graph that is still in the output graph, unchanged, is
listed with the reason a pass gave, or "no int8 pattern for this op" when none
did.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Dict, List

from graphquant.graph import op_histogram

# ops that carry no compute worth quantizing: never listed as "left in fp32"
_PLUMBING = frozenset({
    "Const", "Placeholder", "Identity", "QuantizeV2", "Dequantize", "NoOp", "Shape", "Pack",
    "StridedSlice", "Reshape", "Squeeze", "ExpandDims", "Cast",
})
COMPUTE_OPS = frozenset({"Conv2D", "DepthwiseConv2dNative", "MatMul", "Conv2DBackpropInput",
                         "BatchMatMulV2", "BatchMatMul"})


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

    @classmethod
    def build(cls, original, fp32, int8, ctx, stats, info) -> "ConversionReport":
        quantized = ctx.notes_of("int8")
        reasons = {}
        for note in ctx.notes_of("fp32"):
            reasons.setdefault(note["node"], note)
        kept = {(n.name, n.op) for n in int8.node}
        fp32_left = []
        for node in fp32.node:  # nodes of the clean fp32 graph still there, unchanged
            if node.op in _PLUMBING or (node.name, node.op) not in kept:
                continue
            note = reasons.get(node.name)
            fp32_left.append({"node": node.name, "op": node.op,
                              "reason": note["message"] if note else (
                                  "no int8 pattern for this op" if node.op not in COMPUTE_OPS
                                  else "not matched by any int8 pattern (see notes)")})
        calibration = {"samples": getattr(stats, "num_samples", None),
                       "tensors": len(getattr(stats, "tensors", {}) or {})}
        return cls(info=dict(info), quantized=quantized, fp32=fp32_left,
                   notes=ctx.notes_of("note"), ops_before=op_histogram(original),
                   ops_after=op_histogram(int8), bytes_before=original.ByteSize(),
                   bytes_after=int8.ByteSize(), calibration=calibration)

    def compute_counts(self) -> Dict[str, Dict[str, int]]:
        """Per compute op type (Conv2D, MatMul...): how many became int8 / stayed fp32."""
        done = Counter(q["op"] for q in self.quantized if q.get("op") in COMPUTE_OPS)
        left = Counter(f["op"] for f in self.fp32 if f["op"] in COMPUTE_OPS)
        return {op: {"int8": done.get(op, 0), "fp32": left.get(op, 0)}
                for op in sorted(set(done) | set(left))}

    def to_dict(self) -> Dict[str, object]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, default=float)

    def summary(self) -> str:
        """A few lines for the end of a CLI run."""
        lines = []
        for op, c in self.compute_counts().items():
            lines.append(f"  {op}: {c['int8']} int8, {c['fp32']} fp32")
        other = Counter(q["op"] for q in self.quantized if q.get("op") not in COMPUTE_OPS)
        if other:
            lines.append("  also int8: " + ", ".join(f"{n} {op}" for op, n in sorted(other.items())))
        left = Counter(f["op"] for f in self.fp32)
        if left:
            lines.append("  left in fp32: " + ", ".join(f"{n} {op}" for op, n in
                                                      sorted(left.items(), key=lambda kv: (-kv[1], kv[0]))))
        ratio = self.bytes_after / max(self.bytes_before, 1)
        lines.append(f"  size: {self.bytes_before / 1e6:.2f} MB -> {self.bytes_after / 1e6:.2f} MB "
                     f"({ratio:.2f}x)")
        lines.append(f"  target: {self.info.get('target')} ({self.info.get('target_description')})")
        return "\n".join(lines)
