"""Pass registry and pipelines: the order of passes lives here, as lists of names.

A pass is a function ``(graph_def, ctx) -> graph_def`` registered by name with
:func:`register_pass`.  The CLI, the library call and the tests all run the
same lists through :func:`run_pipeline`.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

from tensorflow.core.framework import graph_pb2

from graphquant.graph import GraphIndex, node_name

PassFn = Callable[[graph_pb2.GraphDef, "PassContext"], graph_pb2.GraphDef]
_REGISTRY: Dict[str, PassFn] = {}

# fp32 clean-up, in order.  Constant folding runs after batch-norm folding too,
# so folded scales computed by Mul/Rsqrt chains collapse into Consts.
CLEANUP_PIPELINE: List[str] = [
    "strip_debug_ops",
    "remove_unused_nodes",
    "fold_constants",
    "fold_batch_norms",
    "fold_decomposed_batch_norms",
    "fold_mul_into_conv",
    "fold_constants",
    "grouped_conv_to_depthwise",
    "fold_pad_into_conv",
    "remove_unused_nodes",
]

# fp32 rewrites that need the calibrated ranges (ctx.options['ranges']) and keep
# every sum exact inside them; they may move ranges and record value offsets
# (ctx.options['offsets']).  convert() runs them before measuring the islands,
# so the errors are measured against the graph they produce.
RANGE_PASSES: List[str] = [
    "offset_residual_summands",
]

# int8 rewrite, after calibration (ranges in ctx.options['ranges']).  The
# quantize passes make self-contained int8 islands (QuantizeV2 -> op ->
# Dequantize); the join passes connect them into chains and clean up.
ISLAND_PASSES: List[str] = [
    "quantize_conv",
    "quantize_matmul",
    "quantize_pool",
    "quantize_concat",
    "quantize_pool",
    "quantize_pad",
]
JOIN_PASSES: List[str] = [
    "remove_dequantize_quantize_pairs",
    "merge_duplicate_quantize",
    "skip_requantize_for_fp32_readers",
    "remove_unused_nodes",
]
QUANTIZE_PIPELINE: List[str] = RANGE_PASSES + ISLAND_PASSES + JOIN_PASSES


@dataclass
class PassContext:
    """What every pass may know: the graph's interface, options and a log for the report."""

    inputs: List[str] = field(default_factory=list)    # node names of graph inputs
    outputs: List[str] = field(default_factory=list)   # tensor names of graph outputs
    options: Dict[str, object] = field(default_factory=dict)
    notes: List[Dict[str, object]] = field(default_factory=list)
    debug: bool = False

    @property
    def protected(self) -> set:
        """Node names that must keep existing under their names."""
        return {node_name(t) for t in self.outputs} | {node_name(t) for t in self.inputs}

    def note(self, pass_name: str, node: str, message: str, kind: str = "note", **info) -> None:
        """Record something the user should read in the report.

        ``kind`` is ``note`` (e.g. why something was not folded), ``fp32`` (a
        node left in float, ``message`` says why) or ``int8`` (a node
        quantized; ``info`` carries its op, ranges...).
        """
        entry = {"pass": pass_name, "node": node, "message": message, "kind": kind, **info}
        if entry not in self.notes:  # a pattern driver may ask twice about one node
            self.notes.append(entry)

    def notes_of(self, kind: str) -> List[Dict[str, object]]:
        return [n for n in self.notes if n.get("kind", "note") == kind]

    @classmethod
    def for_graph(cls, graph_def, inputs: Optional[Sequence[str]] = None,
                  outputs: Optional[Sequence[str]] = None, **options) -> "PassContext":
        """A context with inputs/outputs inferred where not given."""
        index = GraphIndex(graph_def)
        ins = list(inputs) if inputs else index.inputs()
        outs = list(outputs) if outputs else [f"{n}:0" for n in index.inferred_outputs()]
        return cls(inputs=[node_name(i) for i in ins], outputs=outs, options=dict(options))


def register_pass(name: str) -> Callable[[PassFn], PassFn]:
    def decorator(fn: PassFn) -> PassFn:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"pass '{name}' registered twice")
        _REGISTRY[name] = fn
        fn.pass_name = name
        return fn
    return decorator


def _load_pass_modules() -> None:
    import graphquant.passes as package

    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        importlib.import_module(f"{package.__name__}.{info.name}")


def get_pass(name: str) -> PassFn:
    _load_pass_modules()
    try:
        return _REGISTRY[name]
    except KeyError:
        from graphquant.errors import GraphQuantError

        raise GraphQuantError(f"no pass named '{name}'",
                              "known passes: " + ", ".join(sorted(_REGISTRY))) from None


def registered_passes() -> List[str]:
    _load_pass_modules()
    return sorted(_REGISTRY)


def run_pipeline(graph_def: graph_pb2.GraphDef, pass_names: Sequence[str],
                 ctx: PassContext, progress: Optional[Callable[[str], None]] = None
                 ) -> graph_pb2.GraphDef:
    """Run the named passes in order; in debug mode validate the graph after each."""
    from graphquant.graph_io import validate_graph_def

    for name in pass_names:
        fn = get_pass(name)
        if progress:
            progress(name)
        graph_def = fn(graph_def, ctx)
        if ctx.debug:
            validate_graph_def(graph_def, source=f"after pass '{name}'")
            GraphIndex(graph_def).topological_order()
    return graph_def
