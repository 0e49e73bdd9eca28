"""Intensity-sharpness descriptors of an image region: energy of gradient, variance of Laplacian,
Fourier SNR.

Each descriptor is evaluated on the region's bounding-box crop. Pixels of the crop outside the region are
replaced by the region's mean (see :func:`region_crop`) so that only the region's own contrast contributes
and a thin ring or an irregular lung crop does not inject the neighbouring anatomy.
All functions return ``nan`` when undefined (empty region); the caller turns that into fallback + flag.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from scipy import ndimage

#: Cut-off between "signal" and "noise" bands for the Fourier SNR, in cycles per pixel (Nyquist = 0.5).
FOURIER_SNR_CUTOFF = 0.25


def bounding_box(mask: np.ndarray, pad: int = 0) -> tuple[slice, slice] | None:
    """Row and column slices of ``mask``'s bounding box grown by ``pad`` pixels (clipped), or None if empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    r0, r1 = max(int(rows[0]) - pad, 0), min(int(rows[-1]) + 1 + pad, mask.shape[0])
    c0, c1 = max(int(cols[0]) - pad, 0), min(int(cols[-1]) + 1 + pad, mask.shape[1])
    return slice(r0, r1), slice(c0, c1)


def region_crop(image: np.ndarray, region: np.ndarray, pad: int = 1) -> tuple[np.ndarray, np.ndarray] | None:
    """The region's bounding-box crop (grown by ``pad``) and the region mask within it.

    Returns ``(crop, crop_region)`` with ``crop`` float64, or None when the region is empty.
    """
    box = bounding_box(region, pad)
    if box is None:
        return None
    return np.asarray(image[box], dtype=np.float64), np.asarray(region[box], dtype=bool)


def mean_filled(crop: np.ndarray, crop_region: np.ndarray) -> np.ndarray:
    """Copy of ``crop`` with pixels outside ``crop_region`` set to the region mean μ_R.

    I'(x) = I(x) if x ∈ R else μ_R — removes foreign anatomy without creating an artificial edge.
    """
    filled = crop.copy()
    filled[~crop_region] = float(crop[crop_region].mean())
    return filled


def energy_of_gradient(crop: np.ndarray, crop_region: np.ndarray) -> float:
    """Mean squared gradient magnitude over the region (HU² / px²).

    EoG = (1/N_R) Σ_{x∈R} [ (∂I/∂r)(x)² + (∂I/∂c)(x)² ], with central differences (np.gradient).
    Gradients are taken on the raw crop, so a ring pixel sees its true neighbours.
    """
    if crop.ndim != 2 or not crop_region.any():
        return math.nan
    grad_r, grad_c = np.gradient(crop) if min(crop.shape) > 1 else (np.zeros_like(crop), np.zeros_like(crop))
    return float(np.mean((grad_r**2 + grad_c**2)[crop_region]))


def variance_of_laplacian(crop: np.ndarray, crop_region: np.ndarray) -> float:
    """Variance over the region of the 4-neighbour discrete Laplacian (HU² / px⁴).

    VoL = Var_{x∈R}( ∇²I(x) ),  ∇²I(r,c) = I(r-1,c) + I(r+1,c) + I(r,c-1) + I(r,c+1) − 4 I(r,c)
    (scipy.ndimage.laplace, edges reflected).
    """
    if crop.ndim != 2 or not crop_region.any():
        return math.nan
    laplacian = ndimage.laplace(crop, mode="reflect")
    return float(np.var(laplacian[crop_region]))


@lru_cache(maxsize=512)
def _column_multiplicity(shape: tuple[int, int]) -> np.ndarray:
    """How many full-spectrum columns each rfft2 column stands for: 1 for DC (and Nyquist when the width
    is even), 2 for the others (their mirror image)."""
    columns = shape[1] // 2 + 1
    multiplicity = np.full(columns, 2.0)
    multiplicity[0] = 1.0
    if shape[1] % 2 == 0:
        multiplicity[-1] = 1.0
    return multiplicity


@lru_cache(maxsize=512)
def _frequency_bands(shape: tuple[int, int], cutoff: float) -> tuple[np.ndarray, np.ndarray]:
    """Weights on the rfft2 grid of ``shape`` selecting 0 < |f| ≤ cutoff and |f| > cutoff, each column
    weighted by its multiplicity (cached: crops repeat sizes)."""
    freq_r = np.fft.fftfreq(shape[0])[:, None]
    freq_c = np.fft.rfftfreq(shape[1])[None, :]
    radial = np.sqrt(freq_r**2 + freq_c**2)
    multiplicity = _column_multiplicity(shape)[None, :]
    low_weights = ((radial > 0) & (radial <= cutoff)) * multiplicity
    high_weights = (radial > cutoff) * multiplicity
    low_weights.setflags(write=False)
    high_weights.setflags(write=False)
    return low_weights, high_weights


@lru_cache(maxsize=512)
def _dc_weight(shape: tuple[int, int]) -> np.ndarray:
    weight = np.zeros((shape[0], shape[1] // 2 + 1))
    weight[0, 0] = 1.0
    weight.setflags(write=False)
    return weight


def fourier_snr_db(array: np.ndarray, cutoff: float = FOURIER_SNR_CUTOFF) -> float:
    """Low-to-high-frequency power ratio of a 2-D array, in dB.

    With P(f) = |FFT(a − mean(a))|² and radial frequency |f| in cycles/pixel,
    SNR = 10·log10( (Σ_{0<|f|≤f_c} P(f) + ε) / (Σ_{|f|>f_c} P(f) + ε) ),  f_c = ``cutoff`` (0.25),
    ε = 1e-10·Σ_f P(f) (so a noiseless signal scores a finite +100 dB, not infinity).
    Smooth content (signal) lives below f_c, pixel noise spreads up to Nyquist (0.5); white noise gives
    ≈ 10·log10(π/16 / (1 − π/16)) ≈ −6.1 dB. Returns nan for a constant input (no power at all).
    """
    data = np.asarray(array, dtype=np.float64)
    if data.ndim != 2 or data.size < 4:
        return math.nan
    # Real input: the half spectrum (rfft2) with each mirrored column counted twice gives the same band
    # sums as the full FFT at half the cost.
    spectrum = np.fft.rfft2(data - data.mean())
    power = spectrum.real**2 + spectrum.imag**2
    low_weights, high_weights = _frequency_bands(data.shape, cutoff)
    low = float(np.vdot(low_weights, power))
    high = float(np.vdot(high_weights, power))
    scale_total = low + high + float(np.vdot(_dc_weight(data.shape), power))
    scale = scale_total
    # A constant array leaves only FFT round-off (relative to its own magnitude): no power at all.
    if scale <= 1e-20 * max(float(np.sum(data * data)), 1e-300) or scale <= 0.0:
        return math.nan
    floor = 1e-10 * scale
    return 10.0 * math.log10((low + floor) / (high + floor))


def intensity_descriptors(image: np.ndarray, region: np.ndarray) -> dict[str, float]:
    """energy_of_gradient, variance_of_laplacian and fourier_snr of ``image`` over ``region`` (nan if undefined):
    EoG = mean_R |∇I|², VoL = Var_R(∇²I), SNR = 10·log10(P_low / P_high).

    The Fourier SNR is taken on the mean-filled crop (:func:`mean_filled`) so only the region's texture counts.
    """
    names = ("energy_of_gradient", "variance_of_laplacian", "fourier_snr")
    cropped = region_crop(image, region)
    if cropped is None:
        return {name: math.nan for name in names}
    crop, crop_region = cropped
    return {
        "energy_of_gradient": energy_of_gradient(crop, crop_region),
        "variance_of_laplacian": variance_of_laplacian(crop, crop_region),
        "fourier_snr": fourier_snr_db(mean_filled(crop, crop_region)),
    }


INTENSITY_DESCRIPTORS: tuple[str, ...] = ("energy_of_gradient", "variance_of_laplacian", "fourier_snr")
