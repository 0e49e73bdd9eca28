"""The report as a PDF (fpdf2): the same content as the HTML report (``qcgate.report.content``), laid
out for A4, to be encapsulated in DICOM (``qcgate.writers.pdf``) so that any PACS shows it.

Why fpdf2: pure Python (no system libraries, unlike weasyprint's pango), maintained (2.8, 2025), draws
Unicode text with an embedded, subset TrueType font (DejaVu Sans from matplotlib: τ, ±, −), and was the
fastest of those tried for a hundred thumbnails (BENCHMARKS.md, "Viewer outputs").
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from qcgate.core.results import CaseResult, Verdict
from qcgate.report import content

_MARGIN_MM = 12.0
_THUMB_WIDTH_MM = 88.0


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    return tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


def _font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def _image(rgb: np.ndarray):  # type: ignore[no-untyped-def]
    from PIL import Image

    return Image.fromarray(np.ascontiguousarray(rgb))


def render_case_pdf(result: CaseResult, image_hu: np.ndarray | None = None, *, model_synthetic: bool = False,
                    plot_png: bytes | None = None) -> bytes:
    """The report as PDF bytes (A4 portrait); ``plot_png`` as for the HTML report (rendered once per job)."""
    from fpdf import FPDF

    pdf = FPDF(orientation="P", unit="mm", format="A4")
    pdf.set_margins(_MARGIN_MM, _MARGIN_MM, _MARGIN_MM)
    pdf.set_auto_page_break(True, margin=_MARGIN_MM)
    pdf.set_title("qcgate QC report")
    pdf.set_creator("qcgate")
    # Thumbnails as JPEG (DCTDecode): Flate-compressing a hundred of them was a fifth of the time.
    pdf.set_image_filter("DCTDecode")
    fonts = _font_dir()
    pdf.add_font("dejavu", "", str(fonts / "DejaVuSans.ttf"))
    pdf.add_font("dejavu", "B", str(fonts / "DejaVuSans-Bold.ttf"))
    synthetic = content.is_synthetic(result, model_synthetic)

    def footer_banner() -> None:
        if synthetic:
            pdf.set_fill_color(198, 40, 40)
            pdf.set_text_color(255, 255, 255)
            pdf.set_font("dejavu", "B", 10)
            pdf.multi_cell(0, 6, "SYNTHETIC: the data or the threshold model of this case are synthetic "
                           "(qcgate demo); not for clinical use.", fill=True, new_x="LMARGIN", new_y="NEXT")
            pdf.set_text_color(0, 0, 0)
            pdf.ln(2)

    pdf.add_page()
    footer_banner()
    counts = {v: sum(s.verdict is v for s in result.slices) for v in Verdict}
    pdf.set_font("dejavu", "B", 16)
    pdf.cell(pdf.get_string_width("Segmentation QC: ") + 1, 9, "Segmentation QC: ")
    pdf.set_text_color(*_rgb(content.COLOURS[result.series_verdict]))
    pdf.cell(0, 9, result.series_verdict.value.upper(), new_x="LMARGIN", new_y="NEXT")
    pdf.set_text_color(0, 0, 0)
    pdf.set_font("dejavu", "", 9)
    pdf.multi_cell(0, 4.5, f"{len(result.slices)} lesion slice(s): {counts[Verdict.ACCEPT]} accepted, "
                   f"{counts[Verdict.REVIEW]} need review, {counts[Verdict.REJECT]} rejected. Policy: {result.series_policy}.",
                   new_x="LMARGIN", new_y="NEXT")
    pdf.ln(1)
    for label, value in content.study_context(result):
        pdf.set_font("dejavu", "B", 8)
        pdf.cell(42, 4.2, label)
        pdf.set_font("dejavu", "", 8)
        pdf.multi_cell(0, 4.2, value, new_x="LMARGIN", new_y="NEXT")
    pdf.ln(2)
    pdf.set_fill_color(240, 243, 250)
    pdf.set_font("dejavu", "", 8.5)
    pdf.multi_cell(0, 4.5, content.EXPLANATION, fill=True, new_x="LMARGIN", new_y="NEXT")
    for note in result.notes:
        pdf.multi_cell(0, 4.2, f"• {note}", new_x="LMARGIN", new_y="NEXT")
    pdf.ln(2)

    ordered = sorted(result.slices, key=lambda s: s.slice_index)
    if not ordered:
        pdf.set_font("dejavu", "", 10)
        pdf.cell(0, 6, "No lesion was segmented.", new_x="LMARGIN", new_y="NEXT")
    else:
        plot = plot_png if plot_png is not None else content.tau_q_plot_png(result)
        if plot is not None:
            pdf.image(io.BytesIO(plot), w=150)
            pdf.ln(1)
        _slice_table(pdf, ordered)
        _thumbnails(pdf, ordered, image_hu)
    _legend(pdf)
    return bytes(pdf.output())


def _slice_table(pdf, ordered) -> None:  # type: ignore[no-untyped-def]
    widths = (16, 16, 14, 14, 28, 16, 20, 62)
    headers = ("CT image", "z (mm)", "τ", "q", "band τ ± m", "area mm²", "verdict", "key features (moved τ most)")

    def header() -> None:
        pdf.set_font("dejavu", "B", 7.5)
        pdf.set_fill_color(230, 230, 230)
        for width, text in zip(widths, headers):
            pdf.cell(width, 5, text, border=1, fill=True)
        pdf.ln()

    header()
    pdf.set_font("dejavu", "", 7)
    for item in ordered:
        if pdf.will_page_break(4.5):
            pdf.add_page()
            header()
            pdf.set_font("dejavu", "", 7)
        label = content.slice_label(item.source_image)
        q = "unknown" if item.q is None or item.q != item.q else f"{item.q:.3f}"
        cells = ("?" if label.instance_number is None else str(label.instance_number),
                 "—" if label.z_mm is None else f"{label.z_mm:.1f}", f"{item.tau:.3f}", q,
                 content.band_text(item), f"{item.lesion_area_mm2:.1f}")
        for width, text in zip(widths, cells):
            pdf.cell(width, 4.5, text, border=1, align="R")
        pdf.set_text_color(*_rgb(content.COLOURS[item.verdict]))
        pdf.cell(widths[6], 4.5, content.VERDICT_WORDS[item.verdict], border=1)
        pdf.set_text_color(0, 0, 0)
        text = content.key_feature_text(item)
        while text and pdf.get_string_width(text) > widths[7] - 2:
            text = text[:-2]
        pdf.cell(widths[7], 4.5, text if text == content.key_feature_text(item) else text + "…", border=1)
        pdf.ln()
    pdf.ln(3)


def _thumbnails(pdf, ordered, image_hu) -> None:  # type: ignore[no-untyped-def]
    pdf.set_font("dejavu", "B", 11)
    pdf.cell(0, 6, "Lesion slices", new_x="LMARGIN", new_y="NEXT")
    if any(item.uncertainty_map is not None for item in ordered):
        pdf.set_font("dejavu", "", 8)
        text = "Uncertainty map scale (all thumbnails): 0 "
        pdf.cell(pdf.get_string_width(text) + 1, 5, text)
        pdf.image(_image(content.colour_bar()), x=pdf.get_x(), y=pdf.get_y() + 1, w=40, h=3)
        pdf.set_x(pdf.get_x() + 41)
        pdf.cell(0, 5, f" {content.UM_SCALE_MAX} (members' pixel-wise SD)", new_x="LMARGIN", new_y="NEXT")
    column = 0
    row_top = pdf.get_y()
    row_height = 0.0
    for item in ordered[:content.MAX_THUMBNAILS]:
        slice_image = image_hu[item.slice_index] if image_hu is not None else None
        rgb = content.thumbnail(item, slice_image)
        height = _THUMB_WIDTH_MM * rgb.shape[0] / rgb.shape[1]
        block = height + 9
        if column == 0 and pdf.will_page_break(block):
            pdf.add_page()
            row_top = pdf.get_y()
        x = _MARGIN_MM + column * (_THUMB_WIDTH_MM + 6)
        pdf.image(_image(rgb), x=x, y=row_top, w=_THUMB_WIDTH_MM, h=height)
        label = content.slice_label(item.source_image)
        pdf.set_xy(x, row_top + height + 0.5)
        pdf.set_font("dejavu", "B", 7.5)
        pdf.cell(40, 4, f"CT {label.text}")
        pdf.set_text_color(*_rgb(content.COLOURS[item.verdict]))
        pdf.cell(30, 4, content.VERDICT_WORDS[item.verdict])
        pdf.set_text_color(0, 0, 0)
        pdf.set_xy(x, row_top + height + 4.5)
        pdf.set_font("dejavu", "", 6.5)
        pdf.cell(_THUMB_WIDTH_MM, 3.5, f"τ {item.tau:.3f}, q {'unknown' if item.q is None else f'{item.q:.3f}'}; "
                 f"left CT + AI outline, right {'uncertainty map' if item.uncertainty_map is not None else 'mask'}")
        row_height = max(row_height, block)
        column += 1
        if column == 2:
            column, row_top, row_height = 0, row_top + row_height + 2, 0.0
            pdf.set_xy(_MARGIN_MM, row_top)
    if column:
        pdf.set_xy(_MARGIN_MM, row_top + row_height + 2)
    if len(ordered) > content.MAX_THUMBNAILS:
        pdf.set_font("dejavu", "", 8)
        pdf.cell(0, 5, f"… {len(ordered) - content.MAX_THUMBNAILS} more slices in the table above.", new_x="LMARGIN", new_y="NEXT")
    pdf.ln(2)


def _legend(pdf) -> None:  # type: ignore[no-untyped-def]
    if pdf.will_page_break(60):
        pdf.add_page()
    pdf.set_font("dejavu", "B", 11)
    pdf.cell(0, 6, "Legend", new_x="LMARGIN", new_y="NEXT")
    for key, text in content.LEGEND:
        pdf.set_font("dejavu", "B", 8)
        pdf.cell(30, 4.3, key)
        pdf.set_font("dejavu", "", 8)
        pdf.multi_cell(0, 4.3, text, new_x="LMARGIN", new_y="NEXT")
