"""skip_requantize_for_fp32_readers: a conv whose result leaves int8 keeps its int32 precision.

Before (after the pairs between int8 ops are gone, only fp32 readers remain)::

    … ─► _FusedQuantizedConv2D[BiasAdd, (Relu,) Requantize] ─► Dequantize(lo, hi) ─► fp32 ops
              out_type quint8/qint8: rounded to 255 or 127 steps of the output range

After::

    … ─► _FusedQuantizedConv2D[BiasAdd, (Relu)] ─► Bitcast(int32) ─► Cast(float) ─► Mul(s)
              out_type qint32: y / s with s = s_in · max_c s_w[c]        (named like the Dequantize)

The int8 output step (a 255th or 127th of the calibrated range) was the
largest error of a conv that feeds PReLU, a residual Add without Relu, a
global mean or a graph output; the int32 result is ~2³¹/255 times finer, and
values outside the calibrated range are no longer clipped.  Applied only when
the Dequantize is the conv's one reader and no QuantizeV2 reads the
Dequantize (then the int8 output is what the next int8 op needs).  The Sum
fusion needs Requantize and is left alone.

A ``_QuantizedMatMul`` in the same place gets its own Dequantize fusion (float
output straight from the int32 sum, no 8-bit rounding; the bias is float)::

    … ─► _QuantizedMatMul[BiasAdd, (Relu | Relu6,) Requantize] ─► Dequantize(lo, hi) ─► fp32 ops
    … ─► _QuantizedMatMul[BiasAdd, (Relu | Relu6,) Dequantize]  (Tout float, named like the Dequantize)

That is the classifier head feeding Softmax (MTCNN RNet's face/no-face logits
were rounded to a 127th of their range: 3 of 83 decisions flipped).
"""

from __future__ import annotations

from graphquant import quant_math
import numpy as np

from graphquant.graph import GraphIndex, attr_value, const_value, data_inputs, make_const, make_node
from graphquant.int8_ops import dtype
from graphquant.pattern import OpTypePattern, Replacement, rewrite
from graphquant.pipeline import register_pass

FUSIONS = {("BiasAdd", "Requantize"): ["BiasAdd"],
           ("BiasAdd", "Relu", "Requantize"): ["BiasAdd", "Relu"]}


def _fused(node):
    return tuple(s.decode() for s in node.attr["fused_ops"].list.s)


# Dequantize(_FusedQuantizedConv2D|_FusedQuantizedDepthwiseConv2D[... Requantize], lo, hi)
DEQUANTIZED_CONV = OpTypePattern("Dequantize", name="dequantize", inputs=[
    OpTypePattern("_FusedQuantizedConv2D|_FusedQuantizedDepthwiseConv2D", name="conv",
                  where=lambda n: _fused(n) in FUSIONS),
    OpTypePattern("Const", name="lo", keep=True), OpTypePattern("Const", name="hi", keep=True)])


def _rewrite(match, rctx):
    conv, dq = match["conv"], match["dequantize"]
    if any(r.op == "QuantizeV2" for r in rctx.index.consumer_nodes(dq.name)):
        return None
    index: GraphIndex = rctx.index
    host = data_inputs(conv)
    has_bias = True  # both FUSIONS carry BiasAdd
    # host: input, filter, bias, min_input, max_input, min_filter, max_filter, min_out, max_out
    first_range = 3 if has_bias else 2
    max_input = float(const_value(index.node(host[first_range + 1])))
    signed_input = conv.attr["Tinput"].type == dtype("qint8").as_datatype_enum
    min_filter = const_value(index.node(host[first_range + 2]))
    max_filter = const_value(index.node(host[first_range + 3]))
    scale = float(quant_math.int32_output_scale(max_input, signed_input, min_filter, max_filter))

    new_conv = type(conv)()
    new_conv.CopyFrom(conv)
    del new_conv.input[:]
    new_conv.input.extend(host[:-2])  # drop min/max_freezed_output
    new_conv.attr["fused_ops"].CopyFrom(attr_value(FUSIONS[_fused(conv)]))
    new_conv.attr["out_type"].type = dtype("qint32").as_datatype_enum
    new_conv.attr["Tsummand"].type = dtype("qint32").as_datatype_enum
    new_conv.attr["Thost_inputs"].list.type[:] = list(conv.attr["Thost_inputs"].list.type)[:-2]
    new_conv.attr["Thost_outputs"].list.type[0] = dtype("qint32").as_datatype_enum
    # Dequantize has no qint32 kernel once oneDNN rewrites it: reinterpret, convert, scale
    bits = make_node("Bitcast", rctx.fresh_name(f"{dq.name}/int32"), [new_conv.name],
                     T=dtype("qint32"), type=dtype("int32"))
    as_float = make_node("Cast", rctx.fresh_name(f"{dq.name}/float"), [bits.name],
                         SrcT=dtype("int32"), DstT=dtype("float"), Truncate=False)
    step = make_const(rctx.fresh_name(f"{dq.name}/scale"), np.float32(scale))
    scaled = make_node("Mul", dq.name, [as_float.name, step.name], T=dtype("float"))
    return Replacement(nodes=[new_conv, bits, as_float, step, scaled])


MATMUL_FUSIONS = {("BiasAdd", "Requantize"): ["BiasAdd", "Dequantize"],
                  ("BiasAdd", "Relu", "Requantize"): ["BiasAdd", "Relu", "Dequantize"],
                  ("BiasAdd", "Relu6", "Requantize"): ["BiasAdd", "Relu6", "Dequantize"]}

# Dequantize(_QuantizedMatMul[... Requantize], lo, hi)
DEQUANTIZED_MATMUL = OpTypePattern("Dequantize", name="dequantize", inputs=[
    OpTypePattern("_QuantizedMatMul", name="matmul", where=lambda n: _fused(n) in MATMUL_FUSIONS),
    OpTypePattern("Const", name="lo", keep=True), OpTypePattern("Const", name="hi", keep=True)])


def _rewrite_matmul(match, rctx):
    matmul, dq = match["matmul"], match["dequantize"]
    if any(r.op == "QuantizeV2" for r in rctx.index.consumer_nodes(dq.name)):
        return None
    new = type(matmul)()
    new.CopyFrom(matmul)
    new.name = dq.name
    del new.input[:]
    new.input.extend(data_inputs(matmul)[:-2])  # drop min/max_freezed_output
    new.attr["fused_ops"].CopyFrom(attr_value(MATMUL_FUSIONS[_fused(matmul)]))
    new.attr["Tout"].type = dtype("float").as_datatype_enum
    new.attr["Thost_inputs"].list.type[:] = list(matmul.attr["Thost_inputs"].list.type)[:-2]
    new.attr["Thost_outputs"].list.type[:] = [dtype("float").as_datatype_enum]
    return Replacement(nodes=[new])


@register_pass("skip_requantize_for_fp32_readers")
def skip_requantize_for_fp32_readers(graph_def, ctx):
    graph_def, _ = rewrite(graph_def, DEQUANTIZED_CONV, _rewrite, protected=ctx.protected)
    graph_def, _ = rewrite(graph_def, DEQUANTIZED_MATMUL, _rewrite_matmul,
                           protected=ctx.protected)
    return graph_def
