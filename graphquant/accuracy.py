"""The accuracy steps of :func:`graphquant.convert.convert` between calibration and quantization.

    [center_channels] ─► [equalize_cross_layer] ─► calibrate ─► [shift_signed_activations]
      ─► [weight rounding] ─► [bias corrections] ─► plan_ranges ─► int8 passes

Each step is an fp32 rewrite that leaves the fp32 outputs unchanged, or a
choice of int8 parameters kept in ``ctx.options``; :func:`convert` switches
them with keywords:

* ``center_channels`` -- :mod:`graphquant.passes.center_channels`: channels
  between a depthwise conv and an unpadded conv reading it moved to the middle of their
  ranges (the 8-bit step spans the widest channel, not all of them);
* ``equalize`` -- :mod:`graphquant.passes.equalize_cross_layer`: channels
  between two convs rescaled where the expected noise at the second drops;
* ``shift_signed`` -- :mod:`graphquant.passes.shift_signed_activations`:
  signed tensors read only by unpadded convs/matmuls become ``y - lo >= 0``
  (quint8: 255 steps over the data's span, and an unsigned input for the
  reader, hence 8-bit weights with ``pair_weights``);
* ``weight_rounding`` -- :mod:`graphquant.weight_rounding`: the weights' integers
  rounded against the layer inputs' covariance on the calibration data
  (``ctx.options['rounded_weights']``), before bias correction measures them;
* ``bias_correction`` -- :mod:`graphquant.bias_correction`: per-channel
  output mean shift of the int8 weights, measured on the calibration data,
  removed from each int8 op's bias (``ctx.options['bias_corrections']``);
* ``pair_weights`` (read by :func:`graphquant.int8_rewrite.quantize_weights`):
  8-bit weights with limited input-channel pairs on AVX2 without VNNI
  (:mod:`graphquant.pair_weights`).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

from tensorflow.core.framework import graph_pb2

from graphquant.bias_correction import bias_corrections
from graphquant.calibrate import CalibrationStats, collect_statistics, derived_statistics
from graphquant.execute import tensor_shapes
from graphquant.pipeline import run_pipeline
from graphquant.ranges import plan_ranges

Range = Tuple[float, float]


def before_calibration(fp32: graph_pb2.GraphDef, ctx, data, *, equalize=True,
                       center_channels: bool = False) -> graph_pb2.GraphDef:
    """The clean fp32 graph with the enabled fp32 identities that change what calibration
    sees: per-channel centring and cross-layer equalization (statistics of the tensors
    between pairs on ``data``).  ``equalize``: True (weight ranges equalized) or
    "activation" (scales of least expected noise)."""
    if center_channels:
        from graphquant.passes.center_channels import find_centerable
        from graphquant.passes.equalize_cross_layer import channel_statistics

        ctx.options["channel_stats"] = channel_statistics(
            fp32, [p.between for p in find_centerable(fp32, ctx.protected)], data)
        fp32 = run_pipeline(fp32, ["center_channels"], ctx)
    if equalize:
        from graphquant.passes.equalize_cross_layer import channel_statistics, find_pairs

        ctx.options["equalize_criterion"] = "ranges" if equalize is True else equalize
        pairs = find_pairs(fp32, ctx.protected)
        ctx.options["channel_stats"] = channel_statistics(
            fp32, [p.between for p in pairs], data)
        fp32 = run_pipeline(fp32, ["equalize_cross_layer"], ctx)
    return fp32


def after_calibration(fp32: graph_pb2.GraphDef, ranges: Dict[str, Range], ctx, data, *,
                      shift_signed: bool = True, bias_correction: bool = True,
                      weight_rounding: bool = False, stats: Optional[CalibrationStats] = None
                      ) -> Tuple[graph_pb2.GraphDef, Dict[str, Range]]:
    """(fp32 graph, calibrated ranges) after the enabled steps; ``ctx`` gets their notes
    and ``ctx.options['bias_corrections']``.  ``data``: the calibration feeds.  ``stats``
    (the calibration statistics) gets those of the tensors the shift makes, measured on
    ``data`` (the report shows every int8 input's statistics)."""
    if shift_signed:
        ctx.options.update(ranges=dict(ranges), shapes=tensor_shapes(fp32))
        fp32 = run_pipeline(fp32, ["shift_signed_activations"], ctx)
        ranges = ctx.options["ranges"]
        if stats is not None:   # the shifted tensors' statistics: derived, else measured
            new = sorted(t for t in ranges if t not in stats.tensors)
            derived = {t: derived_statistics(fp32, t, stats.tensors) for t in new}
            stats.tensors.update({t: s for t, s in derived.items() if s is not None})
            rest = [t for t, s in derived.items() if s is None]
            if rest:
                stats.tensors.update(collect_statistics(fp32, rest, data).tensors)
    if weight_rounding:   # before bias correction, which measures the rounded weights
        from graphquant.weight_rounding import rounded_weights

        ctx.options["rounded_weights"] = rounded_weights(
            fp32, plan_ranges(fp32, ranges), data, ctx, centered=bias_correction)
    if bias_correction:
        ctx.options["bias_corrections"] = bias_corrections(
            fp32, plan_ranges(fp32, ranges), data, ctx,
            mean_maps=getattr(stats, "mean_maps", None))
    return fp32, ranges
