"""What ``qcgate analyze`` produces: Table 2's rows and the whole analysis result."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from qcgate.science.feature_table import FeatureTable
from qcgate.science.statistics import Correlation, ErrorSummary

TABLE_GROUPS = ("imaging", "texture", "border", "geometry", "uncertainty")  # Table 2's row order
BASELINE_NAME = "global mean"


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
    """Table 2 with everything behind it: the feature table, correlations and out-of-fold predictions."""

    table: FeatureTable
    correlations: list[Correlation]
    rows: list[GroupResult]
    n_folds: int
    predictions: dict[str, np.ndarray]
    baseline_predictions: np.ndarray
    synthetic: bool
    cohort_name: str
    individual: dict[str, np.ndarray] = field(default_factory=dict)  # reader -> Dice vs the reference
