"""The QC SEG: valid (dciodvfy), coloured segments by verdict, frames on the right source images."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from qcgate.errors import InputError
from qcgate.core.results import Verdict
from qcgate.writers.seg import VERDICT_SEGMENT_STYLES, NoLesionError, has_lesion_pixels, write_qc_seg
from qcgate.writers.validate import dciodvfy_errors
from tests.support import DCMQI_LIVER
from tests.writers.conftest import WriterCase, build_case, verdict_by_label


def _assert_segments_match(path: Path, case: WriterCase) -> hd.seg.Segmentation:
    """Every lesion slice's mask sits, on its source image, in the segment of its verdict and nowhere else."""
    seg = hd.seg.segread(path)
    labels = verdict_by_label()
    verdict_of_segment = {
        int(item.SegmentNumber): labels[item.SegmentLabel] for item in seg.SegmentSequence
    }
    # only verdicts that occur get a segment
    assert set(verdict_of_segment.values()) == set(case.expected_verdicts.values())
    numbers = sorted(verdict_of_segment)
    assert numbers == list(range(1, len(numbers) + 1))
    uids = list(case.expected_masks)
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=numbers)
    for position, uid in enumerate(uids):
        for column, number in enumerate(numbers):
            plane = pixels[position, :, :, column].astype(bool)
            if verdict_of_segment[number] == case.expected_verdicts[uid]:
                np.testing.assert_array_equal(plane, case.expected_masks[uid], err_msg=f"{uid} segment {number}")
            else:
                assert not plane.any(), f"{uid} leaks into segment {number}"
    # one frame per lesion slice and segment, each referencing a lesion slice's source image
    referenced = {
        str(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        for frame in seg.PerFrameFunctionalGroupsSequence
    }
    assert referenced == set(uids)
    assert int(seg.NumberOfFrames) == len(uids)
    return seg


def test_synthetic_case_seg_is_valid_and_maps_masks_to_sources(synthetic_case: WriterCase, tmp_path: Path) -> None:
    path = write_qc_seg(synthetic_case.result, tmp_path / "qc-seg.dcm")
    assert dciodvfy_errors(path) == []
    seg = _assert_segments_match(path, synthetic_case)
    assert seg.SegmentationType == "BINARY"
    assert "QC" in seg.SeriesDescription and seg.SeriesDescription.startswith("SYNTHETIC")
    assert seg.FrameOfReferenceUID == synthetic_case.result.ct_datasets[0].FrameOfReferenceUID
    # colours: green accept, red reject (CIELab a* negative for green, positive for red)
    labels = verdict_by_label()
    for item in seg.SegmentSequence:
        verdict = labels[item.SegmentLabel]
        assert item.RecommendedDisplayCIELabValue is not None
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == "qcgate"
        assert "phantom-full" in str(algorithm.AlgorithmParameters)
        stored = hd.color.CIELabColor(*VERDICT_SEGMENT_STYLES[verdict].display_color)
        assert list(item.RecommendedDisplayCIELabValue) == list(stored.value)


def test_real_ct_seg_is_valid_and_maps_masks_to_sources(real_case: WriterCase, tmp_path: Path) -> None:
    # the dcmqi liver CT has an empty SpecificCharacterSet, which highdicom refuses as such
    assert real_case.result.ct_datasets[0].SpecificCharacterSet == ""
    path = write_qc_seg(real_case.result, tmp_path / "qc-seg.dcm")
    assert dciodvfy_errors(path) == []
    _assert_segments_match(path, real_case)
    assert real_case.result.ct_datasets[0].SpecificCharacterSet == ""  # the caller's header is untouched
    seg = pydicom.dcmread(path, stop_before_pixels=True)
    assert not str(seg.SeriesDescription).startswith("SYNTHETIC")
    assert seg.StudyInstanceUID == real_case.result.ct_datasets[0].StudyInstanceUID


def test_real_ct_missing_type2_attributes_are_added_on_a_copy(tmp_path: Path) -> None:
    # a fresh read: the session fixture's headers must stay intact for the other tests
    datasets = [pydicom.dcmread(path) for path in sorted((DCMQI_LIVER / "ct-3slice").glob("*.dcm"))]
    removed = ("PatientBirthDate", "PatientSex", "ReferringPhysicianName", "AccessionNumber", "StudyID")
    for ds in datasets:
        for keyword in removed:
            delattr(ds, keyword)
    case = build_case(datasets, [(1, 0.5, 0.9)], n_members=2)
    path = write_qc_seg(case.result, tmp_path / "qc-seg.dcm")
    assert dciodvfy_errors(path) == []
    _assert_segments_match(path, case)
    assert all(keyword not in ds for ds in datasets for keyword in removed)


def test_single_verdict_case_gets_a_single_segment(q_unknown_case: WriterCase, tmp_path: Path) -> None:
    path = write_qc_seg(q_unknown_case.result, tmp_path / "qc-seg.dcm")
    assert dciodvfy_errors(path) == []
    seg = _assert_segments_match(path, q_unknown_case)
    assert [item.SegmentLabel for item in seg.SegmentSequence] == [VERDICT_SEGMENT_STYLES[Verdict.REVIEW].label]


def test_no_lesion_case_gets_no_seg(no_lesion_case: WriterCase, tmp_path: Path) -> None:
    assert not has_lesion_pixels(no_lesion_case.result)
    with pytest.raises(NoLesionError):
        write_qc_seg(no_lesion_case.result, tmp_path / "qc-seg.dcm")
    assert not (tmp_path / "qc-seg.dcm").exists()


def test_mask_of_the_wrong_shape_is_refused(synthetic_case: WriterCase, tmp_path: Path) -> None:
    synthetic_case.result.slices[0].ai_mask = np.ones((3, 3), dtype=bool)
    with pytest.raises(InputError, match="shape"):
        write_qc_seg(synthetic_case.result, tmp_path / "qc-seg.dcm")


def test_dciodvfy_reports_errors_of_a_broken_object(synthetic_case: WriterCase, tmp_path: Path) -> None:
    path = write_qc_seg(synthetic_case.result, tmp_path / "qc-seg.dcm")
    broken = pydicom.dcmread(path)
    del broken.SegmentSequence  # type 1 attribute of the Segmentation Image module
    broken.save_as(tmp_path / "broken.dcm")
    errors = dciodvfy_errors(tmp_path / "broken.dcm")
    assert errors and all(line.startswith("Error") for line in errors)
