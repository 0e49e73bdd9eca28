"""What the gate needs to know about an instance, read from its header only (pixels stay encoded).

Besides the identifiers, the header is checked for what processing will need, so that what the
node acknowledges can be processed: UIDs are PS3.5 UIDs, a CT has usable geometry, the pixel data
is there with the stated size (native syntaxes) or as at least one fragment (encapsulated ones),
and the data set is encoded in the transfer syntax that was negotiated. The pixel data is never
read into memory nor decoded: element offsets and the file size suffice.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import BinaryIO

import pydicom
from pydicom import uid as _uid
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from qcgate.core.dicom import CT_IMAGE_STORAGE, CT_SOP_CLASSES, SEGMENTATION_STORAGE, InstanceHeader
from qcgate.node import refusals as R

TEXT_COLUMN_WIDTH = 64  # manufacturer, algorithm name and version columns (LO)
MODALITY_WIDTH = 16

_NATIVE_SYNTAXES = frozenset({_uid.ImplicitVRLittleEndian, _uid.ExplicitVRLittleEndian, _uid.ExplicitVRBigEndian})
_DEFLATED = _uid.DeflatedExplicitVRLittleEndian
_PIXEL_DATA_TAG = 0x7FE00010
_ITEM_TAG = 0xFFFEE000
_SEQUENCE_DELIMITER = 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_VRS = frozenset(b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split())
_MAX_FRAGMENTS_CHECKED = 100_000


class HeaderError(Exception):
    """The payload cannot be used; ``code`` is one of the reason codes in ``refusals``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _uid_value(value: object, keyword: str, *, required: bool = True) -> str:
    text = str(value).strip().rstrip("\x00").strip() if value is not None else ""
    if not text:
        if required:
            raise HeaderError(R.MISSING_ATTRIBUTE, f"{keyword} is missing or blank")
        return ""
    problem = R.uid_problem(text)
    if problem:
        raise HeaderError(R.INVALID_UID, f"{keyword} {R.printable(text, 80)!r} {problem}")
    return text


def _required_uid(dataset: Dataset, keyword: str) -> str:
    return _uid_value(dataset.get(keyword), keyword)


def _text(dataset: Dataset, keyword: str) -> str | None:
    return R.clean_text(dataset.get(keyword), TEXT_COLUMN_WIDTH)


def _seg_references(dataset: Dataset) -> tuple[tuple[str, ...], frozenset[str]]:
    """Referenced series (from ReferencedSeriesSequence) and every referenced source SOP instance.

    Source instances come from the Referenced Series Sequence and from each frame's
    Derivation Image -> Source Image Sequence (shared or per-frame functional groups).
    Every UID is checked: one that is not a UID refuses the SEG.
    """
    series: list[str] = []
    instances: set[str] = set()
    for item in dataset.get("ReferencedSeriesSequence", []) or []:
        uid = _uid_value(item.get("SeriesInstanceUID"), "ReferencedSeriesSequence SeriesInstanceUID", required=False)
        if uid and uid not in series:
            series.append(uid)
        for ref in item.get("ReferencedInstanceSequence", []) or []:
            sop = _uid_value(ref.get("ReferencedSOPInstanceUID"), "ReferencedSOPInstanceUID", required=False)
            if sop:
                instances.add(sop)
    groups = list(dataset.get("PerFrameFunctionalGroupsSequence", []) or [])
    groups += list(dataset.get("SharedFunctionalGroupsSequence", []) or [])
    for group in groups:
        for derivation in group.get("DerivationImageSequence", []) or []:
            for source in derivation.get("SourceImageSequence", []) or []:
                sop = _uid_value(source.get("ReferencedSOPInstanceUID"), "SourceImageSequence ReferencedSOPInstanceUID", required=False)
                if sop:
                    instances.add(sop)
    return tuple(series), frozenset(instances)


# --- geometry and pixel data ---------------------------------------------------------------------

def _int_attribute(dataset: Dataset, keyword: str, what: str, minimum: int) -> int:
    """The integer value of ``keyword``, at least ``minimum``; HeaderError naming it otherwise."""
    value = dataset.get(keyword)
    if value in (None, ""):
        raise HeaderError(R.MISSING_ATTRIBUTE, f"{what} lacks {keyword}")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise HeaderError(R.INVALID_ATTRIBUTE, f"{keyword} {R.printable(value, 40)!r} is not a number") from None
    if number < minimum:
        raise HeaderError(R.INVALID_ATTRIBUTE, f"{keyword} is {number}; it must be >= {minimum}")
    return number


def _positive_int(dataset: Dataset, keyword: str, what: str) -> int:
    return _int_attribute(dataset, keyword, what, 1)


def _non_negative_int(dataset: Dataset, keyword: str, what: str) -> int:
    return _int_attribute(dataset, keyword, what, 0)


_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")


def _numbers(dataset: Dataset, keyword: str, count: int, *, positive: bool = False) -> list[float]:
    value = dataset.get(keyword)
    if value in (None, ""):
        raise HeaderError(R.MISSING_ATTRIBUTE, f"CT image lacks {keyword}, needed to place the slice")
    try:
        items = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
        values = [float(v) for v in items]
    except (TypeError, ValueError):
        raise HeaderError(R.INVALID_ATTRIBUTE, f"{keyword} is not numeric") from None
    if len(values) != count or not all(math.isfinite(v) for v in values):
        raise HeaderError(R.INVALID_ATTRIBUTE, f"{keyword} needs {count} finite numbers, has {R.printable(values, 120)}")
    if positive and not all(v > 0 for v in values):
        raise HeaderError(R.INVALID_ATTRIBUTE, f"{keyword} {values} must be > 0")
    return values


def _check_ct_geometry(dataset: Dataset) -> None:
    _positive_int(dataset, "Rows", "CT image")
    _positive_int(dataset, "Columns", "CT image")
    _numbers(dataset, "PixelSpacing", 2, positive=True)
    _numbers(dataset, "ImagePositionPatient", 3)
    orientation = _numbers(dataset, "ImageOrientationPatient", 6)
    if math.hypot(*orientation[:3]) < 1e-3 or math.hypot(*orientation[3:]) < 1e-3:
        raise HeaderError(R.INVALID_ATTRIBUTE, "ImageOrientationPatient has a zero direction vector")


def _expected_native_bytes(dataset: Dataset, sop_class: str) -> int:
    """Bytes of native pixel data the header states (before even-length padding)."""
    what = "SEG" if sop_class == SEGMENTATION_STORAGE else "image"
    rows = _positive_int(dataset, "Rows", what)
    columns = _positive_int(dataset, "Columns", what)
    frames = _positive_int(dataset, "NumberOfFrames", what) if (sop_class == SEGMENTATION_STORAGE or "NumberOfFrames" in dataset) else 1
    # The Image Pixel module's Type 1 attributes: without them the pixel data cannot be decoded.
    samples = _positive_int(dataset, "SamplesPerPixel", what)
    bits = _positive_int(dataset, "BitsAllocated", what)
    stored = _positive_int(dataset, "BitsStored", what)
    high_bit = _non_negative_int(dataset, "HighBit", what)
    representation = _non_negative_int(dataset, "PixelRepresentation", what)
    photometric = str(dataset.get("PhotometricInterpretation", "") or "").strip()
    if not photometric:
        raise HeaderError(R.MISSING_ATTRIBUTE, f"{what} lacks PhotometricInterpretation")
    if photometric not in _MONOCHROME:  # CT images and SEGs are grey-scale (PS3.3 C.8.2.1, C.8.20.2)
        raise HeaderError(R.INVALID_ATTRIBUTE, f"PhotometricInterpretation {R.printable(photometric, 20)!r} is not MONOCHROME1 or MONOCHROME2")
    if stored > bits or high_bit >= bits:
        raise HeaderError(R.INVALID_ATTRIBUTE, f"BitsStored {stored} / HighBit {high_bit} do not fit BitsAllocated {bits}")
    if representation > 1:
        raise HeaderError(R.INVALID_ATTRIBUTE, f"PixelRepresentation is {representation}; it must be 0 or 1")
    if sop_class != SEGMENTATION_STORAGE and samples != 1:
        raise HeaderError(R.INVALID_ATTRIBUTE, f"a CT image has SamplesPerPixel 1, not {samples}")
    if sop_class == SEGMENTATION_STORAGE:
        kind = str(dataset.get("SegmentationType", "") or "").strip().upper()
        allowed = {"BINARY": (1,), "FRACTIONAL": (8,), "LABELMAP": (8, 16)}.get(kind)
        if allowed is None:
            raise HeaderError(R.INVALID_ATTRIBUTE, f"SegmentationType {R.printable(kind, 20)!r} is not BINARY, FRACTIONAL or LABELMAP")
        if bits not in allowed:
            raise HeaderError(R.INVALID_ATTRIBUTE, f"a {kind} SEG needs BitsAllocated {allowed}, not {bits}")
    elif bits % 8 != 0 and bits != 1:
        raise HeaderError(R.INVALID_ATTRIBUTE, f"BitsAllocated {bits} is not 1 or a multiple of 8")
    total_bits = rows * columns * frames * samples * bits
    return (total_bits + 7) // 8


def _element_header(stream: BinaryIO, *, implicit: bool, little: bool) -> tuple[int, bytes, int, int] | None:
    """(tag, VR, value length, header length) at the stream's position, or None at end of file."""
    raw = stream.read(8)
    if len(raw) < 8:
        return None
    order = "<" if little else ">"
    group, element = struct.unpack(order + "HH", raw[:4])
    tag = (group << 16) | element
    if implicit or group == 0xFFFE:
        return tag, b"", struct.unpack(order + "L", raw[4:8])[0], 8
    vr = raw[4:6]
    if vr in (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"):
        extra = stream.read(4)
        if len(extra) < 4:
            return None
        return tag, vr, struct.unpack(order + "L", extra)[0], 12
    return tag, vr, struct.unpack(order + "H", raw[6:8])[0], 8


def _check_dataset_encoding(stream: BinaryIO, start: int, syntax: str) -> None:
    """The first data set element must look encoded as ``syntax`` says (pydicom would silently
    switch VR or byte order when it does not, and the worker would later disagree)."""
    if syntax == _DEFLATED or not _known_syntax(syntax):
        return
    ts = _uid.UID(syntax)
    stream.seek(start)
    raw = stream.read(8)
    if len(raw) < 8:
        return
    little = ts.is_little_endian
    group_as_sent = struct.unpack("<H" if little else ">H", raw[:2])[0]
    group_swapped = struct.unpack(">H" if little else "<H", raw[:2])[0]
    # Every image has group 0008 elements (SOP Class UID is (0008,0016)), so the first element's
    # group is at most 0008.
    if group_as_sent > 0x0008:
        if group_swapped <= 0x0008:
            order = "little" if little else "big"
            raise HeaderError(R.ENCODING_MISMATCH, f"the data set is not {order} endian as the negotiated transfer syntax {syntax} says")
        raise HeaderError(R.UNPARSEABLE, f"the payload does not start like a DICOM data set (first group {group_as_sent:04X})")
    looks_explicit = raw[4:6] in _VRS
    if ts.is_implicit_VR and looks_explicit:
        raise HeaderError(R.ENCODING_MISMATCH, f"the data set has explicit VRs but the negotiated transfer syntax {syntax} is implicit VR")
    if not ts.is_implicit_VR and not looks_explicit:
        raise HeaderError(R.ENCODING_MISMATCH, f"the data set has no explicit VRs but the negotiated transfer syntax {syntax} is explicit VR")


def _check_pixel_data(stream: BinaryIO, pixel_offset: int, file_size: int, dataset: Dataset, sop_class: str, syntax: str) -> None:
    """Pixel data present, of the stated size (native) or with ≥ 1 fragment (encapsulated)."""
    expected = _expected_native_bytes(dataset, sop_class)  # checks Rows, Columns, frames, bits for every syntax
    if syntax == _DEFLATED:
        return  # offsets are in the inflated stream; the worker checks the decoded size
    ts = _uid.UID(syntax) if _known_syntax(syntax) else None
    if ts is None:
        return
    stream.seek(pixel_offset)
    header = _element_header(stream, implicit=ts.is_implicit_VR, little=ts.is_little_endian)
    if header is None or header[0] != _PIXEL_DATA_TAG:
        raise HeaderError(R.PIXEL_DATA, "the data set has no PixelData")
    _, _, length, header_length = header
    value_start = pixel_offset + header_length
    if syntax in _NATIVE_SYNTAXES:
        if length == _UNDEFINED:
            raise HeaderError(R.ENCODING_MISMATCH, f"PixelData is encapsulated but the negotiated transfer syntax {syntax} is native")
        if value_start + length > file_size:
            raise HeaderError(R.PIXEL_DATA, f"PixelData states {length} bytes but the data set ends after {file_size - value_start}")
        # Exactly the stated size, plus the one pad byte to an even length: more data than the
        # header states would be decoded as extra frames (or ignored) by the worker.
        if not expected <= length <= expected + 1:
            raise HeaderError(R.PIXEL_DATA, f"PixelData has {length} bytes; the header states {expected}")
        return
    # Encapsulated: undefined length, a Basic Offset Table item, then at least one fragment.
    if length != _UNDEFINED:
        raise HeaderError(R.ENCODING_MISMATCH, f"PixelData is native ({length} bytes) but the negotiated transfer syntax {syntax} is encapsulated")
    fragments = 0
    position = value_start
    for index in range(_MAX_FRAGMENTS_CHECKED):
        stream.seek(position)
        raw = stream.read(8)
        if len(raw) < 8:
            raise HeaderError(R.PIXEL_DATA, "encapsulated PixelData is cut short (no sequence delimiter)")
        group, element, item_length = struct.unpack("<HHL", raw)
        tag = (group << 16) | element
        if tag == _SEQUENCE_DELIMITER:
            break
        if tag != _ITEM_TAG or item_length == _UNDEFINED:
            raise HeaderError(R.PIXEL_DATA, "encapsulated PixelData holds something that is not an item")
        position += 8 + item_length
        if position > file_size:
            raise HeaderError(R.PIXEL_DATA, "an encapsulated PixelData fragment runs past the end of the data set")
        if index > 0 and item_length > 0:
            fragments += 1
    else:
        return  # very many fragments: structure checked this far
    if fragments == 0:
        raise HeaderError(R.PIXEL_DATA, "encapsulated PixelData has no fragment")


def read_header(path: Path) -> InstanceHeader:
    """Parse the header of a Part 10 file and check what the gate needs.

    Raises HeaderError with a reason code from ``refusals``.
    """
    file_size = path.stat().st_size
    with open(path, "rb") as stream:
        try:
            dataset = pydicom.dcmread(stream, stop_before_pixels=True, defer_size="256 KB")
            pixel_offset = stream.tell()
            meta = getattr(dataset, "file_meta", None)
            transfer_syntax = str(meta.get("TransferSyntaxUID", "") or "").strip().rstrip("\x00") if meta is not None else ""
            if transfer_syntax and not R.uid_problem(transfer_syntax):
                _check_dataset_encoding(stream, _data_set_start(stream), transfer_syntax)
            # Touch the identifying elements now so a corrupt element fails here, not later.
            sop_class = _required_uid(dataset, "SOPClassUID")
        except HeaderError:
            raise
        except Exception as exc:  # untrusted bytes: any parser failure (BytesLengthException, struct.error, ...) is "unparseable"
            raise HeaderError(R.UNPARSEABLE, f"payload does not parse as DICOM: {type(exc).__name__}: {R.printable(exc, 300)}") from None
        try:
            if transfer_syntax and R.uid_problem(transfer_syntax):
                raise HeaderError(R.INVALID_UID, "TransferSyntaxUID is not a UID")
            header_fields = dict(
                sop_class_uid=sop_class,
                sop_instance_uid=_required_uid(dataset, "SOPInstanceUID"),
                study_instance_uid=_required_uid(dataset, "StudyInstanceUID"),
                series_instance_uid=_required_uid(dataset, "SeriesInstanceUID"),
                modality=R.clean_text(dataset.get("Modality"), MODALITY_WIDTH) or "",
                transfer_syntax_uid=transfer_syntax,
            )
            if sop_class not in CT_SOP_CLASSES and sop_class != SEGMENTATION_STORAGE:
                raise HeaderError(R.UNSUPPORTED, f"SOP class {sop_class} is not CT or Segmentation")
            if sop_class == CT_IMAGE_STORAGE:
                for keyword in ("Rows", "Columns", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
                    if dataset.get(keyword) in (None, ""):
                        raise HeaderError(R.MISSING_ATTRIBUTE, f"CT image lacks {keyword}, needed to place the slice")
                _check_ct_geometry(dataset)
            elif sop_class == SEGMENTATION_STORAGE:
                if not dataset.get("SegmentSequence"):
                    raise HeaderError(R.MISSING_ATTRIBUTE, "SEG has no SegmentSequence")
                series_refs, instance_refs = _seg_references(dataset)
                if not series_refs and not instance_refs:
                    raise HeaderError(R.MISSING_ATTRIBUTE, "SEG references no source series or images")
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
            _check_pixel_data(stream, pixel_offset, file_size, dataset, sop_class, transfer_syntax or _uid.ExplicitVRLittleEndian)
            return InstanceHeader(**header_fields)
        except HeaderError:
            raise
        except Exception as exc:  # a corrupt element decoded lazily above: same verdict
            raise HeaderError(R.UNPARSEABLE, f"header element does not parse: {type(exc).__name__}: {R.printable(exc, 300)}") from None


def _data_set_start(stream: BinaryIO) -> int:
    """Offset of the data set's first element: after the preamble and File Meta group."""
    stream.seek(0)
    head = stream.read(132)
    if head[128:132] != b"DICM":
        return 0
    position = 132
    while True:
        stream.seek(position)
        raw = stream.read(8)
        if len(raw) < 8:
            return position
        group = struct.unpack("<H", raw[:2])[0]
        if group != 0x0002:
            return position
        vr = raw[4:6]
        if vr in (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"):
            length = struct.unpack("<L", stream.read(4))[0]
            position += 12 + length
        else:
            position += 8 + struct.unpack("<H", raw[6:8])[0]


def _known_syntax(syntax: str) -> bool:
    try:
        return bool(_uid.UID(syntax).is_transfer_syntax)
    except ValueError:
        return False
