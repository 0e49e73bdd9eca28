"""q estimators, the conformal band and the simulated AI: known answers and toy distributions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qcgate.core.agreement import dice_against_experts, soft_self_dice
from qcgate.predictors.band import band_from_dict, band_to_dict, conformal_accept_cut, conformal_reject_cut, fit_band
from qcgate.predictors.quality import calibrate, fit_temperature, probability_metrics
from qcgate.predictors.simulated_ai import ERROR_KINDS, simulate_ai


def _disc(shape, centre, radius):  # type: ignore[no-untyped-def]
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return ((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) <= radius ** 2


def test_soft_self_dice_of_known_maps() -> None:
    binary = np.zeros((10, 10))
    binary[2:5, 2:5] = 1.0
    assert soft_self_dice(binary) == pytest.approx(1.0)
    soft = np.zeros((10, 10))
    soft[0, :10] = 1.0  # 10 pixels at p = 1 (the mask)
    soft[1, :10] = soft[2, :10] = 0.25  # 20 pixels at p = 1/4 outside it
    # 2 * 10 / (15 + 10)
    assert soft_self_dice(soft) == pytest.approx(0.8)
    half = np.full((4, 4), 0.5)  # every pixel exactly at 1/2: in the mask, each "half right"
    assert soft_self_dice(half) == pytest.approx(2 * 8 / (8 + 16))
    assert soft_self_dice(np.full((4, 4), 0.4)) is None  # no mask: nothing to judge


def test_dice_against_experts_skips_empty_pairs_and_counts_misses() -> None:
    ai = np.zeros((5, 5), bool)
    ai[1:3, 1:3] = True
    assert dice_against_experts(ai, [ai, np.zeros_like(ai)]) == pytest.approx(0.5)  # 1 and a miss (0)
    assert dice_against_experts(np.zeros_like(ai), [np.zeros_like(ai)]) is None


def test_temperature_calibration_keeps_the_mask_and_recovers_a_known_temperature() -> None:
    p = np.array([0.1, 0.5, 0.9])
    assert calibrate(p, 2.0)[1] == pytest.approx(0.5)
    assert calibrate(p, 2.0)[2] < 0.9 and calibrate(p, 0.5)[2] > 0.9
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, 40_000)  # over-confident logits: the truth follows sigmoid(z / 2)
    y = (rng.random(z.size) < 1 / (1 + np.exp(-z / 2))).astype(float)
    assert fit_temperature([z], [y]) == pytest.approx(2.0, rel=0.05)


def test_probability_metrics_of_a_binary_map() -> None:
    metrics = probability_metrics(_disc((40, 40), (20, 20), 8).astype(float))
    assert metrics["prob.soft_dice"] == pytest.approx(1.0, abs=1e-3) and metrics["prob.frac_soft"] == 0.0
    assert metrics["prob.n_components"] == 1 and metrics["prob.largest_fraction"] == 1.0


def test_conformal_cuts_on_a_known_sample() -> None:
    bad = np.arange(1, 100) / 100.0  # 99 bad scores 0.01 ... 0.99
    # k = ceil(100 * 0.9) = 90: the 90th smallest, 0.90, one float step up
    cut = conformal_accept_cut(bad, 0.10)
    assert cut > 0.90 and cut == pytest.approx(0.90)
    assert np.mean(bad >= cut) <= 0.10
    assert conformal_accept_cut(bad[:5], 0.10) == math.inf  # too few bad slices: accept impossible
    good = np.arange(0, 99) / 100.0  # 99 good scores; j = floor(100 * 0.1) = 10: the 10th smallest
    assert conformal_reject_cut(good, 0.10) == pytest.approx(0.09)
    assert conformal_reject_cut(good[:5], 0.10) == -math.inf


def test_the_band_holds_its_miss_rate_on_a_toy_distribution() -> None:
    rng = np.random.default_rng(1)

    def draw(n):  # type: ignore[no-untyped-def]
        bad = rng.random(n) < 0.5
        x = np.where(bad, rng.normal(-0.15, 0.1, n), rng.normal(0.15, 0.1, n))  # q - tau
        return x, bad

    x, bad = draw(2000)
    band = fit_band(np.zeros_like(x), x, bad, max_missed_bad=0.10, max_rejected_good=0.05)
    x_new, bad_new = draw(20_000)
    verdicts = band.decide(np.zeros_like(x_new), x_new)
    missed = np.mean(verdicts[bad_new] == "accept")
    wrongly_rejected = np.mean(verdicts[~bad_new] == "reject")
    assert missed == pytest.approx(0.10, abs=0.02) and wrongly_rejected == pytest.approx(0.05, abs=0.015)
    # N(-0.15, 0.1): its 90 % quantile is -0.15 + 1.2816 * 0.1
    assert band.accept_at == pytest.approx(-0.022, abs=0.015)
    assert np.mean(verdicts[~bad_new] == "accept") > 0.8  # accept is reachable
    again = band_from_dict(band_to_dict(band))
    assert again.accept_at == pytest.approx(band.accept_at) and again.n_bad == band.n_bad


def test_simulated_ai_is_seeded_and_follows_its_proportions() -> None:
    readers = [_disc((64, 64), (32, 32), 9), _disc((64, 64), (33, 31), 10)]
    first = simulate_ai(readers, np.random.default_rng([0, 1, 2]))
    again = simulate_ai(readers, np.random.default_rng([0, 1, 2]))
    assert first is not None and again is not None
    assert np.array_equal(first.probability, again.probability) and first.kind == again.kind
    assert first.members.shape == (2, 64, 64)
    kinds = [simulate_ai(readers, np.random.default_rng([0, i, 0])).kind for i in range(600)]  # type: ignore[union-attr]
    for kind, share in ERROR_KINDS.items():
        assert kinds.count(kind) / len(kinds) == pytest.approx(share, abs=0.05)
    eroded = simulate_ai(readers, np.random.default_rng(3), kind="erode", confidence="calibrated")
    assert eroded is not None and (eroded.probability >= 0.5).sum() < readers[eroded.template].sum()
