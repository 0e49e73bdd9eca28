"""Table 3 arithmetic on known inputs, and reproducibility of training."""

from __future__ import annotations

import numpy as np
import pytest

from qcgate.predictors.evaluation import (
    GLOBAL, RIDGE, build_table3, cross_validate, draw_synthetic_dsc, error_figures, inclusion_counts,
    simulate_clinical_setting,
)

from tests.predictors.conftest import make_tiny_cohort, tiny_resnet_config


def test_inclusion_counts_by_hand() -> None:
    truth = np.array([0.5, 0.5, 0.8, 0.8])
    synthetic = np.array([0.6, 0.4, 0.9, 0.7])  # good: yes, no, yes, no
    threshold = np.array([0.7, 0.3, 0.85, 0.75])  # included: no, yes, yes, no
    # good ∧ included = {2}; good = {0, 2}; bad ∧ rejected = {3}; bad = {1, 3}
    assert inclusion_counts(synthetic, truth, threshold) == (1, 2, 1, 2)


def test_perfect_threshold_includes_every_good_and_rejects_every_bad_slice() -> None:
    truth = np.random.default_rng(1).uniform(0.2, 0.9, 500)
    figures = simulate_clinical_setting(truth, {"oracle": truth, "global": np.full(500, truth.mean())},
                                        mean=0.6, sd=0.15, repeats=5, seed=3)
    assert figures["oracle"].good_included_pct == 100.0 and figures["oracle"].bad_rejected_pct == 100.0
    assert figures["oracle"].good_included_sd == 0.0
    assert figures["global"].good_included_pct < 100.0 and figures["global"].bad_rejected_pct < 100.0
    # repeat-0 counts partition the slices
    assert figures["global"].good + figures["global"].bad == 500


def test_simulation_is_seeded_and_paired() -> None:
    assert np.array_equal(draw_synthetic_dsc(10, 0.5, 0.1, 7, 2), draw_synthetic_dsc(10, 0.5, 0.1, 7, 2))
    assert not np.array_equal(draw_synthetic_dsc(10, 0.5, 0.1, 7, 2), draw_synthetic_dsc(10, 0.5, 0.1, 7, 3))
    truth = np.linspace(0.1, 0.9, 50)
    a = simulate_clinical_setting(truth, {"m": truth * 0.9}, mean=0.5, sd=0.2, repeats=4, seed=11)
    b = simulate_clinical_setting(truth, {"m": truth * 0.9}, mean=0.5, sd=0.2, repeats=4, seed=11)
    assert a == b
    # with sd = 0 every draw is the mean: counts follow from the inputs alone
    c = simulate_clinical_setting(truth, {"m": np.full(50, 0.3)}, mean=0.5, sd=0.0, repeats=2, seed=0)["m"]
    good = int(np.count_nonzero(0.5 >= truth))
    assert (c.good, c.good_included, c.bad) == (good, good, 50 - good)
    assert c.bad_rejected == 0 and c.good_included_sd == 0.0


def test_error_figures_by_hand() -> None:
    truth = np.array([0.5, 0.7, 0.2, 0.4])
    predicted = np.array([0.6, 0.6, 0.2, 0.8])
    patients = np.array(["a", "a", "b", "b"])
    figures = error_figures(predicted, truth, patients)
    errors = np.array([0.1, 0.1, 0.0, 0.4])
    assert figures.mae == pytest.approx(errors.mean())
    assert figures.sd == pytest.approx(errors.std())
    # patient a: |0.6 − 0.6| = 0; patient b: |0.5 − 0.3| = 0.2
    assert figures.mae_patient == pytest.approx(0.1)


def test_table3_rows_and_json() -> None:
    truth = np.array([0.5, 0.7, 0.2, 0.4])
    table = build_table3(cohort_name="t", synthetic=True, setting="s", truth=truth, patients=["a", "a", "b", "b"],
                         case_ids=["a", "a", "b", "b"], slice_indices=[0, 1, 0, 1],
                         predictions={RIDGE: truth, GLOBAL: np.full(4, 0.45)}, repeats=2)
    assert table.methods() == [GLOBAL, RIDGE]
    payload = table.to_dict()
    assert payload["synthetic"] is True and [r["method"] for r in payload["rows"]] == [GLOBAL, RIDGE]
    assert payload["rows"][1]["mae"] == 0.0


def test_same_seed_same_metrics_different_seed_different_resnet() -> None:
    from qcgate.predictors.dataset import build_rows

    cohort = make_tiny_cohort(patients=6, slices=2, seed=5)
    rows = build_rows(cohort, groups=["geometry", "uncertainty"], with_crops=True, crop_size=32)
    first = cross_validate(rows, n_folds=3, resnet_config=tiny_resnet_config(seed=1))
    second = cross_validate(rows, n_folds=3, resnet_config=tiny_resnet_config(seed=1))
    assert set(first) == {GLOBAL, "Global thresholding (median)", RIDGE, "Ridge w. UM", "ResNet w/o UM", "ResNet w. UM", "Ensemble w/o UM", "Ensemble w. UM"}
    for method in first:
        assert np.array_equal(first[method], second[method]), method
    other = cross_validate(rows, n_folds=3, resnet_config=tiny_resnet_config(seed=2))
    assert not np.array_equal(first["ResNet w/o UM"], other["ResNet w/o UM"])
    # the patient-grouped global threshold is a training-fold mean: never the slice's own fold alone
    assert np.all((first[GLOBAL] > 0) & (first[GLOBAL] < 1))


def test_same_seed_gives_byte_identical_weight_files(tmp_path) -> None:
    from qcgate.predictors.artifacts import sha256_file
    from qcgate.predictors.resnet import train_resnet

    rng = np.random.default_rng(0)
    crops = rng.random((12, 3, 32, 32)).astype(np.float32)
    targets = rng.random(12)
    for name in ("a", "b"):
        train_resnet(crops, targets, ("ct", "probability"), tiny_resnet_config(seed=4)).save(tmp_path / f"{name}.safetensors")
    assert sha256_file(tmp_path / "a.safetensors") == sha256_file(tmp_path / "b.safetensors")
