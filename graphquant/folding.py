"""Arithmetic shared by the folding passes: small constant expressions,
per-channel vectors, and weights scaled per output channel.

The three folding passes (``fold_batch_norms``, ``fold_decomposed_batch_norms``,
``fold_mul_into_conv``) all reduce what they match to one per-channel affine
map after a conv or matmul and fold it the same way::

    y = (conv(x, w) + bias) * scale + offset
      = conv(x, w * scale) + (bias * scale + offset)

This module knows where a node's output channel is (``NHWC``/``NCHW``, the last
axis of a MatMul), which constants hold "one value per output channel", and
how each weight layout is indexed by output channel::

    Conv2D                 w[kh, kw, in, out]        channel c = out
    DepthwiseConv2dNative  w[kh, kw, in, mult]       channel c = in * mult + m
    MatMul                 w[in, out]                (transpose_b: w[out, in])

Constant expressions (``gamma * Rsqrt(var + eps)``, ``Squeeze(Reshape(b))``)
are evaluated here with numpy, so the passes work whether or not
``fold_constants`` ran first; :func:`prune_dead_constants` then removes the
expression nodes a fold left unread.
"""

from __future__ import annotations

import copy
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np
from tensorflow.core.framework import attr_value_pb2, graph_pb2, node_def_pb2

from graphquant.graph import GraphIndex, const_value, data_inputs, make_const, make_node
from graphquant.graph import node_name, parse_tensor_name
from graphquant.pattern import OpTypePattern

NodeDef = node_def_pb2.NodeDef

CONV_OPS = "Conv2D|DepthwiseConv2dNative|MatMul"
FLOAT_DTYPES = (np.float16, np.float32, np.float64)

_UNARY = {
    "Identity": lambda a: a,
    "Snapshot": lambda a: a,
    "StopGradient": lambda a: a,
    "Neg": np.negative,
    "Sqrt": np.sqrt,
    "Rsqrt": lambda a: (1 / np.sqrt(a)).astype(a.dtype),
    "Reciprocal": lambda a: (1 / a).astype(a.dtype),
    "Inv": lambda a: (1 / a).astype(a.dtype),
    "Square": np.square,
}
_BINARY = {
    "Add": np.add,
    "AddV2": np.add,
    "Sub": np.subtract,
    "Mul": np.multiply,
    "RealDiv": lambda a, b: (a / b).astype(np.result_type(a, b)),
    "Maximum": np.maximum,
    "Minimum": np.minimum,
}
_SHAPE = ("Reshape", "Squeeze", "ExpandDims", "Cast")
# Ops a constant expression may be made of (graph inputs excluded by evaluation).
CONST_EXPR_OPS = frozenset({"Const", *_UNARY, *_BINARY, *_SHAPE})
MAX_EXPR_NODES = 64
MAX_EXPR_ELEMENTS = 1 << 22


def ConstExpr(name: str) -> OpTypePattern:  # noqa: N802 - reads as data in pattern trees
    """A tensor that may be a constant expression: matched like a wildcard (never
    removed, never vetoes), its value is asked of :func:`const_expr_value`."""
    return OpTypePattern("*", name=name, where=lambda node: node.op in CONST_EXPR_OPS)


# --------------------------------------------------------------------------- evaluation
def const_expr_value(index: GraphIndex, tensor: str) -> Optional[np.ndarray]:
    """Value of ``tensor`` when it is computed from Consts by a few elementwise and
    reshaping ops (at most :data:`MAX_EXPR_NODES` nodes and
    :data:`MAX_EXPR_ELEMENTS` elements per value), else None."""
    memo: Dict[str, np.ndarray] = {}
    try:
        return _evaluate(index, node_name(tensor), parse_tensor_name(tensor).port, memo)
    except _NotConstant:
        return None


class _NotConstant(Exception):
    pass


def _evaluate(index, name, port, memo):
    if port != 0:
        raise _NotConstant(name)
    if name in memo:
        return memo[name]
    if len(memo) >= MAX_EXPR_NODES:
        raise _NotConstant(name)
    node = index.nodes.get(name)
    if node is None or node.op not in CONST_EXPR_OPS:
        raise _NotConstant(name)
    args = [_evaluate(index, parse_tensor_name(i).node, parse_tensor_name(i).port, memo)
            for i in data_inputs(node)]
    value = _apply(node, args)
    if value.size > MAX_EXPR_ELEMENTS:
        raise _NotConstant(name)
    memo[name] = value
    return value


def _apply(node: NodeDef, args: List[np.ndarray]) -> np.ndarray:
    op = node.op
    if op == "Const":
        return const_value(node)
    if op in _UNARY:
        return np.asarray(_UNARY[op](args[0]))
    if op in _BINARY:
        return np.asarray(_BINARY[op](args[0], args[1]))
    if op == "Reshape":
        return args[0].reshape([int(d) for d in args[1].reshape(-1)])
    if op == "ExpandDims":
        return np.expand_dims(args[0], int(args[1].reshape(-1)[0]))
    if op == "Squeeze":
        dims = tuple(get_attr(node, "squeeze_dims").list.i)
        return np.squeeze(args[0], axis=dims or None)
    if op == "Cast":
        from tensorflow.python.framework import dtypes

        return args[0].astype(dtypes.as_dtype(get_attr(node, "DstT").type).as_numpy_dtype)
    raise _NotConstant(node.name)  # pragma: no cover - CONST_EXPR_OPS lists only the above


# --------------------------------------------------------------------------- attrs
def get_attr(node: NodeDef, key: str) -> attr_value_pb2.AttrValue:
    """``node.attr[key]``, or the op's registered default when the graph left it
    out (graphs saved with stripped default attrs); never inserts into ``node``."""
    if key in node.attr:
        return node.attr[key]
    from tensorflow.python.framework import op_def_registry

    op_def = op_def_registry.get(node.op)
    for attr in op_def.attr if op_def else ():
        if attr.name == key and attr.HasField("default_value"):
            return attr.default_value
    return attr_value_pb2.AttrValue()


def data_format(node: NodeDef) -> str:
    return get_attr(node, "data_format").s.decode() or "NHWC"


# --------------------------------------------------------------------------- channels
def channel_layout(node: NodeDef) -> Tuple[int, int]:
    """(rank, channel axis) of the output of a Conv2D, DepthwiseConv2dNative or MatMul."""
    if node.op == "MatMul":
        return 2, 1
    return 4, (1 if is_nchw(node) else 3)


def is_nchw(node: NodeDef) -> bool:
    """Channels first: ``NCHW`` / ``NCDHW`` (never for MatMul)."""
    return node.op != "MatMul" and data_format(node).startswith("NC")


def bias_add_axis(bias_add: NodeDef, rank: int) -> int:
    """The axis a BiasAdd adds along, for an input of ``rank``."""
    return 1 if is_nchw(bias_add) else rank - 1


def output_channels(node: NodeDef, weights: np.ndarray) -> int:
    if node.op == "Conv2D":
        return weights.shape[3]
    if node.op == "DepthwiseConv2dNative":
        return weights.shape[2] * weights.shape[3]
    return weights.shape[0] if get_attr(node, "transpose_b").b else weights.shape[1]


def per_channel(value, rank: int, axis: int, channels: int) -> Optional[np.ndarray]:
    """``value`` as a float64 vector of ``channels`` numbers when broadcasting it
    against an output of ``rank`` with ``channels`` at ``axis`` acts on that axis
    alone (a scalar counts), else None."""
    v = np.asarray(value)
    if v.ndim > rank:
        return None
    shape = (1,) * (rank - v.ndim) + v.shape
    if any(d != 1 for i, d in enumerate(shape) if i != axis) or shape[axis] not in (1, channels):
        return None
    return np.broadcast_to(v.reshape(-1).astype(np.float64), (channels,)).copy()


def scale_weights(node: NodeDef, weights: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``weights`` of ``node`` with output channel ``c`` multiplied by ``scale[c]``."""
    w = weights.astype(np.float64)
    if node.op == "Conv2D":
        out = w * scale
    elif node.op == "DepthwiseConv2dNative":
        kh, kw, cin, mult = w.shape
        out = (w.reshape(kh, kw, cin * mult) * scale).reshape(w.shape)
    elif get_attr(node, "transpose_b").b:
        out = w * scale[:, None]
    else:
        out = w * scale[None, :]
    return out.astype(weights.dtype)


def channel_vector(index: GraphIndex, tensor: str, rank: int, axis: int,
                   channels: int) -> Tuple[Optional[np.ndarray], str]:
    """``tensor`` as one float64 value per channel of an output of ``rank`` with
    ``channels`` at ``axis``, and ``""``; or None and why not (``""`` when it is
    simply not a constant, a sentence for the user otherwise)."""
    value = const_expr_value(index, tensor)
    if value is None:
        return None, ""
    if value.dtype not in FLOAT_DTYPES:
        return None, f"'{node_name(tensor)}' is {value.dtype}, not floating point"
    vector = per_channel(value, rank, axis, channels)
    if vector is None:
        return None, (f"'{node_name(tensor)}' has shape {tuple(value.shape)}, not one value per "
                      f"output channel ({channels} on axis {axis} of a rank-{rank} output)")
    return vector, ""


def conv_bias(index: GraphIndex, match, channels: int) -> Tuple[Optional[np.ndarray], str]:
    """The bias vector added by ``match['bias_add']`` (BiasAdd, or Add/AddV2 of
    ``match['bias']``) after ``match['conv']``; zeros when the match has none.
    Returns (vector, "") or (None, why not) like :func:`channel_vector`."""
    if "bias_add" not in match:
        return np.zeros(channels), ""
    bias_add, (rank, axis) = match["bias_add"], channel_layout(match["conv"])
    if bias_add.op != "BiasAdd":
        return channel_vector(index, match.tensor("bias"), rank, axis, channels)
    along = bias_add_axis(bias_add, rank)
    if along != axis:
        return None, (f"BiasAdd '{bias_add.name}' adds along axis {along}, not the output "
                      f"channel axis {axis}")
    value = const_expr_value(index, match.tensor("bias"))
    if value is None or value.shape != (channels,):
        return None, ""
    return value.astype(np.float64), ""


# --------------------------------------------------------------------------- node building
def folded_conv_nodes(rctx, conv: NodeDef, weights: NodeDef, scale: Optional[np.ndarray],
                      bias: Optional[np.ndarray], name: str) -> List[NodeDef]:
    """The conv/matmul with weights scaled by ``scale`` (None: unchanged) followed
    by a BiasAdd of ``bias`` (None: none); the last node is named ``name`` (the
    conv itself when there is no bias, else the BiasAdd, the conv keeping its name)."""
    w = const_value(weights)
    nodes: List[NodeDef] = []
    new_conv = copy.deepcopy(conv)
    new_conv.name = name if bias is None else conv.name
    if scale is not None:
        folded = make_const(rctx.fresh_name(f"{conv.name}/folded_weights"),
                            scale_weights(conv, w, scale))
        nodes.append(folded)
        new_conv.input[1] = folded.name
    nodes.append(new_conv)
    if bias is not None:
        b = make_const(rctx.fresh_name(f"{name}/folded_bias"), bias.astype(w.dtype))
        fmt = b"NCHW" if is_nchw(conv) else b"NHWC"
        nodes += [b, make_node("BiasAdd", name, [new_conv.name, b.name], T=conv.attr["T"],
                               data_format=fmt)]
    return nodes


def float_weights(weights: NodeDef) -> bool:
    return const_value(weights).dtype in FLOAT_DTYPES


# --------------------------------------------------------------------------- clean-up
def prune_dead_constants(graph_def: graph_pb2.GraphDef, seeds: Iterable[str],
                         protected: Iterable[str]) -> graph_pb2.GraphDef:
    """Remove ``seeds`` and the constant-expression nodes above them once nothing
    reads them (a fold left them behind); graph inputs/outputs always stay."""
    index = GraphIndex(graph_def)
    protected = set(protected)
    readers = {name: len(index.consumers(name)) for name in index.nodes}
    dead, todo = set(), [s for s in set(seeds) if s in index.nodes]
    while todo:
        name = todo.pop()
        node = index.nodes[name]
        if name in dead or name in protected or readers[name] or node.op not in CONST_EXPR_OPS:
            continue
        dead.add(name)
        for inp in node.input:
            src = node_name(inp)
            if src in readers:
                readers[src] -= 1
                todo.append(src)
    if not dead:
        return graph_def
    out = graph_pb2.GraphDef()
    out.versions.CopyFrom(graph_def.versions)
    out.library.CopyFrom(graph_def.library)
    out.node.extend(n for n in graph_def.node if n.name not in dead)
    return out


def note_once(ctx, pass_name: str, node: str, message: str) -> None:
    """``ctx.note`` unless the same note is already there (rewrites retry matches)."""
    if not any((n["pass"], n["node"], n["message"]) == (pass_name, node, message)
               for n in ctx.notes):
        ctx.note(pass_name, node, message)
