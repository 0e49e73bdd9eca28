"""`qcgate analyze`: which input properties explain the experts' disagreement (the paper's Table 2).

Pipeline
--------
1. Every lesion slice of the cohort (a slice where at least one reader drew) with a defined DSC Lesion
   becomes one row: patient, case, slice, DSC Lesion (qcgate.core.agreement), and the feature groups
   of qcgate.features computed from the *feature mask* (the reference reader's mask; the first
   non-empty reader's mask without reader identity; or the AI ensemble mask with ``feature_mask="ai"``).
   Extraction runs in a process pool over cases.
2. Per feature, Pearson's r with DSC Lesion; per group, the feature with the largest |r|.
3. Per group, a Ridge regressor (signed-log1p, standardisation, Ridge; alpha chosen by an inner
   patient-grouped CV) evaluated by an outer patient-grouped CV: patients never straddle folds.
   The baseline ("global thresholding") predicts the training folds' mean DSC Lesion.
4. Outputs under ``out``: ``features.csv``, ``correlations.csv``, ``table2.csv``, ``predictions.csv``,
   ``dsc_lesion_density.png`` (Fig. 2), ``correlations.png`` and ``report.md``.

Error metrics (fractions of Dice, not percent)
----------------------------------------------
* Slice MAE = (1/N) * sum_s |ŷ_s − y_s| over all N slices; its ± is the SD over patients of each
  patient's mean slice error (each patient is one fold under leave-one-patient-out, as in the paper).
* Patient MAE = (1/P) * sum_p |mean_{s in p} ŷ_s − mean_{s in p} y_s|; its ± is the SD of those P
  per-patient errors.

Positional orthodoxy needs a lesion-frequency map learned from training lesions. It is fitted once
on all the cohort's feature masks, so a slice's own lesion contributes (1 / number of lesions) to the
map it is scored on: a small, stated leak, not re-fitted per fold.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qcgate.cohort.model import Case, Cohort
from qcgate.errors import InputError

log = logging.getLogger(__name__)

TABLE_GROUPS = ("imaging", "texture", "border", "geometry", "uncertainty")
RIDGE_ALPHAS = tuple(float(a) for a in np.logspace(-2, 4, 13))
BASELINE_NAME = "global mean"


# --------------------------------------------------------------------------------------------------
# Feature table
# --------------------------------------------------------------------------------------------------


@dataclass
class FeatureTable:
    """One row per analysed lesion slice: identifiers, target and every feature value."""

    patient_ids: list[str]
    case_ids: list[str]
    slice_indices: list[int]
    dsc_lesion: np.ndarray
    feature_names: list[str]
    values: np.ndarray  # (rows, features)
    groups: dict[str, list[int]] = field(default_factory=dict)  # group -> column indices
    flagged: np.ndarray | None = None  # (rows, features) bool: value is a documented fallback

    def __len__(self) -> int:
        return len(self.patient_ids)

    def group_matrix(self, group: str) -> tuple[np.ndarray, list[str]]:
        columns = self.groups[group]
        return self.values[:, columns], [self.feature_names[c] for c in columns]


@dataclass
class CaseTask:
    """What a worker needs to extract features for the lesion slices of one case."""

    case_id: str
    patient_id: str
    pixel_spacing: tuple[float, float]
    frame_shape: tuple[int, int] | None
    offset: tuple[int, int]
    slices: list[tuple[int, np.ndarray | None, np.ndarray, np.ndarray | None, np.ndarray | None, float]]
    groups: tuple[str, ...]


def _feature_mask(case: Case, index: int, feature_mask: str) -> np.ndarray:
    if feature_mask == "ai":
        mask = case.ai_mask(index)
        if mask is None:
            raise InputError(f"{case.source or case.case_id}: --feature-mask ai needs AI probability maps")
        return mask
    return case.feature_mask(index)


def build_case_tasks(cohort: Cohort, groups: Sequence[str], feature_mask: str = "reference",
                     min_readers: int = 1) -> list[CaseTask]:
    """One task per case with every lesion slice whose DSC Lesion is defined and on which at least
    ``min_readers`` readers drew."""
    tasks = []
    for case in cohort.cases:
        slices = []
        for index in case.lesion_slices():
            if sum(bool(m[index].any()) for m in case.reader_masks.values()) < min_readers:
                continue
            target = case.dsc_lesion(index)
            if target is None:
                continue
            mask = _feature_mask(case, index, feature_mask)
            if not mask.any():  # the AI missed the lesion entirely: nothing to describe
                continue
            image = None if case.image_hu is None else case.image_hu[index]
            lung = None if case.lung_mask is None else case.lung_mask[index]
            slices.append((index, image, mask, lung, case.uncertainty_map(index), float(target)))
        if slices:
            tasks.append(
                CaseTask(case.case_id, case.patient_id, tuple(case.pixel_spacing), case.frame_shape,  # type: ignore[arg-type]
                         tuple(case.offset), slices, tuple(groups))  # type: ignore[arg-type]
            )
    return tasks


# Position map shared with worker processes (set by the pool initializer; JSON text travels, not pickle).
_WORKER_POSITION_MAP = None


def _single_threaded() -> None:
    """One BLAS/OpenMP thread per worker process: the pool already uses every core."""
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        pass


def _init_worker(position_map_json: str | None) -> None:
    global _WORKER_POSITION_MAP
    _single_threaded()
    # pyradiomics logs a traceback for each undefined descriptor (e.g. GLCM MCC on a flat crop); the
    # feature library already replaces those by flagged fallbacks, so keep the console readable.
    logging.getLogger("radiomics").setLevel(logging.CRITICAL)
    if position_map_json is None:
        _WORKER_POSITION_MAP = None
    else:
        from qcgate.features import PositionFrequencyMap

        _WORKER_POSITION_MAP = PositionFrequencyMap.from_json(position_map_json)


def extract_case(task: CaseTask) -> list[tuple[int, float, dict[str, tuple[list[str], list[float], list[str]]]]]:
    """Worker: features of every slice of one case, as plain lists (cheap to send between processes)."""
    from qcgate.features import extract_slice_features

    rows = []
    for index, image, mask, lung, uncertainty, target in task.slices:
        vectors = extract_slice_features(
            image, mask, task.pixel_spacing, lung_mask=lung, uncertainty_map=uncertainty,
            position_map=_WORKER_POSITION_MAP, frame_shape=task.frame_shape, offset=task.offset,
            groups=task.groups,
        )
        rows.append((
            index, target,
            {g: (list(v.names), [float(x) for x in v.values], list(v.flags)) for g, v in vectors.items()},
        ))
    return rows


def fit_position_map(cohort: Cohort, feature_mask: str = "reference"):  # -> PositionFrequencyMap
    """Fit the lesion-frequency map from every case's feature masks (see the module docstring)."""
    from qcgate.features import PositionFrequencyMap

    samples: list[tuple[np.ndarray, np.ndarray | None]] = []
    offsets: list[tuple[int, int]] = []
    frame_shapes = {case.frame_shape for case in cohort.cases}
    if len(frame_shapes) > 1:
        raise InputError(f"{cohort.source}: cases have different frame shapes {sorted(map(str, frame_shapes))}")
    for case in cohort.cases:
        for index in case.lesion_slices():
            mask = _feature_mask(case, index, feature_mask)
            if not mask.any():
                continue
            samples.append((mask, None if case.lung_mask is None else case.lung_mask[index]))
            offsets.append(tuple(case.offset))  # type: ignore[arg-type]
    return PositionFrequencyMap.fit(samples, frame_shape=frame_shapes.pop(), offsets=offsets)


class Progress:
    """Prints "label: done/total (pct) elapsed" to stderr at most every ``interval`` seconds."""

    def __init__(self, label: str, total: int, *, interval: float = 2.0, enabled: bool = True) -> None:
        self.label, self.total, self.interval, self.enabled = label, total, interval, enabled
        self.done = 0
        self.start = self.last = time.monotonic()

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self.last >= self.interval or self.done >= self.total):
            self.last = now
            pct = 100.0 * self.done / max(self.total, 1)
            print(f"{self.label}: {self.done}/{self.total} ({pct:.0f}%) {now - self.start:.1f} s",
                  file=sys.stderr, flush=True)


def extract_feature_table(
    cohort: Cohort,
    *,
    groups: Sequence[str] | None = None,
    workers: int | None = None,
    feature_mask: str = "reference",
    progress: bool = True,
    min_readers: int = 1,
) -> FeatureTable:
    """Extract every group that the cohort's data allows for every analysable lesion slice."""
    from qcgate.features import ALL_GROUPS

    if groups is None:
        # Only groups that every case can provide: a table needs the same columns in every row.
        with_images = [c.image_hu is not None for c in cohort.cases]
        with_ensemble = [c.ai_probabilities is not None and c.ai_probabilities.shape[0] >= 2 for c in cohort.cases]
        groups = [g for g in ALL_GROUPS if all(with_images) or g in ("geometry", "uncertainty")]
        if not all(with_ensemble):
            groups = [g for g in groups if g != "uncertainty"]
        for label, flags in (("CT pixels (imaging, texture, border)", with_images),
                             ("an AI ensemble of >= 2 members (uncertainty)", with_ensemble)):
            if any(flags) and not all(flags):
                log.warning("%d of %d cases lack %s: those groups are left out", flags.count(False), len(flags), label)
    groups = tuple(groups)
    tasks = build_case_tasks(cohort, groups, feature_mask, min_readers)
    if not tasks:
        raise InputError(f"{cohort.source or cohort.name}: no lesion slice with a defined DSC Lesion to analyse")
    position_map = fit_position_map(cohort, feature_mask) if "geometry" in groups else None
    position_json = None if position_map is None else position_map.to_json()
    n_slices = sum(len(t.slices) for t in tasks)
    workers = max(1, workers or os.cpu_count() or 1)
    meter = Progress("features", n_slices, enabled=progress)
    results: list[tuple[CaseTask, list]] = []
    if workers == 1:
        _init_worker(position_json)  # in this process: the same settings as a pool worker
        for task in tasks:
            results.append((task, extract_case(task)))
            meter.advance(len(task.slices))
    else:
        with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker,
                                 initargs=(position_json,)) as pool:
            for task, rows in zip(tasks, pool.map(extract_case, tasks, chunksize=max(1, len(tasks) // (workers * 16)))):
                results.append((task, rows))
                meter.advance(len(task.slices))
    return _assemble(results)


def _assemble(results: list[tuple[CaseTask, list]]) -> FeatureTable:
    names: list[str] = []
    groups: dict[str, list[int]] = {}
    patient_ids, case_ids, slice_indices, targets, value_rows, flag_rows = [], [], [], [], [], []
    for task, rows in results:
        for index, target, vectors in rows:
            if not names:
                for group, (group_names, _, _) in vectors.items():
                    groups[group] = list(range(len(names), len(names) + len(group_names)))
                    names.extend(group_names)
            flat_names = [n for g in groups for n in vectors[g][0]]
            if flat_names != names:
                raise InputError(f"case {task.case_id} slice {index}: feature names differ from the first slice's")
            value_rows.append([v for g in groups for v in vectors[g][1]])
            flagged = {f for g in groups for f in vectors[g][2]}
            flag_rows.append([n in flagged for n in names])
            patient_ids.append(task.patient_id)
            case_ids.append(task.case_id)
            slice_indices.append(index)
            targets.append(target)
    return FeatureTable(
        patient_ids=patient_ids, case_ids=case_ids, slice_indices=slice_indices,
        dsc_lesion=np.asarray(targets, dtype=np.float64), feature_names=names,
        values=np.asarray(value_rows, dtype=np.float64).reshape(len(targets), len(names)),
        groups=groups, flagged=np.asarray(flag_rows, dtype=bool).reshape(len(targets), len(names)),
    )


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------


def pearson_r(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson's correlation r = cov(x, y) / (sd(x) sd(y)); None when x or y is constant."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    dx, dy = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float(dx @ dx) * float(dy @ dy))
    if denominator <= 1e-12 * max(1.0, float(np.abs(x).max()) * float(np.abs(y).max())) * len(x):
        return None
    return float(np.clip((dx @ dy) / denominator, -1.0, 1.0))


@dataclass
class Correlation:
    feature: str
    group: str
    r: float | None


def feature_correlations(table: FeatureTable) -> list[Correlation]:
    """Pearson r of every feature with DSC Lesion (None for a feature constant on this cohort)."""
    group_of = {table.feature_names[c]: g for g, cols in table.groups.items() for c in cols}
    return [
        Correlation(name, group_of[name], pearson_r(table.values[:, j], table.dsc_lesion))
        for j, name in enumerate(table.feature_names)
    ]


def signed_log1p(x: np.ndarray) -> np.ndarray:
    """sign(x) * log(1 + |x|): tames the heavy tails of areas, energies and counts before Ridge."""
    return np.sign(x) * np.log1p(np.abs(x))


def make_ridge():
    """Pipeline: signed-log1p -> standardise -> Ridge (alpha set by ``select_alpha_grouped``)."""
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer, StandardScaler
    from sklearn.linear_model import Ridge

    return make_pipeline(FunctionTransformer(signed_log1p), StandardScaler(), Ridge())


def _standardise(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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
    train, test = _standardise(x_train, x_test)
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


def fit_ridge_grouped(x: np.ndarray, y: np.ndarray, patients: np.ndarray, inner_splits: int = 5):
    """The fitted scikit-learn pipeline (signed-log1p, StandardScaler, Ridge) at the alpha chosen by
    ``select_alpha_grouped``; ``pipeline[1]`` is the scaler and ``pipeline[-1]`` the Ridge."""
    alpha = select_alpha_grouped(x, y, patients, inner_splits)
    return make_ridge().set_params(ridge__alpha=alpha).fit(x, y)


_fit_ridge_grouped = fit_ridge_grouped  # the name qcgate.predictors.ridge imports


@dataclass
class ErrorSummary:
    """Slice- and patient-level MAE with their SDs (see the module docstring for the definitions)."""

    mae_slice: float
    sd_slice: float
    mae_patient: float
    sd_patient: float


def summarise_errors(predicted: np.ndarray, truth: np.ndarray, patients: np.ndarray) -> ErrorSummary:
    """Slice MAE = mean |ŷ − y| (± SD over patients of per-patient slice MAE);
    patient MAE = mean_p |mean ŷ_p − mean y_p| (± SD over patients)."""
    errors = np.abs(predicted - truth)
    per_patient_slice, per_patient = [], []
    for patient in np.unique(patients):
        rows = patients == patient
        per_patient_slice.append(errors[rows].mean())
        per_patient.append(abs(predicted[rows].mean() - truth[rows].mean()))
    return ErrorSummary(
        mae_slice=float(errors.mean()), sd_slice=float(np.std(per_patient_slice)),
        mae_patient=float(np.mean(per_patient)), sd_patient=float(np.std(per_patient)),
    )


def grouped_folds(patients: np.ndarray, n_folds: int | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Outer folds: leave-one-patient-out when ``n_folds`` is None or ≥ the number of patients,
    else GroupKFold(n_folds). No patient is ever split between training and test."""
    from sklearn.model_selection import GroupKFold, LeaveOneGroupOut

    n_patients = len(np.unique(patients))
    if n_patients < 2:
        raise InputError("patient-grouped cross-validation needs at least two patients")
    splitter = LeaveOneGroupOut() if n_folds is None or n_folds >= n_patients else GroupKFold(n_splits=n_folds)
    dummy = np.zeros(len(patients))
    return list(splitter.split(dummy, groups=patients))


def _evaluate_fold(args: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]):
    x, y, patients, train, test, inner = args
    model = fit_ridge_grouped(x[train], y[train], patients[train], inner)
    return test, np.clip(model.predict(x[test]), 0.0, 1.0), float(model[-1].alpha)


def cross_validate_group(
    x: np.ndarray, y: np.ndarray, patients: np.ndarray, folds: list[tuple[np.ndarray, np.ndarray]],
    *, inner_splits: int = 5, pool: ProcessPoolExecutor | None = None,
) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Out-of-fold Ridge predictions and global-mean baseline predictions, plus each fold's alpha."""
    predicted = np.empty_like(y)
    baseline = np.empty_like(y)
    jobs = [(x, y, patients, train, test, inner_splits) for train, test in folds]
    results = pool.map(_evaluate_fold, jobs) if pool is not None else map(_evaluate_fold, jobs)
    alphas = []
    for (train, _), (test, prediction, alpha) in zip(folds, results):
        predicted[test] = prediction
        baseline[test] = y[train].mean()
        alphas.append(alpha)
    return predicted, baseline, alphas


@dataclass
class GroupResult:
    """One row of Table 2."""

    group: str
    n_features: int
    top_feature: str | None
    top_r: float | None
    model: ErrorSummary
    baseline: ErrorSummary
    median_alpha: float


@dataclass
class AnalysisResult:
    table: FeatureTable
    correlations: list[Correlation]
    rows: list[GroupResult]
    n_folds: int
    predictions: dict[str, np.ndarray]
    baseline_predictions: np.ndarray
    synthetic: bool
    cohort_name: str
    individual: dict[str, np.ndarray] = field(default_factory=dict)  # reader -> Dice vs the reference


def individual_reader_scores(cohort: Cohort, table: FeatureTable) -> dict[str, np.ndarray]:
    """Each non-reference reader's Dice against the reference on the analysed slices (Fig. 2's
    "individually"); pairs where both are empty are left out, as in DSC Lesion. Empty without identity."""
    from qcgate.core.agreement import dice

    by_id = {case.case_id: case for case in cohort.cases}
    scores: dict[str, list[float]] = {}
    for case_id, index in zip(table.case_ids, table.slice_indices):
        case = by_id[case_id]
        if case.reference_reader is None:
            continue
        reference = case.reader_masks[case.reference_reader][index]
        for reader, masks in case.reader_masks.items():
            if reader != case.reference_reader and (reference.any() or masks[index].any()):
                scores.setdefault(reader, []).append(dice(masks[index], reference))
    return {reader: np.asarray(values) for reader, values in scores.items()}


def analyze_table(
    table: FeatureTable, *, n_folds: int | None = 10, inner_splits: int = 5, workers: int | None = None,
    progress: bool = True, synthetic: bool = False, cohort_name: str = "",
) -> AnalysisResult:
    """Correlations and the per-group grouped-CV Ridge evaluation on an extracted feature table."""
    patients = np.asarray(table.patient_ids)
    y = table.dsc_lesion
    folds = grouped_folds(patients, n_folds)
    correlations = feature_correlations(table)
    rows: list[GroupResult] = []
    predictions: dict[str, np.ndarray] = {}
    baseline_predictions = np.empty(0)
    groups = [g for g in TABLE_GROUPS if g in table.groups] + [g for g in table.groups if g not in TABLE_GROUPS]
    meter = Progress("ridge", len(groups) * len(folds), enabled=progress)
    workers = max(1, workers or os.cpu_count() or 1)
    pool = ProcessPoolExecutor(max_workers=workers, initializer=_single_threaded) if workers > 1 else None
    try:
        for group in groups:
            x, names = table.group_matrix(group)
            predicted, baseline, alphas = cross_validate_group(x, y, patients, folds, inner_splits=inner_splits, pool=pool)
            meter.advance(len(folds))
            in_group = [c for c in correlations if c.group == group and c.r is not None]
            top = max(in_group, key=lambda c: abs(c.r), default=None)  # type: ignore[arg-type]
            rows.append(GroupResult(
                group=group, n_features=len(names),
                top_feature=None if top is None else top.feature, top_r=None if top is None else top.r,
                model=summarise_errors(predicted, y, patients), baseline=summarise_errors(baseline, y, patients),
                median_alpha=float(np.median(alphas)),
            ))
            predictions[group] = predicted
            baseline_predictions = baseline
    finally:
        if pool is not None:
            pool.shutdown()
    return AnalysisResult(table, correlations, rows, len(folds), predictions, baseline_predictions,
                          synthetic, cohort_name)


# --------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def format_table(result: AnalysisResult) -> str:
    """Table 2 as fixed-width text (MAE in percent of Dice)."""
    header = (f"{'Group':<12} {'n':>4} {'Max r':>7}  {'MAE slice %':>13} {'MAE patient %':>14}  "
              f"{'(global mean: slice / patient %)':>33}  top feature")
    lines = [header, "-" * len(header)]
    for row in result.rows:
        r = "n/a" if row.top_r is None else f"{row.top_r:+.2f}"
        lines.append(
            f"{row.group:<12} {row.n_features:>4} {r:>7}  "
            f"{_pct(row.model.mae_slice):>6} ± {_pct(row.model.sd_slice):<4} "
            f"{_pct(row.model.mae_patient):>7} ± {_pct(row.model.sd_patient):<4}  "
            f"{_pct(row.baseline.mae_slice) + ' ± ' + _pct(row.baseline.sd_slice) + ' / ' + _pct(row.baseline.mae_patient) + ' ± ' + _pct(row.baseline.sd_patient):>33}  "
            f"{row.top_feature or ''}"
        )
    return "\n".join(lines)


def write_outputs(result: AnalysisResult, out: Path, *, command: str = "") -> dict[str, Path]:
    """Write the CSVs, the two PNGs and report.md under ``out``; returns name -> path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = result.table
    paths = {
        "features": out / "features.csv", "correlations": out / "correlations.csv",
        "table2": out / "table2.csv", "predictions": out / "predictions.csv",
        "density": out / "dsc_lesion_density.png", "correlation_plot": out / "correlations.png",
        "report": out / "report.md",
    }
    with open(paths["features"], "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["patient_id", "case_id", "slice_index", "dsc_lesion", *table.feature_names])
        for i in range(len(table)):
            writer.writerow([table.patient_ids[i], table.case_ids[i], table.slice_indices[i],
                             f"{table.dsc_lesion[i]:.6f}", *(f"{v:.6g}" for v in table.values[i])])
    with open(paths["correlations"], "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["group", "feature", "pearson_r", "abs_r", "fallback_fraction"])
        flag_fraction = table.flagged.mean(axis=0) if table.flagged is not None and len(table) else None
        for j, c in sorted(enumerate(result.correlations), key=lambda jc: -abs(jc[1].r or 0.0)):
            writer.writerow([c.group, c.feature, "" if c.r is None else f"{c.r:.4f}",
                             "" if c.r is None else f"{abs(c.r):.4f}",
                             "" if flag_fraction is None else f"{flag_fraction[j]:.3f}"])
    with open(paths["table2"], "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["group", "n_features", "top_feature", "max_r", "mae_slice", "sd_slice",
                         "mae_patient", "sd_patient", "baseline_mae_slice", "baseline_sd_slice",
                         "baseline_mae_patient", "baseline_sd_patient", "median_alpha", "n_slices",
                         "n_patients", "n_folds"])
        for row in result.rows:
            writer.writerow([row.group, row.n_features, row.top_feature or "",
                             "" if row.top_r is None else f"{row.top_r:.4f}",
                             *(f"{v:.5f}" for v in (row.model.mae_slice, row.model.sd_slice,
                                                    row.model.mae_patient, row.model.sd_patient,
                                                    row.baseline.mae_slice, row.baseline.sd_slice,
                                                    row.baseline.mae_patient, row.baseline.sd_patient)),
                             f"{row.median_alpha:.4g}", len(table), len(set(table.patient_ids)), result.n_folds])
    with open(paths["predictions"], "w", newline="") as handle:
        writer = csv.writer(handle)
        groups = list(result.predictions)
        writer.writerow(["patient_id", "case_id", "slice_index", "dsc_lesion", BASELINE_NAME.replace(" ", "_"),
                         *groups])
        for i in range(len(table)):
            writer.writerow([table.patient_ids[i], table.case_ids[i], table.slice_indices[i],
                             f"{table.dsc_lesion[i]:.6f}", f"{result.baseline_predictions[i]:.6f}",
                             *(f"{result.predictions[g][i]:.6f}" for g in groups)])
    _plot_density(result, paths["density"])
    _plot_correlations(result, paths["correlation_plot"])
    paths["report"].write_text(_report(result, command))
    return paths


def _plot_density(result: AnalysisResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.stats import gaussian_kde

    y = result.table.dsc_lesion
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    ax.hist(y, bins=40, range=(0, 1), density=True, alpha=0.35, color="tab:blue", label="histogram")
    if len(y) > 2 and np.std(y) > 0:
        grid = np.linspace(0, 1, 201)
        ax.plot(grid, gaussian_kde(y)(grid), color="tab:blue", label="DSC Lesion (averaged)")
        for i, (reader, scores) in enumerate(sorted(result.individual.items())):
            if len(scores) > 2 and np.std(scores) > 0:
                ax.plot(grid, gaussian_kde(scores)(grid), linewidth=0.9, linestyle=":",
                        color=plt.get_cmap("Dark2")(i), label=f"{reader} vs reference")
    ax.axvline(float(y.mean()), color="tab:red", linestyle="--", label=f"mean {y.mean():.2f} (global threshold)")
    tag = " — SYNTHETIC data" if result.synthetic else ""
    ax.set_title(f"DSC Lesion per slice, {result.cohort_name}{tag} (n={len(y)})", fontsize=9)
    ax.set_xlabel("DSC Lesion")
    ax.set_ylabel("density")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_correlations(result: AnalysisResult, path: Path, top: int = 20) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    defined = [c for c in result.correlations if c.r is not None]
    strongest = sorted(defined, key=lambda c: -abs(c.r))[:top][::-1]  # type: ignore[arg-type]
    colours = {g: plt.get_cmap("tab10")(i) for i, g in enumerate(TABLE_GROUPS)}
    fig, ax = plt.subplots(figsize=(7, 0.28 * max(len(strongest), 4) + 1.2), dpi=120)
    ax.barh([c.feature for c in strongest], [c.r for c in strongest],  # type: ignore[misc]
            color=[colours.get(c.group, "grey") for c in strongest])
    ax.axvline(0, color="black", linewidth=0.6)
    ax.set_xlim(-1, 1)
    ax.set_xlabel("Pearson r with DSC Lesion")
    tag = " — SYNTHETIC data" if result.synthetic else ""
    ax.set_title(f"Strongest correlations, {result.cohort_name}{tag}", fontsize=9)
    ax.tick_params(axis="y", labelsize=6)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[g]) for g in TABLE_GROUPS if g in result.table.groups]
    ax.legend(handles, [g for g in TABLE_GROUPS if g in result.table.groups], fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _report(result: AnalysisResult, command: str) -> str:
    table = result.table
    y = table.dsc_lesion
    lines = [f"# DSC Lesion analysis: {result.cohort_name}", ""]
    if result.synthetic:
        lines += ["**SYNTHETIC data** (qcgate phantom): no patient, not evidence about real readers.", ""]
    if command:
        lines += ["Command:", "", f"    {command}", ""]
    lines += [
        f"- {len(table)} lesion slices from {len(set(table.patient_ids))} patients "
        f"({len(set(table.case_ids))} cases); DSC Lesion mean {y.mean():.3f} ± {y.std():.3f} (SD).",
        f"- Ridge per group (signed-log1p, standardise, Ridge; alpha by inner patient-grouped CV), "
        f"outer patient-grouped CV with {result.n_folds} folds; baseline = training folds' mean DSC Lesion.",
        "- MAE in percent of Dice. Slice ± = SD over patients of per-patient slice MAE; "
        "patient ± = SD over patients.",
        "",
        "| Group | n features | Max r (feature) | MAE slice | MAE patient | Global mean: slice | Global mean: patient |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result.rows:
        r = "n/a" if row.top_r is None else f"{row.top_r:+.2f} ({row.top_feature})"
        lines.append(
            f"| {row.group} | {row.n_features} | {r} | {_pct(row.model.mae_slice)} ± {_pct(row.model.sd_slice)} % | "
            f"{_pct(row.model.mae_patient)} ± {_pct(row.model.sd_patient)} % | "
            f"{_pct(row.baseline.mae_slice)} ± {_pct(row.baseline.sd_slice)} % | "
            f"{_pct(row.baseline.mae_patient)} ± {_pct(row.baseline.sd_patient)} % |"
        )
    defined = sorted((c for c in result.correlations if c.r is not None), key=lambda c: -abs(c.r))  # type: ignore[arg-type]
    lines += ["", "Strongest correlations:", ""]
    lines += [f"- {c.feature}: r = {c.r:+.3f}" for c in defined[:10]]
    lines += ["", "Files: features.csv, correlations.csv, table2.csv, predictions.csv, "
              "dsc_lesion_density.png (Fig. 2), correlations.png.", ""]
    return "\n".join(lines)


def run_analysis(
    cohort: Cohort, out: Path, *, n_folds: int | None = 10, workers: int | None = None,
    feature_mask: str = "reference", groups: Sequence[str] | None = None, progress: bool = True,
    command: str = "", printer: Callable[[str], None] = print, min_readers: int = 1,
) -> AnalysisResult:
    """Extract, analyse, write every output and print Table 2."""
    started = time.monotonic()
    table = extract_feature_table(cohort, groups=groups, workers=workers, feature_mask=feature_mask,
                                  progress=progress, min_readers=min_readers)
    extracted = time.monotonic()
    result = analyze_table(table, n_folds=n_folds, workers=workers, progress=progress,
                           synthetic=cohort.synthetic, cohort_name=cohort.name)
    result.individual = individual_reader_scores(cohort, table)
    write_outputs(result, out, command=command)
    tag = "  [SYNTHETIC data]" if cohort.synthetic else ""
    printer(f"{cohort.name}{tag}: {len(table)} lesion slices, {len(set(table.patient_ids))} patients, "
            f"{result.n_folds}-fold patient-grouped CV (features {extracted - started:.1f} s, "
            f"models {time.monotonic() - extracted:.1f} s)")
    printer(format_table(result))
    printer(f"outputs in {out}")
    return result
