"""A lung mask from a CT slice in HU, for when none is supplied.

Steps (scipy.ndimage only):
1. air = HU < ``threshold`` (−400 HU separates aerated lung, ≈ −850, from soft tissue, ≈ 40);
2. drop air components touching the image border (outside-body air, table gaps);
3. keep the largest component, plus the second one when it is at least ``second_fraction`` of the first
   (two lungs, or one when they touch or only one is in the slice); components under ``min_area_px`` are noise;
4. binary closing (a square of half-width ``closing_radius_px``: separable max/min filters, about twice
   as fast as a disc) then hole filling, so vessels and nodules inside
   the lung belong to it.

For cost the steps run on the slice subsampled by ``downsample`` (2: a 512² slice becomes 256², four
times cheaper); the result is upsampled by pixel repetition and its outermost coarse ring is re-thresholded
at full resolution (kept where HU < threshold), so the outline is nearly full-resolution. On the lung1/lung2
CT lesion slices the Dice against ``downsample=1`` is 0.98–0.996 at 2 (≈ 2–3 ms) and 0.94–0.99 at 4.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

LUNG_THRESHOLD_HU = -400.0


def lung_mask_from_hu(
    image_hu: np.ndarray,
    *,
    threshold: float = LUNG_THRESHOLD_HU,
    second_fraction: float = 0.1,
    min_area_px: int = 50,
    closing_radius_px: int = 3,
    downsample: int = 2,
) -> np.ndarray:
    """Boolean lung mask of a 2-D HU slice (all False when no lung-like air is found).

    M = fill(close(⋃_{k ∈ kept} C_k)), with C_k the 8-connected components of {HU < threshold} that do
    not touch the border, kept = the largest and (if |C_2| ≥ second_fraction·|C_1|) the second largest.
    """
    full = np.asarray(image_hu)
    if full.ndim != 2:
        raise ValueError(f"image must be 2-D, got shape {full.shape}")
    step = max(int(downsample), 1)
    image = full[::step, ::step]
    min_area_px = max(int(round(min_area_px / step**2)), 1)
    closing_radius_px = max(int(round(closing_radius_px / step)), 1)
    air = image < threshold
    labels, count = ndimage.label(air, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return np.zeros(full.shape, dtype=bool)
    border_labels = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sizes[0] = 0
    sizes[border_labels] = 0  # outside-body air is connected to the frame's edge
    order = np.argsort(sizes)[::-1]
    kept: list[int] = []
    if sizes[order[0]] >= min_area_px:
        kept.append(int(order[0]))
        if count > 1 and sizes[order[1]] >= max(min_area_px, second_fraction * sizes[order[0]]):
            kept.append(int(order[1]))
    if not kept:
        return np.zeros(full.shape, dtype=bool)
    keep = np.zeros(count + 1, dtype=bool)
    keep[kept] = True
    lungs = keep[labels]  # lookup table: cheaper than np.isin on a full slice
    # Closing and filling only need the lungs' bounding box (+ room for the closing), not the frame.
    pad = closing_radius_px + 1
    rows = np.flatnonzero(lungs.any(axis=1))
    cols = np.flatnonzero(lungs.any(axis=0))
    box = (slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1))
    local = np.pad(lungs[box], pad)  # padding keeps a lung touching the frame from being eroded by it
    closed = _square_closing(local, closing_radius_px)
    filled_padded = _fill_holes(closed)
    filled = filled_padded[pad:-pad, pad:-pad]
    if step == 1:
        result = np.zeros(full.shape, dtype=bool)
        result[box] = filled
        return result
    # Upsample only the lungs' box (the rest of the frame is background).
    full_box = (
        slice(box[0].start * step, min(box[0].stop * step, full.shape[0])),
        slice(box[1].start * step, min(box[1].stop * step, full.shape[1])),
    )
    box_shape = (full_box[0].stop - full_box[0].start, full_box[1].stop - full_box[1].start)
    # Sharpen the blocky outline: in the outermost coarse pixel ring keep only air (HU < threshold).
    # One upsampled code array (0 outside, 1 interior, 2 outline ring) instead of two masks (cost).
    interior = ndimage.binary_erosion(filled_padded, border_value=0)[pad:-pad, pad:-pad]
    code = filled.astype(np.uint8) + (filled & ~interior).astype(np.uint8)
    code_full = _upsample(code, step, box_shape)
    coarse = code_full == 1
    outline = code_full == 2
    coarse[outline] = full[full_box][outline] < threshold
    result = np.zeros(full.shape, dtype=bool)
    result[full_box] = coarse
    return result


def _upsample(mask: np.ndarray, step: int, shape: tuple[int, int]) -> np.ndarray:
    """Pixel repetition by ``step`` (a broadcast view copied once), cut to ``shape``."""
    rows, cols = mask.shape
    repeated = np.broadcast_to(mask[:, None, :, None], (rows, step, cols, step)).reshape(rows * step, cols * step)
    return np.ascontiguousarray(repeated[: shape[0], : shape[1]])


def _square_closing(mask: np.ndarray, radius: int) -> np.ndarray:
    """M • S = (M ⊕ S) ⊖ S with S the (2r+1)² square, as separable max then min filters (uint8).
    The caller pads M by more than r, so the filters' edge handling never matters."""
    size = 2 * radius + 1
    dilated = ndimage.maximum_filter(mask.view(np.uint8), size=size)
    return ndimage.minimum_filter(dilated, size=size).astype(bool)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """M ∪ {background components (4-connected) that do not touch the border} — scipy's
    ``binary_fill_holes`` result, with one labelling pass instead of an iterated dilation (cost)."""
    labels, count = ndimage.label(~mask)
    if count == 0:
        return mask.copy()
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    outside = np.zeros(count + 1, dtype=bool)
    outside[border] = True
    outside[0] = False
    return ~outside[labels]
