"""Which model family for ``learned-margin``? The alternatives compared on the LIDC split of the docs.

Run from the repository root (about 4 minutes on one core; prints one line per model):

    .venv/bin/python bench/gate_margin_models.py

Samples: ``build_gate_samples`` with the shipped ``models/lidc-geometry`` (its τ on the AI mask), simulated
AI (seed 0), on the train part (80 %, split seed 0) and the held-out part. Each model is fitted on the
train part; the band (``qcgate.predictors.band``, targets 10 % / 10 %) on its patient-grouped 5-fold
out-of-fold scores there; the rates and the AUC of the score (good vs bad) on the held-out part.
Features: ``learned-um``'s (geometry, probability and ensemble metrics) plus τ̂, except row A.

Rows: A the ``learned-um``-style Ridge for D_AI minus τ (q̂ − τ̂); B a Ridge on Δ = D_AI − y;
C a logistic classifier of good/bad; D gradient-boosted trees on Δ (scikit-learn, 200 trees of depth 3);
E the additive spline Ridge of ``qcgate.predictors.margin`` (the one shipped). The figures are a
comparison on one split, not the shipped model's evaluation (that is ``qcgate evaluate-gate``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np

from qcgate.cohort import load_cohort
from qcgate.predictors import load_model
from qcgate.predictors.band import fit_band_from_scores
from qcgate.predictors.gate_evaluation import (
    auc_good_vs_bad,
    build_gate_samples,
    select_part,
)
from qcgate.predictors.margin import fit_spline_ridge


def _samples(part: str):  # type: ignore[no-untyped-def]
    cohort = select_part(load_cohort("../shared/data/lidc"), part, 0.2, 0)
    model = load_model("models/lidc-geometry")
    s = build_gate_samples(cohort, ai="simulated", seed=0, position_map=model.position_map, groups=["geometry"],
                           model=model)
    names = list(s.features[0])
    return (np.column_stack([s.matrix(names), s.model_tau]), np.asarray(s.dice_ai), np.asarray(s.dsc_lesion),
            np.asarray(s.patients))


def main() -> int:
    from sklearn.ensemble import GradientBoostingRegressor
    from sklearn.linear_model import LogisticRegressionCV, RidgeCV
    from sklearn.model_selection import GroupKFold

    warnings.filterwarnings("ignore")
    x_tr, d_tr, y_tr, p_tr = _samples("train")
    x_ho, d_ho, y_ho, _ = _samples("holdout")
    delta_tr, bad_tr, bad_ho = d_tr - y_tr, d_tr < y_tr, d_ho < y_ho
    folds = list(GroupKFold(5).split(x_tr, groups=p_tr))
    alphas = np.logspace(-2, 4, 13)

    def slog_std(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        a, b = np.sign(a) * np.log1p(np.abs(a)), np.sign(b) * np.log1p(np.abs(b))
        mean, sd = a.mean(0), a.std(0) + 1e-9
        return (a - mean) / sd, (b - mean) / sd

    def q_minus_tau(a: np.ndarray, xb: np.ndarray) -> np.ndarray:
        train, test = slog_std(x_tr[a][:, :-1], xb[:, :-1])  # without tau: q estimates D_AI alone
        return np.clip(RidgeCV(alphas=alphas).fit(train, d_tr[a]).predict(test), 0, 1) - xb[:, -1]

    fits: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
        "A Ridge for D_AI, minus tau": q_minus_tau,
        "B Ridge on the margin": lambda a, xb: RidgeCV(alphas=alphas).fit(slog_std(x_tr[a], xb)[0], delta_tr[a]).predict(
            slog_std(x_tr[a], xb)[1]),
        "C logistic good/bad": lambda a, xb: LogisticRegressionCV(Cs=8, max_iter=2000).fit(
            slog_std(x_tr[a], xb)[0], ~bad_tr[a]).decision_function(slog_std(x_tr[a], xb)[1]),
        "D gradient-boosted trees": lambda a, xb: GradientBoostingRegressor(
            max_depth=3, n_estimators=200, learning_rate=0.05, subsample=0.8, random_state=0).fit(
            x_tr[a], delta_tr[a]).predict(xb),
        "E spline Ridge (shipped)": lambda a, xb: fit_spline_ridge(
            x_tr[a], delta_tr[a], p_tr[a], [f"f{j}" for j in range(x_tr.shape[1])]).predict(xb),
    }
    everything = np.arange(len(d_tr))
    for name, fit in fits.items():
        oof = np.empty(len(d_tr))
        for train, test in folds:
            oof[test] = fit(train, x_tr[test])
        held = fit(everything, x_ho)
        band = fit_band_from_scores(oof[bad_tr], oof[~bad_tr], 0.10, 0.10)
        verdict = np.where(held >= band.accept_at, "accept", np.where(held < band.reject_below, "reject", "review"))
        print(f"{name:28s} AUC {auc_good_vs_bad(held, bad_ho):.3f}  bad rejected {100 * np.mean(verdict[bad_ho] == 'reject'):.1f} %"
              f"  bad accepted {100 * np.mean(verdict[bad_ho] == 'accept'):.1f} %"
              f"  good accepted {100 * np.mean(verdict[~bad_ho] == 'accept'):.1f} %  review {100 * np.mean(verdict == 'review'):.1f} %",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
