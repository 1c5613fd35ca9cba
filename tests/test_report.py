"""The conversion report: facts checked against independent numpy, and the three renderings.

One small conversion (conv+relu -> conv -> Erf, calibrated with histograms)
gives a real report; its weight summaries, calibrated ranges and histograms are
recomputed here from the weights and the calibration data, then rendered as
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
def report():
    graph_def, _ = build_graph(_model, x=[1, 8, 8, 3])
    result = convert(graph_def, list(SAMPLES), histograms=True, target="avx2",
                     max_layer_error=None)
    result.report.files = {"input file": "model.pb"}
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


@pytest.mark.parametrize("node, w, level", [("Conv2D", W1, 63), ("conv2", W2, 63)])
def test_weight_summary_matches_numpy(report, node, w, level):
    """Per-channel absmax and the SQNR of 7-bit symmetric per-channel weights (avx2)."""
    q = _quantized(report, node)
    absmax = np.abs(w).reshape(-1, w.shape[-1]).max(axis=0)
    summary = q["weights"]
    assert summary["channels"] == w.shape[-1] and summary["levels"] == level
    assert summary["absmax_min"] == pytest.approx(absmax.min(), rel=1e-6)
    assert summary["absmax_median"] == pytest.approx(np.median(absmax), rel=1e-6)
    assert summary["absmax_max"] == pytest.approx(absmax.max(), rel=1e-6)
    step = absmax.astype(np.float64) / level
    deq = np.clip(np.rint(w / step), -level, level) * step
    err = np.linalg.norm(deq - w) / np.linalg.norm(w)
    assert summary["rel_l2"] == pytest.approx(err, rel=1e-3)
    assert summary["sqnr_db"] == pytest.approx(-20 * math.log10(err), abs=0.01)


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
