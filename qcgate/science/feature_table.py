"""The feature table of ``qcgate analyze``: one row per lesion slice, its DSC Lesion and its features.

Every lesion slice of the cohort (a slice where at least one reader drew) with a defined DSC Lesion
becomes one row: patient, case, slice, DSC Lesion (qcgate.core.agreement), and the feature groups of
qcgate.features computed from the *feature mask* (the reference reader's mask; the first non-empty
reader's mask without reader identity; or the AI ensemble mask with ``feature_mask="ai"``).
Extraction runs in a process pool over cases (``CaseTask`` → ``extract_case``).

Positional orthodoxy needs a lesion-frequency map learned from training lesions. It is fitted once
on all the cohort's feature masks, so a slice's own lesion contributes (1 / number of lesions) to the
map it is scored on: a small, stated leak, not re-fitted per fold.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from qcgate.cohort.model import Case, Cohort
from qcgate.errors import InputError
from qcgate.science.parallel import AnalysisProgress, single_threaded

if TYPE_CHECKING:
    from qcgate.features import PositionFrequencyMap

log = logging.getLogger(__name__)

# One slice of a CaseTask: (index, CT image in HU, feature mask, lung mask, uncertainty map, DSC Lesion).
SliceInput = tuple[int, np.ndarray | None, np.ndarray, np.ndarray | None, np.ndarray | None, float]
# One extracted slice: (index, DSC Lesion, group -> (names, values, flagged names)).
SliceFeatures = tuple[int, float, dict[str, tuple[list[str], list[float], list[str]]]]

@dataclass
class FeatureTable:
    """One row per analysed lesion slice: identifiers, target and every feature value."""

    patient_ids: list[str]
    case_ids: list[str]
    slice_indices: list[int]
    dsc_lesion: np.ndarray
    feature_names: list[str]
    values: np.ndarray  # (rows, features)
    groups: dict[str, list[int]] = field(default_factory=dict)  # group -> column indices
    flagged: np.ndarray | None = None  # (rows, features) bool: value is a documented fallback

    def __len__(self) -> int:
        return len(self.patient_ids)

    def group_matrix(self, group: str) -> tuple[np.ndarray, list[str]]:
        """The columns of one feature group and their names."""
        columns = self.groups[group]
        return self.values[:, columns], [self.feature_names[c] for c in columns]


@dataclass
class CaseTask:
    """What a worker needs to extract features for the lesion slices of one case."""

    case_id: str
    patient_id: str
    pixel_spacing: tuple[float, float]
    frame_shape: tuple[int, int] | None
    offset: tuple[int, int]
    slices: list[SliceInput]
    groups: tuple[str, ...]


def _feature_mask(case: Case, index: int, feature_mask: str) -> np.ndarray:
    """The mask features are computed from: the AI ensemble mask, or the case's reader feature mask."""
    if feature_mask == "ai":
        mask = case.ai_mask(index)
        if mask is None:
            raise InputError(f"{case.source or case.case_id}: --feature-mask ai needs AI probability maps")
        return mask
    return case.feature_mask(index)


def build_case_tasks(cohort: Cohort, groups: Sequence[str], feature_mask: str = "reference",
                     min_readers: int = 1) -> list[CaseTask]:
    """One task per case with every lesion slice whose DSC Lesion is defined and on which at least
    ``min_readers`` readers drew."""
    tasks = []
    for case in cohort.cases:
        slices = []
        for index in case.lesion_slices():
            if sum(bool(m[index].any()) for m in case.reader_masks.values()) < min_readers:
                continue
            target = case.dsc_lesion(index)
            if target is None:
                continue
            mask = _feature_mask(case, index, feature_mask)
            if not mask.any():  # the AI missed the lesion entirely: nothing to describe
                continue
            image = None if case.image_hu is None else case.image_hu[index]
            lung = None if case.lung_mask is None else case.lung_mask[index]
            slices.append((index, image, mask, lung, case.uncertainty_map(index), float(target)))
        if slices:
            tasks.append(
                CaseTask(case.case_id, case.patient_id, tuple(case.pixel_spacing), case.frame_shape,  # type: ignore[arg-type]
                         tuple(case.offset), slices, tuple(groups))  # type: ignore[arg-type]
            )
    return tasks


# Position map shared with worker processes (set by the pool initializer; JSON text travels, not pickle).
_WORKER_POSITION_MAP: PositionFrequencyMap | None = None


def _init_worker(position_map_json: str | None) -> None:
    """Pool initializer: one thread, quiet pyradiomics, and the position map (from its JSON text)."""
    global _WORKER_POSITION_MAP
    single_threaded()
    # pyradiomics logs a traceback for each undefined descriptor (e.g. GLCM MCC on a flat crop); the
    # feature library already replaces those by flagged fallbacks, so keep the console readable.
    logging.getLogger("radiomics").setLevel(logging.CRITICAL)
    if position_map_json is None:
        _WORKER_POSITION_MAP = None
    else:
        from qcgate.features import PositionFrequencyMap

        _WORKER_POSITION_MAP = PositionFrequencyMap.from_json(position_map_json)


def extract_case(task: CaseTask) -> list[SliceFeatures]:
    """Worker: features of every slice of one case, as plain lists (cheap to send between processes)."""
    from qcgate.features import extract_slice_features

    rows = []
    for index, image, mask, lung, uncertainty, target in task.slices:
        vectors = extract_slice_features(
            image, mask, task.pixel_spacing, lung_mask=lung, uncertainty_map=uncertainty,
            position_map=_WORKER_POSITION_MAP, frame_shape=task.frame_shape, offset=task.offset,
            groups=task.groups,
        )
        rows.append((
            index, target,
            {g: (list(v.names), [float(x) for x in v.values], list(v.flags)) for g, v in vectors.items()},
        ))
    return rows


def fit_position_map(cohort: Cohort, feature_mask: str = "reference") -> PositionFrequencyMap:
    """Fit the lesion-frequency map from every case's feature masks (see the module docstring)."""
    from qcgate.features import PositionFrequencyMap

    samples: list[tuple[np.ndarray, np.ndarray | None]] = []
    offsets: list[tuple[int, int]] = []
    frame_shapes = {case.frame_shape for case in cohort.cases}
    if len(frame_shapes) > 1:
        raise InputError(f"{cohort.source}: cases have different frame shapes {sorted(map(str, frame_shapes))}")
    for case in cohort.cases:
        for index in case.lesion_slices():
            mask = _feature_mask(case, index, feature_mask)
            if not mask.any():
                continue
            samples.append((mask, None if case.lung_mask is None else case.lung_mask[index]))
            offsets.append(tuple(case.offset))  # type: ignore[arg-type]
    return PositionFrequencyMap.fit(samples, frame_shape=frame_shapes.pop(), offsets=offsets)


def extract_feature_table(
    cohort: Cohort,
    *,
    groups: Sequence[str] | None = None,
    workers: int | None = None,
    feature_mask: str = "reference",
    progress: bool = True,
    min_readers: int = 1,
) -> FeatureTable:
    """Extract every group that the cohort's data allows for every analysable lesion slice."""
    from qcgate.features import ALL_GROUPS

    if groups is None:
        # Only groups that every case can provide: a table needs the same columns in every row.
        with_images = [c.image_hu is not None for c in cohort.cases]
        with_ensemble = [c.ai_probabilities is not None and c.ai_probabilities.shape[0] >= 2 for c in cohort.cases]
        groups = [g for g in ALL_GROUPS if all(with_images) or g in ("geometry", "uncertainty")]
        if not all(with_ensemble):
            groups = [g for g in groups if g != "uncertainty"]
        for label, flags in (("CT pixels (imaging, texture, border)", with_images),
                             ("an AI ensemble of >= 2 members (uncertainty)", with_ensemble)):
            if any(flags) and not all(flags):
                log.warning("%d of %d cases lack %s: those groups are left out", flags.count(False), len(flags), label)
    groups = tuple(groups)
    tasks = build_case_tasks(cohort, groups, feature_mask, min_readers)
    if not tasks:
        raise InputError(f"{cohort.source or cohort.name}: no lesion slice with a defined DSC Lesion to analyse")
    position_map = fit_position_map(cohort, feature_mask) if "geometry" in groups else None
    position_json = None if position_map is None else position_map.to_json()
    n_slices = sum(len(t.slices) for t in tasks)
    workers = max(1, workers or os.cpu_count() or 1)
    meter = AnalysisProgress("features", n_slices, enabled=progress)
    results: list[tuple[CaseTask, list[SliceFeatures]]] = []
    if workers == 1:
        _init_worker(position_json)  # in this process: the same settings as a pool worker
        for task in tasks:
            results.append((task, extract_case(task)))
            meter.advance(len(task.slices))
    else:
        with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker,
                                 initargs=(position_json,)) as pool:
            for task, rows in zip(tasks, pool.map(extract_case, tasks, chunksize=max(1, len(tasks) // (workers * 16)))):
                results.append((task, rows))
                meter.advance(len(task.slices))
    table = _assemble(results)
    warn_imaging_fallback(table)
    return table


def warn_imaging_fallback(table: FeatureTable) -> int:
    """A warning when the imaging group fell back to its defaults (no healthy lung found near the
    lesion) on some slices; returns how many. The values are finite fallbacks, flagged, not lung."""
    columns = table.groups.get("imaging")
    if not columns or table.flagged is None or not len(table.dsc_lesion):
        return 0
    fell_back = int(table.flagged[:, columns].any(axis=1).sum())
    if fell_back:
        log.warning("imaging group: %d of %d slices fell back to documented defaults (no healthy lung found around "
                    "the lesion); their imaging descriptors are fallbacks, not measurements", fell_back,
                    len(table.dsc_lesion))
    return fell_back


def _assemble(results: list[tuple[CaseTask, list[SliceFeatures]]]) -> FeatureTable:
    """One FeatureTable from every case's extracted slices; every slice must have the first slice's columns."""
    names: list[str] = []
    groups: dict[str, list[int]] = {}
    patient_ids, case_ids, slice_indices, targets, value_rows, flag_rows = [], [], [], [], [], []
    for task, rows in results:
        for index, target, vectors in rows:
            if not names:
                for group, (group_names, _, _) in vectors.items():
                    groups[group] = list(range(len(names), len(names) + len(group_names)))
                    names.extend(group_names)
            flat_names = [n for g in groups for n in vectors[g][0]]
            if flat_names != names:
                raise InputError(f"case {task.case_id} slice {index}: feature names differ from the first slice's")
            value_rows.append([v for g in groups for v in vectors[g][1]])
            flagged = {f for g in groups for f in vectors[g][2]}
            flag_rows.append([n in flagged for n in names])
            patient_ids.append(task.patient_id)
            case_ids.append(task.case_id)
            slice_indices.append(index)
            targets.append(target)
    return FeatureTable(
        patient_ids=patient_ids, case_ids=case_ids, slice_indices=slice_indices,
        dsc_lesion=np.asarray(targets, dtype=np.float64), feature_names=names,
        values=np.asarray(value_rows, dtype=np.float64).reshape(len(targets), len(names)),
        groups=groups, flagged=np.asarray(flag_rows, dtype=bool).reshape(len(targets), len(names)),
    )
