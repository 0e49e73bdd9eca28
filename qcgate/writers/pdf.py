"""The QC report as an Encapsulated PDF (SOP class 1.2.840.10008.5.1.4.1.1.104.1), built by hand with
pydicom (highdicom has no encapsulated-document class).

Same study as the CT (patient and study attributes copied from the prepared CT header), its own series
(modality DOC, number 9005). The Source Instance Sequence lists the CT images of the lesion slices (the
report is derived from them); the PDF bytes come from ``qcgate.report.pdf.render_case_pdf`` (the pipeline
renders, this module only encapsulates, so writers do not depend on the report package).
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

from qcgate import __version__
from qcgate.core.results import CaseResult
from qcgate.errors import InputError
from qcgate.writers.common import DerivationSources, is_synthetic_case, save_dataset, source_headers_for_derivation

log = logging.getLogger(__name__)

ENCAPSULATED_PDF_STORAGE = "1.2.840.10008.5.1.4.1.1.104.1"
QC_PDF_SERIES_NUMBER = 9005
QC_PDF_SERIES_DESCRIPTION = "QC report PDF (qcgate)"
DOCUMENT_TITLE = "qcgate segmentation QC report"
MANUFACTURER = "qcgate"

_PATIENT_STUDY = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "StudyID", "AccessionNumber", "StudyDescription", "IssuerOfPatientID",
)


def build_qc_pdf(
    result: CaseResult,
    pdf_bytes: bytes,
    *,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    series_number: int = QC_PDF_SERIES_NUMBER,
    sources: DerivationSources | None = None,
    model_synthetic: bool = False,
) -> Dataset:
    """The Encapsulated PDF dataset (with file meta) of ``pdf_bytes``, in the CT's study."""
    if not result.ct_datasets:
        raise InputError("QC PDF: the case has no source CT datasets")
    if not pdf_bytes.startswith(b"%PDF"):
        raise InputError("QC PDF: the document is not a PDF")
    ct_sources = sources.ct if sources is not None else source_headers_for_derivation(result.ct_datasets)
    ref = ct_sources[0]
    now = dt.datetime.now()
    ds = Dataset()
    for keyword in _PATIENT_STUDY:
        if keyword in ref:
            setattr(ds, keyword, ref.data_element(keyword).value)
    if "SpecificCharacterSet" in ref and ref.SpecificCharacterSet:
        ds.SpecificCharacterSet = ref.SpecificCharacterSet
    synthetic = is_synthetic_case(result, model_synthetic)
    ds.SOPClassUID = ENCAPSULATED_PDF_STORAGE
    ds.SOPInstanceUID = sop_instance_uid or generate_uid()
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = series_instance_uid or generate_uid()
    ds.SeriesNumber = series_number
    ds.SeriesDescription = (("SYNTHETIC " if synthetic else "") + QC_PDF_SERIES_DESCRIPTION)[:64]
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = "qcgate"
    ds.SoftwareVersions = __version__
    ds.ConversionType = "WSD"  # workstation: the document was made by software
    ds.InstanceNumber = 1
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S")
    ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    ds.BurnedInAnnotation = "NO"  # no patient identification in the document (UIDs and dates only)
    ds.DocumentTitle = (("SYNTHETIC " if synthetic else "") + DOCUMENT_TITLE)[:64]
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning = (
        codes.LN.ImagingStudy.value, "LN", codes.LN.ImagingStudy.meaning) if hasattr(codes.LN, "ImagingStudy") else (
        "18748-4", "LN", "Diagnostic imaging study")
    ds.ConceptNameCodeSequence = [concept]
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.SourceInstanceSequence = [_reference(s.source_image) for s in sorted(result.slices, key=lambda s: s.slice_index)] \
        or [_reference(ref)]
    data = bytes(pdf_bytes)
    ds.EncapsulatedDocumentLength = len(data)
    ds.EncapsulatedDocument = data + (b"\x00" if len(data) % 2 else b"")  # OB: even length, padded
    if synthetic:
        ds.ImageComments = "SYNTHETIC source data or threshold model: QC report for a qcgate demo, not for clinical use"

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    return ds


def _reference(source: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    return item


def write_qc_pdf(result: CaseResult, pdf_bytes: bytes, out_path: Path, **kwargs) -> Path:  # type: ignore[no-untyped-def]
    """Write the Encapsulated PDF of ``pdf_bytes`` to ``out_path`` and return the path."""
    out_path = save_dataset(build_qc_pdf(result, pdf_bytes, **kwargs), out_path)
    log.info("wrote QC report PDF (%d bytes) to %s", len(pdf_bytes), out_path)
    return out_path
