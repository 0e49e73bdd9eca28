"""The QC SEG: a BINARY DICOM Segmentation on the source CT grid that shows the verdict in colour.

Up to three segments, in this order and numbered consecutively from 1 among those present:
"Lesion - QC accepted" (green), "Lesion - QC review" (yellow), "Lesion - QC rejected" (red). Each
lesion slice's AI mask goes, on its source CT image, into the segment of its verdict. Segments with no
pixel are omitted, and so are empty frames (highdicom's default).

Memory and time follow the lesion, not the series: the pixel array holds only the slices with a lesion
pixel (frames x rows x cols, uint8 segment numbers: the segments never overlap); highdicom is given
those images only, and every CT image of the series is then referenced as before (Source Image
Sequence, Referenced Series Sequence, in the series' sorted order).

Choices
-------
* Labels use an ASCII hyphen, not the en dash of DESIGN §2: the source CTs are mostly ISO_IR 100
  (Latin-1), which has no en dash, and highdicom keeps the source's character set.
* No lesion pixel at all (a valid "no lesion" case): a SEG needs at least one segment and highdicom
  refuses a SEG without frames, and an all-empty segment would show nothing anyway. So there is no QC
  SEG: ``write_qc_seg`` raises ``NoLesionError`` and the SR alone carries the result. Callers ask
  ``has_lesion_pixels(result)`` first.
* Anonymised real CTs often lack type 2 patient/study attributes highdicom copies into the SEG; they
  are added empty on a copy of each header (the caller's datasets are never modified).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from pydicom.valuerep import format_number_as_ds

from qcgate import __version__
from qcgate.core.results import CaseResult, Verdict
from qcgate.errors import InputError
from qcgate.writers import codes as qc_codes
from qcgate.writers.common import (
    DerivationSources,
    is_synthetic_source,
    save_dataset,
    source_headers_for_derivation,
)

log = logging.getLogger(__name__)

QC_SEG_SERIES_NUMBER = 9001
QC_SEG_SERIES_DESCRIPTION = "QC result: AI lesion segmentation by verdict (qcgate)"
MANUFACTURER = "qcgate"


class NoLesionError(InputError):
    """The case has no lesion pixel, so there is nothing a QC SEG could show (the SR still is written)."""


@dataclass(frozen=True)
class VerdictSegmentStyle:
    """How one verdict appears in the QC SEG."""

    label: str
    display_color: tuple[float, float, float]  # CIELab (L*, a*, b*)
    tracking_id: str


#: sRGB green / yellow / red converted to CIELab (D65), so every viewer shows the verdict the same way.
VERDICT_SEGMENT_STYLES: dict[Verdict, VerdictSegmentStyle] = {
    Verdict.ACCEPT: VerdictSegmentStyle("Lesion - QC accepted", (87.74, -86.18, 83.18), "QC accepted lesion"),
    Verdict.REVIEW: VerdictSegmentStyle("Lesion - QC review", (97.14, -21.56, 94.48), "QC review lesion"),
    Verdict.REJECT: VerdictSegmentStyle("Lesion - QC rejected", (53.24, 80.09, 67.20), "QC rejected lesion"),
}


def has_lesion_pixels(result: CaseResult) -> bool:
    """Whether any lesion slice has a non-empty AI mask, i.e. whether a QC SEG can be written."""
    return any(bool(np.any(item.ai_mask)) for item in result.slices)


def qc_algorithm_identification(result: CaseResult) -> hd.AlgorithmIdentificationSequence:
    """qcgate as the algorithm, with the threshold model and the q source as parameters."""
    return hd.AlgorithmIdentificationSequence(
        name="qcgate",
        family=codes.cid7162.ArtificialIntelligence,
        version=__version__,
        source="qcgate quality gate",
        parameters={
            "threshold_model": f"{result.model_name} {result.model_version}"[:64],
            "q_source": result.q_source,
            "ensemble_members": str(result.n_members),
        },
    )


def _verdict_planes(result: CaseResult, sorted_uids: list[str], shape: tuple[int, int]) -> dict[str, dict[Verdict, np.ndarray]]:
    """Source image UID -> verdict -> (rows, cols) boolean plane, for the slices with a lesion pixel only
    (memory follows the lesion, not the series)."""
    known = set(sorted_uids)
    planes: dict[str, dict[Verdict, np.ndarray]] = {}
    for item in result.slices:
        uid = str(item.source_image.SOPInstanceUID)
        if uid not in known:
            raise InputError(f"QC SEG: slice {item.slice_index} references an image that is not in the CT series")
        mask = np.asarray(item.ai_mask, dtype=bool)
        if mask.shape != shape:
            raise InputError(f"QC SEG: mask of slice {item.slice_index} has shape {mask.shape}, the CT has {shape}")
        if not mask.any():
            continue  # highdicom would omit its frames anyway
        by_verdict = planes.setdefault(uid, {})
        if item.verdict in by_verdict:
            by_verdict[item.verdict] = by_verdict[item.verdict] | mask
        else:
            by_verdict[item.verdict] = mask
    return planes


def _reference_all_sources(seg: hd.seg.Segmentation, sorted_sources: list[Dataset]) -> None:
    """Reference every CT image of the series, in its sorted order, as highdicom does for its
    ``source_images`` (Source Image Sequence; Referenced Series Sequence per series): the SEG is
    built from the occupied images only, and the images without a frame must still be listed."""
    references: list[Dataset] = []
    by_series: dict[str, list[Dataset]] = {}
    for ds in sorted_sources:
        reference = Dataset()
        reference.ReferencedSOPClassUID = ds.SOPClassUID
        reference.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        references.append(reference)
        by_series.setdefault(str(ds.SeriesInstanceUID), []).append(reference)
    seg.SourceImageSequence = references
    series_items: list[Dataset] = []
    for series_uid, instances in by_series.items():
        item = Dataset()
        item.SeriesInstanceUID = series_uid
        item.ReferencedInstanceSequence = instances
        series_items.append(item)
    seg.ReferencedSeriesSequence = series_items


def _series_pixel_measures(sorted_sources: list[Dataset]) -> hd.PixelMeasuresSequence:
    """The Pixel Measures highdicom derives when every CT image is a source: spacing and thickness of
    the first image, and Spacing Between Slices from the first image or, without it, from the
    positions of the whole series when they are regularly spaced (``get_volume_positions``).

    Given only the occupied images, highdicom would infer the spacing from those and leave it out
    when the lesion slices have a gap; the receiver needs the series' spacing to place the frames."""
    first = sorted_sources[0]
    measures = hd.PixelMeasuresSequence(pixel_spacing=first.PixelSpacing, slice_thickness=first.SliceThickness,
                                        spacing_between_slices=first.get("SpacingBetweenSlices", None))
    if "SpacingBetweenSlices" not in measures[0]:
        spacing, _ = hd.spatial.get_volume_positions(
            image_positions=[ds.ImagePositionPatient for ds in sorted_sources],
            image_orientation=first.ImageOrientationPatient,
        )
        if spacing is not None:
            measures[0].SpacingBetweenSlices = format_number_as_ds(spacing)
    return measures


def _frame_stack(occupied: list[Dataset], planes: dict[str, dict[Verdict, np.ndarray]], ordered: list[Verdict],
                 shape: tuple[int, int]) -> np.ndarray:
    """The pixel array for highdicom, occupied slices only (segment number s = ordered[s - 1]).

    Segments that never overlap (the rule: one verdict per slice) go as one label-map style
    (frames, rows, cols) uint8 array of segment numbers: a third of the stacked array's memory, and
    highdicom skips its overlap check; an overlap (two results on one image) needs the stacked
    (frames, rows, cols, segments) array. highdicom writes the same BINARY frames from either."""
    overlap = any(np.any(np.sum(list(by_verdict.values()), axis=0) > 1)
                  for by_verdict in (planes[str(ds.SOPInstanceUID)] for ds in occupied) if len(by_verdict) > 1)
    number_of = {verdict: number for number, verdict in enumerate(ordered, start=1)}
    if overlap:
        stack = np.zeros((len(occupied), *shape, len(ordered)), dtype=np.uint8)
    else:
        stack = np.zeros((len(occupied), *shape), dtype=np.uint8)
    for frame, ds in enumerate(occupied):
        for verdict, plane in planes[str(ds.SOPInstanceUID)].items():
            if overlap:
                stack[frame, :, :, number_of[verdict] - 1] = plane
            else:
                stack[frame][plane] = number_of[verdict]
    return stack


def build_qc_seg(
    result: CaseResult,
    *,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    series_number: int = QC_SEG_SERIES_NUMBER,
    sources: DerivationSources | None = None,
) -> hd.seg.Segmentation:
    """The QC SEG as a highdicom dataset (see the module docstring); ``write_qc_seg`` saves it.

    ``sources``: the headers prepared once per job (``prepare_derivation_sources``); else prepared here."""
    if not result.ct_datasets:
        raise InputError("QC SEG: the case has no source CT datasets")
    if not has_lesion_pixels(result):
        raise NoLesionError("QC SEG: no lesion pixel in any slice; the SR alone reports this case")

    prepared = sources.ct if sources is not None else source_headers_for_derivation(result.ct_datasets)
    # highdicom requires pixel_array[i] to belong to source_images[i]: sort once and follow the order.
    sorted_sources = hd.spatial.sort_datasets(prepared)
    sorted_uids = [str(ds.SOPInstanceUID) for ds in sorted_sources]
    shape = (int(sorted_sources[0].Rows), int(sorted_sources[0].Columns))
    planes = _verdict_planes(result, sorted_uids, shape)
    # Frames only from the source images that hold a lesion pixel (the others are referenced after),
    # so a 1,000-slice series costs what its lesion slices cost.
    occupied = [ds for ds in sorted_sources if str(ds.SOPInstanceUID) in planes]
    present = {verdict for by_verdict in planes.values() for verdict in by_verdict}

    algorithm = qc_algorithm_identification(result)
    descriptions: list[hd.seg.SegmentDescription] = []
    ordered: list[Verdict] = []
    for verdict in (Verdict.ACCEPT, Verdict.REVIEW, Verdict.REJECT):
        if verdict not in present:
            continue  # an empty segment would only clutter the viewer's segment list
        style = VERDICT_SEGMENT_STYLES[verdict]
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=len(descriptions) + 1,
            segment_label=style.label,
            segmented_property_category=qc_codes.LESION_CATEGORY,
            segmented_property_type=qc_codes.LESION_TYPE,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=generate_uid(),
            tracking_id=style.tracking_id,
            display_color=hd.color.CIELabColor(*style.display_color),
        ))
        ordered.append(verdict)
    pixel_array = _frame_stack(occupied, planes, ordered, shape)

    synthetic = is_synthetic_source(sorted_sources) or result.synthetic_model
    description = ("SYNTHETIC " if synthetic else "") + QC_SEG_SERIES_DESCRIPTION
    seg = hd.seg.Segmentation(
        source_images=occupied,
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_instance_uid or generate_uid(),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name="qcgate",
        software_versions=__version__,
        device_serial_number="0",
        content_description=(f"QC verdicts, {'SYNTHETIC ' if result.synthetic_model else ''}threshold model "
                             f"{result.model_name} {result.model_version}")[:64],
        content_label="QC_VERDICT",
        content_creator_name=None,
        omit_empty_frames=True,
    )
    _reference_all_sources(seg, sorted_sources)
    seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence = _series_pixel_measures(sorted_sources)
    seg.SeriesDescription = description[:64]
    label_synthetic(seg, result, synthetic)
    return seg


def label_synthetic(seg: Dataset, result: CaseResult, synthetic_source: bool) -> None:
    """Say in Image Comments when a SYNTHETIC model made the verdicts or the source is a phantom."""
    if result.synthetic_model:
        seg.ImageComments = (f"SYNTHETIC threshold model {result.model_name} {result.model_version}: trained on "
                             "generated data; these verdicts are not for clinical decisions")
    elif synthetic_source:
        seg.ImageComments = "SYNTHETIC source data: QC result for a qcgate phantom, not a patient"


def write_qc_seg(result: CaseResult, out_path: Path) -> Path:
    """Write the QC SEG of ``result`` to ``out_path`` and return the path.

    Raises NoLesionError when no slice has a lesion pixel (then only the SR is written) and
    InputError when a slice references an image outside ``result.ct_datasets`` or has a mask of the
    wrong shape.
    """
    seg = build_qc_seg(result)
    out_path = save_dataset(seg, out_path)
    log.info("wrote QC SEG with %d segment(s), %d frame(s) to %s", len(seg.SegmentSequence),
             int(seg.NumberOfFrames), out_path)
    return out_path
