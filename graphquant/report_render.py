"""The conversion report as Markdown, JSON or one self-contained HTML file.

    result.report.write("report.html")      # .md, .html or .json, by extension
    text = to_markdown(result.report)

Every form holds the same facts (:class:`~graphquant.report.ConversionReport`):
what was quantized (op, activation ranges, weight summary, SQNR of its output
against fp32 on the calibration data, own and accumulated), what stayed fp32
and why, calibration, target, sizes and, when measured, the speed-up.

The HTML needs no plotting library and loads nothing: its charts are SVG
written here -- a bar chart of each layer's own and accumulated SQNR, and per
layer and per calibrated tensor a strip showing the range (and the value
histogram when calibration collected one).  JSON is strict (NaN and infinity,
e.g. the SQNR of an exact layer, become null).
"""

from __future__ import annotations

import html
import json
import math
import os
from typing import Dict, List, Optional, Sequence

from graphquant.errors import OutputPathError

FORMATS = {".md": "markdown", ".markdown": "markdown", ".html": "html", ".htm": "html",
           ".json": "json"}
SQNR_GOOD_DB = 20.0   # relative L2 error 10%
SQNR_POOR_DB = 14.0   # relative L2 error 20%: graphquant's default max_layer_error


def report_format(path: str) -> str:
    """``markdown``, ``html`` or ``json`` from the extension of ``path``."""
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext not in FORMATS:
        raise OutputPathError(f"report path '{path}' has extension '{ext or '(none)'}'",
                              "name the report .md, .html or .json (the format follows it)")
    return FORMATS[ext]


def render(report, fmt: str) -> str:
    return {"markdown": to_markdown, "html": to_html, "json": to_json}[fmt](report)


def write_report(report, path: str) -> None:
    """Write ``report`` to ``path`` in the format its extension names, atomically."""
    from graphquant.graph_io import write_file_atomic

    write_file_atomic(os.fspath(path), render(report, report_format(path)).encode("utf-8"))


# --------------------------------------------------------------------------- JSON
def to_json(report) -> str:
    return json.dumps(_strict(report.to_dict()), indent=2, sort_keys=True)


def _strict(value):
    """``value`` with NaN/inf as None and numpy scalars as Python numbers."""
    if isinstance(value, dict):
        return {str(k): _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# --------------------------------------------------------------------------- shared facts
def _num(value, pattern: str = "{:.4g}") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "exact" if value > 0 else "-inf"
    if isinstance(value, float) and math.isnan(value):
        return "-"
    return pattern.format(value)


def _db(value) -> str:
    return _num(value, "{:.1f}")


def _range(r) -> str:
    return f"[{_num(r[0])}, {_num(r[1])}]" if r else "-"


def _fused(q: Dict) -> str:
    ops = q.get("fused_ops") or []
    return f"{q.get('int8_op', '')}" + (f" ({'+'.join(ops)})" if ops else "")


def _weights(q: Dict) -> str:
    w = q.get("weights")
    if not w:
        return "-"
    return (f"{w['channels']} ch, |w|max {_num(w['absmax_min'], '{:.3g}')}/"
            f"{_num(w['absmax_median'], '{:.3g}')}/{_num(w['absmax_max'], '{:.3g}')}, "
            f"{w['levels']} levels, {_db(w['sqnr_db'])} dB")


def _facts(report) -> List[tuple]:
    """(label, value) rows of the summary table."""
    info, cal = report.info, report.calibration
    rows = [("graphquant", info.get("graphquant", "")),
            ("target CPU", f"{info.get('target')} - {info.get('target_description', '')}"),
            ("int8 op family", info.get("op_family", "")),
            ("weights", ("per-channel" if info.get("per_channel", True) else "per-tensor")
             + (", 8-bit, limited per adjacent input-channel pair (exact on avx2)"
                if info.get("pair_weights") and info.get("target") == "avx2"
                else f", max level {info.get('weight_max_level')} on u8-input convs")),
            ("calibration", f"{cal.get('method') or info.get('calibration')} on "
             + (cal.get("source") or f"{cal.get('samples')} samples")
             + f" ({cal.get('feeds')} runs); {cal.get('tensors')} tensors measured"
             + (f" in {cal['seconds']:.2f} s" if cal.get("seconds") else "")),
            ("inputs", ", ".join(report.inputs) or "-"),
            ("outputs", ", ".join(report.outputs) or "-"),
            ("size", f"{report.bytes_before:,} bytes -> {report.bytes_after:,} bytes "
             f"({report.bytes_after / max(report.bytes_before, 1):.2f}x)")]
    for key, value in sorted(report.files.items()):
        rows.append((key, value))
    if cal.get("nonfinite_tensors"):
        rows.append(("NaN/Inf seen in", ", ".join(cal["nonfinite_tensors"])))
    if report.speed:
        rows.append(("speed-up", _speed_text(report.speed)))
    return rows


def _speed_text(speed: Dict) -> str:
    if speed.get("error"):
        return f"not measured: {speed['error']}"
    return (f"{speed['speedup']:.2f}x (int8 {speed['int8_ms']:.2f} ms vs fp32 "
            f"{speed['fp32_ms']:.2f} ms, median of {speed['rounds']} interleaved rounds at "
            f"batch {speed['batch']}; a quick estimate - tools/benchmark.py measures properly)")


def _counts_rows(report) -> List[tuple]:
    rows = [(op, c["int8"], c["fp32"]) for op, c in report.compute_counts().items()]
    return rows


# --------------------------------------------------------------------------- Markdown
def _md_cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _md_table(header: Sequence[str], rows: Sequence[Sequence]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return lines + [""]


def to_markdown(report) -> str:
    lines = ["# graphquant conversion report", ""]
    lines += _md_table(["", ""], _facts(report))
    counts = _counts_rows(report)
    if counts:
        lines += ["## Compute ops", ""] + _md_table(["op", "int8", "fp32"], counts)
    lines += [f"## Quantized ({len(report.quantized)})", "",
              "SQNR of each layer's output against fp32 on the calibration data: *own* with "
              "fp32 inputs (this layer's error alone), *accumulated* with int8 upstream (as in "
              "the converted graph). 20 dB = 10% relative error. Weights: channels, per-channel "
              "max |w| (min/median/max), integer levels used, SQNR of the int8 weights.", ""]
    rows = [(i + 1, f"`{q['node']}`", q.get("op", ""), _fused(q), _range(q.get("input_range")),
             _range(q.get("output_range")), _weights(q), _db(q.get("own_sqnr_db")),
             _db(q.get("accumulated_sqnr_db")))
            for i, q in enumerate(report.quantized)]
    lines += _md_table(["#", "node", "op", "int8 op", "input range", "output range", "weights",
                        "SQNR own dB", "SQNR acc. dB"], rows)
    lines += [f"## Left in fp32 ({len(report.fp32)})", ""]
    lines += _md_table(["node", "op", "reason"],
                       [(f"`{f['node']}`", f["op"], f["reason"]) for f in report.fp32]) \
        if report.fp32 else ["(none)", ""]
    if report.tensors:
        lines += [f"## Calibrated tensors ({len(report.tensors)})", ""]
        lines += _md_table(["tensor", "shape", "min", "max", "values", "NaN/Inf"],
                           [(f"`{name}`", t["shape"], _num(t["min"]), _num(t["max"]),
                             t["count"], t["nonfinite"]) for name, t in report.tensors.items()])
    if report.notes:
        lines += [f"## Notes ({len(report.notes)})", ""]
        lines += [f"- {n['pass']}: `{n['node']}`: {n['message']}" for n in report.notes] + [""]
    ops = sorted(set(report.ops_before) | set(report.ops_after),
                 key=lambda op: (-report.ops_before.get(op, 0), op))
    lines += ["## Op histogram", ""]
    lines += _md_table(["op", "before", "after"],
                       [(op, report.ops_before.get(op, 0), report.ops_after.get(op, 0))
                        for op in ops])
    return "\n".join(lines)


# --------------------------------------------------------------------------- HTML
_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0}td,th{padding:3px 8px;border-bottom:1px solid #eee;
text-align:left;vertical-align:middle}th{background:#f5f5f5}td.n{text-align:right;
font-variant-numeric:tabular-nums}code{font-size:12px}.poor{color:#b00020;font-weight:600}
.legend span{display:inline-block;width:12px;height:12px;margin:0 4px 0 12px;vertical-align:-1px}
svg text{font-size:11px;font-family:system-ui,sans-serif}.muted{color:#777}
"""
_OWN, _ACC, _RANGE, _HIST = "#3b6fb6", "#e08a2c", "#9bbbe0", "#3b6fb6"


def _e(value) -> str:
    return html.escape(str(value))


def _short(name: str, n: int = 48) -> str:
    return name if len(name) <= n else "\u2026" + name[-(n - 1):]


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]],
                numeric: Sequence[int] = ()) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(
        f"<td{' class=n' if i in numeric else ''}>{c}</td>" for i, c in enumerate(row))
        + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def sqnr_chart(quantized: Sequence[Dict]) -> str:
    """Horizontal bars: own and accumulated SQNR (dB) per quantized layer, in graph order."""
    rows = [q for q in quantized if q.get("own_sqnr_db") is not None
            or q.get("accumulated_sqnr_db") is not None]
    if not rows:
        return "<p class=muted>No layer error was measured.</p>"
    finite = [v for q in rows for v in (q.get("own_sqnr_db"), q.get("accumulated_sqnr_db"))
              if isinstance(v, (int, float)) and math.isfinite(v)]
    top = max([SQNR_GOOD_DB + 10.0] + finite)
    top = 10.0 * math.ceil(top / 10.0)
    label_w, plot_w, row_h = 340, 500, 18
    height = 28 + row_h * len(rows) + 24
    total_h = height + 10
    x = lambda db: label_w + plot_w * min(max(db, 0.0), top) / top  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_w + plot_w + 70}" '
             f'height="{total_h}" role="img" aria-label="SQNR per layer">']
    for tick in range(0, int(top) + 1, 10):
        parts.append(f'<line x1="{x(tick):.1f}" y1="20" x2="{x(tick):.1f}" '
                     f'y2="{height - 22}" stroke="#ddd"/>'
                     f'<text x="{x(tick):.1f}" y="{height - 8}" text-anchor="middle">{tick}</text>')
    for ref, color in ((SQNR_POOR_DB, "#b00020"), (SQNR_GOOD_DB, "#2e7d32")):
        parts.append(f'<line x1="{x(ref):.1f}" y1="20" x2="{x(ref):.1f}" y2="{height - 22}" '
                     f'stroke="{color}" stroke-dasharray="4 3"/>')
    parts.append(f'<text x="{label_w + plot_w / 2}" y="{height + 6}" text-anchor="middle">'
                 'SQNR dB (own value at the right)</text>'
                 f'<text x="{label_w}" y="12">SQNR of each int8 layer\'s output vs fp32 '
                 f'(dashed: {SQNR_POOR_DB:.0f} dB = 20% error, {SQNR_GOOD_DB:.0f} dB = 10%)</text>')
    for i, q in enumerate(rows):
        y = 24 + i * row_h
        parts.append(f'<text x="{label_w - 6}" y="{y + 12}" text-anchor="end" '
                     f'font-family="monospace"><title>{_e(q["node"])}</title>'
                     f'{_e(_short(q["node"], 46))}</text>')
        for j, (key, color) in enumerate((("own_sqnr_db", _OWN), ("accumulated_sqnr_db", _ACC))):
            value = q.get(key)
            if value is None:
                continue
            shown = top if math.isinf(value) else value
            parts.append(f'<rect x="{label_w}" y="{y + 2 + j * 7}" '
                         f'width="{max(x(shown) - label_w, 0.5):.1f}" height="6" fill="{color}">'
                         f'<title>{_e(q["node"])}: {key.split("_")[0]} {_db(value)} dB</title>'
                         f'</rect>')
        own = q.get("own_sqnr_db")
        parts.append(f'<text x="{x(top) + 4}" y="{y + 12}">{_db(own)}</text>')
    parts.append("</svg>")
    legend = (f'<div class=legend><span style="background:{_OWN}"></span>own (fp32 inputs)'
              f'<span style="background:{_ACC}"></span>accumulated (int8 upstream)</div>')
    return legend + "".join(parts)


def range_strip(tensor: Optional[Dict], planned=None, width: int = 220, height: int = 26) -> str:
    """A small SVG: the tensor's histogram (if collected) over its calibrated [min, max],
    the planned int8 range as a bracket, and 0 as a vertical line."""
    lo_hi = [v for v in ((tensor or {}).get("min"), (tensor or {}).get("max")) if v is not None]
    if planned:
        lo_hi += list(planned)
    if not lo_hi:
        return ""
    lo, hi = min(lo_hi + [0.0]), max(lo_hi + [0.0])
    if hi <= lo:
        hi = lo + 1.0
    pad = 3
    x = lambda v: pad + (width - 2 * pad) * (v - lo) / (hi - lo)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">']
    hist = (tensor or {}).get("histogram")
    if hist and tensor.get("max") is not None and tensor["max"] > tensor["min"]:
        peak = max(hist) or 1
        bin_w = (tensor["max"] - tensor["min"]) / len(hist)
        for i, c in enumerate(hist):
            if not c:
                continue
            h = max(1.0, (height - 8) * math.sqrt(c / peak))   # sqrt: small bins stay visible
            x0 = x(tensor["min"] + i * bin_w)
            parts.append(f'<rect x="{x0:.1f}" y="{height - 4 - h:.1f}" '
                         f'width="{max(x(tensor["min"] + (i + 1) * bin_w) - x0, 0.8):.1f}" '
                         f'height="{h:.1f}" fill="{_HIST}"/>')
    elif tensor and tensor.get("min") is not None:
        parts.append(f'<rect x="{x(tensor["min"]):.1f}" y="{height / 2 - 4:.1f}" '
                     f'width="{max(x(tensor["max"]) - x(tensor["min"]), 0.8):.1f}" height="8" '
                     f'fill="{_RANGE}"/>')
    if planned:
        a, b = x(planned[0]), x(planned[1])
        parts.append(f'<path d="M{a:.1f},2 v4 M{a:.1f},2 H{b:.1f} M{b:.1f},2 v4" '
                     f'stroke="{_ACC}" fill="none" stroke-width="1.5"/>')
    parts.append(f'<line x1="{x(0.0):.1f}" y1="0" x2="{x(0.0):.1f}" y2="{height}" '
                 f'stroke="#444" stroke-width="0.8"/>')
    title = (f"calibrated [{_num((tensor or {}).get('min'))}, {_num((tensor or {}).get('max'))}]"
             + (f", int8 range {_range(planned)}" if planned else ""))
    parts.append(f"<title>{_e(title)}</title></svg>")
    return "".join(parts)


def to_html(report) -> str:
    body = ["<h1>graphquant conversion report</h1>",
            _html_table(["", ""], [(_e(k), _e(v)) for k, v in _facts(report)])]
    counts = _counts_rows(report)
    if counts:
        body += ["<h2>Compute ops</h2>",
                 _html_table(["op", "int8", "fp32"], [(_e(a), b, c) for a, b, c in counts],
                             numeric=(1, 2))]
    body += [f"<h2>Layer error (SQNR, {len(report.quantized)} int8 layers)</h2>",
             sqnr_chart(report.quantized)]
    rows = []
    for i, q in enumerate(report.quantized):
        own = q.get("own_sqnr_db")
        poor = isinstance(own, (int, float)) and own < SQNR_POOR_DB
        out_t = report.tensors.get(q.get("output_tensor", ""))
        name = f"<code title='{_e(q['node'])}'>{_e(_short(q['node'], 60))}</code>"
        rows.append((str(i + 1), name,
                     _e(q.get("op", "")), _e(_fused(q)), _e(_range(q.get("input_range"))),
                     _e(_range(q.get("output_range"))),
                     range_strip(out_t, q.get("output_range")), _e(_weights(q)),
                     f"<span class={'poor' if poor else 'ok'}>{_db(own)}</span>",
                     _db(q.get("accumulated_sqnr_db"))))
    body += [f"<h2>Quantized layers ({len(report.quantized)})</h2>",
             "<p class=muted>Range strip: the output tensor's calibrated values (histogram when "
             "collected, else the [min, max] bar), the int8 range as an orange bracket, 0 as a "
             "line. Weights: channels, per-channel max |w| min/median/max, integer levels, SQNR "
             "of the int8 weights.</p>",
             _html_table(["#", "node", "op", "int8 op", "input range", "output range",
                          "output values", "weights", "SQNR own dB", "SQNR acc. dB"], rows,
                         numeric=(0, 8, 9))]
    body.append(f"<h2>Left in fp32 ({len(report.fp32)})</h2>")
    body.append(_html_table(["node", "op", "reason"],
                            [(f"<code>{_e(f['node'])}</code>", _e(f["op"]), _e(f["reason"]))
                             for f in report.fp32]) if report.fp32 else "<p>(none)</p>")
    if report.tensors:
        body.append(f"<h2>Calibrated tensors ({len(report.tensors)})</h2>")
        body.append(_html_table(
            ["tensor", "shape", "min", "max", "values", "NaN/Inf", "distribution"],
            [(f"<code>{_e(name)}</code>", _e(t["shape"]), _num(t["min"]), _num(t["max"]),
              f"{t['count']:,}", str(t["nonfinite"]), range_strip(t))
             for name, t in report.tensors.items()], numeric=(2, 3, 4, 5)))
    if report.notes:
        body.append(f"<h2>Notes ({len(report.notes)})</h2><ul>" + "".join(
            f"<li>{_e(n['pass'])}: <code>{_e(n['node'])}</code>: {_e(n['message'])}</li>"
            for n in report.notes) + "</ul>")
    ops = sorted(set(report.ops_before) | set(report.ops_after),
                 key=lambda op: (-report.ops_before.get(op, 0), op))
    body += ["<h2>Op histogram</h2>",
             _html_table(["op", "before", "after"],
                         [(_e(op), report.ops_before.get(op, 0), report.ops_after.get(op, 0))
                          for op in ops], numeric=(1, 2))]
    return ("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            "<title>graphquant conversion report</title>"
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
