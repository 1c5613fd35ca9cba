"""NodeDef builders for TensorFlow 2.21's int8 ops, with what each accepts.

Passes build int8 nodes only through these functions, so every attribute rule
found by experiment lives in one place.  Inputs are tensor-name strings
("node", "node:1"); quantized types are given as ``"quint8"``, ``"qint8"``,
``"qint32"`` or ``"float"``.  The numbers each op computes are in
:mod:`graphquant.quant_math`; tests/test_int8_ops.py runs every builder in
TensorFlow against an exact numpy integer reference.

Which family to emit
    ``_FusedQuantizedConv2D``, ``_FusedQuantizedDepthwiseConv2D`` and
    ``_QuantizedMatMul`` (the *attribute-driven* family: two list inputs
    ``device_inputs`` (always empty) and ``host_inputs``, a ``fused_ops``
    attribute) have real CPU kernels: they run with ``TF_ENABLE_ONEDNN_OPTS``
    unset, 0 or 1, with identical results.  The *legacy* family
    (``QuantizedConv2DWithBias...AndRequantize``, ``QuantizedMatMulWithBias...``)
    only has a placeholder CPU kernel that oneDNN's graph rewrite replaces:
    without ``TF_ENABLE_ONEDNN_OPTS=1`` before TensorFlow is imported it fails
    with "Missing 0-th output".  graphquant emits the attribute-driven family;
    the legacy builders exist for comparison (tools/compare_op_families.py).

Outputs of every quantized op: ``:0`` data, ``:1`` min, ``:2`` max (the
attribute-driven ops have no device outputs, so host output i is ``:i``).

Also needing ``TF_ENABLE_ONEDNN_OPTS=1`` (never emitted): ``QuantizedConcatV2``
(use :func:`concat_same_range`, a plain ConcatV2 on quint8).  Running with
default settings: QuantizeV2, Dequantize, the attribute-driven convs and
matmul, QuantizedMaxPool, QuantizedAvgPool, ConcatV2/Reshape on quantized
types, Requantize.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
from tensorflow.core.framework import node_def_pb2

from graphquant import quant_math
from graphquant.graph import make_const, make_node

_TYPE_NAMES = ("quint8", "qint8", "qint32", "float", "int32", "int64")


def dtype(name: str):
    """The TensorFlow DType for ``quint8``/``qint8``/``qint32``/``float``."""
    from tensorflow.python.framework import dtypes

    table = {"quint8": dtypes.quint8, "qint8": dtypes.qint8, "qint32": dtypes.qint32,
             "float": dtypes.float32, "int32": dtypes.int32, "int64": dtypes.int64}
    if name not in table:
        raise ValueError(f"unknown quantized type {name!r}: one of {', '.join(_TYPE_NAMES)}")
    return table[name]


def quantized_const(name: str, values, type_name: str) -> node_def_pb2.NodeDef:
    """A Const of type qint8 (from int8 values) or qint32 (from int32 values).

    The bytes of int8/qint8 and int32/qint32 tensors are the same; only the
    dtype tag differs.
    """
    base = {"qint8": np.int8, "quint8": np.uint8, "qint32": np.int32}[type_name]
    arr = np.asarray(values)
    if arr.dtype != base:
        if np.any(arr != arr.astype(base)):
            raise ValueError(f"{name}: values do not fit {type_name}")
        arr = arr.astype(base)
    node = make_const(name, arr)
    enum = dtype(type_name).as_datatype_enum
    node.attr["dtype"].type = enum
    node.attr["value"].tensor.dtype = enum
    return node


# --------------------------------------------------------------------------- quantize / dequantize
def quantize_v2(name: str, x: str, min_range: str, max_range: str, signed: bool
                ) -> node_def_pb2.NodeDef:
    """``QuantizeV2`` float -> quint8 (``signed=False``) or qint8.

    Attributes from :func:`quant_math.quantize_v2_attrs`: SCALED, HALF_TO_EVEN,
    ``narrow_range`` for qint8, ``ensure_minimum_range=0``.  Pass ``min_range=0``
    for quint8.  Bit-exact against :func:`quant_math.quantize_activation` with
    oneDNN off and on (the oneDNN build rewrites it to its own kernel).
    Outputs: data, the min and max actually used.
    """
    return make_node("QuantizeV2", name, [x, min_range, max_range],
                     T=dtype("qint8" if signed else "quint8"),
                     **quant_math.quantize_v2_attrs(signed))


def dequantize(name: str, q: str, min_range: str, max_range: str, signed: bool
               ) -> node_def_pb2.NodeDef:
    """``Dequantize`` quint8/qint8 -> float, SCALED (narrow range for qint8):
    ``q * R/255`` or ``q * R/127`` exactly (see quant_math)."""
    return make_node("Dequantize", name, [q, min_range, max_range],
                     T=dtype("qint8" if signed else "quint8"), dtype=dtype("float"),
                     **quant_math.dequantize_attrs(signed))


# --------------------------------------------------------------------------- fused conv
#: fused_ops lists _FusedQuantizedConv2D / DepthwiseConv2D accept (kernel whitelist),
#: and the out_type each needs.  Everything else fails with "Unsupported
#: QuantizedConv fusion" -- including any Relu6 and any Dequantize.
CONV_FUSIONS = {
    ("BiasAdd",): ("qint32",),
    ("BiasAdd", "Relu"): ("qint32",),
    ("BiasAdd", "Requantize"): ("qint8", "quint8"),
    ("BiasAdd", "Relu", "Requantize"): ("quint8", "qint8"),
    ("BiasAdd", "Sum", "Relu", "Requantize"): ("quint8",),
}


def fused_quantized_conv(name: str, input: str, filter: str, min_input: str, max_input: str,
                         min_filter: str, max_filter: str, *, bias: Optional[str] = None,
                         tinput: str = "quint8", tbias: str = "float",
                         out_type: str = "quint8", fused_ops: Sequence[str] = (
                             "BiasAdd", "Relu", "Requantize"),
                         strides: Sequence[int] = (1, 1, 1, 1), padding: str = "SAME",
                         explicit_paddings: Sequence[int] = (),
                         dilations: Sequence[int] = (1, 1, 1, 1),
                         min_freezed_output: Optional[str] = None,
                         max_freezed_output: Optional[str] = None,
                         summand: Optional[str] = None, tsummand: Optional[str] = None,
                         min_summand: Optional[str] = None, max_summand: Optional[str] = None,
                         depthwise: bool = False) -> node_def_pb2.NodeDef:
    """``_FusedQuantizedConv2D`` (or ``_FusedQuantizedDepthwiseConv2D``), NHWC.

    Runs with default TensorFlow settings (no oneDNN variable needed).

    * ``host_inputs`` order: input, filter, [bias], [summand], min_input,
      max_input, min_filter, max_filter, [min_summand, max_summand],
      [min_freezed_output, max_freezed_output].
    * ``tinput``: quint8 or qint8 -- signed activations work (conv and
      depthwise), so a conv whose input can be negative stays int8.
    * ``filter``: a qint8 Const [h, w, in, out] (depthwise [h, w, in, mult]);
      ``min_filter``/``max_filter`` scalars (per-tensor) or vectors of
      out (in*mult) channels (per-channel); the kernel takes the step as
      max(|min|,|max|)/127.
    * ``tbias``: float (fp32 bias added as is -- preferred) or qint32
      (:func:`quant_math.quantize_bias`; converted back to float by the kernel).
    * ``fused_ops``/``out_type``: see :data:`CONV_FUSIONS`.  Relu6 does not
      exist: use ``[BiasAdd, Relu, Requantize]``, quint8 output and
      ``max_freezed_output <= 6`` (saturation clips at R_out).  No Dequantize
      fusion: follow a requantized output with :func:`dequantize`.
    * Sum (residual add + Relu): only ``[BiasAdd, Sum, Relu, Requantize]`` with
      quint8 output; ``summand`` is a quint8 tensor with its own min/max.  A
      qint8 summand runs but is wrong: the in-place output then saturates at
      127 instead of 255 (measured: every output above half the range is
      clipped), so it is refused here -- a residual branch that can be
      negative is added in float (Dequantize, AddV2) instead.
      The summand's buffer becomes the output (in place): when it cannot be
      forwarded -- a constant, a fetched tensor, or a tensor another node may
      still read after this one -- the process segfaults.  Fuse only when
      every other consumer of the summand is an ancestor of ``input`` (the
      ResNet block shape, verified) and the summand is not a graph output.
      There is no Sum without Relu.
      ``[BiasAdd, Sum, Relu]`` with a qint32 output segfaults: refused here.
    * ``padding`` SAME, VALID or EXPLICIT (``explicit_paddings`` 8 ints, NHWC);
      ``dilations`` accepted.
    """
    fused = tuple(fused_ops)
    if fused not in CONV_FUSIONS:
        raise ValueError(f"{name}: fused_ops {list(fused)} not supported by the fused quantized "
                         f"conv kernels; supported: {[list(k) for k in CONV_FUSIONS]}")
    if out_type not in CONV_FUSIONS[fused]:
        raise ValueError(f"{name}: fused_ops {list(fused)} needs out_type in "
                         f"{CONV_FUSIONS[fused]}, got {out_type}")
    if depthwise and "Sum" in fused:
        raise ValueError(f"{name}: the depthwise kernel has no Sum fusion")
    has_bias = "BiasAdd" in fused
    if has_bias != (bias is not None):
        raise ValueError(f"{name}: give a bias exactly when BiasAdd is fused")
    requant = "Requantize" in fused
    if requant and (min_freezed_output is None or max_freezed_output is None):
        raise ValueError(f"{name}: Requantize needs min/max_freezed_output")
    host: List[str] = [input, filter]
    types = [dtype(tinput), dtype("qint8")]
    if has_bias:
        host.append(bias)
        types.append(dtype(tbias))
    if "Sum" in fused:
        if summand is None or tsummand != "quint8":
            raise ValueError(f"{name}: Sum needs a quint8 summand with min/max (a qint8 "
                             "summand makes the kernel clip the output at 127)")
        host.append(summand)
        types.append(dtype(tsummand))
    host += [min_input, max_input, min_filter, max_filter]
    types += [dtype("float")] * 4
    if "Sum" in fused:
        host += [min_summand, max_summand]
        types += [dtype("float")] * 2
    if requant:
        host += [min_freezed_output, max_freezed_output]
        types += [dtype("float")] * 2
    attrs = dict(Tinput=dtype(tinput), Tfilter=dtype("qint8"), Tbias=dtype(tbias),
                 Tsummand=dtype(tsummand if "Sum" in fused else out_type),
                 out_type=dtype(out_type), Thost_inputs=types,
                 Thost_outputs=[dtype(out_type), dtype("float"), dtype("float")],
                 Tdevice_inputs=[], Tdevice_outputs=[], data_format="NHWC",
                 strides=list(strides), padding=padding, dilations=list(dilations),
                 fused_ops=list(fused), is_filter_const=True, is_bias_const=True)
    if padding == "EXPLICIT":
        attrs["explicit_paddings"] = list(explicit_paddings)
    op = "_FusedQuantizedDepthwiseConv2D" if depthwise else "_FusedQuantizedConv2D"
    node = make_node(op, name, [], **attrs)
    # device_inputs is an empty list input: only host_inputs appear in node.input
    node.input.extend(host)
    return node


# --------------------------------------------------------------------------- matmul
#: fused_ops lists _QuantizedMatMul accepts and the Tout each allows.
MATMUL_FUSIONS = {
    ("BiasAdd",): ("qint32",),
    ("BiasAdd", "Relu"): ("qint32",),
    ("BiasAdd", "Dequantize"): ("float",),
    ("BiasAdd", "Relu", "Dequantize"): ("float",),
    ("BiasAdd", "Relu6", "Dequantize"): ("float",),
    ("BiasAdd", "Requantize"): ("qint8", "quint8"),
    ("BiasAdd", "Relu", "Requantize"): ("quint8", "qint8"),
    ("BiasAdd", "Relu6", "Requantize"): ("quint8", "qint8"),
}


def quantized_matmul(name: str, a: str, b: str, bias: str, min_a: str, max_a: str,
                     min_b: str, max_b: str, *, t1: str = "quint8", tbias: str = "float",
                     tout: str = "float", fused_ops: Sequence[str] = ("BiasAdd", "Dequantize"),
                     transpose_b: bool = False, min_freezed_output: Optional[str] = None,
                     max_freezed_output: Optional[str] = None) -> node_def_pb2.NodeDef:
    """``_QuantizedMatMul``: quint8/qint8 [M, K] x qint8 const [K, N] (+bias) -> Tout.

    Runs with default TensorFlow settings.  ``host_inputs``: a, b, bias,
    min_a, max_a, min_b, max_b, [min_freezed_output, max_freezed_output].
    ``min_b``/``max_b`` scalar or per-column vectors.  Unlike the conv it has
    a Dequantize fusion (float output straight from the matmul) and Relu6
    (with Dequantize or Requantize); see :data:`MATMUL_FUSIONS`.  Scales as in
    :mod:`quant_math` (input_quant_mode SCALED); ``transpose_b`` takes b as
    [N, K].  Outputs: data, and for quantized Tout min and max.
    """
    fused = tuple(fused_ops)
    if fused not in MATMUL_FUSIONS:
        raise ValueError(f"{name}: fused_ops {list(fused)} not supported by _QuantizedMatMul; "
                         f"supported: {[list(k) for k in MATMUL_FUSIONS]}")
    if tout not in MATMUL_FUSIONS[fused]:
        raise ValueError(f"{name}: fused_ops {list(fused)} needs Tout in "
                         f"{MATMUL_FUSIONS[fused]}, got {tout}")
    host = [a, b, bias, min_a, max_a, min_b, max_b]
    types = [dtype(t1), dtype("qint8"), dtype(tbias)] + [dtype("float")] * 4
    if "Requantize" in fused:
        if min_freezed_output is None or max_freezed_output is None:
            raise ValueError(f"{name}: Requantize needs min/max_freezed_output")
        host += [min_freezed_output, max_freezed_output]
        types += [dtype("float")] * 2
    outs = [dtype(tout)] if tout == "float" else [dtype(tout), dtype("float"), dtype("float")]
    node = make_node("_QuantizedMatMul", name, [], T1=dtype(t1), T2=dtype("qint8"),
                     Tbias=dtype(tbias), Tout=dtype(tout), U=dtype("float"),
                     Thost_inputs=types, Thost_outputs=outs, Tdevice_inputs=[],
                     Tdevice_outputs=[], transpose_a=False, transpose_b=bool(transpose_b),
                     is_weight_const=True, is_bias_const=True, fused_ops=list(fused),
                     input_quant_mode="SCALED", output_quant_mode="SCALED")
    node.input.extend(host)
    return node


# --------------------------------------------------------------------------- legacy family
#: legacy op name -> (Tinput choices, out_type); all need TF_ENABLE_ONEDNN_OPTS=1
LEGACY_CONV_OPS = {
    "QuantizedConv2DWithBiasAndRequantize": (("quint8", "qint8"), "qint8"),
    "QuantizedConv2DWithBiasAndReluAndRequantize": (("quint8", "qint8"), "quint8"),
    "QuantizedConv2DWithBiasSumAndReluAndRequantize": (("quint8",), "quint8"),
    "QuantizedConv2DWithBiasSignedSumAndReluAndRequantize": (("quint8",), "quint8"),
    "QuantizedDepthwiseConv2DWithBiasAndReluAndRequantize": (("quint8",), "quint8"),
}


def legacy_quantized_conv(op: str, name: str, input: str, filter: str, bias: str,
                          min_input: str, max_input: str, min_filter: str, max_filter: str,
                          min_freezed_output: str, max_freezed_output: str, *,
                          tinput: str = "quint8", tbias: str = "float",
                          strides: Sequence[int] = (1, 1, 1, 1), padding: str = "SAME",
                          dilations: Sequence[int] = (1, 1, 1, 1),
                          summand: Optional[str] = None, min_summand: Optional[str] = None,
                          max_summand: Optional[str] = None) -> node_def_pb2.NodeDef:
    """A legacy ``Quantized{,Depthwise}Conv2DWithBias...AndRequantize`` node.

    Positional inputs (input, filter, bias, min/max input, min/max filter,
    min/max freezed output [, summand, min/max summand]).  Works only when
    ``TF_ENABLE_ONEDNN_OPTS=1`` was set before TensorFlow was imported;
    otherwise the run fails with "Missing 0-th output".  For comparison only.
    """
    if op not in LEGACY_CONV_OPS:
        raise ValueError(f"unknown legacy conv op {op}")
    tinputs, out_type = LEGACY_CONV_OPS[op]
    if tinput not in tinputs:
        raise ValueError(f"{op} has kernels for Tinput in {tinputs} only")
    inputs = [input, filter, bias, min_input, max_input, min_filter, max_filter,
              min_freezed_output, max_freezed_output]
    attrs = dict(Tinput=dtype(tinput), Tfilter=dtype("qint8"), Tbias=dtype(tbias),
                 out_type=dtype(out_type), strides=list(strides), padding=padding,
                 dilations=list(dilations))
    if "Sum" in op:
        inputs += [summand, min_summand, max_summand]
        attrs["Tsummand"] = dtype("qint8" if "Signed" in op else "quint8")
    return make_node(op, name, inputs, **attrs)


def legacy_quantized_matmul(op: str, name: str, a: str, b: str, bias: str, min_a: str,
                            max_a: str, min_b: str, max_b: str, min_freezed_output: str,
                            max_freezed_output: str, *, tbias: str = "float",
                            transpose_b: bool = False) -> node_def_pb2.NodeDef:
    """``QuantizedMatMulWithBiasAndReluAndRequantize`` (quint8 out),
    ``...WithBiasAndRequantize`` (quint8 out) or ``...WithBiasAndDequantize``
    (float out); quint8 a, qint8 b, per-tensor b range only, SCALED input.
    Needs ``TF_ENABLE_ONEDNN_OPTS=1``.  For comparison only."""
    outs = {"QuantizedMatMulWithBiasAndReluAndRequantize": "quint8",
            "QuantizedMatMulWithBiasAndRequantize": "quint8",
            "QuantizedMatMulWithBiasAndDequantize": "float"}
    if op not in outs:
        raise ValueError(f"unknown legacy matmul op {op}")
    return make_node(op, name, [a, b, bias, min_a, max_a, min_b, max_b, min_freezed_output,
                                max_freezed_output],
                     T1=dtype("quint8"), T2=dtype("qint8"), Tbias=dtype(tbias),
                     Toutput=dtype(outs[op]), transpose_a=False, transpose_b=bool(transpose_b),
                     input_quant_mode="SCALED")


# --------------------------------------------------------------------------- pools, concat
def quantized_max_pool(name: str, input: str, min_input: str, max_input: str, *, t: str,
                       ksize: Sequence[int], strides: Sequence[int], padding: str
                       ) -> node_def_pb2.NodeDef:
    """``QuantizedMaxPool`` (NHWC, SAME/VALID): max of the integers, range passed
    through unchanged -- bit-exact for quint8 and qint8; runs with default
    settings (plain MaxPool has no quint8 kernel)."""
    return make_node("QuantizedMaxPool", name, [input, min_input, max_input], T=dtype(t),
                     ksize=list(ksize), strides=list(strides), padding=padding)


def quantized_avg_pool(name: str, input: str, min_input: str, max_input: str, *, t: str,
                       ksize: Sequence[int], strides: Sequence[int], padding: str
                       ) -> node_def_pb2.NodeDef:
    """``QuantizedAvgPool`` (NHWC): mean of the integers, range passed through.
    Runs with default settings, but the rounding depends on them: rounded down
    without oneDNN (a -0.5 step bias), to nearest with ``TF_ENABLE_ONEDNN_OPTS=1``."""
    return make_node("QuantizedAvgPool", name, [input, min_input, max_input], T=dtype(t),
                     ksize=list(ksize), strides=list(strides), padding=padding)


def concat_same_range(name: str, values: Sequence[str], axis: str, *, t: str
                      ) -> node_def_pb2.NodeDef:
    """Plain ``ConcatV2`` on quint8/qint8 tensors that share one range.

    TensorFlow's ConcatV2 has CPU kernels for quantized types, runs with
    default settings and copies the integers (bit-exact); the range of the
    result is the shared input range (pass the inputs' min/max on).  This is
    what graphquant emits: QuantizedConcatV2 needs oneDNN (below).
    """
    return make_node("ConcatV2", name, list(values) + [axis], N=len(values), T=dtype(t),
                     Tidx=dtype("int32"))


def pad_integers(name: str, input: str, paddings, shape: Sequence[int], *, t: str
                 ) -> List[node_def_pb2.NodeDef]:
    """Zeros around a quint8/qint8 tensor of static ``shape``, as ConcatV2s of zero Consts.

    In SCALED mode the integer 0 is the float 0.0 for both types, so this is
    the fp32 zero Pad exactly, and the range passes through.  ``paddings`` is
    the Pad's [[before, after], ...] per axis.  TensorFlow's own ``Pad`` runs
    on quantized types too, but slowly: 6 ms for ResNet's 1x112x112x64
    pool1_pad (0.4 ms in fp32, 2 ms through a Bitcast to uint8), while the
    concats copy it in 0.2 ms.  Returns the nodes; the last one, named
    ``name``, is the padded tensor.
    """
    nodes: List[node_def_pb2.NodeDef] = []
    current, dims = input, [int(d) for d in shape]
    padded = [(axis, int(a), int(b)) for axis, (a, b) in enumerate(paddings) if a or b]
    if not padded:
        return [make_node("Identity", name, [input], T=dtype(t))]
    for k, (axis, before, after) in enumerate(padded):
        last = k == len(padded) - 1
        out = name if last else f"{name}/axis{axis}"
        parts = []
        for side, amount in (("before", before), ("after", after)):
            if amount:
                zshape = list(dims)
                zshape[axis] = amount
                zeros = quantized_const(f"{out}/{side}", np.zeros(zshape, np.int8 if t == "qint8"
                                                                  else np.uint8), t)
                nodes.append(zeros)
                parts.append(zeros.name)
        parts.insert(1 if before else 0, current)
        axis_const = make_const(f"{out}/axis", np.int32(axis))
        nodes += [axis_const, concat_same_range(out, parts, axis_const.name, t=t)]
        current = out
        dims[axis] += before + after
    return nodes


def quantized_concat(name: str, values: Sequence[str], axis: str, input_mins: Sequence[str],
                     input_maxes: Sequence[str], *, t: str) -> node_def_pb2.NodeDef:
    """``QuantizedConcatV2``: values..., axis (int32 const), mins..., maxes...

    Its CPU kernel is a oneDNN placeholder: without ``TF_ENABLE_ONEDNN_OPTS=1``
    it fails with "Missing 0-th output" -- use :func:`concat_same_range`.  With
    oneDNN, inputs sharing one range are copied unchanged (bit-exact).
    """
    n = len(values)
    if len(input_mins) != n or len(input_maxes) != n:
        raise ValueError(f"{name}: need one min and one max per value")
    return make_node("QuantizedConcatV2", name,
                     list(values) + [axis] + list(input_mins) + list(input_maxes),
                     N=n, T=dtype(t), Tidx=dtype("int32"))


def requantize(name: str, input: str, input_min: str, input_max: str, requested_min: str,
               requested_max: str, *, tinput: str = "qint32", out_type: str = "quint8"
               ) -> node_def_pb2.NodeDef:
    """``Requantize`` qint32 -> quint8/qint8 with a requested output range."""
    return make_node("Requantize", name, [input, input_min, input_max, requested_min,
                                          requested_max],
                     Tinput=dtype(tinput), out_type=dtype(out_type))


def requantize_per_channel(name: str, input: str, input_min: str, input_max: str,
                           requested_min: str, requested_max: str, *, out_type: str = "quint8"
                           ) -> node_def_pb2.NodeDef:
    """``RequantizePerChannel`` qint32 -> quint8 with per-channel input ranges."""
    return make_node("RequantizePerChannel", name, [input, input_min, input_max,
                                                    requested_min, requested_max],
                     T=dtype("qint32"), out_type=dtype(out_type))
