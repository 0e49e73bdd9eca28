"""Statistics of ``qcgate analyze``: Pearson correlations with DSC Lesion, the error summaries of Table 2,
and each reader's Dice against the reference (Fig. 2).

Error metrics (fractions of Dice, not percent)
----------------------------------------------
* Slice MAE = (1/N) * sum_s |ŷ_s − y_s| over all N slices; its ± is the SD over patients of each
  patient's mean slice error (each patient is one fold under leave-one-patient-out, as in the paper).
* Patient MAE = (1/P) * sum_p |mean_{s in p} ŷ_s − mean_{s in p} y_s|; its ± is the SD of those P
  per-patient errors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from qcgate.cohort.model import Cohort
from qcgate.science.feature_table import FeatureTable


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
    """Pearson r of one feature (of ``group``) with DSC Lesion; None when the feature is constant."""

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
