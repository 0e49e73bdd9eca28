"""Multi-reader cohorts: the in-memory model, the on-disk format, and adapters (LIDC, DICOM, NIfTI)."""

from __future__ import annotations

from pathlib import Path

from qcgate.cohort.lidc import is_lidc_dir, load_lidc
from qcgate.cohort.model import Case, Cohort
from qcgate.cohort.store import is_cohort_dir, load_cohort_dir, read_case, write_case, write_cohort
from qcgate.errors import InputError

__all__ = [
    "Case", "Cohort", "load_cohort", "load_lidc", "load_cohort_dir", "read_case", "write_case",
    "write_cohort", "is_cohort_dir", "is_lidc_dir",
]


def load_cohort(path: Path, *, max_patients: int | None = None, skip_bad_cases: bool = False) -> Cohort:
    """Load COHORT: a qcgate-format directory (cohort.json) or an LIDC-layout directory (detected)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such cohort directory")
    if is_cohort_dir(path):
        cohort = load_cohort_dir(path, skip_bad_cases=skip_bad_cases)
        if max_patients is not None:
            kept = set(cohort.patients[:max_patients])
            cohort.cases = [c for c in cohort.cases if c.patient_id in kept]
        return cohort
    if is_lidc_dir(path):
        return load_lidc(path, max_patients=max_patients)
    raise InputError(
        f"{path}: not a cohort: expected cohort.json (qcgate format, docs/COHORT_FORMAT.md) or "
        "lidc_meta.json + lidc_masks_packed.npz (LIDC layout)"
    )
