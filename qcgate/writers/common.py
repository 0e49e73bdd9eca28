"""Helpers every writer needs: source headers highdicom accepts, and synthetic-data labelling."""

from __future__ import annotations

from collections.abc import Sequence

from pydicom.dataset import Dataset

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
