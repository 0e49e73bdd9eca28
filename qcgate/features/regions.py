"""The image regions of the three image feature groups (DESIGN §1), and the safe inner/outer ratio.

- texture: the lesion itself;
- border: inner ring = L ∖ erode(L, w), outer ring = dilate(L, w) ∖ L, with w = ``RING_WIDTH_PX``
  (3×3 square structuring element, so the rings are 8-connected bands w pixels thick);
- imaging: healthy lung = lung ∖ dilate(L, ``HEALTHY_MARGIN_PX``), restricted to a square window of
  ``HEALTHY_WINDOW_PX`` centred on the lesion (the local lung background, at bounded cost). When that
  window holds fewer than ``MIN_REGION_PX`` healthy pixels, the window is re-centred on the lung pixel
  nearest to the lesion.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from qcgate.features.intensity import bounding_box

RING_WIDTH_PX = 2
HEALTHY_MARGIN_PX = 5
HEALTHY_WINDOW_PX = 64
MIN_REGION_PX = 20
#: Value of a ratio whose denominator vanishes: "no contrast between inside and outside".
RATIO_FALLBACK = 1.0

_SQUARE = np.ones((3, 3), dtype=bool)


def lesion_region(lesion_mask: np.ndarray) -> np.ndarray:
    """Texture region: R = L."""
    return np.asarray(lesion_mask, dtype=bool)


def dilate_in_place(mask: np.ndarray, iterations: int, box: tuple[slice, slice] | None = None) -> np.ndarray:
    """M ⊕ B^k (B the 3×3 square, k = ``iterations``), computed only on the mask's bounding box grown
    by k (cost: a lesion is tiny next to a 512² frame). Same shape as ``mask``; identical result to a
    full-frame ``ndimage.binary_dilation``."""
    mask = np.asarray(mask, dtype=bool)
    box = box if box is not None else bounding_box(mask, pad=iterations)
    out = np.zeros_like(mask)
    if box is None or iterations <= 0:
        out |= mask
        return out
    out[box] = ndimage.binary_dilation(mask[box], structure=_SQUARE, iterations=iterations)
    return out


def border_rings(lesion_mask: np.ndarray, width_px: int = RING_WIDTH_PX) -> tuple[np.ndarray, np.ndarray]:
    """(inner, outer) rings: inner = L ∖ (L ⊖ B^w), outer = (L ⊕ B^w) ∖ L, B = 3×3 square.

    Pixels beyond the frame count as background for the erosion. A lesion thinner than 2w is all inner
    ring (its erosion is empty).
    """
    lesion = np.asarray(lesion_mask, dtype=bool)
    box = bounding_box(lesion, pad=width_px + 1)
    inner = np.zeros_like(lesion)
    outer = np.zeros_like(lesion)
    if box is None:
        return inner, outer
    local = lesion[box]
    eroded = ndimage.binary_erosion(local, structure=_SQUARE, iterations=width_px, border_value=0)
    dilated = ndimage.binary_dilation(local, structure=_SQUARE, iterations=width_px)
    inner[box] = local & ~eroded
    outer[box] = dilated & ~local
    return inner, outer


def _window(center: tuple[int, int], shape: tuple[int, ...], size: int) -> tuple[slice, slice]:
    half = size // 2
    r0 = int(min(max(center[0] - half, 0), max(shape[0] - size, 0)))
    c0 = int(min(max(center[1] - half, 0), max(shape[1] - size, 0)))
    return slice(r0, r0 + size), slice(c0, c0 + size)


def healthy_lung_region(
    lesion_mask: np.ndarray,
    lung_mask: np.ndarray,
    *,
    margin_px: int = HEALTHY_MARGIN_PX,
    window_px: int = HEALTHY_WINDOW_PX,
    min_pixels: int = MIN_REGION_PX,
) -> np.ndarray:
    """Imaging region: H = (lung ∖ (L ⊕ B^margin)) ∩ W, W the window of side ``window_px`` around L.

    W is centred on the lesion's centroid (or the frame centre for an empty lesion); if H has fewer than
    ``min_pixels`` pixels, W moves to the healthy-lung pixel nearest to that centre. May be empty.
    """
    lesion = np.asarray(lesion_mask, dtype=bool)
    lung = np.asarray(lung_mask, dtype=bool)
    if lesion.shape != lung.shape:
        raise ValueError(f"lesion {lesion.shape} and lung {lung.shape} masks differ in shape")
    lesion_box = bounding_box(lesion, pad=margin_px)
    dilated = dilate_in_place(lesion, margin_px, lesion_box)
    if lesion_box is not None:
        rows, cols = np.nonzero(lesion[lesion_box])  # scan the lesion's box only (cost)
        center = (
            int(round(rows.mean() + lesion_box[0].start)),
            int(round(cols.mean() + lesion_box[1].start)),
        )
    else:
        center = (lesion.shape[0] // 2, lesion.shape[1] // 2)
    region = np.zeros_like(lesion)
    window = _window(center, lesion.shape, window_px)
    region[window] = lung[window] & ~dilated[window]
    if np.count_nonzero(region) >= min_pixels:
        return region
    healthy = lung & ~dilated
    if not healthy.any():
        return region
    rows, cols = np.nonzero(healthy)
    nearest = int(np.argmin((rows - center[0]) ** 2 + (cols - center[1]) ** 2))
    region[:] = False
    window = _window((int(rows[nearest]), int(cols[nearest])), lesion.shape, window_px)
    region[window] = healthy[window]
    return region


def safe_ratio(inner: float, outer: float, *, eps: float = 1e-9) -> tuple[float, bool]:
    """Border descriptor r = inner / outer; (``RATIO_FALLBACK``, True) when undefined.

    Undefined: either side non-finite, or |outer| ≤ eps·max(1, |inner|) (a vanishing denominator would
    give an unbounded ratio). The boolean says whether the fallback was used.
    """
    if not (math.isfinite(inner) and math.isfinite(outer)):
        return RATIO_FALLBACK, True
    if abs(outer) <= eps * max(1.0, abs(inner)):
        return RATIO_FALLBACK, True
    return inner / outer, False
