"""Helpers every writer needs: source headers highdicom accepts, saving, and synthetic-data labelling."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

from qcgate.core.results import CaseResult

#: Type 2 attributes highdicom copies from the sources; anonymised real CTs may lack them.
_TYPE2_COPIED = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyID", "StudyDate", "StudyTime",
    "AccessionNumber", "ReferringPhysicianName",
)


def is_synthetic_source(datasets: Sequence[Dataset]) -> bool:
    """Whether the source series says it is synthetic (qcgate phantom data); outputs then say so too."""
    for ds in datasets[:1]:
        text = " ".join(str(ds.get(keyword, "")) for keyword in ("SeriesDescription", "ImageComments", "DeidentificationMethod"))
        if "SYNTHETIC" in text.upper():
            return True
    return False


def source_headers_for_derivation(datasets: Sequence[Dataset]) -> list[Dataset]:
    """Copies of the CT headers with missing type 2 attributes added empty (originals untouched).

    An empty SpecificCharacterSet (seen in anonymised real CTs) means the default repertoire; highdicom
    refuses the empty value, so the copy drops it. The copies share the data elements (pixel data
    included) with the originals; only the added attributes are new, so this costs no pixel copy.
    """
    prepared: list[Dataset] = []
    for ds in datasets:
        missing = [keyword for keyword in _TYPE2_COPIED if keyword not in ds]
        empty_charset = "SpecificCharacterSet" in ds and not ds.SpecificCharacterSet
        if not missing and not empty_charset:
            prepared.append(ds)
            continue
        copy = Dataset()
        for element in ds:
            copy.add(element)
        if hasattr(ds, "file_meta"):
            copy.file_meta = ds.file_meta
        copy.is_little_endian = getattr(ds, "is_little_endian", True)
        copy.is_implicit_VR = getattr(ds, "is_implicit_VR", False)
        for keyword in missing:
            setattr(copy, keyword, "")
        if empty_charset:
            del copy.SpecificCharacterSet
        prepared.append(copy)
    return prepared


@dataclass(frozen=True)
class DerivationSources:
    """The case's source headers prepared once (``source_headers_for_derivation``) for every writer."""

    ct: list[Dataset]  # in the order of CaseResult.ct_datasets
    segmentations: list[Dataset]  # the AI SEGs judged, in the order of CaseResult.segmentation_datasets


def prepare_derivation_sources(result: CaseResult) -> DerivationSources:
    """Prepare the CT and AI SEG headers of ``result`` once; pass the result to each ``build_*``."""
    return DerivationSources(ct=source_headers_for_derivation(result.ct_datasets),
                             segmentations=source_headers_for_derivation(result.segmentation_datasets))


def save_dataset(dataset: Dataset, out_path: Path) -> Path:
    """Save a built output as a DICOM file (creating the folder) and return the path."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(out_path, enforce_file_format=True)
    return out_path
