"""Positional orthodoxy: how usual a lesion's position in the lung is, from a learned frequency map.

Coordinates are normalised to a reference box: the lung mask's bounding box when a lung mask is given,
otherwise the full image frame. A pixel (r, c) in full-frame coordinates maps to
    u = (r − r0 + ½) / (r1 − r0),   v = (c − c0 + ½) / (c1 − c0)     (clipped to [0, 1)),
and to the grid cell (⌊u·G⌋, ⌊v·G⌋) of a G×G map (G = 32 by default).

Fitting: every training lesion adds its pixel-occupancy histogram normalised to total 1 (so big lesions
do not dominate); the sum is smoothed by a Gaussian of ``smoothing_sigma`` cells and stored as F.
Orthodoxy of a lesion = mean over its pixels of F(cell(x)) / max F, in [0, 1].

Masks may be crops of a larger frame: ``frame_shape`` is the full frame's shape and ``offset`` the
(row, col) of the crop's top-left corner in it. The map is stored as JSON (never pickle).

A map remembers its ``reference``: "lung" when any training sample has a (non-empty) lung mask — samples
without one are then left out — else "frame". A frame-fitted map (LIDC, no CT) ignores lung masks at scoring time, and a lung-fitted map
scores nan (→ fallback + flag) for a slice without a usable lung mask, so the two coordinate systems are
never mixed silently.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

FORMAT_NAME = "qcgate.position_frequency_map"
FORMAT_VERSION = 1
REFERENCES = ("lung", "frame")


def _nonzero(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.nonzero(mask), scanning only the mask's bounding box (a lesion is small in a 512² frame)."""
    rows_any = np.flatnonzero(mask.any(axis=1))
    if rows_any.size == 0:
        return np.zeros(0, dtype=np.intp), np.zeros(0, dtype=np.intp)
    r0, r1 = int(rows_any[0]), int(rows_any[-1]) + 1
    rows, cols = np.nonzero(mask[r0:r1])
    return rows + r0, cols


def _reference_box(
    mask_shape: tuple[int, int],
    lung_mask: np.ndarray | None,
    frame_shape: tuple[int, int] | None,
    offset: tuple[int, int],
) -> tuple[float, float, float, float]:
    """(r0, r1, c0, c1) of the reference box in full-frame pixel coordinates."""
    if lung_mask is not None and np.any(lung_mask):
        rows = np.flatnonzero(np.any(lung_mask, axis=1))
        cols = np.flatnonzero(np.any(lung_mask, axis=0))
        return (
            float(rows[0] + offset[0]),
            float(rows[-1] + 1 + offset[0]),
            float(cols[0] + offset[1]),
            float(cols[-1] + 1 + offset[1]),
        )
    frame = frame_shape if frame_shape is not None else mask_shape
    return 0.0, float(frame[0]), 0.0, float(frame[1])


def normalised_cells(
    lesion_mask: np.ndarray,
    grid_size: int,
    *,
    lung_mask: np.ndarray | None = None,
    frame_shape: tuple[int, int] | None = None,
    offset: tuple[int, int] = (0, 0),
) -> tuple[np.ndarray, np.ndarray]:
    """Grid cell indices of every lesion pixel: (⌊u·G⌋, ⌊v·G⌋), u = (r − r0 + ½)/(r1 − r0), v likewise."""
    lesion = np.asarray(lesion_mask, dtype=bool)
    if lesion.ndim != 2:
        raise ValueError(f"lesion mask must be 2-D, got {lesion.shape}")
    if lung_mask is not None and np.shape(lung_mask) != lesion.shape:
        raise ValueError("lung mask and lesion mask must have the same shape (the same crop)")
    r0, r1, c0, c1 = _reference_box(lesion.shape, lung_mask, frame_shape, offset)
    rows, cols = _nonzero(lesion)
    u = (rows + offset[0] - r0 + 0.5) / max(r1 - r0, 1.0)
    v = (cols + offset[1] - c0 + 0.5) / max(c1 - c0, 1.0)
    cell_r = np.clip(np.floor(u * grid_size), 0, grid_size - 1).astype(np.intp)
    cell_c = np.clip(np.floor(v * grid_size), 0, grid_size - 1).astype(np.intp)
    return cell_r, cell_c


@dataclass
class PositionFrequencyMap:
    """Lesion frequency F over a ``grid_size``² grid of normalised lung (or frame) coordinates."""

    grid_size: int = 32
    smoothing_sigma: float = 1.0
    frequency: np.ndarray = field(default_factory=lambda: np.zeros((32, 32)))
    n_lesions: int = 0
    reference: str = "frame"

    def __post_init__(self) -> None:
        if self.reference not in REFERENCES:
            raise ValueError(f"reference must be one of {REFERENCES}, got {self.reference!r}")
        self.frequency = np.asarray(self.frequency, dtype=np.float64)
        if self.frequency.shape != (self.grid_size, self.grid_size):
            if self.n_lesions == 0 and not np.any(self.frequency):
                self.frequency = np.zeros((self.grid_size, self.grid_size))
            else:
                raise ValueError(f"frequency shape {self.frequency.shape} != grid {self.grid_size}")
        if not np.all(np.isfinite(self.frequency)) or np.any(self.frequency < 0):
            raise ValueError("frequency must be finite and non-negative")

    @classmethod
    def fit(
        cls,
        samples: Iterable[tuple[np.ndarray, np.ndarray | None]],
        *,
        grid_size: int = 32,
        smoothing_sigma: float = 1.0,
        frame_shape: tuple[int, int] | None = None,
        offsets: Iterable[tuple[int, int]] | None = None,
    ) -> PositionFrequencyMap:
        """Fit from (lesion_mask, lung_mask or None) pairs (reference rule in the module docstring).

        F = G_σ * Σ_lesions h_l,  h_l(cell) = #{x ∈ L_l : cell(x) = cell} / |L_l|  (empty lesions skipped).
        ``offsets`` (one per sample) and ``frame_shape`` place cropped masks in their full frame.
        """
        counts = np.zeros((grid_size, grid_size), dtype=np.float64)
        n_lesions = 0
        pairs = list(samples)
        offset_list = list(offsets) if offsets is not None else [(0, 0)] * len(pairs)
        if len(offset_list) != len(pairs):
            raise ValueError(f"{len(offset_list)} offsets for {len(pairs)} samples")
        has_lung = [lung is not None and bool(np.any(lung)) for _lesion, lung in pairs]
        reference = "lung" if any(has_lung) else "frame"
        for (lesion_mask, lung_mask), offset, with_lung in zip(pairs, offset_list, has_lung):
            if reference == "lung" and not with_lung:
                continue  # would need frame coordinates: skipped, never mixed into a lung-coordinate map
            cell_r, cell_c = normalised_cells(
                lesion_mask, grid_size, lung_mask=lung_mask, frame_shape=frame_shape, offset=offset
            )
            if cell_r.size == 0:
                continue
            histogram = np.zeros_like(counts)
            np.add.at(histogram, (cell_r, cell_c), 1.0)
            counts += histogram / cell_r.size
            n_lesions += 1
        if smoothing_sigma > 0:
            counts = ndimage.gaussian_filter(counts, smoothing_sigma, mode="constant")
        return cls(
            grid_size=grid_size,
            smoothing_sigma=smoothing_sigma,
            frequency=counts,
            n_lesions=n_lesions,
            reference=reference,
        )

    def orthodoxy(
        self,
        lesion_mask: np.ndarray,
        lung_mask: np.ndarray | None = None,
        *,
        frame_shape: tuple[int, int] | None = None,
        offset: tuple[int, int] = (0, 0),
    ) -> float:
        """Orthodoxy = (1/|L|) Σ_{x∈L} F(cell(x)) / max F ∈ [0, 1]; nan for an empty lesion, an empty map,
        or a lung-fitted map given no (or an empty) lung mask. A frame-fitted map ignores ``lung_mask``."""
        peak = float(self.frequency.max()) if self.frequency.size else 0.0
        if self.reference == "frame":
            lung_mask = None
        elif lung_mask is None or not np.any(lung_mask):
            return math.nan
        cell_r, cell_c = normalised_cells(
            lesion_mask, self.grid_size, lung_mask=lung_mask, frame_shape=frame_shape, offset=offset
        )
        if cell_r.size == 0 or peak <= 0:
            return math.nan
        return float(np.clip(self.frequency[cell_r, cell_c].mean() / peak, 0.0, 1.0))

    def to_json(self) -> str:
        """JSON text: format, version, grid_size, smoothing_sigma, n_lesions, reference, frequency (row lists)."""
        return json.dumps(
            {
                "format": FORMAT_NAME,
                "version": FORMAT_VERSION,
                "grid_size": self.grid_size,
                "smoothing_sigma": self.smoothing_sigma,
                "n_lesions": self.n_lesions,
                "reference": self.reference,
                "frequency": self.frequency.tolist(),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> PositionFrequencyMap:
        """Inverse of :meth:`to_json`; rejects other formats and versions."""
        payload = json.loads(text)
        if payload.get("format") != FORMAT_NAME or payload.get("version") != FORMAT_VERSION:
            raise ValueError(f"not a {FORMAT_NAME} v{FORMAT_VERSION} document")
        return cls(
            grid_size=int(payload["grid_size"]),
            smoothing_sigma=float(payload["smoothing_sigma"]),
            frequency=np.asarray(payload["frequency"], dtype=np.float64),
            n_lesions=int(payload["n_lesions"]),
            reference=str(payload["reference"]),
        )

    def save(self, path: str | Path) -> None:
        """Write :meth:`to_json` to ``path``."""
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> PositionFrequencyMap:
        """Read a map written by :meth:`save`."""
        return cls.from_json(Path(path).read_text(encoding="utf-8"))
