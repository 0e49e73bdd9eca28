"""Adapter for LIDC-layout directories (``../shared/data/lidc`` and any directory laid out like it).

Layout: ``lidc_meta.json`` (a list of nodule-cluster records: key, patient_id, n_annotators, shape
(readers, rows, cols, slices), bbox [[row0,row1],[col0,col1],[k0,k1]], pixel_spacing, ...) and
``lidc_masks_packed.npz`` (per key, ``np.packbits`` of the bool mask array of that shape).
Masks only: cases carry no image, so only the geometry group of features applies. Readers carry no
identity, so DSC Lesion is the mean pairwise Dice.

Skipped with a warning: clusters with more than 4 annotators (pylidc clustering errors), clusters with
a single annotator (no agreement to measure), and clusters missing from the npz.
"""

from __future__ import annotations

import json
import logging
import zipfile
from collections.abc import Collection
from pathlib import Path

import numpy as np

from qcgate.cohort.model import Case, Cohort
from qcgate.errors import InputError

log = logging.getLogger(__name__)

META_FILE = "lidc_meta.json"
MASKS_FILE = "lidc_masks_packed.npz"
MAX_ANNOTATORS = 4
LIDC_FRAME = (512, 512)


def is_lidc_dir(path: Path) -> bool:
    """True when ``path`` is a directory holding the LIDC meta and packed-mask files."""
    path = Path(path)
    return path.is_dir() and (path / META_FILE).is_file() and (path / MASKS_FILE).is_file()


def _read_meta(meta_path: Path) -> list[dict]:
    try:
        records = json.loads(meta_path.read_text())
    except FileNotFoundError as exc:
        raise InputError(f"{meta_path}: file not found") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{meta_path}: not valid JSON ({exc})") from exc
    if not isinstance(records, list):
        raise InputError(f"{meta_path}: expected a JSON list of nodule-cluster records")
    required = ("key", "patient_id", "n_annotators", "shape", "bbox", "pixel_spacing")
    for i, record in enumerate(records):
        missing = [name for name in required if not isinstance(record, dict) or name not in record]
        if missing:
            raise InputError(f"{meta_path}: record {i} lacks {', '.join(missing)}")
    return records


def unpack_masks(packed: np.ndarray, shape: tuple[int, ...], key: str, source: Path) -> np.ndarray:
    """Unpack one key's bits into a bool array of ``shape`` (readers, rows, cols, slices)."""
    size = int(np.prod(shape))
    bits = np.unpackbits(np.asarray(packed, dtype=np.uint8))
    if bits.size < size or bits.size - size >= 8:
        raise InputError(
            f"{source}: masks of {key!r} hold {bits.size} bits, shape {list(shape)} needs {size}"
        )
    return bits[:size].reshape(shape).astype(bool)


def load_lidc(
    directory: Path,
    *,
    patients: Collection[str] | None = None,
    max_patients: int | None = None,
) -> Cohort:
    """Load an LIDC-layout directory as a Cohort of one case per nodule cluster.

    ``patients`` keeps only those patient ids; ``max_patients`` keeps the first N patients in sorted
    order (for quick runs). Each case's arrays are (slices, rows, cols) crops placed in the 512x512
    frame by ``offset`` = (row0, col0).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"{directory}: not a directory")
    meta_path, masks_path = directory / META_FILE, directory / MASKS_FILE
    if not masks_path.is_file():
        raise InputError(f"{masks_path}: file not found (an LIDC-layout directory needs {META_FILE} and {MASKS_FILE})")
    records = _read_meta(meta_path)
    if patients is not None:
        wanted = set(patients)
        records = [r for r in records if r["patient_id"] in wanted]

    skipped: list[str] = []
    cases: list[Case] = []
    try:
        archive = np.load(masks_path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise InputError(f"{masks_path}: not a readable .npz archive ({exc})") from exc
    with archive:
        available = set(archive.files)
        usable = []
        for record in records:
            key = str(record["key"])
            n_annotators = int(record["n_annotators"])
            if n_annotators > MAX_ANNOTATORS:
                skipped.append(f"{key}: {n_annotators} annotators (> {MAX_ANNOTATORS}, a clustering error)")
            elif n_annotators < 2:
                skipped.append(f"{key}: a single annotator, no agreement to measure")
            elif key not in available:
                skipped.append(f"{key}: listed in {META_FILE} but missing from {MASKS_FILE}")
            else:
                usable.append(record)
        if max_patients is not None:  # among patients with a usable cluster
            kept = set(sorted({r["patient_id"] for r in usable})[:max_patients])
            usable = [r for r in usable if r["patient_id"] in kept]
        for record in usable:
            key = str(record["key"])
            n_annotators = int(record["n_annotators"])
            shape = tuple(int(v) for v in record["shape"])
            if len(shape) != 4 or shape[0] != n_annotators:
                raise InputError(
                    f"{meta_path}: record {key!r} has shape {list(shape)}, expected "
                    f"({n_annotators} readers, rows, cols, slices)"
                )
            try:
                packed = archive[key]
            except (ValueError, zipfile.BadZipFile, OSError) as exc:
                raise InputError(f"{masks_path}: entry {key!r} is unreadable ({exc})") from exc
            masks = unpack_masks(packed, shape, key, masks_path)
            stacked = np.moveaxis(masks, 3, 1)  # (readers, slices, rows, cols)
            spacing = float(record["pixel_spacing"])
            bbox = record["bbox"]
            cases.append(
                Case(
                    case_id=key,
                    patient_id=str(record["patient_id"]),
                    pixel_spacing=(spacing, spacing),
                    reader_masks={f"reader{i + 1}": np.ascontiguousarray(stacked[i]) for i in range(shape[0])},
                    frame_shape=LIDC_FRAME,
                    offset=(int(bbox[0][0]), int(bbox[1][0])),
                    source=f"{masks_path}[{key}]",
                    attributes={"slice_z": record.get("slice_z"), "n_annotators": n_annotators},
                )
            )
    for message in skipped:
        log.debug("LIDC: skipped %s", message)
    if skipped:
        log.warning("LIDC %s: skipped %d of %d clusters (details with -v)", directory, len(skipped), len(records))
    if not cases:
        raise InputError(f"{directory}: no usable nodule cluster (need 2-{MAX_ANNOTATORS} annotators)")
    return Cohort(name=directory.name, cases=cases, synthetic=False, source=str(directory), skipped=skipped)
