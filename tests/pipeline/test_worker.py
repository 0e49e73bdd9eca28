"""judge_case on hand-made arrays with the shipped lidc-geometry model: known q, verdicts, notes."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset

from qcgate.config import PipelineSettings
from qcgate.pipeline.loading import CtSeries, SegMember
from qcgate.core.results import Verdict
from qcgate.pipeline.worker import StageTimer, judge_case, load_threshold_model


def _ct(hu: np.ndarray) -> CtSeries:
    datasets = []
    for k in range(hu.shape[0]):
        ds = Dataset()
        ds.SOPInstanceUID = f"1.2.3.{k}"
        datasets.append(ds)
    return CtSeries(datasets=datasets, hu=hu.astype(np.float32), pixel_spacing=(0.7, 0.7),
                    frame_of_reference_uid="1.2.3", positions_mm=np.array([[0, 0, 2.5 * k] for k in range(hu.shape[0])], float))


def _disc(shape: tuple[int, int], centre: tuple[int, int], radius: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return ((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) <= radius**2


def _member(masks: np.ndarray) -> SegMember:
    return SegMember(dataset=Dataset(), probability=masks.astype(np.float32), is_reference_reader=False, label="lesion")


def test_a_slice_without_lung_is_judged_and_noted() -> None:
    hu = np.full((2, 96, 96), 40.0)  # soft tissue only: no lung anywhere
    lesion = np.stack([_disc((96, 96), (48, 48), 10), np.zeros((96, 96), bool)])
    result = judge_case(_ct(hu), [_member(lesion)], PipelineSettings(), load_threshold_model("lidc-geometry"), StageTimer())
    assert [s.slice_index for s in result.slices] == [0]
    assert any("no lung found" in note for note in result.notes)
    # one BINARY member: q from the mask-only estimator, but no lung on any slice: out of domain, review
    assert result.slices[0].verdict is Verdict.REVIEW and result.q_source == "learned-mask"
    assert any("no lung found on any lesion slice" in r for r in result.reasons)
    assert 0 <= result.slices[0].tau <= 1
    assert result.slices[0].lesion_area_mm2 == pytest.approx(lesion[0].sum() * 0.49)


def test_two_members_give_an_estimated_q_and_an_uncertainty_map() -> None:
    hu = np.full((1, 96, 96), -850.0)
    first = _disc((96, 96), (48, 48), 12)[None]
    second = _disc((96, 96), (48, 52), 12)[None]
    result = judge_case(_ct(hu), [_member(first), _member(second)], PipelineSettings(margin=0.05),
                        load_threshold_model("lidc-geometry"), StageTimer())
    (item,) = result.slices
    # The raw ensemble agreement is never q: the model's q estimator answers, with its band (the
    # configured margin applies to a reference reader's SEG only).
    assert result.q_source not in ("ensemble-agreement", "none") and result.n_members == 2
    assert item.q is not None and 0 <= item.q <= 1
    assert item.uncertainty is not None and item.uncertainty["um_mean"] > 0
    reject = item.margin if item.margin_reject is None else item.margin_reject
    expected = (Verdict.ACCEPT if item.q >= item.tau + item.margin else
                Verdict.REJECT if item.q < item.tau - reject else Verdict.REVIEW)
    assert item.verdict is expected


def test_a_job_extracts_features_once_and_writes_outputs_without_reading_them_back(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import pydicom

    import qcgate.features
    import qcgate.writers.common as common
    from qcgate.pipeline.loading import load_ct_series, load_seg_member
    from qcgate.pipeline.worker import write_case_outputs
    from qcgate.writers import pmap, seg, sr
    from qcgate.writers.validate import dciodvfy_errors
    from tests.support import write_synthetic_case

    ct_files, seg_file = write_synthetic_case(tmp_path / "in", n_slices=4, size=64)
    ct = load_ct_series(ct_files)
    member = load_seg_member(seg_file, ct, ["lesion"])
    assert member is not None
    extractions: list[int] = []
    original = qcgate.features.extract_slice_features
    monkeypatch.setattr(qcgate.features, "extract_slice_features",
                        lambda *a, **k: extractions.append(1) or original(*a, **k))
    settings = PipelineSettings(write_uncertainty_map=True)
    result = judge_case(ct, [member, member], settings, load_threshold_model("lidc-geometry"), StageTimer())
    # once per lesion slice: tau, its key features and the learned q estimator's geometry share it
    assert result.slices and len(extractions) == len(result.slices)

    prepared: list[int] = []
    prepare = common.source_headers_for_derivation
    monkeypatch.setattr(common, "source_headers_for_derivation", lambda ds: prepared.append(1) or prepare(ds))
    for module in (seg, sr, pmap):  # writers use the headers prepared once, never their own
        monkeypatch.setattr(module, "source_headers_for_derivation", lambda ds: pytest.fail("prepared again"))
    monkeypatch.setattr(pydicom, "dcmread", lambda *a, **k: pytest.fail("an output was read back"))
    outputs = write_case_outputs(result, tmp_path / "out", settings, ct.hu, StageTimer())
    monkeypatch.undo()
    assert prepared == [1, 1]  # the CT headers once, the AI SEG headers once
    assert sorted(outputs) == ["pmap", "report", "seg", "sr"]
    for kind in ("seg", "pmap", "sr"):
        path, dataset = outputs[kind]
        on_disk = pydicom.dcmread(path, stop_before_pixels=True)
        assert dataset is not None and on_disk.SOPInstanceUID == dataset.SOPInstanceUID
        assert on_disk.SOPClassUID == dataset.SOPClassUID
        assert dciodvfy_errors(path) == [], kind
    evidence = {str(item.ReferencedSOPInstanceUID) for series in outputs["sr"][1].CurrentRequestedProcedureEvidenceSequence
                for ref in series.ReferencedSeriesSequence for item in ref.ReferencedSOPSequence}
    assert str(outputs["seg"][1].SOPInstanceUID) in evidence


def test_enhanced_ct_is_refused_by_default_and_fails_with_a_stated_reason(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import highdicom as hd
    import pydicom

    from qcgate.config import NodeSettings
    from qcgate.core.dicom import ENHANCED_CT_IMAGE_STORAGE
    from qcgate.pipeline.loading import JobFailure, load_ct_series
    from tests.support import write_synthetic_case

    assert NodeSettings().accept_enhanced_ct is False  # the node does not accept what the worker cannot process
    ct_files, _ = write_synthetic_case(tmp_path / "in", n_slices=3, size=32)
    legacy = [pydicom.dcmread(p) for p in ct_files]
    converted = hd.legacy.LegacyConvertedEnhancedCTImage(legacy, series_instance_uid=hd.UID(), series_number=99,
                                                         sop_instance_uid=hd.UID(), instance_number=1)
    converted.SOPClassUID = ENHANCED_CT_IMAGE_STORAGE  # SYNTHETIC: labelled as a true Enhanced CT
    path = tmp_path / "enhanced.dcm"
    converted.save_as(path, enforce_file_format=True)
    with pytest.raises(JobFailure, match="accept_enhanced_ct"):
        load_ct_series([path])
