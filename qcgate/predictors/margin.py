"""``learned-margin``: a direct estimate of the margin the gate's truth turns on, Δ = D_AI − y.

Why: the band decides on x = q − τ. With q and τ regressed separately (q̂ ≈ D_AI, τ̂ ≈ y), x = q̂ − τ̂
carries both errors, although both estimates describe the same AI mask and their errors are
correlated; what the truth needs is only the sign of D_AI − y (good iff D_AI ≥ y). This estimator
regresses Δ itself, from the ``learned-um`` features plus τ̂ (feature ``tau.value``: the threshold
model's prediction for the slice), and reports q := clip(τ̂ + Δ̂, 0, 1), so q stays "estimated Dice
against the experts" on τ's scale and the band on q − τ is a band on Δ̂ (up to the clip).

Model (an additive spline Ridge, stored as JSON; never pickled):

* basis: per feature j, piecewise-linear "hat" functions at K quantile knots t_j1 < … < t_jK of
  the training values (``N_KNOTS`` = 10 quantiles 0, 1/9, …, 1; ties merged); x is clipped to
  [t_j1, t_jK]; h_jk(x) = max(0, 1 − |x − t_jk| / (t_j,k±1 − t_jk)) (the linear interpolation weights),
  the first hat of each feature dropped (the intercept carries it). Each feature thus gets its own
  monotone-or-not, piecewise-linear shape (a generalised additive model).
* z = (h − μ) / σ, Δ̂(x) = b + wᵀz, (w, b) = argmin Σ (Δ − b − wᵀz)² + α‖w‖², α from ``ALPHAS`` by
  the lowest MAE of an inner patient-grouped CV (no clipping: Δ ∈ [−1, 1]).

Measured against the alternatives on the LIDC train/held-out split (``bench/gate_margin_models.py``;
docs/SCIENCE.md, "The verdict"): a plain Ridge on Δ, a logistic classifier of good/bad and a
gradient-boosted tree (scikit-learn, 200 trees of depth 3) gave held-out AUCs 0.547, 0.573 and 0.560
against 0.566 for this model; the tree cannot be stored without pickle or a hand-written exporter, and
it did not validate better.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from qcgate.errors import InputError

FORMAT_NAME = "qcgate.spline-ridge"
FORMAT_VERSION = 1
TAU_FEATURE = "tau.value"
N_KNOTS = 10
ALPHAS = tuple(float(a) for a in np.logspace(-1, 4, 11))


def quantile_knots(values: np.ndarray, n_knots: int = N_KNOTS) -> np.ndarray:
    """Knots t_1 < … < t_K at the 0, 1/(K−1), …, 1 quantiles (ties merged; a constant gets [v, v + 1])."""
    knots = np.unique(np.quantile(np.asarray(values, dtype=np.float64), np.linspace(0.0, 1.0, n_knots)))
    if len(knots) < 2:
        knots = np.asarray([knots[0], knots[0] + 1.0])
    return knots


def hat_basis(x: np.ndarray, knots: Sequence[np.ndarray]) -> np.ndarray:
    """The hat-function basis of every column of ``x`` (see the module docstring), first hat dropped."""
    x = np.asarray(x, dtype=np.float64)
    columns = []
    for j, k in enumerate(knots):
        xj = np.clip(x[:, j], k[0], k[-1])
        cell = np.clip(np.searchsorted(k, xj, side="right") - 1, 0, len(k) - 2)
        weight = (xj - k[cell]) / (k[cell + 1] - k[cell])
        block = np.zeros((len(xj), len(k)))
        rows = np.arange(len(xj))
        block[rows, cell] = 1.0 - weight
        block[rows, cell + 1] = weight
        columns.append(block[:, 1:])
    return np.hstack(columns)


@dataclass
class SplineRidge:
    """The fitted additive spline Ridge for Δ (see the module docstring)."""

    feature_names: tuple[str, ...]
    knots: list[np.ndarray]
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    alpha: float

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Δ̂ = b + wᵀ((h(x) − μ) / σ), one value per row (not clipped)."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(self.feature_names):
            raise ValueError(f"expected (slices, {len(self.feature_names)}) features, got {x.shape}")
        return self.intercept + ((hat_basis(x, self.knots) - self.mean) / self.scale) @ self.coef

    def to_dict(self) -> dict:
        return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "target": "D_AI - DSC Lesion",
                "feature_names": list(self.feature_names), "knots": [k.tolist() for k in self.knots],
                "mean": self.mean.tolist(), "scale": self.scale.tolist(), "coef": self.coef.tolist(),
                "intercept": self.intercept, "alpha": self.alpha}

    @classmethod
    def from_dict(cls, payload: dict, *, source: str = "learned-margin") -> SplineRidge:
        try:
            if payload.get("format") != FORMAT_NAME or int(payload.get("version", 0)) != FORMAT_VERSION:
                raise ValueError(f"not a {FORMAT_NAME} v{FORMAT_VERSION} document")
            names = tuple(str(n) for n in payload["feature_names"])
            knots = [np.asarray(k, dtype=np.float64) for k in payload["knots"]]
            if len(knots) != len(names) or any(k.ndim != 1 or len(k) < 2 or np.any(np.diff(k) <= 0) for k in knots):
                raise ValueError("one strictly increasing knot vector (>= 2 knots) per feature is required")
            width = sum(len(k) - 1 for k in knots)
            arrays = [np.asarray(payload[key], dtype=np.float64) for key in ("mean", "scale", "coef")]
            if any(a.shape != (width,) or not np.all(np.isfinite(a)) for a in arrays) or np.any(arrays[1] <= 0):
                raise ValueError(f"mean, scale (> 0) and coef must be finite vectors of the basis width {width}")
            return cls(names, knots, arrays[0], arrays[1], arrays[2], float(payload["intercept"]),
                       float(payload["alpha"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{source}: not a valid spline Ridge ({exc})") from exc


def fit_spline_ridge(x: np.ndarray, target: np.ndarray, patients: np.ndarray, feature_names: Sequence[str], *,
                     n_knots: int = N_KNOTS, inner_splits: int = 5) -> SplineRidge:
    """Fit the additive spline Ridge of ``target`` (Δ) on ``x``; α by inner patient-grouped CV (MAE)."""
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import GroupKFold

    from qcgate.science.ridge_cv import ridge_path_predictions

    x = np.asarray(x, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if x.shape != (len(target), len(feature_names)):
        raise ValueError(f"features {x.shape} do not match {len(target)} targets × {len(feature_names)} names")
    knots = [quantile_knots(x[:, j], n_knots) for j in range(x.shape[1])]
    basis = hat_basis(x, knots)
    patients = np.asarray(patients)
    n_groups = len(np.unique(patients))
    alpha = 1.0
    if n_groups >= 2:
        errors = np.zeros(len(ALPHAS))
        for train, test in GroupKFold(n_splits=min(inner_splits, n_groups)).split(basis, groups=patients):
            predicted = ridge_path_predictions(basis[train], target[train], basis[test], ALPHAS)
            errors += np.abs(predicted - target[test][None, :]).sum(axis=1)
        alpha = float(ALPHAS[int(np.argmin(errors))])
    mean = basis.mean(axis=0)
    scale = basis.std(axis=0)
    scale[scale == 0] = 1.0
    ridge = Ridge(alpha=alpha).fit((basis - mean) / scale, target)
    return SplineRidge(tuple(feature_names), knots, mean, scale, np.asarray(ridge.coef_, dtype=np.float64),
                       float(ridge.intercept_), alpha)
