"""The conversion report: facts checked against independent numpy, and the three renderings.

One small conversion (conv+relu -> conv -> Erf, calibrated with histograms)
gives a real report; its weight summaries (checked against the int8 weights in
the output graph), calibrated ranges and histograms are recomputed here from
the graph and the calibration data, then rendered as
Markdown, strict JSON and self-contained HTML whose SVG charts are parsed and
measured.
"""

import json
import math
import os
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import numpy as np
import pytest

from graphquant.convert import convert
from graphquant.errors import OutputPathError
from graphquant.report import ConversionReport
from graphquant.report_render import report_format, sqnr_chart, to_html, to_json, to_markdown
from graphquant.runtime import tf
from helpers import build_graph

W1 = np.random.RandomState(1).randn(3, 3, 3, 8).astype(np.float32) * 0.3
W1[..., 5] *= 0.01                                   # one quiet channel: per-channel matters
W2 = np.random.RandomState(2).randn(3, 3, 8, 4).astype(np.float32) * 0.3
SAMPLES = np.random.RandomState(0).rand(6, 1, 8, 8, 3).astype(np.float32) * 2 - 0.5


def _model(x):
    t = tf()
    y = t.nn.relu(t.nn.conv2d(x, t.constant(W1), 1, "SAME"), name="relu")
    z = t.nn.conv2d(y, t.constant(W2), 1, "SAME", name="conv2")
    return t.identity(t.math.erf(z), name="out")


@pytest.fixture(scope="module")
def result():
    graph_def, _ = build_graph(_model, x=[1, 8, 8, 3])
    result = convert(graph_def, list(SAMPLES), histograms=True, target="avx2",
                     max_layer_error=None)
    result.report.files = {"input file": "model.pb"}
    return result


@pytest.fixture(scope="module")
def report(result):
    return result.report


def _quantized(report, op_node):
    return next(q for q in report.quantized if op_node in q.get("nodes", [q["node"]]))


# --------------------------------------------------------------------------- facts
def test_each_quantized_layer_has_op_ranges_weights_and_sqnr(report):
    assert [q["op"] for q in report.quantized] == ["Conv2D", "Conv2D"]    # graph order
    for q in report.quantized:
        assert q["input_range"][0] <= q["input_range"][1]
        assert q["output_range"][0] <= q["output_range"][1]
        assert math.isfinite(q["own_sqnr_db"]) and math.isfinite(q["accumulated_sqnr_db"])
        assert q["own_sqnr_db"] == pytest.approx(-20 * math.log10(q["own_rel_l2"]))
        assert q["output_tensor"] == q["node"] + ":0" and q["input_tensor"] in report.tensors
    assert [f["op"] for f in report.fp32                   # + the shift's Pad/AddV2 (issue 6)
            if "shift_signed_activations" not in f["reason"]] == ["Erf"]
    assert report.fp32[0]["reason"] == "no int8 pattern for this op"


def _emitted_weights(graph_def, names):
    """(integers, float weights the kernel computes with) of the Consts ``names`` gives:
    the integers times max(|min|, |max|) / 127 per output channel (last axis)."""
    nodes = {n.name: n for n in graph_def.node}
    ints = tf().make_ndarray(nodes[names["values"]].attr["value"].tensor)
    ints = ints[ints.dtype.names[0]].astype(np.int64) if ints.dtype.names else ints
    lo = tf().make_ndarray(nodes[names["min"]].attr["value"].tensor)
    hi = tf().make_ndarray(nodes[names["max"]].attr["value"].tensor)
    step = np.maximum(np.abs(lo), np.abs(hi)).astype(np.float64) / 127.0
    return ints, ints * step


def _check_summary(summary, w, ints, used):
    absmax = np.abs(used).reshape(-1, w.shape[-1]).max(axis=0)
    assert summary["channels"] == w.shape[-1] and summary["shape"] == list(w.shape)
    assert summary["absmax_min"] == pytest.approx(absmax.min(), rel=1e-6)
    assert summary["absmax_median"] == pytest.approx(np.median(absmax), rel=1e-6)
    assert summary["absmax_max"] == pytest.approx(absmax.max(), rel=1e-6)
    magnitudes = np.abs(ints[ints != 0])
    assert summary["levels"] == magnitudes.max() // np.gcd.reduce(magnitudes)
    err = np.linalg.norm(used - w) / np.linalg.norm(w)
    assert summary["rel_l2"] == pytest.approx(err, rel=1e-4)
    assert summary["sqnr_db"] == pytest.approx(-20 * math.log10(err), abs=1e-3)
    # what is in the graph is the fp32 weights to within a step per channel
    step = np.abs(used).max(axis=tuple(range(used.ndim - 1))) / np.abs(ints).max(
        axis=tuple(range(ints.ndim - 1)))
    assert np.all(np.abs(absmax - np.abs(w).reshape(-1, w.shape[-1]).max(axis=0))
                  <= step + 1e-9)


@pytest.mark.parametrize("node, w", [("Conv2D", W1), ("conv2", W2)])
def test_weight_summary_is_read_from_the_emitted_weights(result, node, w):
    """Per-channel max |w|, levels and SQNR of the int8 weights in the output graph: the
    qint8 Const the int8 conv reads, with its min/max_filter Consts."""
    q = _quantized(result.report, node)
    names = q["weight_consts"]
    conv = next(n for n in result.graph_def.node
                if n.op == "_FusedQuantizedConv2D" and n.input[1] == names["values"])
    assert [conv.input[5], conv.input[6]] == [names["min"], names["max"]]   # one weight bound
    _check_summary(q["weights"], w, *_emitted_weights(result.graph_def, names))


def test_matmul_weight_summary_is_read_from_the_emitted_weights():
    w = np.random.RandomState(3).randn(16, 6).astype(np.float32) * 0.2

    def model(x):
        return tf().nn.relu(tf().matmul(x, tf().constant(w)), name="out")

    graph_def, _ = build_graph(model, x=[1, 16])
    samples = list(np.random.RandomState(4).rand(6, 1, 16).astype(np.float32))
    result = convert(graph_def, samples, target="avx2", max_layer_error=None)
    q = _quantized(result.report, "MatMul")
    names = q["weight_consts"]
    assert any(n.op == "_QuantizedMatMul" and n.input[1] == names["values"]
               for n in result.graph_def.node)
    _check_summary(q["weights"], w, *_emitted_weights(result.graph_def, names))


def test_calibrated_tensor_statistics_match_the_data(report):
    x = report.tensors["x:0"]
    assert x["min"] == pytest.approx(float(SAMPLES.min()))
    assert x["max"] == pytest.approx(float(SAMPLES.max()))
    assert x["count"] == SAMPLES.size and x["nonfinite"] == 0
    assert x["shape"] == [1, 8, 8, 3]
    hist = np.asarray(x["histogram"])
    assert len(hist) == 32 and hist.sum() == SAMPLES.size
    # bins over [min, max]: within a fine-bin width of numpy's histogram of the data
    want, _ = np.histogram(SAMPLES, bins=32, range=(x["min"], x["max"]))
    assert np.abs(hist - want).sum() <= 0.02 * SAMPLES.size
    relu = report.tensors["relu:0"]
    assert relu["min"] == 0.0 and relu["max"] > 0


def test_calibration_target_sizes_and_interface(report):
    cal = report.calibration
    assert cal["method"] == "auto" and cal["samples"] == len(SAMPLES)   # default (issue 6)
    assert cal["feeds"] == len(SAMPLES) and cal["tensors"] == len(report.tensors)
    assert report.info["target"] == "avx2" and report.info["target_description"]
    assert report.inputs == ["x"] and report.outputs == ["out:0"]
    assert report.bytes_before > 0 and report.bytes_after > 0   # a tiny graph may grow
    lines = report.summary().splitlines()
    assert "  Conv2D: 2 int8, 0 fp32" in lines
    assert any(line.startswith("  lowest layer SQNR: ") for line in lines)


# --------------------------------------------------------------------------- renderings
def test_markdown_lists_every_layer_and_fp32_reason(report):
    text = to_markdown(report)
    assert text.startswith("# graphquant conversion report\n")
    for q in report.quantized:
        row = next(line for line in text.splitlines() if f"`{q['node']}`" in line)
        assert f"| {q['op']} |" in row
        assert f"{q['own_sqnr_db']:.1f}" in row and f"{q['accumulated_sqnr_db']:.1f}" in row
        assert f"{q['weights']['levels']} levels" in row
    assert "| `out/Erf` | Erf | no int8 pattern for this op |" in text \
        or re.search(r"\| `[^`]*` \| Erf \| no int8 pattern for this op \|", text)
    assert "auto on 6 samples" in text and "avx2" in text
    assert "| input file | model.pb |" in text


def _strict_loads(text):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_json_is_strict_and_complete(report):
    data = _strict_loads(to_json(report))
    assert set(data) == set(report.to_dict())
    assert data["quantized"][0]["weights"]["channels"] == 8
    assert data["tensors"]["x:0"]["count"] == SAMPLES.size


def test_json_turns_infinite_sqnr_into_null():
    exact = ConversionReport(info={}, quantized=[{"node": "a", "op": "Conv2D",
                                                  "own_sqnr_db": math.inf,
                                                  "accumulated_sqnr_db": math.nan}])
    assert _strict_loads(to_json(exact))["quantized"][0]["own_sqnr_db"] is None
    assert "| exact |" in to_markdown(exact)
    to_html(exact)  # renders


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.attrs = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += attrs


def test_html_is_self_contained_with_svg_charts(report):
    page = to_html(report)
    parser = _Tags()
    parser.feed(page)
    assert "script" not in parser.tags and "img" not in parser.tags and "link" not in parser.tags
    assert not any(k in ("src", "href") for k, _ in parser.attrs)       # loads nothing
    svgs = re.findall(r"<svg .*?</svg>", page, re.S)
    # one SQNR chart, a range strip per quantized layer and per calibrated tensor
    assert len(svgs) == 1 + len(report.quantized) + len(report.tensors)
    for svg in svgs:
        ET.fromstring(svg)                                             # well-formed XML
    for q in report.quantized:
        assert q["node"] in page


def test_sqnr_chart_bars_are_proportional(report):
    svg = ET.fromstring(re.search(r"<svg .*?</svg>", sqnr_chart(report.quantized), re.S)[0])
    bars = [r for r in svg.iter("{http://www.w3.org/2000/svg}rect")]
    assert len(bars) == 2 * len(report.quantized)
    values = [v for q in report.quantized for v in (q["own_sqnr_db"], q["accumulated_sqnr_db"])]
    widths = [float(b.get("width")) for b in bars]
    ratios = [w / v for w, v in zip(widths, values)]
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-2)          # one scale for all


def test_write_picks_the_format_by_extension_atomically(report, tmp_path):
    for ext, check in ((".md", lambda t: t.startswith("# graphquant")),
                       (".html", lambda t: t.startswith("<!DOCTYPE html>")),
                       (".json", lambda t: _strict_loads(t)["inputs"] == ["x"])):
        path = tmp_path / f"report{ext}"
        report.write(str(path))
        assert check(path.read_text())
    assert sorted(os.listdir(tmp_path)) == ["report.html", "report.json", "report.md"]
    assert oct(os.stat(tmp_path / "report.md").st_mode & 0o777) != oct(0o600)


@pytest.mark.parametrize("name", ["report.pdf", "report", "report.md.txt"])
def test_unknown_report_extension_is_a_clear_error(name):
    with pytest.raises(OutputPathError, match=r"\.md, \.html or \.json"):
        report_format(name)


def test_old_fields_still_work(report):
    """What convert's callers used before the report grew: compute_counts, to_dict, summary."""
    assert report.compute_counts() == {"Conv2D": {"int8": 2, "fp32": 0}}
    d = report.to_dict()
    for key in ("info", "quantized", "fp32", "notes", "ops_before", "ops_after", "bytes_before",
                "bytes_after", "calibration"):
        assert key in d


def test_target_description_names_the_weights_written():
    from graphquant.target import description_with_weights, resolve
    avx2 = resolve("avx2")
    paired = description_with_weights(avx2, True)
    assert "8-bit weights limited per adjacent input-channel pair" in paired
    assert "|w| <= 63" not in paired
    assert "7-bit weights" in description_with_weights(avx2, False)
    assert description_with_weights(resolve("vnni"), True) == resolve("vnni").description


def test_markdown_weights_row_follows_pair_weights():
    from graphquant.report_render import _facts

    class R:
        calibration, inputs, outputs, bytes_before, bytes_after = {}, [], [], 100, 25
        files, speed = {}, None
        info = {"target": "avx2", "weight_max_level": 63, "pair_weights": True}
    assert "limited per adjacent input-channel pair" in dict(_facts(R))["weights"]
    R.info = dict(R.info, pair_weights=False)
    assert "max level 63" in dict(_facts(R))["weights"]
