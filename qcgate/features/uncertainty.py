"""Uncertainty-map (UM) metrics from an ensemble's pixel-wise standard deviation.

The UM is std_m(p_m(x)) over the ensemble members' probability maps (:func:`ensemble_mean_and_std`).
Region of evaluation: the AI mask dilated by ``UM_DILATION_PX`` pixels (3×3 square element) — the
lesion plus the band where its border could plausibly lie, which is where members disagree. With an
empty AI mask the whole map is used (the AI found nothing; its doubt anywhere is the information).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from qcgate.features.intensity import bounding_box
from qcgate.features.regions import dilate_in_place
from qcgate.features.vector import FeatureVector, build_vector

UM_DILATION_PX = 5
UM_THRESHOLDS: tuple[float, ...] = (0.1, 0.2, 0.3)
UM_PERCENTILES: tuple[int, ...] = (50, 90, 99)
#: Histogram for the entropy: the std of values in [0, 1] is at most 0.5.
UM_ENTROPY_BINS = 50
UM_ENTROPY_RANGE = (0.0, 0.5)

def _threshold_label(threshold: float) -> str:
    """0.1 -> "0p1": no dot inside a descriptor name, so ``name.split(".", 1)`` always yields (group, descriptor)."""
    return f"{threshold:.1f}".replace(".", "p")


UNCERTAINTY_DESCRIPTORS: tuple[str, ...] = (
    "um_entropy",
    "um_mean",
    "um_std",
    *(f"um_p{p}" for p in UM_PERCENTILES),
    *(f"um_frac_gt_{_threshold_label(t)}" for t in UM_THRESHOLDS),
)


def ensemble_mean_and_std(prob_maps: Sequence[np.ndarray] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-wise mean μ(x) = (1/M) Σ_m p_m(x) and population std σ(x) = √((1/M) Σ_m (p_m(x) − μ(x))²).

    ``prob_maps``: M maps of equal shape (or an array with the members on axis 0). The AI mask is μ ≥ 0.5.
    """
    stack = np.asarray(prob_maps, dtype=np.float64)
    if stack.ndim < 2 or stack.shape[0] < 1:
        raise ValueError("need at least one probability map, stacked on axis 0")
    return stack.mean(axis=0), stack.std(axis=0)


def uncertainty_region(ai_mask: np.ndarray, dilation_px: int = UM_DILATION_PX) -> np.ndarray:
    """R = AI ⊕ B^k (k = ``dilation_px``, B the 3×3 square); the whole frame when the AI mask is empty."""
    mask = np.asarray(ai_mask, dtype=bool)
    if not mask.any():
        return np.ones_like(mask)
    return dilate_in_place(mask, dilation_px)


def histogram_entropy_bits(values: np.ndarray, bins: int = UM_ENTROPY_BINS, value_range: tuple[float, float] = UM_ENTROPY_RANGE) -> float:
    """Shannon entropy of the values' histogram: H = −Σ_b q_b log2 q_b, q_b = n_b / N (fixed bins; values
    outside the range are clipped into the end bins). 0 for a constant map, log2(bins) at most."""
    data = np.clip(np.asarray(values, dtype=np.float64), value_range[0], value_range[1])
    if data.size == 0:
        return math.nan
    counts, _edges = np.histogram(data, bins=bins, range=value_range)
    q = counts[counts > 0] / data.size
    return float(-np.sum(q * np.log2(q)) + 0.0)


def uncertainty_metrics(uncertainty_map: np.ndarray, ai_mask: np.ndarray) -> dict[str, float]:
    """UM metrics over :func:`uncertainty_region`:

    entropy (see :func:`histogram_entropy_bits`), mean = (1/N) Σ σ, std = √((1/N) Σ (σ − mean)²),
    p50/p90/p99 = percentiles (linear interpolation), frac_gt_t = #{σ > t} / N for t ∈ {0.1, 0.2, 0.3}.
    """
    um = np.asarray(uncertainty_map, dtype=np.float64)
    if um.shape != np.shape(ai_mask):
        raise ValueError(f"uncertainty map {um.shape} and mask {np.shape(ai_mask)} differ in shape")
    region = uncertainty_region(ai_mask)
    box = bounding_box(region)
    values = um[box][region[box]] if box is not None else um[region]  # index the region's box only (cost)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return {}
    metrics = {
        "um_entropy": histogram_entropy_bits(values),
        "um_mean": float(values.mean()),
        "um_std": float(values.std()),
    }
    for p, value in zip(UM_PERCENTILES, np.percentile(values, UM_PERCENTILES)):
        metrics[f"um_p{p}"] = float(value)
    for t in UM_THRESHOLDS:
        metrics[f"um_frac_gt_{_threshold_label(t)}"] = float(np.count_nonzero(values > t) / values.size)
    return metrics


def uncertainty_features(uncertainty_map: np.ndarray, ai_mask: np.ndarray) -> FeatureVector:
    """The ``uncertainty`` :class:`FeatureVector` of :func:`uncertainty_metrics` over R = AI ⊕ B^5
    (fallback 0 + flag where a metric is undefined)."""
    return build_vector("uncertainty", UNCERTAINTY_DESCRIPTORS, uncertainty_metrics(uncertainty_map, ai_mask))
