"""``graphquant convert`` as a library call: fp32 GraphDef in, int8 GraphDef and report out.

    from graphquant.convert import convert
    result = convert("model.pb", calib="samples.npy")
    result.graph_def          # the int8 GraphDef
    print(result.report.summary())

Steps, each checked before the next starts:

1. the graph and the calibration data are loaded and checked (bad data fails
   here, before any work);
2. the fp32 clean-up pipeline (:data:`~graphquant.pipeline.CLEANUP_PIPELINE`);
3. calibration: the clean fp32 graph runs on the samples, every tensor the
   int8 passes may need is measured (:mod:`graphquant.calibrate`) and ranges
   are planned (:mod:`graphquant.ranges`);
4. the int8 islands (:data:`~graphquant.pipeline.ISLAND_PASSES`), each one's
   error measured on the calibration data (:mod:`graphquant.sensitivity`);
   an island whose own error is above ``max_layer_error`` is left in fp32;
   then the islands are joined (:data:`~graphquant.pipeline.JOIN_PASSES`);
5. the target and graphquant's version are recorded in the graph as a Const
   ``graphquant_info`` (JSON), read back by :func:`graph_info`.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence, Union

import numpy as np
from tensorflow.core.framework import graph_pb2

import graphquant
from graphquant import accuracy
from graphquant import fidelity as fidelity_mod
from graphquant import range_search
from graphquant import target as target_mod
from graphquant.api import GraphLike, as_graph_def, make_context, split_names
from graphquant.calib_data import open_data
from graphquant.bias_correction import mean_tensors
from graphquant.calibrate import calibrate
from graphquant.execute import tensor_shapes
from graphquant.graph import const_value, make_const
from graphquant.pipeline import (CLEANUP_PIPELINE, ISLAND_PASSES, JOIN_PASSES, QUANTIZE_PIPELINE,
                                 RANGE_PASSES, PassContext, run_pipeline)
from graphquant.ranges import calibration_tensors, fused_intermediates, plan_ranges
from graphquant.report import ConversionReport
from graphquant.sensitivity import island_errors

INFO_NODE = "graphquant_info"
#: calibration feeds the sensitivity probe runs (errors are ratios of sums: a few feeds suffice)
PROBE_FEEDS = 8


@dataclass
class ConversionResult:
    graph_def: graph_pb2.GraphDef
    report: ConversionReport


def convert(graph: GraphLike, calib: Union[str, Iterable], *, inputs=None, outputs=None,
            calibration: str = "auto", per_tensor: bool = False, target: str = "auto",
            exclude: Sequence[str] = (), image_spec=None, calib_limit: Optional[int] = None,
            percentile: Optional[float] = None, max_layer_error: Optional[float] = 0.2,
            progress: Optional[Callable[[int, Optional[int]], None]] = None,
            debug: bool = False, histograms: Optional[bool] = None,
            pair_weights: bool = True, shift_signed: bool = True,
            bias_correction: bool = True, fidelity=None, validation=None,
            measure_fallback_speed: bool = False, equalize: Union[bool, str] = False,
            weight_rounding: bool = False, center_channels: bool = True) -> ConversionResult:
    """Quantize ``graph`` (GraphDef or path) to int8, calibrating on ``calib``.

    ``calib``: a .npy (one input; first axis = samples), a .npz (one array per
    input name), a folder of images (with ``image_spec``), or an iterable of
    arrays / feed dicts.  ``calibration``: auto (default), minmax, kl, percentile or mse.
    ``target``: auto (this CPU), avx2 or vnni.  ``exclude``: node names or op
    types to keep in fp32.  ``max_layer_error``: an int8 island whose own
    relative L2 error on the calibration data exceeds it is kept in fp32 (the
    report says so, with the measured error); None keeps everything int8.
    ``progress(done, total)`` is called during calibration.  ``histograms``:
    collect activation histograms for the report even with ``minmax``
    (passed to :func:`~graphquant.calibrate.calibrate`; the ranges do not change).

    Accuracy (issue 6, see /work/notes/accuracy.md): ``calibration="auto"`` picks per
    tensor the data range or the clipped one of least expected error
    (:mod:`graphquant.range_search`); ``pair_weights`` (8-bit weights exact on AVX2,
    :mod:`graphquant.pair_weights`), ``shift_signed``
    (:mod:`graphquant.passes.shift_signed_activations`) and ``bias_correction``
    (:mod:`graphquant.bias_correction`); ``fidelity={"top1": 0.99}`` or
    ``{"rel_l2": 0.02}`` (or ``"top1=0.99"``) with ``validation`` data (same forms as
    ``calib``; default: ``calib``) keeps the fewest most sensitive islands fp32 until
    the target is met (:mod:`graphquant.fidelity`; result in the report's
    ``info["fidelity"]``), ``measure_fallback_speed`` times the result.
    ``weight_rounding``: error-compensating weight rounding against the calibration
    inputs (:mod:`graphquant.weight_rounding`; off by default: better on MTCNN, det and
    vgg, worse on fer_mini_xception's held-out faces, BUILD_NOTES).
    ``center_channels``: channels between a depthwise conv and an unpadded conv reading it
    centred on their calibrated ranges where the 8-bit step drops to 0.75 or less
    (:mod:`graphquant.passes.center_channels`; on: fer_mini_xception's separable convs).
    ``equalize``: True (weight ranges equalized) or "activation" (channel scales of
    least expected noise, :mod:`graphquant.passes.equalize_cross_layer`).
    """
    graph_def = as_graph_def(graph)
    ctx = make_context(graph_def, inputs, outputs, debug=debug)
    data = open_data(calib, graph_def, inputs=ctx.inputs, image_spec=image_spec,
                     limit=calib_limit)
    if fidelity is not None:   # the target and the validation data checked before any work
        fidelity = fidelity_mod.parse_target(fidelity)
        if validation is not None:
            validation = open_data(validation, graph_def, inputs=ctx.inputs,
                                   image_spec=image_spec, kind="validation")
    tgt = target_mod.resolve(target)
    fp32 = run_pipeline(graph_def, CLEANUP_PIPELINE, ctx)
    fp32 = accuracy.before_calibration(fp32, ctx, data, equalize=equalize,   # issue 6
                                       center_channels=center_channels)

    extra = {} if percentile is None else {"percentile": percentile}
    auto = calibration.startswith("auto")   # issue 6: graphquant/range_search.py
    tensors = calibration_tensors(fp32)   # (not inside TF1 loops / cond branches)
    calibrated = set(tensors)
    ranges, stats = calibrate(fp32, tensors, data,
                              method="minmax" if auto else calibration, progress=progress,
                              histograms=True if auto else histograms,
                              mean_tensors=[t for t in mean_tensors(fp32) if t in calibrated]
                              if bias_correction else (),
                              no_histogram=fused_intermediates(fp32), **extra)
    if auto:
        ranges = range_search.auto_ranges(stats, range_search.gain_of(calibration))[0]
    ctx.options.update(per_tensor=per_tensor, target=tgt, exclude=set(split_names(exclude)),
                       weight_max_level=target_mod.weight_max_level(tgt.name))
    ctx.options["pair_weights"] = pair_weights          # issue 6: graphquant/pair_weights.py
    # fp32 rewrites exact inside the calibrated ranges (residual summands with an
    # offset): before the accuracy passes, so shift_signed leaves those tensors to
    # the Sum fusion, and before the probe, so its errors are measured against them
    ctx.options["ranges"] = ranges
    fp32 = run_pipeline(fp32, RANGE_PASSES, ctx)
    ranges = ctx.options["ranges"]
    fp32, ranges = accuracy.after_calibration(fp32, ranges, ctx, data,   # issue 6: accuracy.py
                                              shift_signed=shift_signed,
                                              bias_correction=bias_correction,
                                              weight_rounding=weight_rounding, stats=stats)
    ctx.options.update(ranges=plan_ranges(fp32, ranges), shapes=tensor_shapes(fp32))
    errors, probe_notes = _measure_islands(fp32, ctx, data)
    if max_layer_error is not None:
        _keep_coarse_islands_fp32(errors, probe_notes, ctx, max_layer_error)
    fid = None
    if fidelity is not None:   # issue 6: graphquant/fidelity.py (validation: calib if not given)
        fid = fidelity_mod.choose_fallbacks(
            graph_def, fp32, ctx, errors, probe_notes, fidelity,
            validation if validation is not None else data, image_spec=image_spec,
            measure_speed=measure_fallback_speed)
        ctx.options["fp32_nodes"] = set(ctx.options.get("fp32_nodes") or ()) | fid.exclude
    islands = run_pipeline(fp32, ISLAND_PASSES, ctx)
    int8 = run_pipeline(islands, JOIN_PASSES, ctx)
    if shift_signed:   # issue 6: the shifts' fp32 AddV2s into their QuantizeV2s
        int8 = run_pipeline(int8, ["fold_shift_into_quantize", "remove_unused_nodes"], ctx)
    for note in ctx.notes_of("int8"):
        if note["node"] in errors:
            note.update(errors[note["node"]].to_dict())
    info = {"graphquant": graphquant.__version__, "target": tgt.name,
            "target_description": target_mod.description_with_weights(tgt, pair_weights),
            "weight_max_level": ctx.options["weight_max_level"], "calibration": calibration,
            "per_channel": not per_tensor, "pair_weights": pair_weights,
            "op_family": "_FusedQuantizedConv2D/_QuantizedMatMul"}
    if fid is not None:
        info["fidelity"] = fid.to_dict()                 # issue 6
    int8.node.add().CopyFrom(make_const(INFO_NODE, np.array(json.dumps(info, sort_keys=True),
                                                             dtype=object)))
    report = ConversionReport.build(graph_def, fp32, int8, ctx, stats, info)
    return ConversionResult(int8, report)


def quantize_graph(fp32: graph_pb2.GraphDef, ranges, ctx,
                   passes: Sequence[str] = tuple(QUANTIZE_PIPELINE)) -> graph_pb2.GraphDef:
    """Run the int8 passes on a clean fp32 graph given calibrated ``ranges``
    (tensor -> (min, max)); ranges are planned (:func:`plan_ranges`) first.
    ``ctx.options`` may carry ``target``, ``per_tensor`` and ``exclude``."""
    ctx.options.update(ranges=plan_ranges(fp32, ranges), shapes=tensor_shapes(fp32))
    return run_pipeline(fp32, list(passes), ctx)


def _measure_islands(fp32, ctx, data):
    """Own/accumulated error of every island, measured on a probe graph.

    It runs the first :data:`PROBE_FEEDS` calibration feeds.  The probe
    leaves residual Adds in fp32: the Sum fusion writes into its
    summand's buffer, which the shadow graph (whose islands all read fp32
    tensors) cannot guarantee is free -- it crashed TensorFlow there.
    """
    probe_ctx = PassContext(inputs=ctx.inputs, outputs=ctx.outputs,
                            options=dict(ctx.options, fuse_residual=False))
    probe = run_pipeline(fp32, ISLAND_PASSES, probe_ctx)
    feeds = itertools.islice(data, PROBE_FEEDS)
    return island_errors(fp32, probe, feeds), probe_ctx.notes_of("int8")


def _keep_coarse_islands_fp32(errors, probe_notes, ctx, limit):
    """Exclude (and report) the nodes of islands whose own error exceeds ``limit``."""
    excluded = set(ctx.options.get("fp32_nodes") or ())   # node names (int8_rewrite.excluded)
    for note in probe_notes:
        root = note["node"]
        if root not in errors or errors[root].own <= limit:
            continue
        for name in note.get("nodes", [root]):
            excluded.add(name)
            ctx.note("sensitivity", name, f"kept in fp32: int8 error {errors[root].own:.1%} of "
                     f"its output on the calibration data, above the {limit:.0%} limit",
                     kind="fp32")
    ctx.options["fp32_nodes"] = excluded


def graph_info(graph_def: graph_pb2.GraphDef) -> dict:
    """What :func:`convert` recorded in a converted graph ({} for other graphs)."""
    for node in graph_def.node:
        if node.name == INFO_NODE and node.op == "Const":
            value = const_value(node)
            raw = value.item() if hasattr(value, "item") else value
            return json.loads(raw.decode() if isinstance(raw, bytes) else raw)
    return {}
