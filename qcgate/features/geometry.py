"""Geometry descriptors of a binary 2-D lesion mask (no image needed; the only group for LIDC).

Lengths in mm and areas in mm² use ``pixel_spacing = (row, col)`` in mm. Perimeter and maximum
diameter come from pyradiomics' C marching-squares routine (the same numbers as ``shape2D``); the
remaining descriptors are computed here. Undefined values (empty mask) are returned as nan and become
fallback + flag in :func:`geometry_features`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from radiomics import cShape
from scipy import ndimage

from qcgate.features.intensity import bounding_box, fourier_snr_db
from qcgate.features.vector import FeatureVector, build_vector
from qcgate.features.wavelets import WAVELET_DESCRIPTORS, wavelet_descriptors

GEOMETRY_DESCRIPTORS: tuple[str, ...] = (
    "perimeter_mm",
    "area_mm2",
    "max_diameter_mm",
    "major_axis_mm",
    "minor_axis_mm",
    "elongation",
    "sphericity",
    "n_components",
    "n_holes",
    "perimeter_area_ratio",
    "fourier_snr",
    *(f"mask_{name}" for name in WAVELET_DESCRIPTORS),
    "positional_orthodoxy",
)

#: Fallback values of undefined descriptors (an empty mask): zero size, neutral shape ratios, and the
#: "neither usual nor unusual" orthodoxy 0.5 used when no position map is available.
GEOMETRY_FALLBACKS: Mapping[str, float] = {
    "elongation": 1.0,
    "sphericity": 1.0,
    "positional_orthodoxy": 0.5,
}

# 8-connectivity for the foreground and 4-connectivity for the background: the consistent digital
# topology pair, so a diagonal 1-pixel gap neither splits a lesion nor opens a hole.
_FOREGROUND_STRUCTURE = np.ones((3, 3), dtype=bool)
_BACKGROUND_STRUCTURE = ndimage.generate_binary_structure(2, 1)


def _padded(mask: np.ndarray) -> np.ndarray:
    return np.pad(np.asarray(mask, dtype=bool), 1)


def area_mm2(mask: np.ndarray, pixel_spacing: tuple[float, float]) -> float:
    """Pixel-count area: A = N · Δr · Δc (mm²)."""
    return float(np.count_nonzero(mask)) * float(pixel_spacing[0]) * float(pixel_spacing[1])


def perimeter_and_max_diameter_mm(mask: np.ndarray, pixel_spacing: tuple[float, float]) -> tuple[float, float]:
    """Marching-squares contour length P = Σ_edges ‖e_k‖ and maximum Feret diameter D = max_{a,b} ‖v_a − v_b‖.

    The contour is pyradiomics' ``cShape.calculate_coefficients2D`` (sub-pixel vertices at pixel-edge
    midpoints); D is the largest distance between two contour vertices, in mm. (0, 0) for an empty mask.
    """
    if not np.any(mask):
        return 0.0, 0.0
    box = bounding_box(mask, pad=1)
    assert box is not None
    cropped = _padded(mask[box])  # crop first: the C routine scans the whole array
    perimeter, _mesh_surface, diameter = cShape.calculate_coefficients2D(
        cropped.astype(np.int8) * 1, np.asarray(pixel_spacing, dtype=np.float64)
    )
    return float(perimeter), float(diameter)


def principal_axes_mm(mask: np.ndarray, pixel_spacing: tuple[float, float]) -> tuple[float, float]:
    """Major and minor axis lengths (mm): 4·√λ_max and 4·√λ_min.

    λ are the eigenvalues of the covariance of the pixel centres' physical coordinates,
    C = (1/N) Σ (x_k − x̄)(x_k − x̄)ᵀ — the length of the ellipse with the same second moments
    (pyradiomics' convention). (nan, nan) for an empty mask.
    """
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return math.nan, math.nan
    coords = np.stack([rows * float(pixel_spacing[0]), cols * float(pixel_spacing[1])], axis=1)
    coords -= coords.mean(axis=0)
    covariance = coords.T @ coords / rows.size
    eigenvalues = np.clip(np.linalg.eigvalsh(covariance), 0.0, None)  # ascending
    return 4.0 * math.sqrt(eigenvalues[1]), 4.0 * math.sqrt(eigenvalues[0])


def elongation(major_axis: float, minor_axis: float) -> float:
    """Elongation = minor / major ∈ [0, 1] (1 for a disc; pyradiomics' √(λ_min/λ_max)); nan if major = 0."""
    if not major_axis > 0:
        return math.nan
    return minor_axis / major_axis


def sphericity(area: float, perimeter: float) -> float:
    """2-D sphericity (circularity) = 2·√(π·A) / P: 1 for a disc, smaller for irregular outlines; nan if P = 0.

    (The circumference of the disc with the same area, divided by the actual perimeter.)
    """
    if not perimeter > 0:
        return math.nan
    return 2.0 * math.sqrt(math.pi * area) / perimeter


def count_components(mask: np.ndarray) -> int:
    """Number of 8-connected foreground components: n_components = #{labels of ndimage.label(M, 8-conn)}."""
    _labels, count = ndimage.label(np.asarray(mask, dtype=bool), structure=_FOREGROUND_STRUCTURE)
    return int(count)


def count_holes(mask: np.ndarray) -> int:
    """Number of holes: 4-connected background components not connected to the outside.

    holes = #{labels of ndimage.label(¬pad(M), 4-conn)} − 1 (the padded outer background).
    """
    _labels, count = ndimage.label(~_padded(mask), structure=_BACKGROUND_STRUCTURE)
    return max(int(count) - 1, 0)


def mask_fourier_snr(mask: np.ndarray) -> float:
    """Fourier SNR (dB) of the mask's bounding-box crop padded by 4 px:
    SNR = 10·log10(Σ_{0<|f|≤0.25} P(f) / Σ_{|f|>0.25} P(f)) (see :func:`qcgate.features.intensity.fourier_snr_db`);
    smooth blobs score high, jagged outlines low."""
    box = bounding_box(mask, pad=4)
    if box is None:
        return math.nan
    return fourier_snr_db(np.asarray(mask[box], dtype=np.float64))


def geometry_descriptors(mask: np.ndarray, pixel_spacing: tuple[float, float]) -> dict[str, float]:
    """All geometry descriptors except positional orthodoxy (nan where undefined).

    perimeter_area_ratio = P / A (mm⁻¹); mask wavelets are db1 (Haar) on the 0/1 mask crop
    (:mod:`qcgate.features.wavelets`).
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"lesion mask must be 2-D, got shape {mask.shape}")
    # Every descriptor here is translation-invariant: work on the bounding box + 4 px, not the 512² frame.
    box = bounding_box(mask, pad=4)
    if box is not None:
        mask = mask[box]
    area = area_mm2(mask, pixel_spacing)
    perimeter, diameter = perimeter_and_max_diameter_mm(mask, pixel_spacing)
    major, minor = principal_axes_mm(mask, pixel_spacing)
    values: dict[str, float] = {
        "perimeter_mm": perimeter,
        "area_mm2": area,
        "max_diameter_mm": diameter,
        "major_axis_mm": major,
        "minor_axis_mm": minor,
        "elongation": elongation(major, minor),
        "sphericity": sphericity(area, perimeter),
        "n_components": float(count_components(mask)),
        "n_holes": float(count_holes(mask)),
        "perimeter_area_ratio": perimeter / area if area > 0 else math.nan,
        "fourier_snr": mask_fourier_snr(mask),
    }
    box = bounding_box(mask)
    if box is None:
        wavelet_values = {name: math.nan for name in WAVELET_DESCRIPTORS}
    else:
        wavelet_values = wavelet_descriptors(mask[box].astype(np.float64), "db1")
    values.update({f"mask_{name}": value for name, value in wavelet_values.items()})
    return values


def geometry_features(
    mask: np.ndarray,
    pixel_spacing: tuple[float, float],
    orthodoxy: float | None = None,
) -> FeatureVector:
    """The ``geometry`` :class:`FeatureVector` of :func:`geometry_descriptors` plus
    positional_orthodoxy = ``orthodoxy`` (None -> 0.5 + flag; see :meth:`PositionFrequencyMap.orthodoxy`)."""
    values = geometry_descriptors(mask, pixel_spacing)
    values["positional_orthodoxy"] = math.nan if orthodoxy is None else float(orthodoxy)
    return build_vector("geometry", GEOMETRY_DESCRIPTORS, values, fallbacks=GEOMETRY_FALLBACKS)
