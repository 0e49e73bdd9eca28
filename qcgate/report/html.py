"""A per-case HTML report: slice thumbnails with the AI outline and the uncertainty map, the verdict
per slice, and tau against q across slices. Self-contained (images inlined), no patient names."""

from __future__ import annotations

import base64
import html
import io
import struct
import zlib
from pathlib import Path

import numpy as np

from qcgate.core.results import CaseResult, SliceResult, Verdict

_COLOURS = {Verdict.ACCEPT: "#2e7d32", Verdict.REVIEW: "#f9a825", Verdict.REJECT: "#c62828"}
_MAX_THUMBNAILS = 120


def _png(figure) -> str:  # type: ignore[no-untyped-def]
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _png_bytes(rgb: np.ndarray) -> bytes:
    """Encode an (h, w, 3) uint8 array as PNG (zlib, no filter): fast enough for a hundred thumbnails."""
    height, width, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[row].tobytes() for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it."""
    padded = np.pad(mask, 1)
    interior = padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def _thumbnail(item: SliceResult, image_hu: np.ndarray | None) -> str:
    """Two panels side by side: CT (lung window) with the AI outline in the verdict's colour, and
    the uncertainty map (or the mask when there is none), each a lesion-centred crop scaled ×2."""
    rows, cols = np.nonzero(item.ai_mask)
    pad = 24
    r0, r1 = max(int(rows.min()) - pad, 0), min(int(rows.max()) + pad + 1, item.ai_mask.shape[0])
    c0, c1 = max(int(cols.min()) - pad, 0), min(int(cols.max()) + pad + 1, item.ai_mask.shape[1])
    mask = item.ai_mask[r0:r1, c0:c1]
    if image_hu is not None:
        grey = ((np.clip(image_hu[r0:r1, c0:c1], -1350, 150) + 1350) / 1500 * 255).astype(np.uint8)
    else:
        grey = np.where(mask, 160, 40).astype(np.uint8)
    left = np.repeat(grey[..., None], 3, axis=2)
    colour = np.array([int(_COLOURS[item.verdict][i:i + 2], 16) for i in (1, 3, 5)], np.uint8)
    left[_outline(mask)] = colour
    if item.uncertainty_map is not None:
        um = item.uncertainty_map[r0:r1, c0:c1]
        scaled = np.clip(um / max(float(um.max()), 1e-6), 0, 1)
        # black -> red -> yellow, a simple "hot" map
        right = np.stack([np.clip(scaled * 2, 0, 1), np.clip(scaled * 2 - 1, 0, 1), np.zeros_like(scaled)], axis=2)
        right = (right * 255).astype(np.uint8)
    else:
        right = np.repeat(np.where(mask, 200, 30).astype(np.uint8)[..., None], 3, axis=2)
    gap = np.full((mask.shape[0], 4, 3), 255, np.uint8)
    panel = np.concatenate([left, gap, right], axis=1)
    panel = np.repeat(np.repeat(panel, 2, axis=0), 2, axis=1)
    return base64.b64encode(_png_bytes(np.ascontiguousarray(panel))).decode("ascii")


def _tau_q_plot(result: CaseResult) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 2.6))
    index = [s.slice_index for s in result.slices]
    tau = np.array([s.tau for s in result.slices])
    # The band: accept at or above tau + m_accept, reject below tau - m_reject (infinite = never).
    upper = np.array([np.nan if s.margin is None else s.margin for s in result.slices], dtype=float)
    lower = np.array([np.nan if (m := s.margin if s.margin_reject is None else s.margin_reject) is None else m
                      for s in result.slices], dtype=float)
    axis.plot(index, tau, "-", color="#1565c0", label="τ (image-specific threshold)")
    axis.fill_between(index, np.clip(tau - lower, -0.02, 1.02), np.clip(tau + upper, -0.02, 1.02), color="#1565c0",
                      alpha=0.15, label="review band")
    for item in result.slices:
        if item.q is not None:
            axis.plot(item.slice_index, item.q, "o", color=_COLOURS[item.verdict], markersize=4)
    axis.set_xlabel("slice index")
    axis.set_ylabel("Dice")
    axis.set_ylim(0, 1.02)
    axis.legend(fontsize=7, loc="lower left")
    encoded = _png(figure)
    plt.close(figure)
    return encoded


def _band_text(item) -> str:
    def fmt(value) -> str:
        return "never" if value is None or not np.isfinite(value) else f"{value:+.3f}"
    reject = item.margin if item.margin_reject is None else item.margin_reject
    return f"{fmt(item.margin)} / {fmt(reject)}"


def write_case_report(result: CaseResult, out_path: Path, image_hu: np.ndarray | None = None) -> Path:
    """Write the report for ``result``; ``image_hu`` (slices, rows, cols) adds CT under the outlines."""
    counts = {v: sum(s.verdict is v for s in result.slices) for v in Verdict}
    colour = _COLOURS[result.series_verdict]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>qcgate QC report</title>",
        "<style>body{font-family:sans-serif;margin:1.5em}td,th{padding:2px 8px;text-align:right}"
        ".v{font-weight:bold}figure{display:inline-block;margin:4px}</style></head><body>",
        f"<h1>Segmentation QC: <span style='color:{colour}'>{result.series_verdict.value.upper()}</span></h1>",
        f"<p>Series {html.escape(str(result.ct_datasets[0].SeriesInstanceUID))}: {len(result.slices)} lesion slices, "
        f"{counts[Verdict.ACCEPT]} accepted, {counts[Verdict.REVIEW]} to review, {counts[Verdict.REJECT]} rejected.</p>",
        f"<p>Policy: {html.escape(result.series_policy)}.<br>Threshold model: {html.escape(result.model_name)} "
        f"{html.escape(result.model_version)}; quality source: {html.escape(result.q_source)}; "
        f"{result.n_members} ensemble member(s); uncertainty map {'used' if result.uses_uncertainty else 'not used'}.</p>",
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
        parts.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in result.notes) + "</ul>")
    if result.slices:
        parts.append(f"<img alt='tau and q per slice' src='data:image/png;base64,{_tau_q_plot(result)}'>")
        parts.append("<table><tr><th>slice</th><th>τ</th><th>q</th><th>band (accept ≥ τ+, reject < τ−)</th><th>area mm²</th><th>verdict</th></tr>")
        for item in result.slices:
            q = "—" if item.q is None else f"{item.q:.3f}"
            parts.append(f"<tr><td>{item.slice_index}</td><td>{item.tau:.3f}</td><td>{q}</td><td>{_band_text(item)}</td>"
                         f"<td>{item.lesion_area_mm2:.1f}</td><td class='v' style='color:{_COLOURS[item.verdict]}'>{item.verdict.value}</td></tr>")
        parts.append("</table><h2>Lesion slices</h2>")
        for item in result.slices[:_MAX_THUMBNAILS]:
            slice_image = image_hu[item.slice_index] if image_hu is not None else None
            parts.append(f"<figure><img src='data:image/png;base64,{_thumbnail(item, slice_image)}'>"
                         f"<figcaption>slice {item.slice_index}: {item.verdict.value} (left: CT and AI outline; "
                         f"right: {'uncertainty map' if item.uncertainty_map is not None else 'mask'})</figcaption></figure>")
        if len(result.slices) > _MAX_THUMBNAILS:
            parts.append(f"<p>… {len(result.slices) - _MAX_THUMBNAILS} more slices in the table above.</p>")
    else:
        parts.append("<p>No lesion was segmented.</p>")
    parts.append("</body></html>")
    out_path.write_text("\n".join(parts), encoding="utf-8")
    return out_path
