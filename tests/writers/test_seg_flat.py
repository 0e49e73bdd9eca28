"""The QC SEG built from the occupied source images only is the SEG built from the whole series.

The reference below is the former writer (every CT image a highdicom source, one stacked
(slices, rows, cols, segments) array, empty frames dropped by highdicom): the two must give the
same header (but for creation times and tracking UIDs), the same frames and the same pixels,
both with segments that never overlap (the label-map path) and with an overlap (the stacked path).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from qcgate.core.results import CaseResult, Verdict
from qcgate.writers import seg as seg_writer
from qcgate.writers.common import save_dataset, source_headers_for_derivation
from qcgate.writers.validate import dciodvfy_errors
from tests.writers.conftest import SYNTHETIC_LESION_SLICES, WriterCase, build_case

#: Differ by construction between two builds of one result (times, generated UIDs).
_UNSTABLE = {"ContentDate", "ContentTime", "InstanceCreationDate", "InstanceCreationTime", "SeriesDate",
             "SeriesTime", "ContributionDateTime", "TrackingUID", "DimensionOrganizationUID"}


def _whole_series_seg(result: CaseResult) -> hd.seg.Segmentation:
    """The former QC SEG: every source image passed, a full-series stacked array."""
    sorted_sources = hd.spatial.sort_datasets(source_headers_for_derivation(result.ct_datasets))
    position = {str(ds.SOPInstanceUID): k for k, ds in enumerate(sorted_sources)}
    shape = (int(sorted_sources[0].Rows), int(sorted_sources[0].Columns))
    volumes = {verdict: np.zeros((len(sorted_sources), *shape), bool) for verdict in Verdict}
    for item in result.slices:
        volumes[item.verdict][position[str(item.source_image.SOPInstanceUID)]] |= np.asarray(item.ai_mask, bool)
    algorithm = seg_writer.qc_algorithm_identification(result)
    descriptions, layers = [], []
    for verdict in (Verdict.ACCEPT, Verdict.REVIEW, Verdict.REJECT):
        if not volumes[verdict].any():
            continue
        style = seg_writer.VERDICT_SEGMENT_STYLES[verdict]
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=len(descriptions) + 1, segment_label=style.label,
            segmented_property_category=seg_writer.qc_codes.LESION_CATEGORY,
            segmented_property_type=seg_writer.qc_codes.LESION_TYPE,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
            tracking_uid=generate_uid(), tracking_id=style.tracking_id,
            display_color=hd.color.CIELabColor(*style.display_color),
        ))
        layers.append(volumes[verdict])
    built = hd.seg.Segmentation(
        source_images=sorted_sources, pixel_array=np.stack(layers, axis=-1).astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
        series_instance_uid="1.2.3", series_number=seg_writer.QC_SEG_SERIES_NUMBER, sop_instance_uid="1.2.3.4",
        instance_number=1, manufacturer=seg_writer.MANUFACTURER, manufacturer_model_name="qcgate",
        software_versions=seg_writer.__version__, device_serial_number="0",
        content_description=(f"QC verdicts, {'SYNTHETIC ' if result.synthetic_model else ''}threshold model "
                             f"{result.model_name} {result.model_version}")[:64],
        content_label="QC_VERDICT", content_creator_name=None, omit_empty_frames=True,
    )
    synthetic = seg_writer.is_synthetic_source(sorted_sources) or result.synthetic_model
    built.SeriesDescription = (("SYNTHETIC " if synthetic else "") + seg_writer.QC_SEG_SERIES_DESCRIPTION)[:64]
    seg_writer.label_synthetic(built, result, synthetic)
    return built


def _header_lines(ds: Dataset) -> list[str]:
    return [f"{element.tag} {element.keyword} {'' if element.VR == 'SQ' else element.repval}"
            for element in ds.iterall() if element.keyword not in _UNSTABLE and element.keyword != "PixelData"]


def _assert_same_seg(result: CaseResult, tmp_path: Path) -> hd.seg.Segmentation:
    new = seg_writer.build_qc_seg(result, series_instance_uid="1.2.3", sop_instance_uid="1.2.3.4")
    old = _whole_series_seg(result)
    assert _header_lines(new) == _header_lines(old)
    assert new.PixelData == old.PixelData
    path = save_dataset(new, tmp_path / "qc-seg.dcm")
    assert dciodvfy_errors(path) == []
    # read back with highdicom: the same segments and, per source image, the same planes
    read_new, read_old = hd.seg.segread(path), hd.seg.segread(save_dataset(old, tmp_path / "old-seg.dcm"))
    numbers = [int(item.SegmentNumber) for item in read_old.SegmentSequence]
    assert [int(item.SegmentNumber) for item in read_new.SegmentSequence] == numbers
    uids = sorted({str(item.source_image.SOPInstanceUID) for item in result.slices})
    np.testing.assert_array_equal(
        read_new.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=numbers),
        read_old.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=numbers))
    return new


def test_seg_from_the_occupied_images_equals_the_whole_series_seg(synthetic_case: WriterCase, tmp_path: Path) -> None:
    new = _assert_same_seg(synthetic_case.result, tmp_path)
    # every CT image is referenced, also the four without a lesion (no frame of theirs)
    referenced = [str(item.ReferencedSOPInstanceUID) for item in new.SourceImageSequence]
    assert referenced == [str(ds.SOPInstanceUID) for ds in synthetic_case.result.ct_datasets]
    assert int(new.NumberOfFrames) == len(SYNTHETIC_LESION_SLICES) < len(referenced)


def test_overlapping_verdicts_on_one_image_give_the_same_seg(synthetic_ct: list[Dataset], tmp_path: Path) -> None:
    case = build_case(synthetic_ct, SYNTHETIC_LESION_SLICES)
    first = case.result.slices[0]
    other = Verdict.REJECT if first.verdict is not Verdict.REJECT else Verdict.ACCEPT
    # a second result on the first slice's image, with another verdict and half of its mask
    half = first.ai_mask.copy()
    rows = np.flatnonzero(half.any(axis=1))
    half[: rows[len(rows) // 2]] = False
    assert half.any()
    case.result.slices.append(dataclasses.replace(first, verdict=other, ai_mask=half))
    new = _assert_same_seg(case.result, tmp_path)
    assert new.SegmentsOverlap == "YES"


def test_a_slice_with_an_empty_mask_gets_no_frame(synthetic_ct: list[Dataset], tmp_path: Path) -> None:
    case = build_case(synthetic_ct, SYNTHETIC_LESION_SLICES)
    case.result.slices[1].ai_mask = np.zeros_like(case.result.slices[1].ai_mask)
    new = _assert_same_seg(case.result, tmp_path)
    assert int(new.NumberOfFrames) == len(SYNTHETIC_LESION_SLICES) - 1


def test_real_ct_with_a_gap_between_lesion_slices_gives_the_same_seg(real_case: WriterCase, tmp_path: Path) -> None:
    # lesions on the first and the last of three real slices: the spacing comes from the whole series
    new = _assert_same_seg(real_case.result, tmp_path)
    assert int(new.NumberOfFrames) == 2
