"""Our vectorised first-order and texture classes equal pyradiomics' classes, ROI by ROI (incl. degenerate ROIs)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qcgate.features.radiomics_features import (
    RADIOMICS_SETTINGS,
    numpy_class_values,
    pyradiomics_class_values,
    radiomics_descriptors,
    to_sitk,
)
from tests.features.conftest import disc, load_case


def rois() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(7)
    shape = (40, 44)
    noisy = rng.normal(-600, 180, shape).round()
    blob = disc(shape, (20, 22), 12)
    ring = blob & ~disc(shape, (20, 22), 9)
    two_levels = np.where(rng.random(shape) > 0.5, -800.0, 40.0)
    single = np.zeros(shape, bool)
    single[5, 5] = True
    pair = np.zeros(shape, bool)
    pair[5, 5:7] = True
    case = load_case("lung2")
    z = case.largest_slice()
    lesion = case.label[z] > 0
    return {
        "noise_disc": (noisy, blob),
        "noise_ring": (noisy, ring),
        "flat": (np.full(shape, 35.0), blob),
        "two_levels": (two_levels, blob),
        "single_pixel": (noisy, single),
        "pair": (noisy, pair),
        "lung2_lesion": (case.image[z].astype(np.float64), lesion),
    }


ROIS = rois()


@pytest.mark.parametrize("class_name", ["firstorder", "glcm", "glrlm", "glszm", "gldm", "ngtdm"])
@pytest.mark.parametrize("roi", sorted(ROIS))
def test_numpy_equals_pyradiomics(roi: str, class_name: str) -> None:
    image, mask = ROIS[roi]
    spacing = (0.7, 0.8)
    ours = numpy_class_values(image[None], mask[None], 1.0 * spacing[0] * spacing[1], [class_name])
    # A one-slice volume with force2D: pyradiomics' in-plane 2-D texture (see radiomics_descriptors).
    volume_spacing = (1.0, *spacing)
    theirs = pyradiomics_class_values(
        to_sitk(image[None], volume_spacing), to_sitk(mask[None].astype(np.uint8), volume_spacing), [class_name]
    )
    assert set(ours) == set(theirs)
    for name, expected in theirs.items():
        actual = ours[name]
        if math.isnan(expected):
            assert math.isnan(actual), name
        else:
            assert actual == pytest.approx(expected, rel=1e-9, abs=1e-12), name


def test_descriptors_wrapper_matches_full_frame_pyradiomics() -> None:
    """The crop inside radiomics_descriptors changes no value (texture classes through pyradiomics too)."""
    image, mask = ROIS["lung2_lesion"]
    spacing = (0.63, 0.63)
    classes = ("firstorder", "glcm", "glrlm", "ngtdm")
    ours = radiomics_descriptors(image, mask, spacing, classes)
    volume_spacing = (1.0, *spacing)
    theirs = pyradiomics_class_values(
        to_sitk(image[None], volume_spacing), to_sitk(mask[None].astype(np.uint8), volume_spacing), classes, RADIOMICS_SETTINGS
    )
    for name, expected in theirs.items():
        assert ours[name] == pytest.approx(expected, rel=1e-9), name


def test_bin_edges_equal_pyradiomics() -> None:
    from radiomics import imageoperations

    from qcgate.features.radiomics_numpy import bin_edges

    rng = np.random.default_rng(11)
    samples = [
        rng.normal(-500, 300, 200).round(),
        rng.normal(0, 10, 50),
        np.array([-1000.0]),
        np.array([50.0, 50.0]),
        np.array([-25.0, 0.0, 25.0]),
    ]
    for values in samples:
        for width in (25.0, 10.0, 3.7):
            np.testing.assert_array_equal(bin_edges(values, width), imageoperations.getBinEdges(values, binWidth=width))
