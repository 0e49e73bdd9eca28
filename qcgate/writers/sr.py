"""The QC SR: a Comprehensive 3D SR following TID 1500 (highdicom.sr.MeasurementReport).

Content tree
------------
* Observer context: a device observer (TID 1004) named "qcgate", manufacturer "qcgate", whose model
  name is the threshold model's name and version (e.g. "phantom-full 1.2.0").
* One TID 1501 measurement group per lesion slice, finding type SCT "Lesion", referencing its source
  CT image (``source_images``; ``ReferencedSegmentationFrame.from_segmentation`` is avoided, see
  DESIGN §3), with:
    - tau (99QCGATE TAU), q (99QCGATE QEST) and the accept margin (99QCGATE MARGIN: accept if
      q >= tau + MARGIN; left out when accept is impossible) and, when the band is asymmetric, the
      reject margin (99QCGATE MARGINREJ: reject if q < tau - MARGINREJ), UCUM "1";
    - the lesion area, SCT 42798000 "Area", UCUM "mm2";
    - the UM statistics when an uncertainty map was used (99QCGATE UM_*);
    - the verdict: DCM 111050 "Quality Assessment" = DCM 111237 / 111236 / 111235
      (accept / review / reject);
    - when q is unknown, no q measurement but QEST = DCM 114010 "Value unknown" (a coded evaluation).
* One series summary group, finding type 99QCGATE SERIESQC, with the series verdict (DCM 111050), the
  quality control standard (DCM 111051 = DCM 111240 institutionally defined), the numbers of accepted,
  review and rejected slices, the number of ensemble members, the q source, whether the uncertainty
  map was used, the q estimator's validation MAE (99QCGATE QMAE), and as TEXT items the policy
  (99QCGATE POLICY), the verdict rule with its numbers (99QCGATE RULE), for a SYNTHETIC model the flag
  (99QCGATE SYNTHMODEL; the device observer's model name also ends in "SYNTHETIC") and each note
  (DCM 121106 "Comment").

The evidence lists every CT image, the QC SEG when given, and the AI segmentations judged.
``read_qc_sr`` reads such an SR back into plain Python values.
"""

from __future__ import annotations

import itertools
import logging
import math
import struct
from collections.abc import Sequence
from copy import deepcopy
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_sequence_item
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.tag import Tag
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DS

from qcgate import __version__
from qcgate.core.results import CaseResult, SliceResult, Verdict
from qcgate.errors import InputError
from qcgate.writers import codes as qc_codes
from qcgate.writers.common import (
    DerivationSources,
    is_synthetic_source,
    save_dataset,
    slice_location,
    source_headers_for_derivation,
)
from qcgate.writers.contour import outer_contour

log = logging.getLogger(__name__)

QC_SR_SERIES_NUMBER = 9002
QC_SR_SERIES_DESCRIPTION = "QC report: AI lesion segmentation quality (qcgate)"
MANUFACTURER = "qcgate"


def device_observer_uid(model_name: str, model_version: str) -> str:
    """A stable UID for the qcgate device observer with this model (same model -> same observer)."""
    return generate_uid(entropy_srcs=["qcgate-device-observer", model_name, model_version])


def _observation_context(result: CaseResult) -> hd.sr.ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=device_observer_uid(result.model_name, result.model_version),
        name="qcgate",
        manufacturer_name=MANUFACTURER,
        model_name=f"{result.model_name} {result.model_version}" + (" SYNTHETIC" if result.synthetic_model else ""),
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.cid270.Device, observer_identifying_attributes=device,
        ),
    )


def _algorithm(result: CaseResult) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name="qcgate", version=__version__,
        parameters=[f"threshold model {result.model_name} {result.model_version}", f"q source {result.q_source}"],
    )


def _coded(code: Code) -> hd.sr.CodedConcept:
    """The CodedConcept of ``code``, built (and validated by highdicom) once per process.

    Every slice group names the same concepts and units; highdicom would convert and validate each
    Code again for every item. The one CodedConcept dataset is then shared by the items that name it:
    the encoded file is the same (pydicom writes each occurrence in full; items are not mutated).
    Keyed by every field (a Code's own equality ignores the meaning)."""
    return _coded_by_fields(code.value, code.scheme_designator, code.meaning, code.scheme_version)


@lru_cache(maxsize=256)
def _coded_by_fields(value: str, scheme: str, meaning: str, version: str | None) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=value, scheme_designator=scheme, meaning=meaning, scheme_version=version)


def _ratio(name: Code, value: float) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=name, value=float(value), unit=_coded(qc_codes.UNIT_RATIO))


def _location_measurements(item: SliceResult) -> list[hd.sr.Measurement]:
    """InstanceNumber (99QCGATE INSTNUM) and z position (99QCGATE SLICEZ, mm) of the slice's CT image."""
    location = slice_location(item.source_image)
    found = []
    if location.instance_number is not None:
        found.append(hd.sr.Measurement(name=qc_codes.INSTANCE_NUMBER, value=float(location.instance_number), unit=qc_codes.UNIT_RATIO))
    if location.z_mm is not None:
        found.append(hd.sr.Measurement(name=qc_codes.SLICE_POSITION, value=float(location.z_mm), unit=qc_codes.UNIT_MM))
    return found


def _slice_items(item: SliceResult) -> tuple[list[hd.sr.Measurement], list[hd.sr.QualitativeEvaluation]]:
    """tau, q (or "value unknown"), margin, area, UM statistics, location; the verdict."""
    measurements = [_ratio(qc_codes.TAU, item.tau)]
    evaluations = [hd.sr.QualitativeEvaluation(name=qc_codes.QUALITY_ASSESSMENT, value=qc_codes.VERDICT_CODES[item.verdict])]
    if item.q is not None and item.q == item.q:  # NaN counts as unknown, as in slice_verdict
        measurements.append(_ratio(_coded(qc_codes.Q_ESTIMATE), item.q))
    else:
        evaluations.append(hd.sr.QualitativeEvaluation(name=qc_codes.Q_ESTIMATE, value=qc_codes.VALUE_UNKNOWN))
    if item.margin is not None and math.isfinite(item.margin):  # an infinite accept margin: accept impossible
        measurements.append(_ratio(qc_codes.MARGIN, item.margin))
    reject_margin = item.margin if item.margin_reject is None else item.margin_reject
    if reject_margin is not None and math.isfinite(reject_margin) and reject_margin != item.margin:
        measurements.append(_ratio(qc_codes.MARGIN_REJECT, reject_margin))
    measurements.append(hd.sr.Measurement(name=qc_codes.AREA, value=float(item.lesion_area_mm2), unit=qc_codes.UNIT_MM2))
    for name, value in sorted((item.uncertainty or {}).items()):
        if not math.isnan(value):  # a NaN statistic (empty region) is left out rather than written as a number
            concept, unit = qc_codes.uncertainty_code(name)
            measurements.append(hd.sr.Measurement(name=concept, value=float(value), unit=unit))
    measurements.extend(_location_measurements(item))
    return measurements, evaluations


def _tracking(item: SliceResult) -> hd.sr.TrackingIdentifier:
    """One tracking identifier per lesion slice, shared by its TID 1501 and TID 1410 groups (the same
    finding); named by the CT's InstanceNumber and z position, the numbering of every output."""
    return hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=_tracking_label(item))


def _tracking_label(item: SliceResult) -> str:
    return f"Lesion {slice_location(item.source_image).label}"[:64]


def _slice_group(item: SliceResult, algorithm: hd.sr.AlgorithmIdentification,
                 tracking: hd.sr.TrackingIdentifier | None = None) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The TID 1501 group of one lesion slice."""
    measurements, evaluations = _slice_items(item)
    source = item.source_image
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking or _tracking(item),
        finding_type=qc_codes.LESION_TYPE,
        finding_category=qc_codes.LESION_CATEGORY,
        method=qc_codes.QC_METHOD,
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=evaluations,
        source_images=[hd.sr.SourceImageForMeasurementGroup(
            referenced_sop_class_uid=str(source.SOPClassUID), referenced_sop_instance_uid=str(source.SOPInstanceUID),
        )],
    )


def qc_seg_segment_numbers(qc_seg: Dataset | None) -> dict[str, int]:
    """{segment label: segment number} of a QC SEG (the verdict segments present)."""
    if qc_seg is None or "SegmentSequence" not in qc_seg:
        return {}
    return {str(item.SegmentLabel): int(item.SegmentNumber) for item in qc_seg.SegmentSequence}


def _segment_reference(item: SliceResult, qc_seg: Dataset | None, segments: dict[str, int]) -> hd.sr.ImageContentItem | None:
    """An IMAGE item (99QCGATE QCSEGSEG) pointing at the QC SEG segment of this slice's verdict.

    ReferencedSegmentNumber only: DICOM forbids it beside ReferencedFrameNumber (dciodvfy), and the
    segment with the slice's source image identifies the frame."""
    from qcgate.writers.seg import VERDICT_SEGMENT_STYLES

    number = segments.get(VERDICT_SEGMENT_STYLES[item.verdict].label)
    if qc_seg is None or number is None:
        return None
    return hd.sr.ImageContentItem(
        name=qc_codes.QC_SEG_SEGMENT, referenced_sop_class_uid=str(qc_seg.SOPClassUID),
        referenced_sop_instance_uid=str(qc_seg.SOPInstanceUID), referenced_segment_numbers=[number],
        relationship_type="CONTAINS",
    )


def _outline_group(item: SliceResult, algorithm: hd.sr.AlgorithmIdentification, tracking: hd.sr.TrackingIdentifier,
                   segment: hd.sr.ImageContentItem | None) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations | None:
    """The TID 1410 group of one lesion slice: the AI mask's outer contour as a closed SCOORD POLYLINE
    on the source CT image (what OHIF and other viewers display), with the same measurements and
    verdict as the TID 1501 group, and the QC SEG segment of the verdict. None for an empty mask."""
    points = outer_contour(item.ai_mask)
    if points is None:
        return None
    source = item.source_image
    measurements, evaluations = _slice_items(item)
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        referenced_region=hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=points,
            source_image=hd.sr.SourceImageForRegion(referenced_sop_class_uid=str(source.SOPClassUID),
                                                    referenced_sop_instance_uid=str(source.SOPInstanceUID)),
        ),
        finding_type=qc_codes.LESION_TYPE,
        finding_category=qc_codes.LESION_CATEGORY,
        method=qc_codes.QC_METHOD,
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=evaluations,
    )
    if segment is not None:  # TID 1410 takes a region or a segment, not both: the segment as an extra item
        group[0].ContentSequence.append(segment)
    return group


def _count(name: Code, value: int, unit: Code) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=name, value=float(value), unit=unit)


def _summary_group(result: CaseResult, algorithm: hd.sr.AlgorithmIdentification) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The series summary group: verdict, policy, counts, q source, members, UM use, notes."""
    verdicts = [item.verdict for item in result.slices]
    # An unknown q source must not fail the job: code it as "other" and name it in a comment.
    q_source = qc_codes.Q_SOURCE_CODES.get(result.q_source, qc_codes.Q_SOURCE_OTHER)
    notes = list(result.notes)
    if result.q_source not in qc_codes.Q_SOURCE_CODES:
        notes.append(f"q source: {result.q_source}")
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="Series QC summary"),
        finding_type=qc_codes.SERIES_QC_FINDING,
        method=qc_codes.QC_METHOD,
        algorithm_id=algorithm,
        measurements=[
            _count(qc_codes.SLICES_ACCEPTED, verdicts.count(Verdict.ACCEPT), qc_codes.UNIT_SLICES),
            _count(qc_codes.SLICES_REVIEW, verdicts.count(Verdict.REVIEW), qc_codes.UNIT_SLICES),
            _count(qc_codes.SLICES_REJECTED, verdicts.count(Verdict.REJECT), qc_codes.UNIT_SLICES),
            _count(qc_codes.ENSEMBLE_MEMBERS, result.n_members, qc_codes.UNIT_MEMBERS),
            *([_ratio(qc_codes.Q_VALIDATION_MAE, result.q_validation_mae)] if result.q_validation_mae is not None else []),
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=qc_codes.QUALITY_ASSESSMENT, value=qc_codes.VERDICT_CODES[result.series_verdict]),
            hd.sr.QualitativeEvaluation(name=qc_codes.QUALITY_CONTROL_STANDARD, value=qc_codes.INSTITUTIONAL_QC_STANDARD),
            hd.sr.QualitativeEvaluation(name=qc_codes.Q_SOURCE, value=q_source),
            hd.sr.QualitativeEvaluation(name=qc_codes.UNCERTAINTY_USED, value=qc_codes.YES if result.uses_uncertainty else qc_codes.NO),
        ],
    )
    # Free text has no slot in highdicom's TID 1501 class: append TEXT items to the group container.
    container = group[0]
    container.ContentSequence.append(hd.sr.TextContentItem(
        name=qc_codes.SERIES_POLICY, value=_text(result.series_policy or "not stated"), relationship_type="CONTAINS",
    ))
    if result.verdict_rule:
        container.ContentSequence.append(hd.sr.TextContentItem(
            name=qc_codes.VERDICT_RULE, value=_text(result.verdict_rule), relationship_type="CONTAINS",
        ))
    if result.synthetic_model:
        container.ContentSequence.append(hd.sr.TextContentItem(
            name=qc_codes.SYNTHETIC_MODEL, value=_text(f"SYNTHETIC model {result.model_name} {result.model_version}: "
                                                      "trained on generated data; not for clinical decisions"),
            relationship_type="CONTAINS",
        ))
    for note in notes:
        container.ContentSequence.append(hd.sr.TextContentItem(
            name=qc_codes.COMMENT, value=_text(note), relationship_type="CONTAINS",
        ))
    return group


def _text(value: str) -> str:
    """UT-safe text: no backslash issues, bounded length."""
    return str(value)[:1024]


def build_qc_sr(
    result: CaseResult,
    qc_seg: Dataset | None = None,
    *,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    series_number: int = QC_SR_SERIES_NUMBER,
    sources: DerivationSources | None = None,
    encode_groups: bool = True,
) -> hd.sr.Comprehensive3DSR:
    """The QC SR as a highdicom dataset (see the module docstring); ``write_qc_sr`` saves it.

    ``sources``: the headers prepared once per job (``prepare_derivation_sources``); else prepared here.
    ``encode_groups``: the slice groups are encoded straight to bytes (``_SliceGroupEncoder``, the
    same file); False builds them as highdicom items (the reference the tests compare with)."""
    if not result.ct_datasets:
        raise InputError("QC SR: the case has no source CT datasets")
    ct_sources = sources.ct if sources is not None else source_headers_for_derivation(result.ct_datasets)
    known_uids = {str(ds.SOPInstanceUID) for ds in ct_sources}
    for item in result.slices:
        if str(item.source_image.SOPInstanceUID) not in known_uids:
            raise InputError(f"QC SR: slice {item.slice_index} references an image that is not in the CT series")

    algorithm = _algorithm(result)
    segment_numbers = qc_seg_segment_numbers(qc_seg)
    ordered = sorted(result.slices, key=lambda s: s.slice_index)
    encoded = _encoded_slice_groups(result, ordered, algorithm, qc_seg, segment_numbers) if encode_groups else None
    groups = [] if encoded is not None else _highdicom_slice_groups(ordered, algorithm, qc_seg, segment_numbers)
    summary = _summary_group(result, algorithm)
    # highdicom's SR constructor deep-copies the whole content tree, parses the copy back into content
    # items and searches it for referenced instances (about 2/3 of the build time for 100 slice groups).
    # The document is therefore built on the summary group alone and the slice groups are then put
    # before it in the Imaging Measurements container: the same content, in the same order. The
    # evidence is unchanged: every CT, the QC SEG and the AI SEGs are recorded whether referenced or
    # not, and the slices' references were checked against the CT above. ``content`` is parsed on
    # first use (_QcComprehensive3DSR).
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(result),
        procedure_reported=qc_codes.PROCEDURE_CT,
        imaging_measurements=[summary],
    )
    evidence: list[Dataset] = list(ct_sources)
    if qc_seg is not None:
        evidence.append(qc_seg)
    evidence.extend(sources.segmentations if sources is not None else source_headers_for_derivation(result.segmentation_datasets))
    synthetic = is_synthetic_source(ct_sources) or result.synthetic_model
    sr = _QcComprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=series_instance_uid or generate_uid(),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=True,  # the gate's own final statement; a reader may still verify it later
        series_description=(("SYNTHETIC " if synthetic else "") + QC_SR_SERIES_DESCRIPTION)[:64],
    )
    measurements = _imaging_measurements_container(sr)
    position = next(i for i, item in enumerate(measurements.ContentSequence) if item is summary[0])
    if encoded is None:
        measurements.ContentSequence[position:position] = [group[0] for group in groups]
    else:
        _put_encoded_groups(sr, measurements, position, encoded)
    sr._content = None  # parsed again, from the complete tree, on first use
    # Declare the private coding scheme used by the content items (SOP Common module).
    sr.CodingSchemeIdentificationSequence = [qc_codes.coding_scheme_identification()]
    return sr


def _highdicom_slice_groups(ordered: Sequence[SliceResult], algorithm: hd.sr.AlgorithmIdentification,
                            qc_seg: Dataset | None, segment_numbers: dict[str, int]) -> list[Dataset]:
    """The slice groups as highdicom items: the TID 1501 groups, then the TID 1410 outlines."""
    groups: list[Dataset] = []
    outlines: list[Dataset] = []
    for item in ordered:
        tracking = _tracking(item)
        slice_group = _slice_group(item, algorithm, tracking)
        segment = _segment_reference(item, qc_seg, segment_numbers)
        if segment is not None:
            slice_group[0].ContentSequence.append(segment)
        groups.append(slice_group)
        # the same finding: same tracking UID and identifier (fresh items, not shared ones)
        same = hd.sr.TrackingIdentifier(uid=str(tracking[1].UID), identifier=str(tracking[0].TextValue))
        outline = _outline_group(item, algorithm, same, _segment_reference(item, qc_seg, segment_numbers))
        if outline is not None:
            outlines.append(outline)
    return groups + outlines  # TID 1501 groups first (as before), then the TID 1410 outlines


def _encoded_slice_groups(result: CaseResult, ordered: Sequence[SliceResult], algorithm: hd.sr.AlgorithmIdentification,
                          qc_seg: Dataset | None, segment_numbers: dict[str, int]) -> bytes | None:
    """The slice groups of ``_highdicom_slice_groups`` as encoded sequence items, in the same order;
    None when the byte path does not apply (then the highdicom path builds them)."""
    from qcgate.writers.seg import VERDICT_SEGMENT_STYLES

    constant_text = [result.model_name, result.model_version, result.q_source, __version__]
    if not all(str(text).isascii() for text in constant_text):
        return None  # constant items are encoded once with the default character set: ASCII only
    try:
        encoder = _SliceGroupEncoder(algorithm, convert_encodings(default_encoding))
        measurement_groups: list[bytes] = []
        outline_groups: list[bytes] = []
        for item in ordered:
            number = segment_numbers.get(VERDICT_SEGMENT_STYLES[item.verdict].label)
            group, outline = encoder.groups(item, generate_uid(), qc_seg, number)
            measurement_groups.append(group)
            if outline is not None:
                outline_groups.append(outline)
    except (_NotEncodable, ValueError, TypeError, OverflowError) as error:
        log.debug("QC SR: slice groups built by highdicom (%s)", error)
        return None
    return b"".join(measurement_groups) + b"".join(outline_groups)


def _put_encoded_groups(sr: Dataset, measurements: Dataset, position: int, encoded: bytes) -> None:
    """Insert the encoded slice groups before item ``position`` of the Imaging Measurements container.

    The container's ContentSequence becomes one raw element (the other items encoded by pydicom as
    it would write them); the root and the container are marked as already in the file's encoding
    so that pydicom writes the raw element as it is instead of parsing it to re-encode it."""
    if str(sr.file_meta.TransferSyntaxUID) != ExplicitVRLittleEndian:
        raise RuntimeError(f"QC SR: encoded groups need Explicit VR Little Endian, not {sr.file_meta.TransferSyntaxUID}")
    encodings = convert_encodings(sr.get("SpecificCharacterSet", default_encoding))
    items = list(measurements.ContentSequence)
    raw = (b"".join(_pydicom_item(item, encodings) for item in items[:position]) + encoded
           + b"".join(_pydicom_item(item, encodings) for item in items[position:]))
    tag = Tag(_TAG_CONTENT_SEQUENCE)
    measurements[tag] = RawDataElement(tag, "SQ", len(raw), raw, 0, False, True)
    measurements.set_original_encoding(False, True, measurements._character_set)
    sr.set_original_encoding(False, True, sr._character_set)


# --- the slice groups encoded straight to bytes --------------------------------------------------
# highdicom builds ~20,000 nested pydicom Datasets for 100 slice groups (each item validated) and
# pydicom then walks them again to encode them: together ~5 s of the job's SR stage. The slice
# groups are therefore encoded once, directly to Explicit VR Little Endian bytes, from templates:
# every constant part (the group containers, finding type/category/method, algorithm, codes, units)
# is a highdicom item of the same construction, encoded by pydicom once per build; only the values
# of a slice (tracking identifier and UID, the NUM values, image references, the outline) are
# encoded here. The bytes are the Imaging Measurements container's ContentSequence as a raw element:
# pydicom writes it as it is and parses it back on access. The result is byte for byte what the
# highdicom path writes (tests/writers/test_sr_fast.py); anything this path does not handle (text
# that is not ASCII, a value highdicom would refuse) falls back to the highdicom path.

#: Explicit VR with a 4-byte length (PS3.5 7.1.2).
_LONG_LENGTH_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
_ITEM_TAG = b"\xfe\xff\x00\xe0"
_TAG_CONTENT_SEQUENCE = 0x0040A730
_TAG_MEASURED_VALUE_SEQUENCE = 0x0040A300
_TAG_REFERENCED_SOP_SEQUENCE = 0x00081199
_TAG_TEXT_VALUE = 0x0040A160
_TAG_UID = 0x0040A124
_TAG_GRAPHIC_DATA = 0x00700022


class _NotEncodable(Exception):
    """A value the byte path does not encode; the highdicom path builds the groups instead."""


def _element(tag: int, vr: str, value: bytes) -> bytes:
    """One Explicit VR Little Endian data element (value already padded to even length)."""
    if vr in _LONG_LENGTH_VRS:
        return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr.encode(), 0, len(value)) + value
    if len(value) > 0xFFFF:
        raise _NotEncodable(f"element {tag:08X}: {len(value)} bytes do not fit a 2-byte length")
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), len(value)) + value


def _string_element(tag: int, vr: str, value: str) -> bytes:
    """A text element: ASCII only (the same bytes in every character set), padded as pydicom pads."""
    try:
        raw = value.encode("ascii")
    except UnicodeEncodeError as error:
        raise _NotEncodable("non-ASCII text") from error
    if len(raw) % 2:
        raw += b"\x00" if vr == "UI" else b" "
    return _element(tag, vr, raw)


def _item(body: bytes) -> bytes:
    """A sequence item of defined length, as pydicom writes items."""
    return _ITEM_TAG + struct.pack("<I", len(body)) + body


def _sequence(tag: int, items: Sequence[bytes]) -> bytes:
    """An SQ element of defined length holding already-encoded items."""
    return _element(tag, "SQ", b"".join(items))


def _pydicom_elements(dataset: Dataset, encodings: list[str]) -> dict[int, bytes]:
    """{tag: pydicom's Explicit VR Little Endian encoding} of each top-level element of ``dataset``."""
    encoded: dict[int, bytes] = {}
    for element in dataset.elements():
        buffer = DicomBytesIO()
        buffer.is_little_endian, buffer.is_implicit_VR = True, False
        write_data_element(buffer, dataset[element.tag], encodings)
        encoded[int(element.tag)] = buffer.getvalue()
    return encoded


def _pydicom_item(dataset: Dataset, encodings: list[str]) -> bytes:
    """The sequence item pydicom writes for ``dataset``."""
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_sequence_item(buffer, dataset, encodings)
    return buffer.getvalue()


class _ItemTemplate:
    """An item whose elements are constant but for ``variable`` tags: the constant elements are
    pydicom's encoding of ``prototype``; ``render`` puts the variable elements in tag order."""

    def __init__(self, prototype: Dataset, variable: Sequence[int], encodings: list[str]) -> None:
        constant = {tag: raw for tag, raw in _pydicom_elements(prototype, encodings).items() if tag not in variable}
        # runs of constant bytes between the variable elements, in tag order
        self._variable = sorted(variable)
        self._runs: list[bytes] = []
        bounds = [-1, *self._variable, 1 << 32]
        for low, high in itertools.pairwise(bounds):
            self._runs.append(b"".join(raw for tag, raw in sorted(constant.items()) if low < tag < high))

    def render(self, values: dict[int, bytes]) -> bytes:
        parts = [self._runs[0]]
        for tag, run in zip(self._variable, self._runs[1:]):
            parts.append(values[tag])
            parts.append(run)
        return _item(b"".join(parts))


class _SliceGroupEncoder:
    """Encodes the TID 1501 and TID 1410 groups of lesion slices (the same content as _slice_group
    and _outline_group) from highdicom prototypes built once per SR."""

    _DUMMY_UID = "1.2.3"

    def __init__(self, algorithm: hd.sr.AlgorithmIdentification, encodings: list[str]) -> None:
        self._encodings = encodings
        tracking = hd.sr.TrackingIdentifier(uid=self._DUMMY_UID, identifier="x")
        common = {"tracking_identifier": tracking, "finding_type": qc_codes.LESION_TYPE,
                  "finding_category": qc_codes.LESION_CATEGORY, "method": qc_codes.QC_METHOD, "algorithm_id": algorithm}
        image = {"referenced_sop_class_uid": CTImageStorage, "referenced_sop_instance_uid": self._DUMMY_UID}
        measurement_group = hd.sr.MeasurementsAndQualitativeEvaluations(
            **common, source_images=[hd.sr.SourceImageForMeasurementGroup(**image)])[0]
        outline_group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            **common, referenced_region=hd.sr.ImageRegion(
                graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=np.zeros((3, 2), np.float32),
                source_image=hd.sr.SourceImageForRegion(**image)))[0]
        self._measurement_container = _ItemTemplate(measurement_group, [_TAG_CONTENT_SEQUENCE], encodings)
        self._outline_container = _ItemTemplate(outline_group, [_TAG_CONTENT_SEQUENCE], encodings)
        self._measurement_constant = [_pydicom_item(item, encodings) for item in measurement_group.ContentSequence[2:-1]]
        self._outline_constant = [_pydicom_item(item, encodings) for item in outline_group.ContentSequence[2:-1]]
        self._tracking_text = _ItemTemplate(tracking[0], [_TAG_TEXT_VALUE], encodings)
        self._tracking_uid = _ItemTemplate(tracking[1], [_TAG_UID], encodings)
        self._source_image = _ItemTemplate(measurement_group.ContentSequence[-1], [_TAG_REFERENCED_SOP_SEQUENCE], encodings)
        region = outline_group.ContentSequence[-1]
        self._region = _ItemTemplate(region, [_TAG_CONTENT_SEQUENCE, _TAG_GRAPHIC_DATA], encodings)
        self._region_source = _ItemTemplate(region.ContentSequence[0], [_TAG_REFERENCED_SOP_SEQUENCE], encodings)
        self._numbers: dict[tuple[tuple[str, str, str, str | None], tuple[str, str, str, str | None]], tuple[_ItemTemplate, bytes]] = {}
        self._codes: dict[tuple[tuple[str, str, str, str | None], tuple[str, str, str, str | None]], bytes] = {}
        self._segments: dict[tuple[str, str, int], bytes] = {}

    def _number(self, name: Code, value: float, unit: Code) -> bytes:
        """A NUM item as hd.sr.Measurement writes it: unit, FloatingPointValue, NumericValue (DS)."""
        key = (_code_key(name), _code_key(unit))
        found = self._numbers.get(key)
        if found is None:
            template_items = hd.sr.Measurement(name=name, value=0.0, unit=unit)
            if len(template_items) != 1 or "ContentSequence" in template_items[0]:
                raise _NotEncodable("a measurement with more than one item")
            prototype = template_items[0]
            measured = prototype.MeasuredValueSequence[0]
            units = _pydicom_elements(measured, self._encodings)[0x004008EA]
            found = self._numbers[key] = (_ItemTemplate(prototype, [_TAG_MEASURED_VALUE_SEQUENCE], self._encodings), units)
        template, units = found
        value = float(value)
        numeric = str(DS(value, auto_format=True))
        body = units + _element(0x0040A161, "FD", struct.pack("<d", value)) + _string_element(0x0040A30A, "DS", numeric)
        return template.render({_TAG_MEASURED_VALUE_SEQUENCE: _sequence(_TAG_MEASURED_VALUE_SEQUENCE, [_item(body)])})

    def _code(self, name: Code, value: Code) -> bytes:
        """A CODE item as hd.sr.QualitativeEvaluation writes it (constant: encoded once)."""
        key = (_code_key(name), _code_key(value))
        if key not in self._codes:
            self._codes[key] = _pydicom_item(hd.sr.QualitativeEvaluation(name=name, value=value)[0], self._encodings)
        return self._codes[key]

    def _segment(self, qc_seg: Dataset, number: int) -> bytes:
        """The IMAGE item of a QC SEG segment (_segment_reference), constant per segment."""
        key = (str(qc_seg.SOPClassUID), str(qc_seg.SOPInstanceUID), number)
        if key not in self._segments:
            item = hd.sr.ImageContentItem(
                name=qc_codes.QC_SEG_SEGMENT, referenced_sop_class_uid=key[0], referenced_sop_instance_uid=key[1],
                referenced_segment_numbers=[number], relationship_type="CONTAINS")
            self._segments[key] = _pydicom_item(item, self._encodings)
        return self._segments[key]

    def _items(self, item: SliceResult) -> list[bytes]:
        """_slice_items, encoded: the measurements, then the evaluations."""
        measurements = [self._number(qc_codes.TAU, item.tau, qc_codes.UNIT_RATIO)]
        evaluations = [self._code(qc_codes.QUALITY_ASSESSMENT, qc_codes.VERDICT_CODES[item.verdict])]
        if item.q is not None and item.q == item.q:
            measurements.append(self._number(qc_codes.Q_ESTIMATE, item.q, qc_codes.UNIT_RATIO))
        else:
            evaluations.append(self._code(qc_codes.Q_ESTIMATE, qc_codes.VALUE_UNKNOWN))
        if item.margin is not None and math.isfinite(item.margin):
            measurements.append(self._number(qc_codes.MARGIN, item.margin, qc_codes.UNIT_RATIO))
        reject_margin = item.margin if item.margin_reject is None else item.margin_reject
        if reject_margin is not None and math.isfinite(reject_margin) and reject_margin != item.margin:
            measurements.append(self._number(qc_codes.MARGIN_REJECT, reject_margin, qc_codes.UNIT_RATIO))
        measurements.append(self._number(qc_codes.AREA, float(item.lesion_area_mm2), qc_codes.UNIT_MM2))
        for name, value in sorted((item.uncertainty or {}).items()):
            if not math.isnan(value):  # as _slice_items
                concept, unit = qc_codes.uncertainty_code(name)
                measurements.append(self._number(concept, value, unit))
        location = slice_location(item.source_image)
        if location.instance_number is not None:
            measurements.append(self._number(qc_codes.INSTANCE_NUMBER, float(location.instance_number), qc_codes.UNIT_RATIO))
        if location.z_mm is not None:
            measurements.append(self._number(qc_codes.SLICE_POSITION, float(location.z_mm), qc_codes.UNIT_MM))
        return measurements + evaluations

    @staticmethod
    def _image_reference(source: Dataset) -> bytes:
        body = (_string_element(0x00081150, "UI", str(source.SOPClassUID)) + _string_element(0x00081155, "UI", str(source.SOPInstanceUID)))
        return _sequence(_TAG_REFERENCED_SOP_SEQUENCE, [_item(body)])

    def groups(self, item: SliceResult, tracking_uid: str, qc_seg: Dataset | None,
               segment_number: int | None) -> tuple[bytes, bytes | None]:
        """(TID 1501 group, TID 1410 group or None for an empty mask) of one lesion slice."""
        tracking = [
            self._tracking_text.render({_TAG_TEXT_VALUE: _string_element(_TAG_TEXT_VALUE, "UT", _tracking_label(item))}),
            self._tracking_uid.render({_TAG_UID: _string_element(_TAG_UID, "UI", tracking_uid)}),
        ]
        values = self._items(item)
        reference = self._image_reference(item.source_image)
        segment = [] if qc_seg is None or segment_number is None else [self._segment(qc_seg, segment_number)]
        source = self._source_image.render({_TAG_REFERENCED_SOP_SEQUENCE: reference})
        measurement_group = self._measurement_container.render({_TAG_CONTENT_SEQUENCE: _sequence(
            _TAG_CONTENT_SEQUENCE, [*tracking, *self._measurement_constant, *values, source, *segment])})
        points = outer_contour(item.ai_mask)
        if points is None:
            return measurement_group, None
        graphic = np.ascontiguousarray(np.asarray(points, dtype=np.float32).reshape(-1, 2), dtype="<f4").tobytes()
        region = self._region.render({
            _TAG_CONTENT_SEQUENCE: _sequence(_TAG_CONTENT_SEQUENCE, [
                self._region_source.render({_TAG_REFERENCED_SOP_SEQUENCE: reference})]),
            _TAG_GRAPHIC_DATA: _element(_TAG_GRAPHIC_DATA, "FL", graphic),
        })
        outline_group = self._outline_container.render({_TAG_CONTENT_SEQUENCE: _sequence(
            _TAG_CONTENT_SEQUENCE, [*tracking, *self._outline_constant, *values, region, *segment])})
        return measurement_group, outline_group


def _code_key(code: Code) -> tuple[str, str, str, str | None]:
    return (code.value, code.scheme_designator, code.meaning, code.scheme_version)


class _QcComprehensive3DSR(hd.sr.Comprehensive3DSR):
    """A Comprehensive 3D SR whose ``content`` (highdicom's parsed tree) is built on first access."""

    @property
    def content(self) -> hd.sr.ContentSequence:
        if self._content is None:
            root = Dataset()
            for keyword in ("ConceptNameCodeSequence", "ContentSequence", "ValueType", "ContinuityOfContent",
                            "ContentTemplateSequence"):
                if keyword in self:
                    setattr(root, keyword, self[keyword].value)
            item = hd.sr.value_types.ContentItem._from_dataset_derived(deepcopy(root))
            self._content = hd.sr.ContentSequence([item], is_root=True)
        return self._content


def _imaging_measurements_container(sr: Dataset) -> Dataset:
    """The TID 1500 Imaging Measurements container (DCM 126010) of the document root."""
    for item in sr.ContentSequence:
        name = item.ConceptNameCodeSequence[0]
        if item.ValueType == "CONTAINER" and name.CodeValue == "126010" and name.CodingSchemeDesignator == "DCM":
            return item
    raise RuntimeError("QC SR: the measurement report has no Imaging Measurements container")


def write_qc_sr(result: CaseResult, out_path: Path, qc_seg: Dataset | None = None) -> Path:
    """Write the QC SR of ``result`` to ``out_path`` and return the path.

    ``qc_seg`` (the QC SEG written for the case, headers suffice) is recorded in the evidence. A case
    without lesion slices still gets an SR: no slice groups, only the series summary.
    """
    sr = build_qc_sr(result, qc_seg)
    out_path = save_dataset(sr, out_path)
    log.info("wrote QC SR with %d lesion slice group(s) to %s", len(result.slices), out_path)
    return out_path


# --- reading back ----------------------------------------------------------------------------------
@dataclass
class SliceReport:
    """One lesion slice as read back from a QC SR."""

    sop_instance_uid: str
    tau: float
    q: float | None
    margin: float | None  # accept margin; None when accept is impossible
    verdict: Verdict
    lesion_area_mm2: float
    uncertainty: dict[str, float] = field(default_factory=dict)
    instance_number: int | None = None  # the CT's InstanceNumber (99QCGATE INSTNUM)
    z_mm: float | None = None  # its z position (99QCGATE SLICEZ)
    outline: list[tuple[float, float]] | None = None  # SCOORD POLYLINE (column, row) of the TID 1410 group
    qc_seg_segment: int | None = None  # the QC SEG segment number referenced (99QCGATE QCSEGSEG)
    margin_reject: float | None = None  # present when it differs from margin (a conformal band)


@dataclass
class QcReport:
    """A QC SR read back: the slice groups and the series summary."""

    slices: list[SliceReport]
    series_verdict: Verdict
    series_policy: str
    counts: dict[Verdict, int]
    n_members: int
    q_source: str
    uses_uncertainty: bool
    notes: list[str]
    observer_model_name: str
    verdict_rule: str = ""
    q_validation_mae: float | None = None
    synthetic_model: str = ""  # the SYNTHETIC-model text item, "" when absent


def _single_value(group: hd.sr.MeasurementsAndQualitativeEvaluations, concept: Code) -> float | None:
    found = group.get_measurements(name=concept)
    return float(found[0].value) if found else None


def _single_code(group: hd.sr.MeasurementsAndQualitativeEvaluations, concept: Code) -> hd.sr.CodedConcept | None:
    found = group.get_qualitative_evaluations(name=concept)
    return found[0].value if found else None


def _verdict(code: hd.sr.CodedConcept | None) -> Verdict:
    if code is None:
        raise InputError("QC SR: a group has no Quality Assessment")
    return qc_codes.verdict_from_code(code.value, code.scheme_designator)


def _segment_number(group: Dataset) -> int | None:
    for content in group[0].ContentSequence:
        concept = content.ConceptNameCodeSequence[0]
        if content.ValueType == "IMAGE" and concept.CodeValue == qc_codes.QC_SEG_SEGMENT.value:
            numbers = content.ReferencedSOPSequence[0].get("ReferencedSegmentNumber")
            if numbers is not None:
                return int(numbers[0]) if isinstance(numbers, MultiValue) else int(numbers)
    return None


def _outlines(report: hd.sr.MeasurementReport) -> dict[str, list[tuple[float, float]]]:
    """{source SOP Instance UID: polyline points} of the TID 1410 lesion outline groups."""
    found: dict[str, list[tuple[float, float]]] = {}
    for group in report.get_planar_roi_measurement_groups(finding_type=qc_codes.LESION_TYPE):
        region = group.roi
        if region is None or not hasattr(region, "value"):
            continue
        points = [(float(x), float(y)) for x, y in region.value]
        found[str(region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)] = points
    return found


def read_qc_sr(path: Path) -> QcReport:
    """Read a QC SR written by ``write_qc_sr`` back with highdicom (``srread``)."""
    sr = hd.sr.srread(path)
    report: hd.sr.MeasurementReport = sr.content
    slices: list[SliceReport] = []
    outlines = _outlines(report)
    for group in report.get_image_measurement_groups(finding_type=qc_codes.LESION_TYPE):
        uncertainty: dict[str, float] = {}
        for measurement in group.get_measurements():
            if measurement.name.scheme_designator == qc_codes.PRIVATE_SCHEME:
                name = qc_codes.uncertainty_name(measurement.name.value)
                if name is not None:
                    uncertainty[name] = float(measurement.value)
        sources: Sequence[hd.sr.SourceImageForMeasurementGroup] = group.source_images
        uid = str(sources[0].referenced_sop_instance_uid)
        number = _single_value(group, qc_codes.INSTANCE_NUMBER)
        slices.append(SliceReport(
            sop_instance_uid=uid,
            instance_number=None if number is None else round(number),
            z_mm=_single_value(group, qc_codes.SLICE_POSITION),
            outline=outlines.get(uid),
            qc_seg_segment=_segment_number(group),
            tau=float(_single_value(group, qc_codes.TAU)),
            q=_single_value(group, qc_codes.Q_ESTIMATE),
            margin=_single_value(group, qc_codes.MARGIN),
            margin_reject=_single_value(group, qc_codes.MARGIN_REJECT),
            verdict=_verdict(_single_code(group, qc_codes.QUALITY_ASSESSMENT)),
            lesion_area_mm2=float(_single_value(group, qc_codes.AREA)),
            uncertainty=uncertainty,
        ))
    summaries = report.get_image_measurement_groups(finding_type=qc_codes.SERIES_QC_FINDING)
    if len(summaries) != 1:
        raise InputError(f"QC SR: expected one series summary group, found {len(summaries)}")
    summary = summaries[0]
    q_source_code = _single_code(summary, qc_codes.Q_SOURCE)
    q_source = next((key for key, code in qc_codes.Q_SOURCE_CODES.items()
                     if q_source_code is not None and code.value == q_source_code.value), "unknown")
    texts = [item for item in summary[0].ContentSequence if item.ValueType == "TEXT"]
    policy = [str(item.TextValue) for item in texts if item.ConceptNameCodeSequence[0].CodeValue == qc_codes.SERIES_POLICY.value]
    notes = [str(item.TextValue) for item in texts if item.ConceptNameCodeSequence[0].CodeValue == qc_codes.COMMENT.value]
    rule = [str(item.TextValue) for item in texts if item.ConceptNameCodeSequence[0].CodeValue == qc_codes.VERDICT_RULE.value]
    synthetic = [str(item.TextValue) for item in texts
                 if item.ConceptNameCodeSequence[0].CodeValue == qc_codes.SYNTHETIC_MODEL.value]
    used = _single_code(summary, qc_codes.UNCERTAINTY_USED)
    observers = report.get_observer_contexts()
    model_name = ""
    for observer in observers:
        attributes = observer.observer_identifying_attributes
        if isinstance(attributes, hd.sr.DeviceObserverIdentifyingAttributes) and attributes.model_name:
            model_name = str(attributes.model_name)
    return QcReport(
        slices=slices,
        series_verdict=_verdict(_single_code(summary, qc_codes.QUALITY_ASSESSMENT)),
        series_policy=policy[0] if policy else "",
        counts={
            Verdict.ACCEPT: int(_single_value(summary, qc_codes.SLICES_ACCEPTED) or 0),
            Verdict.REVIEW: int(_single_value(summary, qc_codes.SLICES_REVIEW) or 0),
            Verdict.REJECT: int(_single_value(summary, qc_codes.SLICES_REJECTED) or 0),
        },
        n_members=int(_single_value(summary, qc_codes.ENSEMBLE_MEMBERS) or 0),
        q_source=q_source,
        uses_uncertainty=used is not None and used.value == qc_codes.YES.value,
        notes=notes,
        observer_model_name=model_name,
        verdict_rule=rule[0] if rule else "",
        q_validation_mae=_single_value(summary, qc_codes.Q_VALIDATION_MAE),
        synthetic_model=synthetic[0] if synthetic else "",
    )
