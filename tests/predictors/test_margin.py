"""learned-margin's additive spline Ridge (qcgate.predictors.margin): known answers, a known function
recovered, the JSON round trip, refused documents, and q = clip(τ + Δ̂) in the estimator."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qcgate.errors import InputError
from qcgate.predictors.band import fit_band_from_scores
from qcgate.predictors.margin import (
    TAU_FEATURE,
    SplineRidge,
    fit_spline_ridge,
    hat_basis,
    quantile_knots,
)
from qcgate.predictors.quality import (
    LEARNED_MARGIN,
    QualityEstimator,
    QualityEstimators,
)


def test_hat_basis_interpolates_linearly_between_knots() -> None:
    knots = [np.array([0.0, 1.0, 3.0])]
    x = np.array([[-1.0], [0.0], [0.5], [1.0], [2.0], [3.0], [9.0]])
    basis = hat_basis(x, knots)  # first hat dropped: the columns are the hats at 1 and 3
    expected = np.array([[0, 0], [0, 0], [0.5, 0], [1, 0], [0.5, 0.5], [0, 1], [0, 1]], dtype=float)
    np.testing.assert_allclose(basis, expected)


def test_quantile_knots_merge_ties_and_widen_a_constant() -> None:
    np.testing.assert_allclose(quantile_knots(np.array([0, 0, 0, 1, 2.0]), 5), [0.0, 1.0, 2.0])
    np.testing.assert_allclose(quantile_knots(np.full(10, 4.0)), [4.0, 5.0])


def test_the_spline_ridge_recovers_a_known_additive_function_and_round_trips() -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(-2, 2, (2000, 3))
    truth = np.abs(x[:, 0]) - 0.5 * x[:, 1]  # a V in feature 0, a line in feature 1, nothing in feature 2
    patients = np.repeat(np.arange(200), 10)
    model = fit_spline_ridge(x, truth + rng.normal(0, 0.05, len(truth)), patients, ["a", "b", "c"])
    test = rng.uniform(-1.8, 1.8, (500, 3))
    assert np.mean(np.abs(model.predict(test) - (np.abs(test[:, 0]) - 0.5 * test[:, 1]))) < 0.06
    again = SplineRidge.from_dict(json.loads(json.dumps(model.to_dict())))
    np.testing.assert_array_equal(again.predict(test), model.predict(test))


def test_a_broken_spline_ridge_document_is_refused() -> None:
    rng = np.random.default_rng(1)
    model = fit_spline_ridge(rng.normal(size=(100, 2)), rng.normal(size=100), np.arange(100) % 10, ["a", "b"])
    payload = model.to_dict()
    payload["coef"] = payload["coef"][:-1]
    with pytest.raises(InputError, match="basis width"):
        SplineRidge.from_dict(payload)
    payload = model.to_dict()
    payload["knots"][0] = [1.0, 0.0]
    with pytest.raises(InputError, match="strictly increasing"):
        SplineRidge.from_dict(payload)


def test_the_margin_estimator_reports_tau_plus_the_margin_and_survives_quality_json() -> None:
    rng = np.random.default_rng(2)
    x = np.column_stack([rng.uniform(0, 1, 400), rng.uniform(0, 1, 400)])
    margin = fit_spline_ridge(x, 0.2 * x[:, 0] - 0.1, np.arange(400) % 40, ["prob.soft_dice", TAU_FEATURE])
    band = fit_band_from_scores(np.array([-0.3, -0.2, -0.1]), np.array([0.0, 0.1, 0.2]))
    estimator = QualityEstimator(LEARNED_MARGIN, 0.1, band, None, 400, margin)
    assert estimator.uses_tau and estimator.needs() == {"prob"}  # tau comes from the threshold model
    features = {"prob.soft_dice": 0.9, TAU_FEATURE: 0.7}
    expected = 0.7 + float(margin.predict(np.array([[0.9, 0.7]]))[0])
    assert estimator.estimate(features) == pytest.approx(float(np.clip(expected, 0, 1)))
    assert estimator.estimate({"prob.soft_dice": 1.0, TAU_FEATURE: 0.99}) <= 1.0  # q stays a Dice
    stored = QualityEstimators(1.0, {LEARNED_MARGIN: estimator}, LEARNED_MARGIN).to_json()
    assert json.loads(stored)["format_version"] == 2
    loaded = QualityEstimators.from_json(stored).estimators[LEARNED_MARGIN]
    assert loaded.estimate(features) == pytest.approx(estimator.estimate(features))
    with pytest.raises(InputError, match="tau.value"):
        estimator.estimate({"prob.soft_dice": 0.9})
