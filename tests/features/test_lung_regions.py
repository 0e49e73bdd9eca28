"""Lung mask from HU on a synthetic chest phantom, and the group regions."""

from __future__ import annotations

import numpy as np
import pytest

from qcgate.features.lung import lung_mask_from_hu
from qcgate.features.regions import (
    HEALTHY_MARGIN_PX,
    RATIO_FALLBACK,
    border_rings,
    dilate_in_place,
    healthy_lung_region,
    safe_ratio,
)
from tests.features.conftest import ChestPhantom, disc


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


@pytest.mark.parametrize("downsample", [1, 2, 4])
def test_lung_mask_finds_both_lungs_not_outside_air(phantom: ChestPhantom, downsample: int) -> None:
    lungs = lung_mask_from_hu(phantom.image, downsample=downsample)
    assert lungs.shape == phantom.image.shape and lungs.dtype == bool
    assert dice(lungs, phantom.lungs) > 0.97
    assert not np.any(lungs & ~phantom.body)  # outside-body air is excluded
    assert np.all(lungs[phantom.lesion])  # the nodule inside the lung is filled in
    from scipy import ndimage

    assert ndimage.label(lungs)[1] == 2


def test_lung_mask_keeps_one_lung_and_drops_small_air(phantom: ChestPhantom) -> None:
    image = phantom.image.copy()
    image[:, 128:][phantom.lungs[:, 128:]] = 40.0  # right lung filled with tissue
    bubble = disc(image.shape, (200, 60), 2.5)  # a tiny bowel-gas bubble inside the body
    image[bubble] = -900.0
    lungs = lung_mask_from_hu(image, downsample=1)
    left = phantom.lungs.copy()
    left[:, 128:] = False
    assert dice(lungs, left) > 0.97
    assert not np.any(lungs[bubble])


def test_lung_mask_of_soft_tissue_only_is_empty() -> None:
    assert not lung_mask_from_hu(np.full((64, 64), 40.0)).any()
    # Air everywhere is outside air (touches the border): no lung.
    assert not lung_mask_from_hu(np.full((64, 64), -1000.0)).any()


def test_border_rings_partition_the_band_around_the_lesion() -> None:
    lesion = disc((64, 64), (32, 30), 10)
    inner, outer = border_rings(lesion, width_px=2)
    assert np.all(lesion[inner]) and not np.any(lesion[outer])
    assert not np.any(inner & outer)
    from scipy import ndimage

    full_dilation = ndimage.binary_dilation(lesion, np.ones((3, 3), bool), iterations=2)
    assert np.array_equal(inner | outer | ndimage.binary_erosion(lesion, np.ones((3, 3), bool), iterations=2), full_dilation)
    # A lesion thinner than the ring is all inner ring.
    thin = np.zeros((20, 20), bool)
    thin[10, 3:15] = True
    inner_thin, _ = border_rings(thin, 2)
    assert np.array_equal(inner_thin, thin)
    # Touching the frame's edge: the rings stay inside the frame and the erosion treats outside as background.
    edge = np.zeros((20, 20), bool)
    edge[:6, :6] = True
    inner_edge, outer_edge = border_rings(edge, 1)
    assert inner_edge[0, 3] and outer_edge[6, 3]


def test_dilate_in_place_equals_full_frame_dilation() -> None:
    from scipy import ndimage

    mask = disc((100, 120), (5, 110), 8) | disc((100, 120), (70, 40), 3)
    expected = ndimage.binary_dilation(mask, np.ones((3, 3), bool), iterations=4)
    assert np.array_equal(dilate_in_place(mask, 4), expected)


def test_healthy_lung_region_excludes_the_lesion_surroundings(phantom: ChestPhantom) -> None:
    region = healthy_lung_region(phantom.lesion, phantom.lungs)
    assert region.sum() > 500
    assert np.all(phantom.lungs[region])
    near = dilate_in_place(phantom.lesion, HEALTHY_MARGIN_PX)
    assert not np.any(region & near)
    # Local: the crop stays near the lesion (the right lung), not in the left lung.
    assert not np.any(region[:, :128])


def test_healthy_lung_region_moves_to_the_nearest_lung_when_the_lesion_is_outside() -> None:
    lung = np.zeros((200, 200), bool)
    lung[150:190, 150:190] = True
    lesion = disc((200, 200), (20, 20), 5)
    region = healthy_lung_region(lesion, lung)
    assert region.sum() >= 20 and np.all(lung[region])


def test_safe_ratio() -> None:
    assert safe_ratio(6.0, 3.0) == (2.0, False)
    assert safe_ratio(-6.0, 3.0) == (-2.0, False)
    assert safe_ratio(1.0, 0.0) == (RATIO_FALLBACK, True)
    assert safe_ratio(0.0, 0.0) == (RATIO_FALLBACK, True)
    assert safe_ratio(float("nan"), 2.0) == (RATIO_FALLBACK, True)
    assert safe_ratio(5.0, float("inf")) == (RATIO_FALLBACK, True)


def test_square_closing_equals_binary_closing() -> None:
    from scipy import ndimage

    from qcgate.features.lung import _square_closing

    mask = np.pad(np.random.default_rng(3).random((40, 50)) > 0.55, 4)
    for radius in (1, 2, 3):
        expected = ndimage.binary_closing(mask, structure=np.ones((2 * radius + 1,) * 2, bool))
        # binary_closing erodes the frame's edge (border_value 0); compare away from it.
        inner = (slice(radius + 1, -radius - 1),) * 2
        np.testing.assert_array_equal(_square_closing(mask, radius)[inner], expected[inner])
