"""8-level 2-D wavelet analysis: dominant scale, scale ratio, energy variance, fractality.

The input (an image region or a binary mask, on its bounding-box crop) is treated as embedded in an
infinite zero plane and decomposed with ``pywt.wavedec2(..., level=8, mode="zero")`` — db2 for image
crops, db1 (Haar) for masks, as in the paper's Table 1. Zero extension keeps every non-zero coefficient,
so the transform stays orthonormal (Parseval: Σ_j E_j + ‖a_8‖² = ‖x‖²) and costs only the crop's size,
not a fixed 256² frame. Crops larger than ``MAX_CROP`` px are centre-cropped (cost bound).
Level j = 1 is the finest (periods ≈ 2–4 px), j = 8 the coarsest; a sinusoid of period T pixels puts most
of its energy at the level j with 2^j ≤ T ≤ 2^(j+1).

Detail energy of level j (sum over the horizontal, vertical and diagonal sub-bands):
    E_j = Σ_{b∈{H,V,D}} Σ_k d_{j,b,k}²,    p_j = E_j / Σ_i E_i,
and the level's share of an N-pixel support, n_j = 3·N / 4^j (white noise puts exactly this fraction
of its energy, times σ², at level j).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import pywt

WAVELET_LEVELS = 8
MAX_CROP = 256
#: Levels 1..4 are "fine", 5..8 "coarse" for the scale ratio.
FINE_LEVELS = 4
WAVELET_DESCRIPTORS: tuple[str, ...] = (
    "wavelet_dominant_scale",
    "wavelet_scale_ratio",
    "wavelet_energy_variance",
    "wavelet_fractality",
)


def bounded_crop(array: np.ndarray, max_size: int = MAX_CROP) -> np.ndarray:
    """``array`` as float64, centre-cropped to at most S = ``max_size`` pixels per side:
    x[r0 : r0 + S, c0 : c0 + S], r0 = max(⌊(H − S)/2⌋, 0), c0 = max(⌊(W − S)/2⌋, 0)."""
    data = np.asarray(array, dtype=np.float64)
    r0 = max((data.shape[0] - max_size) // 2, 0)
    c0 = max((data.shape[1] - max_size) // 2, 0)
    return data[r0 : r0 + max_size, c0 : c0 + max_size]


@lru_cache(maxsize=8)
def _wavelet(name: str) -> pywt.Wavelet:
    return pywt.Wavelet(name)


def _dwt_axis(data: np.ndarray, filters: pywt.Wavelet, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """One zero-extended 1-D DWT step along ``axis``: (approximation, detail), public ``pywt.dwt``."""
    low, high = pywt.dwt(data, filters, mode="zero", axis=axis)
    return low, high


def level_energies(array: np.ndarray, wavelet: str = "db2", levels: int = WAVELET_LEVELS) -> tuple[np.ndarray, np.ndarray]:
    """Detail energies E_j and support shares n_j = 3·N/4^j for j = 1 (finest) .. ``levels`` (coarsest).

    E_j = Σ_{b∈{H,V,D}} Σ_k d_{j,b,k}²  on the zero-extended DWT of the (bounded) crop.
    """
    data = bounded_crop(array)
    filters = _wavelet(wavelet)
    energies = np.empty(levels, dtype=np.float64)
    approximation = data
    # The separable 2-D step as three 1-D pywt.dwt calls per level: the same coefficients as
    # pywt.wavedec2 (tested), without its per-level checks and its warning that 8 levels exceed a
    # small crop's dwt_max_level (zero extension keeps every coefficient, so the deep levels are exact).
    for level in range(levels):
        low, high = _dwt_axis(approximation, filters, 1)
        approximation, low_high = _dwt_axis(low, filters, 0)
        high_low, high_high = _dwt_axis(high, filters, 0)
        energies[level] = float(np.vdot(low_high, low_high) + np.vdot(high_low, high_low) + np.vdot(high_high, high_high))
    counts = 3.0 * data.size / 4.0 ** np.arange(1, levels + 1)
    return energies, counts


def dominant_scale(energies: np.ndarray) -> float:
    """Level carrying the most detail energy: argmax_j E_j (1 = finest, 8 = coarsest); nan if Σ E_j = 0."""
    if not np.any(energies > 0):
        return math.nan
    return float(np.argmax(energies) + 1)


def scale_ratio(energies: np.ndarray, fine_levels: int = FINE_LEVELS) -> float:
    """Fine-to-coarse energy balance in decades: log10( (Σ_{j≤4} E_j + ε) / (Σ_{j>4} E_j + ε) ),
    ε = 1e-10·Σ_j E_j; nan if Σ_j E_j = 0.

    The logarithm and ε keep the descriptor finite (within ±10) and symmetric (fine-dominated > 0).
    """
    fine = float(energies[:fine_levels].sum())
    coarse = float(energies[fine_levels:].sum())
    total = fine + coarse
    if total <= 0:
        return math.nan
    floor = 1e-10 * total
    return math.log10((fine + floor) / (coarse + floor))


def energy_variance(energies: np.ndarray) -> float:
    """Variance of the normalised level energies: Var_j(p_j), p_j = E_j / Σ_i E_i; nan if Σ E_j = 0.

    0 for energy spread evenly over the 8 levels, maximal (7/64) when one level holds everything.
    """
    total = float(energies.sum())
    if total <= 0:
        return math.nan
    return float(np.var(energies / total))


def fractality(energies: np.ndarray, counts: np.ndarray) -> float:
    """Wavelet spectral exponent β: least-squares slope of log2(E_j / n_j) against level j.

    White noise puts σ²·n_j of its energy at level j, so β ≈ 0;
    a fractional-Brownian surface of Hurst exponent H gives β = 2H + 2 (fractal dimension D = 3 − H);
    smooth, large structures give large β. Levels with zero energy are left out; nan if fewer than 3 remain.
    """
    usable = energies > 1e-12 * max(float(energies.sum()), 1e-300)
    if usable.sum() < 3:
        return math.nan
    levels = np.arange(1, energies.size + 1, dtype=np.float64)[usable]
    mean_power = np.log2(energies[usable] / counts[usable])
    # Closed-form least-squares slope: β = Σ (j − j̄)(y − ȳ) / Σ (j − j̄)²  (np.polyfit costs 10× more)
    centred_levels = levels - levels.mean()
    return float(np.dot(centred_levels, mean_power - mean_power.mean()) / np.dot(centred_levels, centred_levels))


def wavelet_descriptors(array: np.ndarray, wavelet: str = "db2") -> dict[str, float]:
    """The four wavelet descriptors of ``array`` (nan where undefined).

    For image regions pass the region-mean-subtracted crop, zero outside the region (so the frame padding
    adds no edge); for masks pass the 0/1 mask with ``wavelet="db1"``.
    """
    energies, counts = level_energies(array, wavelet)
    return {
        "wavelet_dominant_scale": dominant_scale(energies),
        "wavelet_scale_ratio": scale_ratio(energies),
        "wavelet_energy_variance": energy_variance(energies),
        "wavelet_fractality": fractality(energies, counts),
    }


def image_region_wavelet_descriptors(image: np.ndarray, region: np.ndarray) -> dict[str, float]:
    """db2 descriptors of an image region: crop to the region's box, subtract μ_R, zero outside R.

    I'(x) = (I(x) − μ_R)·[x ∈ R]; all nan if the region is empty.
    """
    from qcgate.features.intensity import region_crop  # local import: avoids a cycle at import time

    cropped = region_crop(image, region, pad=0)
    if cropped is None:
        return {name: math.nan for name in WAVELET_DESCRIPTORS}
    crop, crop_region = cropped
    centred = np.where(crop_region, crop - crop[crop_region].mean(), 0.0)
    return wavelet_descriptors(centred, "db2")
