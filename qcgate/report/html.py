"""A per-case HTML report: study context, what τ, q and the band mean, a legend, tau against q across
slices, a table with the key features, and slice thumbnails with the AI outline and the uncertainty map
(one fixed scale, with its colour bar). Self-contained (images inlined), no patient names. The PDF
(``qcgate.report.pdf``) says the same from the same ``qcgate.report.content``."""

from __future__ import annotations

import base64
import html
import struct
import zlib
from pathlib import Path

import numpy as np

from qcgate.core.results import CaseResult, Verdict
from qcgate.report import content
from qcgate.report.content import COLOURS as _COLOURS

_MAX_THUMBNAILS = content.MAX_THUMBNAILS


def _png_bytes(rgb: np.ndarray) -> bytes:
    """Encode an (h, w, 3) uint8 array as PNG (zlib, no filter): fast enough for a hundred thumbnails."""
    height, width, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[row].tobytes() for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


_STYLE = (
    "body{font-family:sans-serif;margin:1.5em;max-width:1100px;color:#222}"
    "td,th{padding:2px 8px;text-align:right;vertical-align:top}th{background:#eee}"
    "table.ctx td{text-align:left}table.ctx td:first-child{color:#555;white-space:nowrap}"
    "td.kf{text-align:left;font-size:85%;color:#444}"
    ".v{font-weight:bold}figure{display:inline-block;margin:6px;vertical-align:top}figcaption{font-size:85%;max-width:330px}"
    ".banner{background:#c62828;color:#fff;font-weight:bold;padding:6px 12px;font-size:110%}"
    ".explain{background:#f5f7fb;border-left:4px solid #1565c0;padding:6px 12px}"
    "dl.legend{display:grid;grid-template-columns:max-content auto;gap:2px 12px;font-size:90%}dl.legend dt{font-weight:bold}"
    ".bar{display:inline-block;width:160px;height:12px;vertical-align:middle;"
    "background:linear-gradient(to right,#000 0%,#f00 50%,#ff0 100%);border:1px solid #999}"
)


def render_case_report(result: CaseResult, image_hu: np.ndarray | None = None, *, model_synthetic: bool = False,
                       plot_png: bytes | None = None) -> str:
    """The report as one HTML string (see the module docstring); ``plot_png``: the τ/q plot already
    rendered (``content.tau_q_plot_png``, shared with the PDF), else rendered here."""
    esc = html.escape
    counts = {v: sum(s.verdict is v for s in result.slices) for v in Verdict}
    colour = _COLOURS[result.series_verdict]
    ordered = sorted(result.slices, key=lambda s: s.slice_index)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>qcgate QC report</title><style>{_STYLE}</style></head><body>"]
    if content.is_synthetic(result, model_synthetic):
        parts.append("<div class='banner'>SYNTHETIC: the data or the threshold model of this case are synthetic "
                     "(qcgate demo); not for clinical use.</div>")
    parts += [
        f"<h1>Segmentation QC: <span style='color:{colour}'>{result.series_verdict.value.upper()}</span></h1>",
        f"<p>{len(result.slices)} lesion slice(s): {counts[Verdict.ACCEPT]} accepted, {counts[Verdict.REVIEW]} "
        f"need review, {counts[Verdict.REJECT]} rejected. Policy: {esc(result.series_policy)}.</p>",
        "<table class='ctx'>" + "".join(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in content.study_context(result)) + "</table>",
        f"<p class='explain'>{esc(content.EXPLANATION)}</p>",
    ]
    if result.synthetic_model:
        parts.insert(3, f"<p style='color:#b71c1c;font-weight:bold'>SYNTHETIC threshold model "
                        f"{html.escape(result.model_name)} {html.escape(result.model_version)}: trained on generated "
                        "data, for demos and tests only; these verdicts are not for clinical decisions.</p>")
    if result.verdict_rule:
        mae = "" if result.q_validation_mae is None else f" (q validation MAE {result.q_validation_mae:.3f})"
        parts.append(f"<p>Verdict rule{mae}: {html.escape(result.verdict_rule)}.</p>")
    if result.reasons:
        parts.append("<p>Forced to review: " + "; ".join(html.escape(r) for r in result.reasons) + "</p>")
    if result.notes:
        parts.append("<ul>" + "".join(f"<li>{esc(n)}</li>" for n in result.notes) + "</ul>")
    if ordered:
        plot = plot_png if plot_png is not None else content.tau_q_plot_png(result)
        if plot is not None:
            parts.append(f"<img alt='tau, band and q per slice' style='width:640px' src='data:image/png;base64,{_b64(plot)}'>")
        parts.append("<table><tr><th>CT image</th><th>z (mm)</th><th>τ</th><th>q</th><th>band τ ± m</th>"
                     "<th>area mm²</th><th>verdict</th><th style='text-align:left'>key features (moved τ most)</th></tr>")
        for item in ordered:
            label = content.slice_label(item.source_image)
            q = "unknown" if item.q is None or item.q != item.q else f"{item.q:.3f}"
            number = "?" if label.instance_number is None else str(label.instance_number)
            z = "—" if label.z_mm is None else f"{label.z_mm:.1f}"
            parts.append(f"<tr><td>{number}</td><td>{z}</td><td>{item.tau:.3f}</td><td>{q}</td>"
                         f"<td>{content.band_text(item)}</td>"
                         f"<td>{item.lesion_area_mm2:.1f}</td><td class='v' style='color:{_COLOURS[item.verdict]}'>"
                         f"{content.VERDICT_WORDS[item.verdict]}</td><td class='kf'>{esc(content.key_feature_text(item))}</td></tr>")
        parts.append("</table><h2>Lesion slices</h2>")
        has_um = any(item.uncertainty_map is not None for item in ordered)
        if has_um:
            parts.append(f"<p>Uncertainty map scale (all thumbnails): 0 <span class='bar'></span> {content.UM_SCALE_MAX} "
                         "(members' pixel-wise standard deviation)</p>")
        for item in ordered[:_MAX_THUMBNAILS]:
            slice_image = image_hu[item.slice_index] if image_hu is not None else None
            label = content.slice_label(item.source_image)
            png = _png_bytes(content.thumbnail(item, slice_image))
            parts.append(f"<figure><img src='data:image/png;base64,{_b64(png)}'>"
                         f"<figcaption><b>CT {esc(label.text)}</b>: <span style='color:{_COLOURS[item.verdict]}'>"
                         f"{content.VERDICT_WORDS[item.verdict]}</span> (left: CT and AI outline; right: "
                         f"{'uncertainty map' if item.uncertainty_map is not None else 'mask'})</figcaption></figure>")
        if len(ordered) > _MAX_THUMBNAILS:
            parts.append(f"<p>… {len(ordered) - _MAX_THUMBNAILS} more slices in the table above.</p>")
    else:
        parts.append("<p>No lesion was segmented.</p>")
    parts.append("<h2>Legend</h2><dl class='legend'>" + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in content.LEGEND) + "</dl>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_case_report(result: CaseResult, out_path: Path, image_hu: np.ndarray | None = None, *,
                      model_synthetic: bool = False, plot_png: bytes | None = None) -> Path:
    """Write the report for ``result``; ``image_hu`` (slices, rows, cols) adds CT under the outlines;
    ``model_synthetic``: the threshold model is synthetic (SYNTHETIC banner)."""
    out_path.write_text(render_case_report(result, image_hu, model_synthetic=model_synthetic, plot_png=plot_png), encoding="utf-8")
    return out_path
