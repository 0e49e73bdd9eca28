"""In-memory model of a multi-reader cohort: cases of 2-D CT slices, reader masks, AI members."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from qcgate.errors import InputError
from qcgate.core.agreement import slice_dsc_lesion


@dataclass
class Case:
    """One case: a stack of S co-registered 2-D slices of one patient and every mask drawn on them.

    Arrays are (S, rows, cols). ``reader_masks`` maps a reader id to its bool masks. When readers
    carry identity, ``reference_reader`` names the reference and ``repeat_reader`` its repeat (both
    keys of ``reader_masks``); without identity (LIDC) both are None and agreement is pairwise.
    ``ai_probabilities`` is (members, S, rows, cols) in [0, 1]. ``frame_shape`` and ``offset`` place
    a cropped case in its full image frame (for positional orthodoxy). ``source`` names the file the
    case came from, for error messages.
    """

    case_id: str
    patient_id: str
    pixel_spacing: tuple[float, float]
    reader_masks: dict[str, np.ndarray]
    image_hu: np.ndarray | None = None
    ai_probabilities: np.ndarray | None = None
    lung_mask: np.ndarray | None = None
    reference_reader: str | None = None
    repeat_reader: str | None = None
    frame_shape: tuple[int, int] | None = None
    offset: tuple[int, int] = (0, 0)
    synthetic: bool = False
    source: str = ""
    attributes: dict[str, object] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(S, rows, cols) of every array of the case."""
        return tuple(next(iter(self.reader_masks.values())).shape)  # type: ignore[return-value]

    @property
    def n_slices(self) -> int:
        return self.shape[0]

    def validate(self) -> None:
        """Raise InputError naming the case's file and the problem when the arrays are inconsistent."""
        where = f"{self.source or self.case_id}"
        if not self.reader_masks:
            raise InputError(f"{where}: case {self.case_id!r} has no reader masks")
        shapes = {reader: np.shape(mask) for reader, mask in self.reader_masks.items()}
        first = next(iter(shapes.values()))
        if len(first) != 3:
            raise InputError(f"{where}: reader masks must be (slices, rows, cols), got {first}")
        if len(set(shapes.values())) != 1:
            raise InputError(f"{where}: reader masks differ in shape: {shapes}")
        if self.image_hu is not None and self.image_hu.shape != first:
            raise InputError(
                f"{where}: image shape {self.image_hu.shape} does not match the reader masks' shape {first}"
            )
        if self.image_hu is not None and not np.all(np.isfinite(self.image_hu)):
            raise InputError(f"{where}: image holds NaN or infinite values")
        if self.lung_mask is not None and self.lung_mask.shape != first:
            raise InputError(f"{where}: lung mask shape {self.lung_mask.shape} does not match {first}")
        if self.ai_probabilities is not None:
            probs = self.ai_probabilities
            if probs.ndim != 4 or probs.shape[1:] != first:
                raise InputError(
                    f"{where}: AI probabilities must be (members, {', '.join(map(str, first))}), got {probs.shape}"
                )
            if not np.all(np.isfinite(probs)) or probs.min() < 0 or probs.max() > 1:
                raise InputError(f"{where}: AI probabilities must be finite and within [0, 1]")
        for role, reader in (("reference", self.reference_reader), ("repeat", self.repeat_reader)):
            if reader is not None and reader not in self.reader_masks:
                raise InputError(
                    f"{where}: {role} reader {reader!r} is not among the readers {sorted(self.reader_masks)}"
                )
        spacing = tuple(float(s) for s in self.pixel_spacing)
        if len(spacing) != 2 or min(spacing) <= 0 or not all(np.isfinite(spacing)):
            raise InputError(f"{where}: pixel spacing must be two positive numbers, got {self.pixel_spacing}")

    def slice_masks(self, index: int) -> dict[str, np.ndarray]:
        """Every reader's 2-D mask on slice ``index``."""
        return {reader: mask[index] for reader, mask in self.reader_masks.items()}

    def dsc_lesion(self, index: int) -> float | None:
        """DSC Lesion of slice ``index`` (see qcgate.core.agreement for the conventions)."""
        return slice_dsc_lesion(self.slice_masks(index), self.reference_reader)

    def lesion_slices(self) -> list[int]:
        """Indices of the slices where at least one reader drew a lesion."""
        any_reader = np.zeros(self.n_slices, dtype=bool)
        for mask in self.reader_masks.values():
            any_reader |= mask.reshape(mask.shape[0], -1).any(axis=1)
        return [int(k) for k in np.flatnonzero(any_reader)]

    def feature_mask(self, index: int) -> np.ndarray:
        """The mask features are computed from on slice ``index``.

        With reader identity: the reference reader's mask (the paper's "GT mask"); where the
        reference drew nothing, or without identity, the first reader (in stored order) whose mask on
        the slice is non-empty, so features always describe a drawn lesion.
        """
        masks = self.slice_masks(index)
        if self.reference_reader is not None and masks[self.reference_reader].any():
            return masks[self.reference_reader]
        for mask in masks.values():
            if mask.any():
                return mask
        return next(iter(masks.values()))

    def uncertainty_map(self, index: int) -> np.ndarray | None:
        """Pixel-wise std of the AI members' probabilities on slice ``index`` (None with < 2 members)."""
        if self.ai_probabilities is None or self.ai_probabilities.shape[0] < 2:
            return None
        return self.ai_probabilities[:, index].astype(np.float64).std(axis=0)

    def ai_mask(self, index: int) -> np.ndarray | None:
        """The AI segmentation: pixel-wise mean of the members' probabilities >= 0.5."""
        if self.ai_probabilities is None:
            return None
        return self.ai_probabilities[:, index].astype(np.float64).mean(axis=0) >= 0.5


@dataclass
class Cohort:
    """A named collection of cases; ``has_reader_identity`` decides the DSC Lesion definition."""

    name: str
    cases: list[Case]
    synthetic: bool = False
    source: str = ""
    skipped: list[str] = field(default_factory=list)

    def __iter__(self) -> Iterator[Case]:
        return iter(self.cases)

    def __len__(self) -> int:
        return len(self.cases)

    @property
    def patients(self) -> list[str]:
        return sorted({case.patient_id for case in self.cases})

    @property
    def has_images(self) -> bool:
        return any(case.image_hu is not None for case in self.cases)

    @property
    def has_reader_identity(self) -> bool:
        return any(case.reference_reader is not None for case in self.cases)
