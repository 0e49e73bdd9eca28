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
    assert result.slices[0].verdict is Verdict.REVIEW and result.slices[0].q is None  # one member: q unknown
    assert 0 <= result.slices[0].tau <= 1
    assert result.slices[0].lesion_area_mm2 == pytest.approx(lesion[0].sum() * 0.49)


def test_two_members_give_ensemble_agreement_and_an_uncertainty_map() -> None:
    hu = np.full((1, 96, 96), -850.0)
    first = _disc((96, 96), (48, 48), 12)[None]
    second = _disc((96, 96), (48, 52), 12)[None]
    result = judge_case(_ct(hu), [_member(first), _member(second)], PipelineSettings(margin=0.05),
                        load_threshold_model("lidc-geometry"), StageTimer())
    (item,) = result.slices
    consensus = (first[0].astype(float) + second[0]) / 2 >= 0.5
    def dice(a, b):  # type: ignore[no-untyped-def]
        return 2 * (a & b).sum() / (a.sum() + b.sum())
    assert item.q == pytest.approx((dice(first[0], consensus) + dice(second[0], consensus)) / 2)
    assert result.q_source == "ensemble-agreement" and result.n_members == 2
    assert item.uncertainty is not None and item.uncertainty["um_mean"] > 0
    expected = Verdict.ACCEPT if item.q >= item.tau + 0.05 else Verdict.REJECT if item.q < item.tau - 0.05 else Verdict.REVIEW
    assert item.verdict is expected
