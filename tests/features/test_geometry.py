"""Geometry descriptors on shapes with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qcgate.features.geometry import (
    GEOMETRY_DESCRIPTORS,
    count_components,
    count_holes,
    geometry_descriptors,
    geometry_features,
)
from qcgate.features.radiomics_features import radiomics_descriptors
from tests.features.conftest import disc, ellipse

SPACING = (0.7, 0.7)


@pytest.mark.parametrize("radius_px", [8.0, 20.0, 45.0])
def test_digital_disc_area_perimeter_and_diameter(radius_px: float) -> None:
    mask = disc((128, 128), (63.3, 64.6), radius_px)
    values = geometry_descriptors(mask, SPACING)
    radius_mm = radius_px * SPACING[0]
    # Area: pixel counting is unbiased; the error is about one pixel per boundary length unit.
    assert values["area_mm2"] == pytest.approx(math.pi * radius_mm**2, rel=2.0 / radius_px)
    # Perimeter: marching squares cuts corners at 45°, overestimating a disc by at most ~8 %.
    true_perimeter = 2 * math.pi * radius_mm
    assert true_perimeter * 0.98 <= values["perimeter_mm"] <= true_perimeter * 1.09
    # Feret diameter: within one pixel of 2R.
    assert abs(values["max_diameter_mm"] - 2 * radius_mm) <= SPACING[0] * 1.01
    # A disc is isotropic: equal axes (≈ 2R by the 4√λ convention), elongation 1.
    assert values["major_axis_mm"] == pytest.approx(2 * radius_mm, rel=0.05)
    assert values["elongation"] == pytest.approx(1.0, abs=0.02)
    assert 0.9 <= values["sphericity"] <= 1.0
    assert values["n_components"] == 1 and values["n_holes"] == 0
    assert values["perimeter_area_ratio"] == pytest.approx(values["perimeter_mm"] / values["area_mm2"])


def test_sphericity_and_perimeter_area_ratio_rank_shapes() -> None:
    round_mask = disc((96, 96), (48, 48), 20)
    rows, cols = np.mgrid[:96, :96]
    angle = np.arctan2(rows - 48, cols - 48)
    radius = np.hypot(rows - 48, cols - 48)
    star = radius <= 20 * (1 + 0.35 * np.cos(7 * angle))  # a spiky, irregular lesion
    round_values = geometry_descriptors(round_mask, (1.0, 1.0))
    star_values = geometry_descriptors(star, (1.0, 1.0))
    assert star_values["sphericity"] < round_values["sphericity"] - 0.2
    assert star_values["perimeter_area_ratio"] > round_values["perimeter_area_ratio"]
    assert star_values["fourier_snr"] < round_values["fourier_snr"]


def test_ellipse_axes_and_elongation() -> None:
    mask = ellipse((128, 128), (64, 64), (12, 36))  # semi-axes 12 (rows) and 36 (cols) px
    values = geometry_descriptors(mask, (1.0, 1.0))
    assert values["major_axis_mm"] == pytest.approx(2 * 36, rel=0.03)
    assert values["minor_axis_mm"] == pytest.approx(2 * 12, rel=0.05)
    assert values["elongation"] == pytest.approx(12 / 36, rel=0.05)
    assert values["max_diameter_mm"] == pytest.approx(2 * 36, abs=1.5)


def test_anisotropic_spacing_is_used() -> None:
    mask = disc((64, 64), (32, 32), 10)
    square = geometry_descriptors(mask, (1.0, 1.0))
    stretched = geometry_descriptors(mask, (1.0, 2.0))
    assert stretched["area_mm2"] == pytest.approx(2 * square["area_mm2"])
    assert stretched["elongation"] == pytest.approx(0.5, rel=0.03)


def test_ring_has_one_hole_and_two_blobs_are_two_components() -> None:
    ring = disc((64, 64), (32, 32), 20) & ~disc((64, 64), (32, 32), 10)
    assert count_holes(ring) == 1 and count_components(ring) == 1
    two_blobs = disc((64, 96), (32, 20), 8) | disc((64, 96), (32, 70), 8)
    assert count_components(two_blobs) == 2 and count_holes(two_blobs) == 0
    # 8-connectivity: diagonal neighbours are one component, and the 4-connected gap is no hole.
    diagonal = np.zeros((6, 6), dtype=bool)
    diagonal[1, 1] = diagonal[2, 2] = diagonal[3, 3] = True
    assert count_components(diagonal) == 1 and count_holes(diagonal) == 0
    # A hole touching the crop's edge is not a hole: the mask is padded with background first.
    open_ring = ring[:, :32]
    assert count_holes(open_ring) == 0


def test_matches_pyradiomics_shape2d() -> None:
    mask = ellipse((80, 80), (40, 38), (14, 25)) | disc((80, 80), (30, 60), 6)
    ours = geometry_descriptors(mask, SPACING)
    theirs = radiomics_descriptors(np.zeros(mask.shape), mask, SPACING, ["shape2D"])
    assert ours["perimeter_mm"] == pytest.approx(theirs["shape2D_Perimeter"], rel=1e-9)
    assert ours["area_mm2"] == pytest.approx(theirs["shape2D_PixelSurface"], rel=1e-9)
    assert ours["max_diameter_mm"] == pytest.approx(theirs["shape2D_MaximumDiameter"], rel=1e-9)
    assert ours["major_axis_mm"] == pytest.approx(theirs["shape2D_MajorAxisLength"], rel=1e-9)
    assert ours["minor_axis_mm"] == pytest.approx(theirs["shape2D_MinorAxisLength"], rel=1e-9)
    assert ours["elongation"] == pytest.approx(theirs["shape2D_Elongation"], rel=1e-9)


def test_empty_mask_falls_back_with_flags_and_stable_names() -> None:
    full = geometry_features(disc((32, 32), (16, 16), 5), (1.0, 1.0), orthodoxy=0.7)
    empty = geometry_features(np.zeros((32, 32), dtype=bool), (1.0, 1.0))
    assert full.names == empty.names == tuple(f"geometry.{d}" for d in GEOMETRY_DESCRIPTORS)
    assert full.flags == ()
    assert full.as_dict()["geometry.positional_orthodoxy"] == 0.7
    assert np.all(np.isfinite(empty.values))
    empty_values = empty.as_dict()
    assert empty_values["geometry.area_mm2"] == 0.0  # defined: nothing there
    assert empty_values["geometry.positional_orthodoxy"] == 0.5
    assert "geometry.positional_orthodoxy" in empty.flags
    assert "geometry.sphericity" in empty.flags and empty_values["geometry.sphericity"] == 1.0
    assert "geometry.area_mm2" not in empty.flags


def test_single_pixel_is_finite() -> None:
    mask = np.zeros((9, 9), dtype=bool)
    mask[4, 4] = True
    vector = geometry_features(mask, (0.5, 0.5))
    assert np.all(np.isfinite(vector.values))
    assert vector.as_dict()["geometry.area_mm2"] == pytest.approx(0.25)
