"""Training rows from a cohort: one row per lesion slice with a defined DSC Lesion, with its features
(``qcgate.science.feature_table.extract_feature_table``) and, for the ResNet, its lesion-centred crop.

Feature mask: the paper's deployment setting describes the *AI* segmentation, so a cohort with AI
members uses the AI ensemble mask (mean probability ≥ 0.5) for features and crops; a cohort without
(LIDC) uses the reader mask chosen by ``Case.feature_mask`` (the documented stand-in; the model card
says so). Slices whose feature mask is empty are left out (there is nothing to describe).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from qcgate.cohort.model import Case, Cohort
from qcgate.errors import InputError
from qcgate.predictors import SliceInput


@dataclass
class SliceRows:
    """Rows aligned with ``table`` (a ``qcgate.science.feature_table.FeatureTable``)."""

    table: object  # FeatureTable
    feature_mask: str
    position_map: object | None  # PositionFrequencyMap
    has_image: bool
    has_uncertainty: bool
    crops: np.ndarray | None  # (N, 3, S, S) float32, see qcgate.predictors.resnet.lesion_crop
    cohort_name: str
    synthetic: bool

    @property
    def targets(self) -> np.ndarray:
        return self.table.dsc_lesion  # type: ignore[attr-defined]

    @property
    def patients(self) -> np.ndarray:
        return np.asarray(self.table.patient_ids)  # type: ignore[attr-defined]

    def columns(self, groups: Sequence[str]) -> tuple[np.ndarray, list[str]]:
        """Feature matrix and names of ``groups`` (in the table's order)."""
        table = self.table
        indices = [c for g in table.groups if g in groups for c in table.groups[g]]  # type: ignore[attr-defined]
        return table.values[:, indices], [table.feature_names[c] for c in indices]  # type: ignore[attr-defined]

    @property
    def plain_groups(self) -> list[str]:
        return [g for g in self.table.groups if g != "uncertainty"]  # type: ignore[attr-defined]

    @property
    def all_groups(self) -> list[str]:
        return list(self.table.groups)  # type: ignore[attr-defined]


def cohort_has_uncertainty(cohort: Cohort) -> bool:
    return any(c.ai_probabilities is not None and c.ai_probabilities.shape[0] >= 2 for c in cohort.cases)


def resolve_feature_mask(cohort: Cohort, feature_mask: str) -> str:
    """"auto": "ai" when every case has AI members, else "reference"."""
    if feature_mask == "auto":
        return "ai" if cohort.cases and all(c.ai_probabilities is not None for c in cohort.cases) else "reference"
    if feature_mask not in ("ai", "reference"):
        raise InputError(f"feature mask must be auto, ai or reference, got {feature_mask!r}")
    return feature_mask


def slice_probability(case: Case, index: int, feature_mask: str) -> np.ndarray:
    """The 'AI probability' of a slice: the ensemble mean, or the reader mask as 0/1 (mask-only)."""
    if feature_mask == "ai" and case.ai_probabilities is not None:
        return case.ai_probabilities[:, index].astype(np.float64).mean(axis=0)
    return case.feature_mask(index).astype(np.float64)


def _in_frame(array: np.ndarray | None, case: Case, fill: float) -> np.ndarray | None:
    """A cropped case's 2-D array placed in its full frame (the gate sees whole slices)."""
    if array is None or case.frame_shape is None:
        return array
    frame = np.full(tuple(case.frame_shape), fill, dtype=array.dtype)
    r, c = case.offset
    frame[r:r + array.shape[0], c:c + array.shape[1]] = array
    return frame


def slice_input(case: Case, index: int, feature_mask: str, *, full_frame: bool = False) -> SliceInput:
    """The run-time input of one cohort slice (what the gate would see); ``full_frame`` places a
    cropped case (LIDC) back in its frame so that positional orthodoxy sees the true position."""
    item = SliceInput(
        image_hu=None if case.image_hu is None else case.image_hu[index],
        ai_probability=slice_probability(case, index, feature_mask),
        uncertainty_map=case.uncertainty_map(index) if feature_mask == "ai" else None,
        pixel_spacing=tuple(float(s) for s in case.pixel_spacing),  # type: ignore[arg-type]
        lung_mask=None if case.lung_mask is None else case.lung_mask[index],
    )
    if full_frame and case.frame_shape is not None:
        item.image_hu = _in_frame(item.image_hu, case, -1000.0)
        item.ai_probability = _in_frame(item.ai_probability, case, 0.0)  # type: ignore[assignment]
        item.uncertainty_map = _in_frame(item.uncertainty_map, case, 0.0)
        item.lung_mask = _in_frame(item.lung_mask, case, False)
    return item


def table_slice_inputs(cohort: Cohort, table, feature_mask: str) -> list[SliceInput]:
    """One SliceInput per table row (same order)."""
    by_id = {case.case_id: case for case in cohort.cases}
    return [slice_input(by_id[cid], int(k), feature_mask) for cid, k in zip(table.case_ids, table.slice_indices)]


def build_rows(cohort: Cohort, *, feature_mask: str = "auto", groups: Sequence[str] | None = None,
               with_crops: bool = False, crop_size: int = 64, workers: int | None = 1,
               progress: bool = False) -> SliceRows:
    """Features (every group the cohort allows, or ``groups``) and optionally crops of every row."""
    from qcgate.predictors.resnet import lesion_crop
    from qcgate.science.feature_table import extract_feature_table, fit_position_map

    feature_mask = resolve_feature_mask(cohort, feature_mask)
    has_um = feature_mask == "ai" and cohort_has_uncertainty(cohort)
    if groups is None:
        from qcgate.features import ALL_GROUPS

        groups = [g for g in ALL_GROUPS if (cohort.has_images or g == "geometry") and g != "uncertainty"]
        if has_um:
            groups.append("uncertainty")
    table = extract_feature_table(cohort, groups=groups, workers=workers, feature_mask=feature_mask,
                                  progress=progress)
    position_map = fit_position_map(cohort, feature_mask) if "geometry" in groups else None
    crops = None
    if with_crops:
        inputs = table_slice_inputs(cohort, table, feature_mask)
        crops = np.stack([lesion_crop(s.image_hu, s.ai_probability, s.uncertainty_map, crop_size) for s in inputs])
    return SliceRows(table=table, feature_mask=feature_mask, position_map=position_map,
                     has_image=cohort.has_images and any(g in groups for g in ("imaging", "texture", "border")),
                     has_uncertainty="uncertainty" in groups, crops=crops, cohort_name=cohort.name,
                     synthetic=cohort.synthetic)
