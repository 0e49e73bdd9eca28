"""`qcgate analyze`: which input properties explain the experts' disagreement (the paper's Table 2).

Pipeline
--------
1. Every lesion slice of the cohort (a slice where at least one reader drew) with a defined DSC Lesion
   becomes one row: patient, case, slice, DSC Lesion (qcgate.core.agreement), and the feature groups
   of qcgate.features computed from the *feature mask* (``qcgate.science.feature_table``).
   Extraction runs in a process pool over cases.
2. Per feature, Pearson's r with DSC Lesion; per group, the feature with the largest |r|
   (``qcgate.science.statistics``).
3. Per group, a Ridge regressor (signed-log1p, standardisation, Ridge; alpha chosen by an inner
   patient-grouped CV) evaluated by an outer patient-grouped CV: patients never straddle folds
   (``qcgate.science.ridge_cv``). The baseline ("global thresholding") predicts the training folds'
   mean DSC Lesion. Errors: slice and patient MAE, defined in ``qcgate.science.statistics``.
4. Outputs under ``out`` (``qcgate.science.report``, ``qcgate.science.plots``): ``features.csv``,
   ``correlations.csv``, ``table2.csv``, ``predictions.csv``, ``dsc_lesion_density.png`` (Fig. 2),
   ``correlations.png`` and ``report.md``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from qcgate.cohort.model import Cohort
from qcgate.science.feature_table import FeatureTable, extract_feature_table
from qcgate.science.parallel import AnalysisProgress, single_threaded
from qcgate.science.report import format_table, write_analysis_outputs
from qcgate.science.results import TABLE_GROUPS, AnalysisResult, GroupResult
from qcgate.science.ridge_cv import cross_validate_group, grouped_folds
from qcgate.science.statistics import (
    feature_correlations,
    individual_reader_scores,
    summarise_errors,
)


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
    meter = AnalysisProgress("ridge", len(groups) * len(folds), enabled=progress)
    workers = max(1, workers or os.cpu_count() or 1)
    pool = ProcessPoolExecutor(max_workers=workers, initializer=single_threaded) if workers > 1 else None
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
    write_analysis_outputs(result, out, command=command)
    tag = "  [SYNTHETIC data]" if cohort.synthetic else ""
    printer(f"{cohort.name}{tag}: {len(table)} lesion slices, {len(set(table.patient_ids))} patients, "
            f"{result.n_folds}-fold patient-grouped CV (features {extracted - started:.1f} s, "
            f"models {time.monotonic() - extracted:.1f} s)")
    printer(format_table(result))
    printer(f"outputs in {out}")
    return result
