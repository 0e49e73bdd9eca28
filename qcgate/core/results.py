"""What a QC job decides, in the shape the DICOM writers, the audit store and the report consume.

The verdict rule (DESIGN §2): with tau the predicted DSC Lesion of a slice, q the estimated Dice of
the AI segmentation on it and m the margin,

    accept  if q >= tau + m
    reject  if q <  tau - m
    review  otherwise, and whenever q is unknown (one member and no reference reader).

With a model's q estimator (``quality.json``) the two margins differ: m_accept and m_reject come from
the class-conditional conformal band of ``qcgate.predictors.band`` (accept if q ≥ τ + m_accept,
reject if q < τ − m_reject).
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


#: q sources that are not a model's q estimator (whose names are ``qcgate.predictors.quality.ESTIMATORS``).
Q_SOURCE_REFERENCE = "reference"  # q = Dice of the AI against a reader's SEG in the case
Q_SOURCE_NONE = "none"  # q unknown: the model has no q estimator, or none applies to the input


def slice_verdict(tau: float, q: float | None, margin: float | None, reject_margin: float | None = None) -> Verdict:
    """accept if q ≥ τ + m_a; reject if q < τ − m_r; review otherwise or when q (or the margin) is
    unknown. m_a = ``margin``; m_r = ``reject_margin`` (default ``margin``: the symmetric rule). With
    a conformal band (qcgate.predictors.band) m_a and m_r come from validation data and may be
    negative; an infinite m_a means accept is impossible."""
    if q is None or margin is None or not np.isfinite(q):
        return Verdict.REVIEW
    reject_margin = margin if reject_margin is None else reject_margin
    if q >= tau + margin:
        return Verdict.ACCEPT
    if q < tau - reject_margin:
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
    margin: float | None  # m_accept: accept if q >= tau + margin (None: q unknown)
    verdict: Verdict
    lesion_area_mm2: float
    uncertainty: dict[str, float] | None = None  # UM metrics (names without the group prefix)
    key_features: dict[str, float] = field(default_factory=dict)
    uncertainty_map: np.ndarray | None = None  # 2-D pixel-wise std of the members on this slice
    margin_reject: float | None = None  # m_reject: reject if q < tau - margin_reject (None: = margin)
    reason: str = ""  # why review was forced (out of domain, no q estimator), "" otherwise
    q_source: str = Q_SOURCE_NONE  # where q came from: an estimator's name, Q_SOURCE_REFERENCE or Q_SOURCE_NONE

    @property
    def accept_at(self) -> float | None:
        """τ + m_accept: q at or above it accepts (above 1: accept is impossible); None without a band."""
        return None if self.margin is None else self.tau + self.margin

    @property
    def reject_below(self) -> float | None:
        """τ − m_reject: q below it rejects (m_reject = m_accept for the symmetric rule); None without a band."""
        if self.margin is None:
            return None
        return self.tau - (self.margin if self.margin_reject is None else self.margin_reject)


@dataclass
class CaseResult:
    """The decision for one case: every lesion slice plus the series verdict."""

    ct_datasets: list[Dataset]  # spatially sorted source CT headers (with pixel data when available)
    slices: list[SliceResult]
    series_verdict: Verdict
    series_policy: str  # the stated policy, in words, e.g. "reject if any slice is rejected, ..."
    model_name: str
    model_version: str
    q_source: str  # "probability" | "learned" | "learned-um" | "learned-mask" | "learned-margin" | "reference" | "none"
    n_members: int
    uses_uncertainty: bool
    notes: list[str] = field(default_factory=list)  # e.g. "one member: no uncertainty map"
    segmentation_datasets: list[Dataset] = field(default_factory=list)  # the AI SEGs judged
    q_validation_mae: float | None = None  # the q estimator's validation MAE (None for reference / none)
    verdict_rule: str = ""  # the rule and its numbers in words (q source, band, targets)
    synthetic_model: bool = False  # the model was trained on SYNTHETIC data: flagged in every output
    reasons: list[str] = field(default_factory=list)  # why verdicts were forced to review (domain, no q)
