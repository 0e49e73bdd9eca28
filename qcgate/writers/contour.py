"""The outer contour of a 2-D mask as a closed polygon in DICOM pixel coordinates (column, row).

Marching squares at level 0.5 (contourpy, which matplotlib depends on) on the mask's pixel centres:
every vertex lies half-way between a pixel inside the mask and a neighbour outside it, i.e. on the
mask boundary to within 0.5 pixel. The largest closed line by enclosed area is the outer contour
(holes and smaller islands are left out). DICOM pixel coordinates put (0, 0) at the top-left corner of
the top-left pixel (PS3.3 C.10.5.1.2 / C.18.6.1.1), so array index (r, c) has its centre at
(c + 0.5, r + 0.5).
"""

from __future__ import annotations

import numpy as np

#: Enough for a smooth outline in any viewer, small enough for the SR (a few kB per slice).
MAX_CONTOUR_POINTS = 200


def _area(line: np.ndarray) -> float:
    x, y = line[:, 0], line[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def outer_contour(mask: np.ndarray, max_points: int = MAX_CONTOUR_POINTS) -> np.ndarray | None:
    """(N, 2) float32 (column, row) of the closed outer contour, first point repeated last; N ≤ max_points.

    None when the mask is empty. Only the bounding box (plus a one-pixel border) is traced."""
    import contourpy

    mask = np.asarray(mask, dtype=bool)
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    r0, c0 = int(rows.min()), int(cols.min())
    crop = np.pad(mask[r0:int(rows.max()) + 1, c0:int(cols.max()) + 1], 1).astype(np.float64)
    lines = contourpy.contour_generator(z=crop, line_type=contourpy.LineType.Separate).lines(0.5)
    closed = [np.asarray(line, dtype=np.float64) for line in lines if len(line) >= 4]
    if not closed:
        return None
    line = max(closed, key=_area)
    if not np.allclose(line[0], line[-1]):
        line = np.vstack([line, line[:1]])
    ring = line[:-1]
    budget = max(int(max_points) - 1, 3)
    if len(ring) > budget:  # evenly spaced vertices of the traced line: still on the boundary
        ring = ring[np.linspace(0, len(ring), budget, endpoint=False).astype(int)]
    # crop index (x, y) -> array (col, row) = (x + c0 - 1, y + r0 - 1); DICOM centre offset +0.5
    points = ring + np.array([c0 - 1 + 0.5, r0 - 1 + 0.5])
    return np.vstack([points, points[:1]]).astype(np.float32)


def all_contours(mask: np.ndarray) -> list[np.ndarray]:
    """Every closed contour line of ``mask`` (islands and holes), each (N, 2) (column, row) in DICOM
    pixel coordinates, closed; for drawing (the SR keeps only the outer one)."""
    import contourpy

    mask = np.asarray(mask, dtype=bool)
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return []
    r0, c0 = int(rows.min()), int(cols.min())
    crop = np.pad(mask[r0:int(rows.max()) + 1, c0:int(cols.max()) + 1], 1).astype(np.float64)
    lines = contourpy.contour_generator(z=crop, line_type=contourpy.LineType.Separate).lines(0.5)
    offset = np.array([c0 - 1 + 0.5, r0 - 1 + 0.5])
    return [np.asarray(line, dtype=np.float64) + offset for line in lines if len(line) >= 2]
