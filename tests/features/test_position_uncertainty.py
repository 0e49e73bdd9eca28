"""Positional frequency map / orthodoxy, and uncertainty-map metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from qcgate.features.position import PositionFrequencyMap
from qcgate.features.uncertainty import (
    UNCERTAINTY_DESCRIPTORS,
    ensemble_mean_and_std,
    uncertainty_features,
    uncertainty_metrics,
    uncertainty_region,
)
from tests.features.conftest import disc

FRAME = (512, 512)


def training_lesions(rng: np.random.Generator, n: int = 40) -> list[np.ndarray]:
    """Lesions clustered in the upper-left quadrant of the frame."""
    lesions = []
    for _ in range(n):
        center = (rng.uniform(80, 180), rng.uniform(80, 180))
        lesions.append(disc(FRAME, center, rng.uniform(4, 12)))
    return lesions


@pytest.fixture(scope="module")
def frame_map() -> PositionFrequencyMap:
    lesions = training_lesions(np.random.default_rng(0))
    return PositionFrequencyMap.fit([(lesion, None) for lesion in lesions])


def test_orthodoxy_high_where_lesions_were_seen_low_elsewhere(frame_map: PositionFrequencyMap) -> None:
    usual = frame_map.orthodoxy(disc(FRAME, (130, 130), 8))
    unusual = frame_map.orthodoxy(disc(FRAME, (420, 400), 8))
    assert 0.0 <= unusual < 0.05 < 0.5 < usual <= 1.0
    assert frame_map.n_lesions == 40
    assert math.isnan(frame_map.orthodoxy(np.zeros(FRAME, bool)))
    assert math.isnan(PositionFrequencyMap().orthodoxy(disc(FRAME, (130, 130), 8)))  # empty map


def test_crop_with_offset_equals_full_frame(frame_map: PositionFrequencyMap) -> None:
    full = disc(FRAME, (150, 140), 10)
    crop = full[130:175, 120:165]
    assert frame_map.orthodoxy(crop, frame_shape=FRAME, offset=(130, 120)) == pytest.approx(frame_map.orthodoxy(full))
    # Fitting from crops gives the same map as fitting from full frames.
    refit = PositionFrequencyMap.fit([(crop, None)], frame_shape=FRAME, offsets=[(130, 120)])
    direct = PositionFrequencyMap.fit([(full, None)])
    np.testing.assert_allclose(refit.frequency, direct.frequency)


def test_lung_normalisation_is_translation_invariant() -> None:
    lung = np.zeros(FRAME, bool)
    lung[100:400, 60:460] = True
    lesion = disc(FRAME, (150, 120), 8)
    fitted = PositionFrequencyMap.fit([(lesion, lung)])
    shifted_lung = np.roll(lung, (40, -30), axis=(0, 1))
    shifted_lesion = np.roll(lesion, (40, -30), axis=(0, 1))
    assert fitted.orthodoxy(shifted_lesion, shifted_lung) == pytest.approx(fitted.orthodoxy(lesion, lung))
    assert fitted.orthodoxy(lesion, lung) > 0.8


def test_json_round_trip(tmp_path: Path, frame_map: PositionFrequencyMap) -> None:
    path = tmp_path / "position.json"
    frame_map.save(path)
    document = json.loads(path.read_text())
    assert document["format"] == "qcgate.position_frequency_map" and document["grid_size"] == 32
    loaded = PositionFrequencyMap.load(path)
    np.testing.assert_array_equal(loaded.frequency, frame_map.frequency)
    lesion = disc(FRAME, (140, 100), 6)
    assert loaded.orthodoxy(lesion) == frame_map.orthodoxy(lesion)
    with pytest.raises(ValueError):
        PositionFrequencyMap.from_json(json.dumps({"format": "pickle", "version": 1}))


def test_ensemble_mean_and_std() -> None:
    rng = np.random.default_rng(1)
    members = [rng.uniform(0, 1, (8, 9)) for _ in range(3)]
    mean, std = ensemble_mean_and_std(members)
    manual_mean = (members[0] + members[1] + members[2]) / 3
    manual_std = np.sqrt(sum((m - manual_mean) ** 2 for m in members) / 3)
    np.testing.assert_allclose(mean, manual_mean)
    np.testing.assert_allclose(std, manual_std)
    _, agree = ensemble_mean_and_std([members[0], members[0]])
    assert not agree.any()


def test_uncertainty_metrics_on_a_known_map() -> None:
    mask = disc((64, 64), (32, 32), 6)
    region = uncertainty_region(mask)
    um = np.zeros((64, 64))
    um[region] = 0.15
    um[~region] = 0.45  # far from the lesion: must not count
    metrics = uncertainty_metrics(um, mask)
    assert metrics["um_mean"] == pytest.approx(0.15) and metrics["um_std"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["um_entropy"] == 0.0
    assert metrics["um_p50"] == metrics["um_p99"] == pytest.approx(0.15)
    assert metrics["um_frac_gt_0p1"] == 1.0 and metrics["um_frac_gt_0p2"] == 0.0


def test_uncertainty_metrics_fractions_and_entropy() -> None:
    mask = np.ones((10, 10), bool)
    um = ((np.arange(100) + 0.5) * 0.005).reshape(10, 10)  # uniform over [0, 0.5), no ties with thresholds
    metrics = uncertainty_metrics(um, mask)
    assert metrics["um_frac_gt_0p3"] == pytest.approx(0.4)
    assert metrics["um_frac_gt_0p1"] == pytest.approx(0.8)
    assert metrics["um_frac_gt_0p2"] == pytest.approx(0.6)
    assert metrics["um_entropy"] == pytest.approx(math.log2(50), abs=1e-9)  # 2 values per bin, 50 bins
    assert metrics["um_p90"] == pytest.approx(np.percentile(um, 90))


def test_uncertainty_vector_names_and_empty_mask() -> None:
    um = np.random.default_rng(2).uniform(0, 0.3, (32, 32))
    vector = uncertainty_features(um, np.zeros((32, 32), bool))  # no AI mask: whole map
    assert vector.names == tuple(f"uncertainty.{d}" for d in UNCERTAINTY_DESCRIPTORS)
    assert vector.flags == ()
    assert vector.as_dict()["uncertainty.um_mean"] == pytest.approx(um.mean())
    nan_map = np.full((32, 32), np.nan)
    fallback = uncertainty_features(nan_map, np.ones((32, 32), bool))
    assert set(fallback.flags) == set(fallback.names) and np.all(fallback.values == 0.0)


def test_reference_kind_is_kept_and_never_mixed(tmp_path: Path) -> None:
    lung = np.zeros(FRAME, bool)
    lung[100:400, 60:460] = True
    lesion = disc(FRAME, (150, 120), 8)
    lung_map = PositionFrequencyMap.fit([(lesion, lung)])
    frame_map = PositionFrequencyMap.fit([(lesion, None)])
    assert (lung_map.reference, frame_map.reference) == ("lung", "frame")
    # Mixed training data: the lung-less sample is left out rather than mixed into lung coordinates.
    far = disc(FRAME, (450, 450), 8)
    mixed = PositionFrequencyMap.fit([(lesion, lung), (far, None)])
    assert mixed.reference == "lung" and mixed.n_lesions == 1
    np.testing.assert_array_equal(mixed.frequency, lung_map.frequency)
    # A lung-fitted map cannot score without a lung mask; a frame-fitted one ignores a lung mask.
    assert math.isnan(lung_map.orthodoxy(lesion))
    assert frame_map.orthodoxy(lesion, lung) == frame_map.orthodoxy(lesion)
    lung_map.save(tmp_path / "lung.json")
    assert PositionFrequencyMap.load(tmp_path / "lung.json").reference == "lung"
