"""A per-case HTML report: slice thumbnails with the AI outline and the uncertainty map, the verdict
per slice, and tau against q across slices. Self-contained (images inlined), no patient names."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np

from qcgate.pipeline.results import CaseResult, SliceResult, Verdict

_COLOURS = {Verdict.ACCEPT: "#2e7d32", Verdict.REVIEW: "#f9a825", Verdict.REJECT: "#c62828"}
_MAX_THUMBNAILS = 60


def _png(figure) -> str:  # type: ignore[no-untyped-def]
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _thumbnail(item: SliceResult, image_hu: np.ndarray | None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = np.nonzero(item.ai_mask)
    pad = 24
    r0, r1 = max(rows.min() - pad, 0), min(rows.max() + pad + 1, item.ai_mask.shape[0])
    c0, c1 = max(cols.min() - pad, 0), min(cols.max() + pad + 1, item.ai_mask.shape[1])
    figure, axes = plt.subplots(1, 2, figsize=(4.2, 2.2))
    if image_hu is not None:
        axes[0].imshow(np.clip(image_hu[r0:r1, c0:c1], -1350, 150), cmap="gray")
    axes[0].contour(item.ai_mask[r0:r1, c0:c1], levels=[0.5], colors=[_COLOURS[item.verdict]], linewidths=1.2)
    axes[0].set_title("AI segmentation", fontsize=8)
    uncertainty = item.uncertainty_map[r0:r1, c0:c1] if item.uncertainty_map is not None else None
    if uncertainty is not None:
        axes[1].imshow(uncertainty, cmap="magma")
    else:
        axes[1].imshow(item.ai_mask[r0:r1, c0:c1], cmap="gray")
    axes[1].set_title("uncertainty map" if uncertainty is not None else "mask (no uncertainty map)", fontsize=8)
    for axis in axes:
        axis.set_axis_off()
    encoded = _png(figure)
    plt.close(figure)
    return encoded


def _tau_q_plot(result: CaseResult) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 2.6))
    index = [s.slice_index for s in result.slices]
    tau = np.array([s.tau for s in result.slices])
    margin = np.array([s.margin for s in result.slices])
    axis.plot(index, tau, "-", color="#1565c0", label="τ (image-specific threshold)")
    axis.fill_between(index, tau - margin, tau + margin, color="#1565c0", alpha=0.15, label="τ ± margin")
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
    if result.notes:
        parts.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in result.notes) + "</ul>")
    if result.slices:
        parts.append(f"<img alt='tau and q per slice' src='data:image/png;base64,{_tau_q_plot(result)}'>")
        parts.append("<table><tr><th>slice</th><th>τ</th><th>q</th><th>margin</th><th>area mm²</th><th>verdict</th></tr>")
        for item in result.slices:
            q = "—" if item.q is None else f"{item.q:.3f}"
            parts.append(f"<tr><td>{item.slice_index}</td><td>{item.tau:.3f}</td><td>{q}</td><td>{item.margin:.3f}</td>"
                         f"<td>{item.lesion_area_mm2:.1f}</td><td class='v' style='color:{_COLOURS[item.verdict]}'>{item.verdict.value}</td></tr>")
        parts.append("</table><h2>Lesion slices</h2>")
        for item in result.slices[:_MAX_THUMBNAILS]:
            slice_image = image_hu[item.slice_index] if image_hu is not None else None
            parts.append(f"<figure><img src='data:image/png;base64,{_thumbnail(item, slice_image)}'>"
                         f"<figcaption>slice {item.slice_index}: {item.verdict.value}</figcaption></figure>")
        if len(result.slices) > _MAX_THUMBNAILS:
            parts.append(f"<p>… {len(result.slices) - _MAX_THUMBNAILS} more slices in the table above.</p>")
    else:
        parts.append("<p>No lesion was segmented.</p>")
    parts.append("</body></html>")
    out_path.write_text("\n".join(parts), encoding="utf-8")
    return out_path
