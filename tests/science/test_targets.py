"""Dice and DSC Lesion: hand-made masks, the empty-mask conventions, and the real LIDC cross-check."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from qcgate.cohort import load_lidc
from qcgate.errors import InputError
from qcgate.core.agreement import dice, dsc_lesion_vs_reference, mean_pairwise_dice, slice_dsc_lesion

LIDC_DIR = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "lidc"


def square(top: int, left: int, size: int, shape: tuple[int, int] = (20, 20)) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[top : top + size, left : left + size] = True
    return mask


def test_dice_of_hand_made_masks() -> None:
    a = square(0, 0, 4)  # 16 px
    b = square(0, 2, 4)  # 16 px, overlap 4x2 = 8 px
    assert dice(a, a) == 1.0
    assert dice(a, b) == pytest.approx(2 * 8 / 32)
    assert dice(a, square(10, 10, 4)) == 0.0
    assert dice(a, square(0, 0, 2)) == pytest.approx(2 * 4 / (16 + 4))
    assert dice(a, b) == dice(b, a)
    # float probability maps binarise at 0.5
    assert dice(a * 0.7, b.astype(float)) == pytest.approx(0.5)
    assert dice(a * 0.3, b) == 0.0


def test_dice_empty_conventions() -> None:
    empty = np.zeros((5, 5), dtype=bool)
    assert dice(empty, empty) == 1.0  # both empty: agreement that nothing is there
    assert dice(empty, square(0, 0, 2, (5, 5))) == 0.0  # one empty: full disagreement
    with pytest.raises(InputError, match="shape"):
        dice(empty, np.zeros((4, 5), dtype=bool))


def test_mean_pairwise_dice_conventions() -> None:
    a, b = square(0, 0, 4), square(0, 2, 4)
    empty = np.zeros_like(a)
    assert mean_pairwise_dice([a, b]) == pytest.approx(0.5)
    # three readers: pairs (a,b)=0.5, (a,a)=1, (b,a)=0.5
    assert mean_pairwise_dice([a, b, a]) == pytest.approx(2 / 3)
    # one empty reader: its pairs count 0 -> (0.5 + 0 + 0) / 3
    assert mean_pairwise_dice([a, b, empty]) == pytest.approx(0.5 / 3)
    # two empty readers: the empty-empty pair is left out -> (0 + 0 + 0 + 0 + 0.5) / 5
    assert mean_pairwise_dice([a, b, empty, empty]) == pytest.approx(0.5 / 5)
    assert mean_pairwise_dice([empty, empty, empty]) is None  # not a lesion slice
    assert mean_pairwise_dice([a]) is None  # a single reader has no agreement


def test_dsc_lesion_against_reference() -> None:
    reference, other, repeat = square(0, 0, 4), square(0, 2, 4), square(0, 0, 4)
    empty = np.zeros_like(reference)
    assert dsc_lesion_vs_reference(reference, [other, repeat]) == pytest.approx((0.5 + 1.0) / 2)
    assert dsc_lesion_vs_reference(reference, [other, empty]) == pytest.approx(0.25)
    # reference empty, one reader drew: that pair counts 0, the empty pair is left out
    assert dsc_lesion_vs_reference(empty, [other, empty]) == 0.0
    assert dsc_lesion_vs_reference(empty, [empty]) is None
    assert dsc_lesion_vs_reference(reference, []) is None
    named = {"R1A": reference, "R2": other, "R1B": repeat}
    assert slice_dsc_lesion(named, "R1A") == pytest.approx(0.75)
    # reader identity matters: against R2 as reference the score differs from the pairwise mean
    assert slice_dsc_lesion(named, "R2") == pytest.approx(0.5)
    assert slice_dsc_lesion(named) == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    with pytest.raises(InputError, match="reference reader"):
        slice_dsc_lesion(named, "nobody")


def test_lidc_targets_agree_with_the_convenience_csv() -> None:
    """Our pairwise DSC Lesion on the real LIDC masks equals the shipped table, slice by slice."""
    expected: dict[tuple[str, int], float] = {}
    with open(LIDC_DIR / "lidc_slice_dsc_lesion.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            if 2 <= int(row["n_annotators"]) <= 4:
                expected[(row["key"], int(row["slice_index_in_bbox"]))] = float(row["dsc_lesion"])
    cohort = load_lidc(LIDC_DIR)
    ours: dict[tuple[str, int], float] = {}
    for case in cohort:
        for index in case.lesion_slices():
            value = case.dsc_lesion(index)
            assert value is not None
            ours[(case.case_id, index)] = value
    assert set(ours) == set(expected)
    worst = max(abs(ours[key] - expected[key]) for key in expected)
    assert worst < 1e-9
    values = np.array(list(ours.values()))
    assert 0.0 <= values.min() and values.max() <= 1.0 and 0.3 < values.mean() < 0.9
