"""The qcgate cohort format on disk: ``cohort.json`` + one compressed ``.npz`` per case.

See docs/COHORT_FORMAT.md for the specification. Arrays are read with ``allow_pickle=False``: a file
that needs pickle is refused. Strings inside the npz are fixed-width unicode arrays.
"""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path

import numpy as np

from qcgate.cohort.model import Case, Cohort
from qcgate.errors import InputError

log = logging.getLogger(__name__)

MANIFEST = "cohort.json"
FORMAT_NAME = "qcgate-cohort"
FORMAT_VERSION = 1


def is_cohort_dir(path: Path) -> bool:
    """True when ``path`` is a directory holding a ``cohort.json`` manifest."""
    return Path(path).is_dir() and (Path(path) / MANIFEST).is_file()


def write_case(case: Case, path: Path) -> None:
    """Write one case as a compressed npz (validating it first)."""
    case.validate()
    readers = list(case.reader_masks)
    arrays: dict[str, np.ndarray] = {
        "patient_id": np.array(case.patient_id),
        "case_id": np.array(case.case_id),
        "pixel_spacing": np.asarray(case.pixel_spacing, dtype=np.float64),
        "reader_ids": np.array(readers, dtype=str),
        "reader_masks": np.stack([np.asarray(case.reader_masks[r], dtype=bool) for r in readers]),
        "offset": np.asarray(case.offset, dtype=np.int64),
        "synthetic": np.array(bool(case.synthetic)),
    }
    if case.reference_reader is not None:
        arrays["reference_reader"] = np.array(case.reference_reader)
    if case.repeat_reader is not None:
        arrays["repeat_reader"] = np.array(case.repeat_reader)
    if case.image_hu is not None:
        arrays["image_hu"] = np.asarray(case.image_hu, dtype=np.float32)
    if case.ai_probabilities is not None:
        arrays["ai_probabilities"] = np.asarray(case.ai_probabilities, dtype=np.float32)
    if case.lung_mask is not None:
        arrays["lung_mask"] = np.asarray(case.lung_mask, dtype=bool)
    if case.frame_shape is not None:
        arrays["frame_shape"] = np.asarray(case.frame_shape, dtype=np.int64)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)


def _text(archive: np.lib.npyio.NpzFile, name: str) -> str | None:
    return str(archive[name][()]) if name in archive.files else None


def read_case(path: Path, *, patient_id: str | None = None) -> Case:
    """Read one case npz; InputError names the file and the problem when it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: case file not found")
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [n for n in ("reader_ids", "reader_masks", "pixel_spacing") if n not in archive.files]
            if missing:
                raise InputError(f"{path}: missing array(s) {', '.join(missing)}")
            reader_ids = [str(r) for r in archive["reader_ids"].reshape(-1)]
            masks = archive["reader_masks"]
            if masks.ndim != 4 or masks.shape[0] != len(reader_ids):
                raise InputError(
                    f"{path}: reader_masks must be ({len(reader_ids)} readers, slices, rows, cols), got {masks.shape}"
                )
            stored_patient = _text(archive, "patient_id")
            case = Case(
                case_id=_text(archive, "case_id") or path.stem,
                patient_id=patient_id or stored_patient or path.stem,
                pixel_spacing=tuple(float(v) for v in archive["pixel_spacing"].reshape(-1)),  # type: ignore[arg-type]
                reader_masks={r: masks[i].astype(bool) for i, r in enumerate(reader_ids)},
                image_hu=archive["image_hu"].astype(np.float32) if "image_hu" in archive.files else None,
                ai_probabilities=(
                    archive["ai_probabilities"].astype(np.float32) if "ai_probabilities" in archive.files else None
                ),
                lung_mask=archive["lung_mask"].astype(bool) if "lung_mask" in archive.files else None,
                reference_reader=_text(archive, "reference_reader"),
                repeat_reader=_text(archive, "repeat_reader"),
                frame_shape=(
                    tuple(int(v) for v in archive["frame_shape"]) if "frame_shape" in archive.files else None  # type: ignore[arg-type]
                ),
                offset=tuple(int(v) for v in archive["offset"]) if "offset" in archive.files else (0, 0),  # type: ignore[arg-type]
                synthetic=bool(archive["synthetic"][()]) if "synthetic" in archive.files else False,
                source=str(path),
            )
    except InputError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise InputError(f"{path}: not a readable qcgate case file ({type(exc).__name__}: {exc})") from exc
    case.validate()
    return case


def write_cohort(cohort: Cohort, directory: Path, *, description: str = "") -> Path:
    """Write every case under ``directory/cases/`` and the manifest; returns the manifest path."""
    directory = Path(directory)
    (directory / "cases").mkdir(parents=True, exist_ok=True)
    entries = []
    for case in cohort.cases:
        relative = f"cases/{case.case_id}.npz"
        write_case(case, directory / relative)
        entries.append({"case_id": case.case_id, "patient_id": case.patient_id, "file": relative})
    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "name": cohort.name,
        "synthetic": bool(cohort.synthetic),
        "description": description,
        "cases": entries,
    }
    path = directory / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def load_cohort_dir(directory: Path, *, skip_bad_cases: bool = False) -> Cohort:
    """Load a directory in the qcgate cohort format.

    A missing or malformed manifest raises InputError. A case that cannot be read raises InputError
    naming its file, or, with ``skip_bad_cases``, is skipped with a warning. A case without any
    lesion slice is skipped with a warning (it contributes nothing to the analysis).
    """
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise InputError(f"{manifest_path}: manifest not found")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{manifest_path}: not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise InputError(f"{manifest_path}: not a {FORMAT_NAME} manifest (\"format\" must be {FORMAT_NAME!r})")
    if int(manifest.get("version", 0)) > FORMAT_VERSION:
        raise InputError(f"{manifest_path}: format version {manifest.get('version')} is newer than {FORMAT_VERSION}")
    entries = manifest.get("cases")
    if not isinstance(entries, list) or not entries:
        raise InputError(f"{manifest_path}: \"cases\" must be a non-empty list")
    cases: list[Case] = []
    skipped: list[str] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "file" not in entry:
            raise InputError(f"{manifest_path}: case entry {i} has no \"file\"")
        case_path = directory / str(entry["file"])
        try:
            case = read_case(case_path, patient_id=entry.get("patient_id"))
        except InputError as exc:
            if not skip_bad_cases:
                raise
            log.warning("skipping case: %s", exc)
            skipped.append(str(exc))
            continue
        if not case.lesion_slices():
            message = f"{case_path}: patient {case.patient_id!r} has no lesion slice (every reader mask is empty)"
            log.warning("skipping case: %s", message)
            skipped.append(message)
            continue
        cases.append(case)
    if not cases:
        raise InputError(f"{manifest_path}: no usable case (skipped: {'; '.join(skipped)})")
    return Cohort(
        name=str(manifest.get("name") or directory.name),
        cases=cases,
        synthetic=bool(manifest.get("synthetic", False)),
        source=str(directory),
        skipped=skipped,
    )
