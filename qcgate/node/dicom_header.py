"""What the gate needs to know about an instance, read from its header only (pixels stay encoded)."""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from qcgate.core.dicom import CT_IMAGE_STORAGE, CT_SOP_CLASSES, SEGMENTATION_STORAGE, InstanceHeader


class HeaderError(Exception):
    """The payload cannot be used; ``code`` is a short machine-readable reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _required_uid(dataset: Dataset, keyword: str) -> str:
    value = dataset.get(keyword)
    text = str(value).strip().rstrip("\x00") if value is not None else ""
    if not text:
        raise HeaderError("missing-attribute", f"{keyword} is missing or blank")
    if len(text) > 64:
        raise HeaderError("invalid-attribute", f"{keyword} is longer than 64 characters")
    return text


def _text(dataset: Dataset, keyword: str) -> str | None:
    value = dataset.get(keyword)
    return str(value)[:64] if value not in (None, "") else None


def _seg_references(dataset: Dataset) -> tuple[tuple[str, ...], frozenset[str]]:
    """Referenced series (from ReferencedSeriesSequence) and every referenced source SOP instance.

    Source instances come from the Referenced Series Sequence and from each frame's
    Derivation Image -> Source Image Sequence (shared or per-frame functional groups).
    """
    series: list[str] = []
    instances: set[str] = set()
    for item in dataset.get("ReferencedSeriesSequence", []) or []:
        uid = str(item.get("SeriesInstanceUID", "")).strip()
        if uid and uid not in series:
            series.append(uid)
        for ref in item.get("ReferencedInstanceSequence", []) or []:
            sop = str(ref.get("ReferencedSOPInstanceUID", "")).strip()
            if sop:
                instances.add(sop)
    groups = list(dataset.get("PerFrameFunctionalGroupsSequence", []) or [])
    groups += list(dataset.get("SharedFunctionalGroupsSequence", []) or [])
    for group in groups:
        for derivation in group.get("DerivationImageSequence", []) or []:
            for source in derivation.get("SourceImageSequence", []) or []:
                sop = str(source.get("ReferencedSOPInstanceUID", "")).strip()
                if sop:
                    instances.add(sop)
    return tuple(series), frozenset(instances)


def read_header(path: Path) -> InstanceHeader:
    """Parse the header of a Part 10 file and check what the gate needs.

    Raises HeaderError("unparseable" | "missing-attribute" | "invalid-attribute" | "unsupported", ...).
    """
    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=True, defer_size="256 KB")
        # Touch the identifying elements now so a corrupt element fails here, not later.
        sop_class = _required_uid(dataset, "SOPClassUID")
    except HeaderError:
        raise
    except Exception as exc:  # untrusted bytes: any parser failure (BytesLengthException, struct.error, ...) is "unparseable"
        raise HeaderError("unparseable", f"payload does not parse as DICOM: {type(exc).__name__}: {exc}") from None
    try:
        transfer_syntax = str(dataset.file_meta.get("TransferSyntaxUID", "")) if hasattr(dataset, "file_meta") else ""
        header_fields = dict(
            sop_class_uid=sop_class,
            sop_instance_uid=_required_uid(dataset, "SOPInstanceUID"),
            study_instance_uid=_required_uid(dataset, "StudyInstanceUID"),
            series_instance_uid=_required_uid(dataset, "SeriesInstanceUID"),
            modality=str(dataset.get("Modality", "") or "")[:16],
            transfer_syntax_uid=transfer_syntax,
        )
        if sop_class == CT_IMAGE_STORAGE:
            for keyword in ("Rows", "Columns", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
                if dataset.get(keyword) in (None, ""):
                    raise HeaderError("missing-attribute", f"CT image lacks {keyword}, needed to place the slice")
        elif sop_class == SEGMENTATION_STORAGE:
            if not dataset.get("SegmentSequence"):
                raise HeaderError("missing-attribute", "SEG has no SegmentSequence")
            series_refs, instance_refs = _seg_references(dataset)
            if not series_refs and not instance_refs:
                raise HeaderError("missing-attribute", "SEG references no source series or images")
            algorithm = None
            version = None
            for segment in dataset.SegmentSequence:
                algorithm = algorithm or _text(segment, "SegmentAlgorithmName")
                for ident in segment.get("SegmentationAlgorithmIdentificationSequence", []) or []:
                    version = version or _text(ident, "AlgorithmVersion")
            header_fields.update(
                referenced_series_uids=series_refs,
                referenced_sop_instance_uids=instance_refs,
                manufacturer=_text(dataset, "Manufacturer"),
                algorithm_name=algorithm,
                algorithm_version=version,
            )
        elif sop_class not in CT_SOP_CLASSES:
            raise HeaderError("unsupported", f"SOP class {sop_class} is not CT or Segmentation")
        return InstanceHeader(**header_fields)
    except HeaderError:
        raise
    except Exception as exc:  # a corrupt element decoded lazily above: same verdict
        raise HeaderError("unparseable", f"header element does not parse: {type(exc).__name__}: {exc}") from None
