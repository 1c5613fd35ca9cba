"""Helpers for int8 pass tests: calibrate a tiny graph on its own inputs, run passes, bound errors."""

from __future__ import annotations

import numpy as np

from graphquant import quant_math
from graphquant.calibrate import calibrate
from graphquant.convert import quantize_graph
from graphquant.execute import run_graph
from graphquant.graph import GraphIndex, data_inputs
from graphquant.pipeline import PassContext
from graphquant.ranges import calibration_tensors
from graphquant.target import resolve


def quantize_tiny(graph_def, outputs, feeds, passes, **options):
    """Calibrate ``graph_def`` on ``feeds`` (one feed dict) and run ``passes``.

    Returns (int8 GraphDef, ctx, ranges).  The target defaults to avx2 so the
    weights are exact on every CPU.
    """
    ranges, _ = calibrate(graph_def, calibration_tensors(graph_def), [feeds])
    ctx = PassContext.for_graph(graph_def, list(feeds), outputs)
    ctx.options.update(target=resolve(options.pop("target", "avx2")), **options)
    return quantize_graph(graph_def, ranges, ctx, passes), ctx, ranges


def ops(graph_def):
    return sorted(n.op for n in graph_def.node if n.op != "Const")


def node(graph_def, name):
    return GraphIndex(graph_def).nodes[name]


def producer_op(graph_def, tensor):
    return GraphIndex(graph_def).node(tensor).op


def outputs_before_after(fp32, int8, feeds, outputs):
    return run_graph(fp32, feeds, outputs), run_graph(int8, feeds, outputs)


def output_step(rng, signed):
    """One quantization step of a tensor with planned range ``rng``."""
    lo, hi = quant_math.activation_range(rng[0], rng[1], signed)
    return float(quant_math.activation_scale(hi, signed))


def conv_error_bound(conv_fn, x, w, x_range, w_step, out_step):
    """Worst-case |int8 - fp32| of a conv (+bias, + monotone activation), per element.

    Input rounding is at most half an input step, weight rounding half a weight
    step (per channel), bias rounding half a unit of s_in*s_w, output rounding
    half an output step: |Δ| <= conv(|x|+e_x, e_w) + conv(e_x, |w|) + e_b + e_out.
    ``conv_fn(x, w)`` computes the float conv.
    """
    signed = x_range[0] < 0
    s_in = output_step(x_range, signed)
    e_x = 0.5 * s_in
    w_step = np.asarray(w_step, np.float32)
    if w_step.size == w.shape[2] * w.shape[3]:  # depthwise: channel = in * mult + m
        w_step = w_step.reshape(w.shape[2:])
    e_w = 0.5 * np.broadcast_to(w_step, w.shape[w.ndim - w_step.ndim:])
    bound = conv_fn(np.abs(x) + e_x, np.ones_like(w) * e_w) + conv_fn(
        np.full_like(x, e_x), np.abs(w))
    return bound + 0.5 * s_in * np.max(w_step) + 0.5 * out_step
