"""The QC Secondary Capture series: what a radiologist sees in any viewer, burned into the pixels.

Many PACS and viewers show neither DICOM SEG nor TID 1500 SR; every one shows a Secondary Capture.
The series (same study as the CT, its own series, number 9004) holds

* instance 1, a summary image: the series verdict, the counts, the threshold model name and version,
  the q source, the policy, the list of lesion slices with their verdicts, and a SYNTHETIC banner when
  the data or the model are synthetic;
* instances 2..N+1, one per lesion slice in CT order: the CT image in a lung window (W 1500 / L -600)
  with the AI outline in the verdict's colour and line style (accept: green, solid; review: amber,
  dashed; reject: red, dotted), the verdict word beside the lesion, and a header band with tau, q,
  the band (tau ± m), the verdict, the CT InstanceNumber and z position (the numbering of every output).

Each slice image references its CT image (SourceImageSequence and ReferencedImageSequence); the
summary references every lesion slice's CT image. Pixels are RGB, uncompressed (Explicit VR Little
Endian), at the CT's resolution (small CTs are enlarged by an integer factor so the text stays legible).
Text is drawn with Pillow (matplotlib's dependency) in DejaVu Sans (shipped with matplotlib: it has
τ, ± and −).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from qcgate import __version__
from qcgate.core.results import CaseResult, SliceResult, Verdict
from qcgate.errors import InputError
from qcgate.writers.common import (
    DerivationSources, is_synthetic_case, save_dataset, slice_location, source_headers_for_derivation,
)
from qcgate.writers.contour import all_contours

log = logging.getLogger(__name__)

QC_SC_SERIES_NUMBER = 9004
QC_SC_SERIES_DESCRIPTION = "QC overlay: AI lesion outline by verdict (qcgate)"
MANUFACTURER = "qcgate"
LUNG_WINDOW = (1500.0, -600.0)  # width, level (HU)
MIN_WIDTH = 384  # smaller CTs are enlarged by an integer factor to at least this width
HEADER_HEIGHT = 100  # the band with the burned-in text, above the image

#: sRGB of the outline, chosen to stand out on a grey CT; line style and word make them readable in grey.
VERDICT_RGB: dict[Verdict, tuple[int, int, int]] = {
    Verdict.ACCEPT: (40, 220, 60), Verdict.REVIEW: (255, 176, 0), Verdict.REJECT: (240, 40, 40),
}
#: (dash on, dash off) in pixels along the outline; None: solid.
VERDICT_DASH: dict[Verdict, tuple[int, int] | None] = {
    Verdict.ACCEPT: None, Verdict.REVIEW: (7, 5), Verdict.REJECT: (2, 4),
}
LINE_STYLE_WORDS = {Verdict.ACCEPT: "solid", Verdict.REVIEW: "dashed", Verdict.REJECT: "dotted"}


@functools.lru_cache(maxsize=8)
def _font(size: int, bold: bool = False):  # type: ignore[no-untyped-def]
    from PIL import ImageFont
    import matplotlib

    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    try:
        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name), size)
    except OSError:  # pragma: no cover - matplotlib always ships DejaVu
        return ImageFont.load_default(size)


def lung_window_rgb(image_hu: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray:
    """(rows, cols, 3) uint8: the CT in the lung window; black when there is no pixel data."""
    if image_hu is None:
        return np.zeros((*shape, 3), np.uint8)
    width, level = LUNG_WINDOW
    low = level - width / 2
    grey = ((np.clip(np.asarray(image_hu, np.float32), low, low + width) - low) * (255.0 / width)).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def _densify(line: np.ndarray, step: float = 1.0) -> np.ndarray:
    """Points every ``step`` pixels along a polyline (so dashes have the same length everywhere)."""
    segments = np.diff(line, axis=0)
    lengths = np.hypot(segments[:, 0], segments[:, 1])
    total = float(lengths.sum())
    if total <= 0:
        return line[:1]
    cumulative = np.concatenate([[0.0], np.cumsum(lengths)])
    at = np.arange(0.0, total + step / 2, step)
    return np.stack([np.interp(at, cumulative, line[:, 0]), np.interp(at, cumulative, line[:, 1])], axis=1)


def _draw_outline(draw, mask: np.ndarray, verdict: Verdict, scale: int, top: int) -> None:  # type: ignore[no-untyped-def]
    colour, dash = VERDICT_RGB[verdict], VERDICT_DASH[verdict]
    width = max(2, scale)
    for line in all_contours(mask):
        points = line * scale + np.array([0.0, top])
        if dash is None:
            draw.line([tuple(p) for p in points], fill=colour, width=width, joint="curve")
            continue
        dense = _densify(points)
        on, off = dash
        for start in range(0, len(dense), on + off):
            chunk = dense[start:start + on + 1]
            if len(chunk) >= 2:
                draw.line([tuple(p) for p in chunk], fill=colour, width=width)
            elif len(chunk) == 1:
                x, y = chunk[0]
                draw.ellipse([x - width / 2, y - width / 2, x + width / 2, y + width / 2], fill=colour)


def _fmt(value: float | None) -> str:
    return "unknown" if value is None or value != value else f"{value:.3f}"


def render_slice_image(item: SliceResult, image_hu: np.ndarray | None, *, synthetic: bool) -> np.ndarray:
    """The RGB pixels of one lesion slice's SC image (header band + CT with outline)."""
    from PIL import Image, ImageDraw

    rows, cols = item.ai_mask.shape
    scale = max(1, -(-MIN_WIDTH // cols))
    ct = lung_window_rgb(image_hu, (rows, cols))
    if scale > 1:
        ct = np.repeat(np.repeat(ct, scale, axis=0), scale, axis=1)
    canvas = np.zeros((HEADER_HEIGHT + rows * scale, cols * scale, 3), np.uint8)
    canvas[HEADER_HEIGHT:] = ct
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    _draw_outline(draw, item.ai_mask, item.verdict, scale, HEADER_HEIGHT)

    colour = VERDICT_RGB[item.verdict]
    location = slice_location(item.source_image)
    if item.accept_at is None or item.reject_below is None:
        band = "no band (q unknown)"
    else:
        band = f"band {item.reject_below:.3f} – {'never' if item.accept_at > 1 else f'{item.accept_at:.3f}'}"
    small, big = _font(13), _font(16, bold=True)
    draw.text((8, 6), f"QC  CT {location.label}", font=big, fill=(255, 255, 255))
    draw.text((8, 30), f"τ {item.tau:.3f}   q {_fmt(item.q)}   {band}",
              font=small, fill=(255, 255, 255))
    draw.text((8, 50), "verdict:", font=small, fill=(255, 255, 255))
    draw.text((70, 48), item.verdict.value.upper(), font=big, fill=colour)
    draw.text((8, 76), "AI outline: solid = accept, dashed = review, dotted = reject", font=_font(11), fill=(200, 200, 200))
    if synthetic:
        text = "SYNTHETIC"
        box = draw.textbbox((0, 0), text, font=big)
        x = canvas.shape[1] - (box[2] - box[0]) - 14
        draw.rectangle([x - 6, 48, canvas.shape[1] - 6, 72], fill=(200, 0, 0))
        draw.text((x, 50), text, font=big, fill=(255, 255, 255))
    # the verdict word beside the lesion: readable without colour
    any_rows, any_cols = np.flatnonzero(item.ai_mask.any(axis=1)), np.flatnonzero(item.ai_mask.any(axis=0))
    if any_rows.size:
        x = min(int(any_cols[-1]) * scale + 6, canvas.shape[1] - 64)
        y = max(int(any_rows[0]) * scale + HEADER_HEIGHT - 18, HEADER_HEIGHT + 2)
        word = item.verdict.value.upper()
        box = draw.textbbox((x, y), word, font=small)
        draw.rectangle([box[0] - 2, box[1] - 1, box[2] + 2, box[3] + 1], fill=(0, 0, 0))
        draw.text((x, y), word, font=small, fill=colour)
    return np.asarray(image)


def render_summary_image(result: CaseResult, *, synthetic: bool, width: int = 512, height: int = 512) -> np.ndarray:
    """The RGB pixels of the summary image: verdict, counts, model, q source, slices, SYNTHETIC banner."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    y = 10
    if synthetic:
        draw.rectangle([0, 0, width, 34], fill=(200, 0, 0))
        draw.text((10, 7), "SYNTHETIC data or model - not for clinical use", font=_font(16, bold=True), fill=(255, 255, 255))
        y = 44
    counts = {v: sum(s.verdict is v for s in result.slices) for v in Verdict}
    draw.text((10, y), "qcgate segmentation QC", font=_font(16, bold=True), fill=(255, 255, 255))
    draw.text((10, y + 26), "series verdict:", font=_font(16), fill=(255, 255, 255))
    draw.text((150, y + 20), result.series_verdict.value.upper(), font=_font(26, bold=True), fill=VERDICT_RGB[result.series_verdict])
    y += 62
    small = _font(13)
    lines = [
        f"{len(result.slices)} lesion slice(s): {counts[Verdict.ACCEPT]} accept, {counts[Verdict.REVIEW]} review, "
        f"{counts[Verdict.REJECT]} reject",
        f"threshold model: {result.model_name} {result.model_version}",
        f"q source: {result.q_source}; {result.n_members} ensemble member(s)",
        f"qcgate {__version__}",
    ]
    for line in lines:
        draw.text((10, y), line, font=small, fill=(230, 230, 230))
        y += 19
    y += 4
    for line in _wrap(f"policy: {result.series_policy}", 68):
        draw.text((10, y), line, font=_font(11), fill=(180, 180, 180))
        y += 15
    y += 8
    draw.text((10, y), "slices (CT InstanceNumber, z):", font=small, fill=(230, 230, 230))
    y += 20
    ordered = sorted(result.slices, key=lambda s: s.slice_index)
    room = max((height - y - 10) // 16, 1)
    column_width, columns = width // 2, 2
    shown = ordered[: room * columns]
    for k, item in enumerate(shown):
        x, row = 10 + (k // room) * column_width, y + (k % room) * 16
        draw.text((x, row), f"{slice_location(item.source_image).label}", font=_font(11), fill=(210, 210, 210))
        draw.text((x + 160, row), item.verdict.value, font=_font(11, bold=True), fill=VERDICT_RGB[item.verdict])
    if len(ordered) > len(shown):
        draw.text((10, height - 16), f"... and {len(ordered) - len(shown)} more (one image each in this series)",
                  font=_font(11), fill=(180, 180, 180))
    if not ordered:
        draw.text((10, y), "no lesion was segmented", font=small, fill=(230, 230, 230))
    return np.asarray(image)


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width) or [""]


def _orientation(ds: Dataset) -> tuple[str, str]:
    """PatientOrientation (row direction, column direction) from ImageOrientationPatient; axial default."""
    letters = (("L", "R"), ("P", "A"), ("H", "F"))
    try:
        cosines = [float(v) for v in ds.ImageOrientationPatient]
    except (AttributeError, TypeError, ValueError):
        return ("L", "P")
    found = []
    for vector in (cosines[:3], cosines[3:]):
        axis = int(np.argmax(np.abs(vector)))
        found.append(letters[axis][0] if vector[axis] > 0 else letters[axis][1])
    return (found[0], found[1])


def _reference(ds: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    return item


def _sc(pixels: np.ndarray, ref: Dataset, series_uid: str, series_number: int, instance_number: int,
        description: str, synthetic: bool) -> hd.sc.SCImage:
    # The constructor with the study's values, not from_ref_dataset: that one checks every attribute of
    # the CT header against the IOD (0.3 s per hundred images).
    sc = hd.sc.SCImage(
        pixel_array=np.ascontiguousarray(pixels),
        study_instance_uid=str(ref.StudyInstanceUID),
        patient_id=ref.get("PatientID") or None,
        patient_name=ref.get("PatientName") or None,
        patient_birth_date=ref.get("PatientBirthDate") or None,
        patient_sex=ref.get("PatientSex") or None,
        accession_number=ref.get("AccessionNumber") or None,
        study_id=ref.get("StudyID") or None,
        study_date=ref.get("StudyDate") or None,
        study_time=ref.get("StudyTime") or None,
        referring_physician_name=ref.get("ReferringPhysicianName") or None,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        patient_orientation=_orientation(ref),
        transfer_syntax_uid="1.2.840.10008.1.2.1",
    )
    sc.SeriesDescription = description[:64]
    sc.BurnedInAnnotation = "YES"
    if "Laterality" not in sc:  # type 2C in General Series (dciodvfy asks for it): unpaired or unknown
        sc.Laterality = None
    sc.SoftwareVersions = __version__
    if synthetic:
        sc.ImageComments = "SYNTHETIC source data or threshold model: QC result for a qcgate demo, not for clinical use"
    return sc


def build_qc_sc_series(
    result: CaseResult,
    image_hu: np.ndarray | None = None,
    *,
    series_instance_uid: str | None = None,
    series_number: int = QC_SC_SERIES_NUMBER,
    sources: DerivationSources | None = None,
    model_synthetic: bool = False,
) -> list[hd.sc.SCImage]:
    """The SC series (module docstring): [summary, one image per lesion slice in CT order].

    ``image_hu``: (slices, rows, cols) HU volume in ``result.ct_datasets`` order (the worker's ct.hu);
    without it the slice images have a black background. ``model_synthetic``: the threshold model is
    synthetic (its manifest flag), which puts the SYNTHETIC banner on every image."""
    if not result.ct_datasets:
        raise InputError("QC SC: the case has no source CT datasets")
    ct_sources = sources.ct if sources is not None else source_headers_for_derivation(result.ct_datasets)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in ct_sources}
    synthetic = is_synthetic_case(result, model_synthetic)
    description = ("SYNTHETIC " if synthetic else "") + QC_SC_SERIES_DESCRIPTION
    series_uid = series_instance_uid or generate_uid()
    ordered = sorted(result.slices, key=lambda s: s.slice_index)
    for item in ordered:
        if str(item.source_image.SOPInstanceUID) not in by_uid:
            raise InputError(f"QC SC: slice {item.slice_index} references an image that is not in the CT series")

    first = ct_sources[0]
    summary = _sc(render_summary_image(result, synthetic=synthetic), first, series_uid, series_number, 1, description, synthetic)
    summary.DerivationDescription = "qcgate QC summary of the lesion slices of the referenced CT images"
    if ordered:
        summary.ReferencedImageSequence = [_reference(by_uid[str(s.source_image.SOPInstanceUID)]) for s in ordered]
    images: list[hd.sc.SCImage] = [summary]
    for number, item in enumerate(ordered, start=2):
        source = by_uid[str(item.source_image.SOPInstanceUID)]
        slice_hu = image_hu[item.slice_index] if image_hu is not None else _hu_of(source)
        pixels = render_slice_image(item, slice_hu, synthetic=synthetic)
        sc = _sc(pixels, source, series_uid, series_number, number, description, synthetic)
        sc.SourceImageSequence = [_reference(source)]
        sc.ReferencedImageSequence = [_reference(source)]
        sc.DerivationDescription = (f"CT lung window W {LUNG_WINDOW[0]:.0f} L {LUNG_WINDOW[1]:.0f}, AI outline by "
                                    f"qcgate verdict, text burned in")
        images.append(sc)
    return images


def _hu_of(ds: Dataset) -> np.ndarray | None:
    """HU of one CT header with pixel data (rescale applied), else None."""
    if "PixelData" not in ds:
        return None
    try:
        return ds.pixel_array.astype(np.float32) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    except Exception:  # noqa: BLE001 - a picture without CT beats no picture
        return None


def write_qc_sc_series(result: CaseResult, out_dir: Path, image_hu: np.ndarray | None = None, **kwargs) -> list[Path]:  # type: ignore[no-untyped-def]
    """Write the SC series into ``out_dir`` as qc-sc-0001.dcm (summary), qc-sc-0002.dcm, ...; the paths."""
    paths = [save_dataset(sc, Path(out_dir) / sc_file_name(int(sc.InstanceNumber)))
             for sc in build_qc_sc_series(result, image_hu, **kwargs)]
    log.info("wrote QC SC series of %d image(s) to %s", len(paths), out_dir)
    return paths


def sc_file_name(instance_number: int) -> str:
    return f"qc-sc-{instance_number:04d}.dcm"


def sc_output_kind(instance_number: int) -> str:
    """The Output kind of one SC instance: "sc.<InstanceNumber>" ("sc.1" the summary). Outputs are
    unique per job and kind, so each instance of the series has its own; the object type for routing
    is the part before the dot ("sc")."""
    return f"sc.{instance_number}"


def output_object_type(kind: str) -> str:
    """The routable object type of an Output kind ("sc.3" -> "sc"; "sr" -> "sr")."""
    return kind.split(".", 1)[0]


__all__: Sequence[str] = ("build_qc_sc_series", "write_qc_sc_series", "render_slice_image", "render_summary_image",
                          "sc_output_kind", "output_object_type")
