"""Importers for sites holding their own multi-reader data as DICOM (CT + one SEG per reader) or NIfTI.

Site layouts (one sub-directory per case; the directory name is the case id)::

    DICOM                                   NIfTI
    SITE/<case>/ct/*.dcm                    SITE/<case>/image.nii[.gz]        (HU)
    SITE/<case>/seg_reader_<ID>.dcm         SITE/<case>/reader_<ID>.nii[.gz]  (0/1)
    SITE/<case>/seg_ai_<name>.dcm (opt.)    SITE/<case>/ai_<name>.nii[.gz]    (opt., probability 0..1)
                                            SITE/<case>/lung.nii[.gz]         (opt., 0/1)

``qcgate phantom --dicom`` writes exactly the DICOM layout. The patient id is the CT's PatientID (DICOM)
or the case directory name (NIfTI; a ``patient_id.txt`` beside the image overrides it). Only slices on
which at least one reader drew are kept. Every problem raises InputError naming the file.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from qcgate.cohort.model import Case, Cohort
from qcgate.errors import InputError

log = logging.getLogger(__name__)

LESION_TYPE_CODES = {"52988006", "4147007", "840539006", "49755003"}  # lesion, mass, COVID-19, abnormal structure
READER_SEG = re.compile(r"^seg_reader_(?P<id>[A-Za-z0-9._-]+)\.dcm$")
AI_SEG = re.compile(r"^seg_ai_(?P<id>[A-Za-z0-9._-]+)\.dcm$")
READER_NII = re.compile(r"^reader_(?P<id>[A-Za-z0-9._-]+)\.nii(\.gz)?$")
AI_NII = re.compile(r"^ai_(?P<id>[A-Za-z0-9._-]+)\.nii(\.gz)?$")


# --------------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------------


def read_ct_series(ct_dir: Path) -> tuple[list, np.ndarray, tuple[float, float]]:
    """(datasets in spatial order, HU volume (slices, rows, cols), pixel spacing) of a CT directory."""
    import highdicom as hd
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_rescale

    files = sorted(p for p in Path(ct_dir).iterdir() if p.is_file()) if Path(ct_dir).is_dir() else []
    if not files:
        raise InputError(f"{ct_dir}: no CT files found")
    datasets = []
    for path in files:
        try:
            ds = pydicom.dcmread(path)
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            raise InputError(f"{path}: not a readable DICOM file ({exc})") from exc
        if getattr(ds, "Modality", None) != "CT" or "PixelData" not in ds:
            log.warning("%s: not a CT image, ignored", path)
            continue
        ds.filename = str(path)
        datasets.append(ds)
    if not datasets:
        raise InputError(f"{ct_dir}: no CT image among {len(files)} files")
    if len({ds.SeriesInstanceUID for ds in datasets}) > 1:
        raise InputError(f"{ct_dir}: holds more than one CT series")
    sizes = {(int(ds.Rows), int(ds.Columns)) for ds in datasets}
    if len(sizes) > 1:
        raise InputError(f"{ct_dir}: slices differ in size {sorted(sizes)}")
    try:
        datasets = hd.spatial.sort_datasets(datasets)
    except (ValueError, AttributeError, KeyError) as exc:
        log.warning("%s: spatial sort failed (%s); ordering by InstanceNumber", ct_dir, exc)
        datasets.sort(key=lambda ds: int(getattr(ds, "InstanceNumber", 0)))
    try:
        volume = np.stack([apply_rescale(ds.pixel_array, ds).astype(np.float32) for ds in datasets])
    except (ValueError, AttributeError, RuntimeError) as exc:
        raise InputError(f"{ct_dir}: cannot decode the CT pixels ({exc})") from exc
    spacing = tuple(float(v) for v in datasets[0].PixelSpacing)
    return datasets, volume, spacing  # type: ignore[return-value]


def _lesion_segment(seg, path: Path) -> int:
    numbers = [int(item.SegmentNumber) for item in seg.SegmentSequence]
    if len(numbers) == 1:
        return numbers[0]
    for item in seg.SegmentSequence:
        codes = {c.CodeValue for c in getattr(item, "SegmentedPropertyTypeCodeSequence", [])}
        if codes & LESION_TYPE_CODES or "lesion" in str(getattr(item, "SegmentLabel", "")).lower():
            return int(item.SegmentNumber)
    raise InputError(f"{path}: {len(numbers)} segments and none is a lesion (by property type or label)")


def read_seg_on_ct(path: Path, ct_datasets: Sequence) -> np.ndarray:
    """The lesion segment of a SEG as float (slices, rows, cols) on the CT grid (probabilities for
    FRACTIONAL, 0/1 otherwise); InputError when it does not reference the CT series."""
    import highdicom as hd
    from pydicom.errors import InvalidDicomError

    try:
        seg = hd.seg.segread(path)
    except (InvalidDicomError, OSError, ValueError, AttributeError, KeyError, EOFError) as exc:
        raise InputError(f"{path}: not a readable DICOM Segmentation ({exc})") from exc
    source_uids = [str(ds.SOPInstanceUID) for ds in ct_datasets]
    referenced = {
        str(item.ReferencedSOPInstanceUID)
        for series in getattr(seg, "ReferencedSeriesSequence", [])
        for item in series.ReferencedInstanceSequence
    }
    if not referenced & set(source_uids):
        raise InputError(f"{path}: references none of the CT images in the case's ct/ directory")
    segment = _lesion_segment(seg, path)
    wanted = [uid for uid in source_uids if uid in referenced]

    def pixels_by_source(ignore_spatial_locations: bool) -> np.ndarray:
        return seg.get_pixels_by_source_instance(
            wanted, segment_numbers=[segment], assert_missing_frames_are_empty=True, rescale_fractional=True,
            dtype=np.float32, ignore_spatial_locations=ignore_spatial_locations,
        )[..., 0]

    try:
        try:
            pixels = pixels_by_source(False)
        except (ValueError, RuntimeError) as exc:
            if "spatial locations" not in str(exc):
                raise
            # Many real SEGs (e.g. dcmqi's) omit SpatialLocationsPreserved; the frame references
            # still name the source image, which is what this mapping uses.
            log.warning("%s: SpatialLocationsPreserved not stated; mapping frames by their source image", path)
            pixels = pixels_by_source(True)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise InputError(f"{path}: cannot map the segmentation onto the CT ({exc})") from exc
    full = np.zeros((len(source_uids), *pixels.shape[1:]), np.float32)
    positions = [i for i, uid in enumerate(source_uids) if uid in referenced]
    full[positions] = pixels
    return full


def import_dicom_case(case_dir: Path, *, reference_reader: str | None = None,
                      repeat_reader: str | None = None) -> Case:
    """Import ``case_dir`` in the DICOM site layout (see the module docstring)."""
    case_dir = Path(case_dir)
    datasets, volume, spacing = read_ct_series(case_dir / "ct")
    readers: dict[str, np.ndarray] = {}
    members: list[np.ndarray] = []
    for path in sorted(case_dir.iterdir()):
        if (match := READER_SEG.match(path.name)) is not None:
            readers[match["id"]] = read_seg_on_ct(path, datasets) >= 0.5
        elif (match := AI_SEG.match(path.name)) is not None:
            members.append(read_seg_on_ct(path, datasets))
    if not readers:
        raise InputError(f"{case_dir}: no reader SEG (seg_reader_<ID>.dcm)")
    patient_id = str(getattr(datasets[0], "PatientID", "") or case_dir.name)
    return _finish_case(case_dir, patient_id, spacing, volume, readers, members, None, reference_reader,
                        repeat_reader, synthetic="SYNTHETIC" in str(getattr(datasets[0], "SeriesDescription", "")).upper())


# --------------------------------------------------------------------------------------------------
# NIfTI
# --------------------------------------------------------------------------------------------------


def _read_nifti(path: Path):
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"{path}: not a readable NIfTI file ({str(exc).strip().splitlines()[-1]})") from exc
    array = sitk.GetArrayFromImage(image)
    if array.ndim == 2:
        array = array[np.newaxis]
    if array.ndim != 3:
        raise InputError(f"{path}: expected a 2-D or 3-D image, got {array.ndim}-D")
    return image, array


def import_nifti_case(case_dir: Path, *, reference_reader: str | None = None,
                      repeat_reader: str | None = None) -> Case:
    """Import ``case_dir`` in the NIfTI site layout (see the module docstring)."""
    case_dir = Path(case_dir)
    images = [p for p in (case_dir / "image.nii.gz", case_dir / "image.nii") if p.is_file()]
    if not images:
        raise InputError(f"{case_dir}: no image.nii or image.nii.gz")
    image, volume = _read_nifti(images[0])
    spacing_xy = image.GetSpacing()[:2]
    spacing = (float(spacing_xy[1]), float(spacing_xy[0]))  # (row, col) = (y, x)

    def on_grid(path: Path) -> np.ndarray:
        other, array = _read_nifti(path)
        if array.shape != volume.shape:
            raise InputError(f"{path}: shape {array.shape} does not match the image's {volume.shape} ({images[0].name})")
        if not np.allclose(other.GetSpacing(), image.GetSpacing(), rtol=1e-3) or not np.allclose(
            other.GetOrigin(), image.GetOrigin(), atol=1e-2
        ):
            raise InputError(f"{path}: spacing/origin differ from {images[0].name}: not on the image grid")
        return array

    readers: dict[str, np.ndarray] = {}
    members: list[np.ndarray] = []
    lung = None
    for path in sorted(case_dir.iterdir()):
        if (match := READER_NII.match(path.name)) is not None:
            readers[match["id"]] = on_grid(path) > 0
        elif (match := AI_NII.match(path.name)) is not None:
            probability = on_grid(path).astype(np.float32)
            if probability.min() < 0 or probability.max() > 1:
                raise InputError(f"{path}: AI probabilities must lie in [0, 1]")
            members.append(probability)
        elif path.name in ("lung.nii", "lung.nii.gz"):
            lung = on_grid(path) > 0
    if not readers:
        raise InputError(f"{case_dir}: no reader mask (reader_<ID>.nii[.gz])")
    id_file = case_dir / "patient_id.txt"
    patient_id = id_file.read_text().strip() if id_file.is_file() else case_dir.name
    return _finish_case(case_dir, patient_id, spacing, volume.astype(np.float32), readers, members, lung,
                        reference_reader, repeat_reader, synthetic=False)


# --------------------------------------------------------------------------------------------------
# Shared
# --------------------------------------------------------------------------------------------------


def _finish_case(case_dir: Path, patient_id: str, spacing: tuple[float, float], volume: np.ndarray,
                 readers: dict[str, np.ndarray], members: list[np.ndarray], lung: np.ndarray | None,
                 reference_reader: str | None, repeat_reader: str | None, *, synthetic: bool) -> Case:
    for role, reader in (("reference", reference_reader), ("repeat", repeat_reader)):
        if reader is not None and reader not in readers:
            raise InputError(f"{case_dir}: {role} reader {reader!r} has no mask (readers: {sorted(readers)})")
    drawn = np.zeros(volume.shape[0], bool)
    for mask in readers.values():
        drawn |= mask.reshape(mask.shape[0], -1).any(axis=1)
    keep = np.flatnonzero(drawn)
    if keep.size == 0:
        raise InputError(f"{case_dir}: patient {patient_id!r} has no lesion slice (every reader mask is empty)")
    case = Case(
        case_id=case_dir.name,
        patient_id=patient_id,
        pixel_spacing=spacing,
        reader_masks={r: np.ascontiguousarray(m[keep]) for r, m in readers.items()},
        image_hu=np.ascontiguousarray(volume[keep]),
        ai_probabilities=np.stack([m[keep] for m in members]) if members else None,
        lung_mask=None if lung is None else np.ascontiguousarray(lung[keep]),
        reference_reader=reference_reader,
        repeat_reader=repeat_reader,
        synthetic=synthetic,
        source=str(case_dir),
        attributes={"kept_slices": [int(k) for k in keep]},
    )
    case.validate()
    return case


def import_site(site_dir: Path, fmt: str, *, reference_reader: str | None = None,
                repeat_reader: str | None = None, skip_bad_cases: bool = False) -> Cohort:
    """Import every case directory under ``site_dir`` (``fmt`` "dicom" or "nifti")."""
    site_dir = Path(site_dir)
    if not site_dir.is_dir():
        raise InputError(f"{site_dir}: not a directory")
    importer = {"dicom": import_dicom_case, "nifti": import_nifti_case}.get(fmt)
    if importer is None:
        raise InputError(f"unknown import format {fmt!r} (dicom or nifti)")
    cases, skipped = [], []
    for case_dir in sorted(p for p in site_dir.iterdir() if p.is_dir()):
        try:
            cases.append(importer(case_dir, reference_reader=reference_reader, repeat_reader=repeat_reader))
        except InputError as exc:
            if not skip_bad_cases:
                raise
            log.warning("skipping case: %s", exc)
            skipped.append(str(exc))
    if not cases:
        raise InputError(f"{site_dir}: no importable case directory" + (f" (skipped: {'; '.join(skipped)})" if skipped else ""))
    return Cohort(name=site_dir.name, cases=cases, synthetic=all(c.synthetic for c in cases),
                  source=str(site_dir), skipped=skipped)
