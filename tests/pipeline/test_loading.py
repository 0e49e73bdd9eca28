"""Loading cases for the worker: CT sorting (gantry tilt), SEG mapping of every kind, refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from qcgate.pipeline.loading import JobFailure, load_ct_series, load_seg_member
from qcgate.core.results import Verdict, slice_verdict
from qcgate.core.agreement import ensemble_agreement
from qcgate.pipeline.worker import series_verdict
from qcgate.config import PipelineSettings
from tests.support import DCMQI_LIVER, GANTRY_TILT_CT, HIGHDICOM_FILES, write_synthetic_case


def test_gantry_tilted_ct_is_sorted_along_its_slice_normal() -> None:
    files = sorted(GANTRY_TILT_CT.glob("*.dcm"))
    ct = load_ct_series(list(reversed(files)))
    normal = np.cross(*np.array(ct.datasets[0].ImageOrientationPatient, dtype=float).reshape(2, 3))
    distances = ct.positions_mm @ normal
    assert np.all(np.diff(distances) > 0)
    assert ct.hu.shape == (28, 512, 512)
    assert float(ct.hu.min()) >= -3024 and float(ct.hu.max()) > 500  # HU (padding at -1500, bone above 500)


def test_a_seg_maps_back_onto_its_source_slices(tmp_path: Path) -> None:
    ct_files, seg_file = write_synthetic_case(tmp_path, n_slices=6, size=64)
    ct = load_ct_series(ct_files)
    member = load_seg_member(seg_file, ct, ["lesion"])
    assert member is not None and not member.is_reference_reader
    expected = (ct.hu > -500) & (ct.hu < -100)
    assert np.array_equal(member.probability >= 0.5, expected)


@pytest.mark.parametrize("name", ["seg_image_ct_binary.dcm", "seg_image_ct_binary_fractional.dcm",
                                  "seg_image_ct_true_fractional.dcm", "seg_image_ct_binary_overlap.dcm"])
def test_highdicom_segs_of_every_kind_load(name: str) -> None:
    ct = load_ct_series(sorted((HIGHDICOM_FILES / "pydicom_dicomdirtests_77654033_CT2").glob("*")))
    member = load_seg_member(HIGHDICOM_FILES / name, ct, ["lesion"])
    if member is None:  # several segments and none is a lesion: stated, not guessed
        seg = pydicom.dcmread(HIGHDICOM_FILES / name)
        assert len(seg.SegmentSequence) > 1
        return
    assert member.probability.shape == ct.hu.shape
    assert 0.0 <= member.probability.min() and member.probability.max() <= 1.0
    assert member.probability.max() > 0


def test_the_real_dcmqi_liver_seg_maps_onto_its_ct() -> None:
    ct = load_ct_series(sorted((DCMQI_LIVER / "ct-3slice").glob("*")))
    member = load_seg_member(DCMQI_LIVER / "liver.dcm", ct, ["liver"])
    assert member is not None and member.probability.shape == (3, 512, 512)
    assert (member.probability > 0.5).sum() > 1000


def test_a_seg_on_another_grid_is_a_stated_failure(tmp_path: Path) -> None:
    small_ct, small_seg = write_synthetic_case(tmp_path / "small", n_slices=3, size=32)
    other_ct, _ = write_synthetic_case(tmp_path / "other", n_slices=3, size=48)
    with pytest.raises(JobFailure, match="cannot be mapped onto the CT"):
        load_seg_member(small_seg, load_ct_series(other_ct), ["lesion"])


def test_mixed_slice_sizes_are_refused(tmp_path: Path) -> None:
    a, _ = write_synthetic_case(tmp_path / "a", n_slices=2, size=32)
    b, _ = write_synthetic_case(tmp_path / "b", n_slices=2, size=48)
    with pytest.raises(JobFailure, match="differ"):
        load_ct_series([*a, *b])


def test_verdict_rule_and_series_policies() -> None:
    assert slice_verdict(0.6, 0.75, 0.1) is Verdict.ACCEPT
    assert slice_verdict(0.6, 0.65, 0.1) is Verdict.REVIEW
    assert slice_verdict(0.6, 0.45, 0.1) is Verdict.REJECT
    assert slice_verdict(0.6, None, 0.1) is Verdict.REVIEW
    strict = PipelineSettings()
    assert series_verdict([Verdict.ACCEPT, Verdict.REJECT], strict)[0] is Verdict.REJECT
    assert series_verdict([Verdict.ACCEPT, Verdict.REVIEW], strict)[0] is Verdict.REVIEW
    assert series_verdict([Verdict.ACCEPT] * 3, strict)[0] is Verdict.ACCEPT
    assert series_verdict([], strict)[0] is Verdict.REVIEW
    fraction = PipelineSettings(series_policy="fraction", reject_fraction=0.5)
    assert series_verdict([Verdict.ACCEPT, Verdict.ACCEPT, Verdict.REJECT], fraction)[0] is Verdict.REVIEW


def test_ensemble_agreement_is_the_mean_member_dice_against_the_consensus() -> None:
    consensus = np.zeros((10, 10), bool)
    consensus[2:6, 2:6] = True  # 16 px
    same = consensus.copy()
    half = np.zeros_like(consensus)
    half[2:6, 2:4] = True  # 8 px inside: Dice = 2*8/(8+16) = 2/3
    assert ensemble_agreement([same, half], consensus) == pytest.approx((1 + 2 / 3) / 2)
