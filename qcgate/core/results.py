"""What a QC job decides, in the shape the DICOM writers, the audit store and the report consume.

The verdict rule (DESIGN §2): with tau the predicted DSC Lesion of a slice, q the estimated Dice of
the AI segmentation on it and m the margin,

    accept  if q >= tau + m
    reject  if q <  tau - m
    review  otherwise, and whenever q is unknown (one member and no reference reader).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset


class Verdict(str, enum.Enum):
    ACCEPT = "accept"
    REVIEW = "review"
    REJECT = "reject"


def slice_verdict(tau: float, q: float | None, margin: float) -> Verdict:
    """accept if q ≥ τ + m; reject if q < τ − m; review otherwise or when q is unknown."""
    if q is None or not np.isfinite(q):
        return Verdict.REVIEW
    if q >= tau + margin:
        return Verdict.ACCEPT
    if q < tau - margin:
        return Verdict.REJECT
    return Verdict.REVIEW


@dataclass
class SliceResult:
    """The decision for one lesion slice of the CT series."""

    source_image: Dataset  # the CT slice's header (SOP Class/Instance UID, position, ...)
    slice_index: int  # index into CaseResult.ct_datasets (spatially sorted)
    ai_mask: np.ndarray  # 2-D bool, the ensemble's segmentation (mean probability >= 0.5)
    tau: float  # image-specific threshold: predicted DSC Lesion, in [0, 1]
    q: float | None  # estimated Dice of the AI segmentation; None when unknown
    margin: float
    verdict: Verdict
    lesion_area_mm2: float
    uncertainty: dict[str, float] | None = None  # UM metrics (names without the group prefix)
    key_features: dict[str, float] = field(default_factory=dict)
    uncertainty_map: np.ndarray | None = None  # 2-D pixel-wise std of the members on this slice


@dataclass
class CaseResult:
    """The decision for one case: every lesion slice plus the series verdict."""

    ct_datasets: list[Dataset]  # spatially sorted source CT headers (with pixel data when available)
    slices: list[SliceResult]
    series_verdict: Verdict
    series_policy: str  # the stated policy, in words, e.g. "reject if any slice is rejected, ..."
    model_name: str
    model_version: str
    q_source: str  # "ensemble-agreement" | "reference" | "none"
    n_members: int
    uses_uncertainty: bool
    notes: list[str] = field(default_factory=list)  # e.g. "one member: no uncertainty map"
    segmentation_datasets: list[Dataset] = field(default_factory=list)  # the AI SEGs judged
