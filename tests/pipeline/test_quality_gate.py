"""The verdict at run time: q from the model's q estimator and its band; honest reasons for review."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from scipy import ndimage

from qcgate.config import PipelineSettings
from qcgate.core.agreement import dice_against_experts
from qcgate.core.results import Verdict
from qcgate.pipeline.loading import CtSeries, SegMember
from qcgate.pipeline.worker import StageTimer, judge_case, load_threshold_model


def _ct(hu: np.ndarray, modality: str = "CT", spacing: float = 0.7) -> CtSeries:
    datasets = []
    for k in range(hu.shape[0]):
        ds = Dataset()
        ds.SOPInstanceUID = f"1.2.3.{k}"
        ds.Modality = modality
        datasets.append(ds)
    return CtSeries(datasets=datasets, hu=hu.astype(np.float32), pixel_spacing=(spacing, spacing),
                    frame_of_reference_uid="1.2.3", positions_mm=np.array([[0, 0, 2.5 * k] for k in range(hu.shape[0])], float))


def _member(probability: np.ndarray, kind: str = "FRACTIONAL") -> SegMember:
    ds = Dataset()
    ds.SegmentationType = kind
    return SegMember(dataset=ds, probability=probability.astype(np.float32), is_reference_reader=False, label="lesion")


def _disc(shape, centre, radius):  # type: ignore[no-untyped-def]
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return ((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) <= radius ** 2


def _lung_ct(n: int = 1, size: int = 128) -> np.ndarray:
    hu = np.full((n, size, size), 40.0)
    hu[:, 10:-10, 10:-10] = -850.0  # lung parenchyma around the lesion
    return hu


def _soft(mask: np.ndarray, width: float) -> np.ndarray:
    inside = ndimage.distance_transform_edt(mask)
    outside = ndimage.distance_transform_edt(~mask)
    return 1 / (1 + np.exp(-np.where(mask, inside - 0.5, -(outside - 0.5)) / width))


@pytest.fixture(scope="module")
def lidc():  # type: ignore[no-untyped-def]
    model = load_threshold_model("lidc-geometry")
    assert model.q_estimators is not None, "the shipped lidc-geometry model has a q estimator (quality.json)"
    return model


def test_a_single_fractional_member_gets_a_q_on_taus_scale(lidc) -> None:  # type: ignore[no-untyped-def]
    mask = _disc((128, 128), (64, 64), 14)
    result = judge_case(_ct(_lung_ct()), [_member(_soft(mask, 0.8)[None])], PipelineSettings(), lidc, StageTimer())
    (item,) = result.slices
    assert result.q_source in ("probability", "learned")  # one member: no UM estimator
    assert item.q is not None and 0 <= item.q <= 1
    assert result.q_validation_mae is not None and result.q_validation_mae > 0
    assert "validation MAE" in result.verdict_rule and "conformal" in result.verdict_rule
    assert item.margin is not None and item.margin_reject is not None
    expected = (Verdict.ACCEPT if item.q >= item.tau + item.margin else
                Verdict.REJECT if item.q < item.tau - item.margin_reject else Verdict.REVIEW)
    assert item.verdict is expected and not result.reasons


def test_a_single_binary_member_gets_the_mask_only_estimator_and_says_so(lidc) -> None:  # type: ignore[no-untyped-def]
    mask = _disc((128, 128), (64, 64), 14)
    result = judge_case(_ct(_lung_ct()), [_member(mask[None].astype(float), "BINARY")], PipelineSettings(), lidc,
                        StageTimer())
    assert result.q_source == "learned-mask"
    assert any("BINARY" in note and "learned-mask" in note for note in result.notes)
    assert result.slices[0].q is not None


def test_a_model_without_q_estimator_gives_review_with_the_reason(lidc, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from qcgate.predictors import load_model
    from qcgate.predictors.artifacts import MANIFEST, write_manifest

    old = tmp_path / "old-model"
    shutil.copytree(lidc.directory, old)
    (old / "quality.json").unlink()
    manifest = json.loads((old / MANIFEST).read_text())
    manifest.pop("quality")
    manifest.pop("files")
    write_manifest(old, manifest)
    model = load_model(old)
    assert model.q_estimators is None
    mask = _disc((128, 128), (64, 64), 14)
    result = judge_case(_ct(_lung_ct()), [_member(_soft(mask, 0.8)[None]), _member(_soft(mask, 0.9)[None])],
                        PipelineSettings(), model, StageTimer())
    assert result.q_source == "none" and all(s.verdict is Verdict.REVIEW and s.q is None for s in result.slices)
    assert any("no q estimator" in r for r in result.reasons)
    assert all(s.q_source == "none" and "no q estimator" in s.reason for s in result.slices)


@pytest.mark.parametrize("problem", ["modality", "not-hu", "no-lung"])
def test_out_of_domain_input_goes_to_review_with_the_reason(lidc, problem: str) -> None:  # type: ignore[no-untyped-def]
    hu = _lung_ct()
    modality = "CT"
    if problem == "modality":
        modality = "MR"
    elif problem == "not-hu":
        hu = hu + 1500.0  # raw stored values: nothing near air
    else:
        hu = np.full_like(hu, 40.0)
    mask = _disc((128, 128), (64, 64), 14)
    result = judge_case(_ct(hu, modality), [_member(_soft(mask, 0.8)[None])], PipelineSettings(), lidc, StageTimer())
    assert all(s.verdict is Verdict.REVIEW for s in result.slices)
    expected = {"modality": "modality MR", "not-hu": "HU", "no-lung": "no lung"}[problem]
    assert any(expected in r for r in result.reasons), result.reasons
    assert all(expected in s.reason for s in result.slices)


def _phantom_case():  # type: ignore[no-untyped-def]
    from qcgate.phantom.generator import PhantomConfig, generate_cohort

    return generate_cohort(PhantomConfig(patients=3, seed=21, members=2), workers=1).cases


def test_phantom_weak_two_member_ai_is_never_accepted_and_a_good_ai_mostly_accepted() -> None:
    """A weak 2-member AI (the reference outline eroded by 3-4 px: worse than the experts by
    construction, checked below) is never accepted, and where the gate decides it rejects; a good one (the
    readers' majority vote, softly edged) is mostly accepted and never rejected, with the SYNTHETIC
    phantom-full model and its q estimator. (With the band fitted on the τ the gate uses at run time, the
    ensemble with UM, a third of the weak AI's slices are rejected and the others, only mildly worse than
    the experts on most of them, go to review: the band keeps rejected good slices at its 10 % target.)"""
    model = load_threshold_model("phantom-full")
    assert model.q_estimators is not None
    verdicts: dict[str, list[Verdict]] = {"weak": [], "good": []}
    for case in _phantom_case():
        ct = _ct(case.image_hu, spacing=case.pixel_spacing[0])
        ref = case.reader_masks[case.reference_reader]
        votes = np.mean([m.astype(float) for m in case.reader_masks.values()], axis=0) >= 0.5
        # weak: both members under-segment (the reference eroded by 3 and 4 px), soft edges (blur 1.5)
        weak = [np.stack([ndimage.gaussian_filter(ndimage.binary_erosion(ref[k], iterations=it).astype(float), 1.5) for k in range(len(ref))])
                for it in (3, 4)]
        good = [np.stack([_soft(votes[k], 0.5 + 0.1 * j) for k in range(len(ref))]) for j in range(2)]
        for name, maps in (("weak", weak), ("good", good)):
            result = judge_case(ct, [_member(m) for m in maps], PipelineSettings(), model, StageTimer())
            if name == "weak":  # truth: worse than the experts agree with each other on most slices
                worse = [dice_against_experts(s.ai_mask, [m[s.slice_index] for m in case.reader_masks.values()])
                         < case.dsc_lesion(s.slice_index) for s in result.slices]
                assert np.mean(worse) > 0.8
            assert result.synthetic_model and any("SYNTHETIC" in n for n in result.notes)
            verdicts[name] += [s.verdict for s in result.slices]
    weak_rejected = np.mean([v is Verdict.REJECT for v in verdicts["weak"]])
    weak_accepted = np.mean([v is Verdict.ACCEPT for v in verdicts["weak"]])
    good_accepted = np.mean([v is Verdict.ACCEPT for v in verdicts["good"]])
    assert weak_accepted == 0 and weak_rejected >= 0.25, verdicts["weak"]
    assert good_accepted > 0.5 and Verdict.REJECT not in verdicts["good"], verdicts["good"]


def test_a_synthetic_model_on_a_real_ct_is_flagged_in_seg_sr_and_report(tmp_path: Path) -> None:
    import pydicom

    from qcgate.pipeline.loading import load_ct_series, load_seg_member
    from qcgate.pipeline.worker import write_case_outputs
    from qcgate.writers.sr import read_qc_sr
    from qcgate.writers.validate import dciodvfy_errors
    from tests.support import write_lung2_case

    ct_files, member_files = write_lung2_case(tmp_path / "lung2")  # a real chest CT, not synthetic
    ct = load_ct_series(ct_files)
    members = [load_seg_member(p, ct, ["lesion"]) for p in member_files]
    result = judge_case(ct, [m for m in members if m is not None], PipelineSettings(),
                        load_threshold_model("phantom-full"), StageTimer())
    assert result.synthetic_model and result.slices and not result.reasons
    outputs = write_case_outputs(result, tmp_path / "out", PipelineSettings(), ct.hu)
    report = read_qc_sr(outputs["sr"][0])
    assert report.synthetic_model.startswith("SYNTHETIC model phantom-full")
    assert report.observer_model_name.endswith("SYNTHETIC")
    assert report.q_source == result.q_source and report.q_validation_mae == pytest.approx(result.q_validation_mae)
    assert "conformal" in report.verdict_rule
    seg = pydicom.dcmread(outputs["seg"][0], stop_before_pixels=True)
    assert "SYNTHETIC threshold model" in str(seg.ImageComments) and str(seg.SeriesDescription).startswith("SYNTHETIC")
    assert "SYNTHETIC threshold model" in outputs["report"][0].read_text()
    for kind in ("seg", "sr"):
        assert dciodvfy_errors(outputs[kind][0]) == [], kind


def test_scanner_padding_outside_the_field_of_view_is_not_mistaken_for_non_hu_values(lidc) -> None:  # type: ignore[no-untyped-def]
    """A real GE CT pads outside its circular field of view with -3024: still HU, still in the domain."""
    from qcgate.pipeline.quality_gate import domain_problems

    hu = _lung_ct()
    rows, cols = hu.shape[-2:]
    yy, xx = np.mgrid[:rows, :cols]
    padded = np.where((yy - rows / 2) ** 2 + (xx - cols / 2) ** 2 > (rows / 2) ** 2, -3024.0, hu)
    assert domain_problems(_ct(padded, "CT"), lidc, True, [0]) == []
    assert any("HU" in p for p in domain_problems(_ct(hu + 1500.0, "CT"), lidc, True, [0]))  # raw values: still caught
