"""The Ridge cross-validation of ``qcgate analyze`` (Table 2), public for ``qcgate.predictors``.

Model: signed-log1p → standardise → Ridge, with alpha chosen from ``RIDGE_ALPHAS`` by the lowest MAE
in an inner patient-grouped CV (GroupKFold) on the training rows (``select_alpha_grouped``,
``fit_ridge_grouped``). Outer folds (``grouped_folds``) are patient-grouped: no patient is ever split
between training and test. ``cross_validate_group`` gives out-of-fold Ridge predictions (clipped to
[0, 1]) and the baseline ("global thresholding"): the training folds' mean DSC Lesion.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from qcgate.errors import InputError

if TYPE_CHECKING:
    from sklearn.pipeline import Pipeline

RIDGE_ALPHAS = tuple(float(a) for a in np.logspace(-2, 4, 13))

# One outer fold's job: (x, y, patients, training rows, test rows, inner splits).
FoldJob = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]
Folds = list[tuple[np.ndarray, np.ndarray]]


def signed_log1p(x: np.ndarray) -> np.ndarray:
    """sign(x) * log(1 + |x|): tames the heavy tails of areas, energies and counts before Ridge."""
    return np.sign(x) * np.log1p(np.abs(x))


def make_ridge() -> Pipeline:
    """Pipeline: signed-log1p -> standardise -> Ridge (alpha set by ``select_alpha_grouped``)."""
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer, StandardScaler

    return make_pipeline(FunctionTransformer(signed_log1p), StandardScaler(), Ridge())


def standardise(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x − mean) / SD with the training rows' mean and SD (population SD, as StandardScaler), for both sets."""
    mean = train.mean(axis=0)
    scale = train.std(axis=0)
    scale[scale == 0] = 1.0  # as StandardScaler: a constant column stays constant (zero)
    return (train - mean) / scale, (test - mean) / scale


def ridge_path_predictions(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                           alphas: Sequence[float]) -> np.ndarray:
    """Predictions on ``x_test`` of Ridge fits (with intercept) for every alpha, shape (alphas, n_test).

    With centred, standardised X = U S Vᵀ: w(α) = V diag(s / (s² + α)) Uᵀ (y − ȳ), ŷ = ȳ + X_test w(α);
    one SVD serves the whole alpha grid (the same solution as sklearn's Ridge).
    """
    train, test = standardise(x_train, x_test)
    centre = train.mean(axis=0)
    train, test = train - centre, test - centre
    y_mean = float(y_train.mean())
    u, singular, vt = np.linalg.svd(train, full_matrices=False)
    projected = u.T @ (y_train - y_mean)
    test_v = test @ vt.T
    shrink = singular[None, :] / (singular[None, :] ** 2 + np.asarray(alphas)[:, None])
    return y_mean + (shrink * projected[None, :]) @ test_v.T


def select_alpha_grouped(x: np.ndarray, y: np.ndarray, patients: np.ndarray, inner_splits: int,
                         alphas: Sequence[float] = RIDGE_ALPHAS) -> float:
    """The alpha with the lowest mean absolute error over an inner patient-grouped CV (GroupKFold)."""
    from sklearn.model_selection import GroupKFold

    n_groups = len(np.unique(patients))
    if n_groups < 2:
        return 1.0
    transformed = signed_log1p(x)
    errors = np.zeros(len(alphas))
    for train, test in GroupKFold(n_splits=min(inner_splits, n_groups)).split(x, y, groups=patients):
        predictions = np.clip(ridge_path_predictions(transformed[train], y[train], transformed[test], alphas), 0, 1)
        errors += np.abs(predictions - y[test][None, :]).sum(axis=1)
    return float(alphas[int(np.argmin(errors))])


def fit_ridge_grouped(x: np.ndarray, y: np.ndarray, patients: np.ndarray, inner_splits: int = 5) -> Pipeline:
    """The fitted scikit-learn pipeline (signed-log1p, StandardScaler, Ridge) at the alpha chosen by
    ``select_alpha_grouped``; ``pipeline[1]`` is the scaler and ``pipeline[-1]`` the Ridge."""
    alpha = select_alpha_grouped(x, y, patients, inner_splits)
    return make_ridge().set_params(ridge__alpha=alpha).fit(x, y)


def grouped_folds(patients: np.ndarray, n_folds: int | None) -> Folds:
    """Outer folds: leave-one-patient-out when ``n_folds`` is None or ≥ the number of patients,
    else GroupKFold(n_folds). No patient is ever split between training and test."""
    from sklearn.model_selection import GroupKFold, LeaveOneGroupOut

    n_patients = len(np.unique(patients))
    if n_patients < 2:
        raise InputError("patient-grouped cross-validation needs at least two patients")
    splitter = LeaveOneGroupOut() if n_folds is None or n_folds >= n_patients else GroupKFold(n_splits=n_folds)
    dummy = np.zeros(len(patients))
    return list(splitter.split(dummy, groups=patients))


def _evaluate_fold(args: FoldJob) -> tuple[np.ndarray, np.ndarray, float]:
    """One outer fold (in a pool worker): its test rows, their clipped Ridge predictions and the chosen alpha."""
    x, y, patients, train, test, inner = args
    model = fit_ridge_grouped(x[train], y[train], patients[train], inner)
    return test, np.clip(model.predict(x[test]), 0.0, 1.0), float(model[-1].alpha)


def cross_validate_group(
    x: np.ndarray, y: np.ndarray, patients: np.ndarray, folds: Folds,
    *, inner_splits: int = 5, pool: ProcessPoolExecutor | None = None,
) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Out-of-fold Ridge predictions and global-mean baseline predictions, plus each fold's alpha."""
    predicted = np.empty_like(y)
    baseline = np.empty_like(y)
    jobs = [(x, y, patients, train, test, inner_splits) for train, test in folds]
    results = pool.map(_evaluate_fold, jobs) if pool is not None else map(_evaluate_fold, jobs)
    alphas: list[float] = []
    for (train, _), (test, prediction, alpha) in zip(folds, results):
        predicted[test] = prediction
        baseline[test] = y[train].mean()
        alphas.append(alpha)
    return predicted, baseline, alphas
