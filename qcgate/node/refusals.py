"""The node's refusal vocabulary, in one place: DIMSE statuses, reason codes, and their mapping.

A reason code is stored in ``refused_instances.reason_code`` (at most 32 characters) and used as
the ``reason`` label of ``qcgate_instances_refused_total``. Each maps to one C-STORE status:

* ``0xA900`` family (the data set does not match the SOP class, or lacks what it needs) and
  ``0xC000`` family (cannot understand) are **permanent**: re-sending the same bytes cannot help.
* ``0xA700`` (out of resources) is **transient** and used only for real resource trouble (disk,
  database, spool): the sender keeps its copy and retries later.

If ``qcgate/core/refusals.py`` appears, these names move there; the values must not change.
"""

from __future__ import annotations

import re
import unicodedata

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900  # data set does not match SOP class / lacks what it needs
STATUS_CANNOT_UNDERSTAND = 0xC000

# Reason codes (≤ 32 characters each).
UNPARSEABLE = "unparseable"  # not DICOM, or an element does not decode
ENCODING_MISMATCH = "transfer-syntax-mismatch"  # bytes not encoded in the negotiated transfer syntax
MISSING_ATTRIBUTE = "missing-attribute"  # an attribute the gate needs is absent or blank
INVALID_ATTRIBUTE = "invalid-attribute"  # present but unusable (Rows 0, PixelSpacing 0, non-numeric position)
INVALID_UID = "invalid-uid"  # a UID that is not a PS3.5 UID (≤ 64 chars, digits and dots, no empty component)
PIXEL_DATA = "pixel-data"  # pixel data missing, shorter than stated, or not encapsulated as the syntax says
UNSUPPORTED = "unsupported"  # a SOP class the gate does not process
UID_MISMATCH = "uid-mismatch"  # data set UIDs differ from the C-STORE request's
DISK_FULL = "disk-full"  # free space below the watermark, or the disk filled during the transfer
STORAGE_UNAVAILABLE = "storage-unavailable"  # database or spool failed (I/O, connection)
INTERNAL_ERROR = "internal-error"  # a bug: the handler raised
CONFLICT = "conflict"  # re-send with different content (acknowledged; the new copy is set aside)

STATUS_FOR_CODE: dict[str, int] = {
    UNPARSEABLE: STATUS_CANNOT_UNDERSTAND,
    ENCODING_MISMATCH: STATUS_CANNOT_UNDERSTAND,
    MISSING_ATTRIBUTE: STATUS_DATASET_MISMATCH,
    INVALID_ATTRIBUTE: STATUS_DATASET_MISMATCH,
    INVALID_UID: STATUS_DATASET_MISMATCH,
    PIXEL_DATA: STATUS_DATASET_MISMATCH,
    UNSUPPORTED: STATUS_DATASET_MISMATCH,
    UID_MISMATCH: STATUS_DATASET_MISMATCH,
    DISK_FULL: STATUS_OUT_OF_RESOURCES,
    STORAGE_UNAVAILABLE: STATUS_OUT_OF_RESOURCES,
    INTERNAL_ERROR: STATUS_CANNOT_UNDERSTAND,
    CONFLICT: STATUS_SUCCESS,
}


def status_for(code: str) -> int:
    """The C-STORE status for a reason code; unknown codes are "cannot understand" (permanent)."""
    return STATUS_FOR_CODE.get(code, STATUS_CANNOT_UNDERSTAND)


# --- values from the network, made safe for SQL, logs and status comments ---------------------

UID_MAX_LENGTH = 64
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def uid_problem(value: str) -> str | None:
    """Why ``value`` is not a PS3.5 UID, or None. Leading zeros in a component are tolerated
    (real senders emit them; they are harmless to the gate)."""
    if not value:
        return "is empty"
    if len(value) > UID_MAX_LENGTH:
        return f"is {len(value)} characters long (at most {UID_MAX_LENGTH})"
    if "\x00" in value:
        return "contains a NUL byte"
    if not _UID.match(value):
        return "is not digits separated by single dots"
    return None


def clean_text(value: object, limit: int) -> str | None:
    """A text value for a database column: no NUL or control characters, no lone surrogates,
    trimmed and cut to ``limit`` characters; None when nothing is left."""
    if value is None:
        return None
    text = str(value).encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Cc").strip()
    return text[:limit] or None


def printable(value: object, limit: int = 2000) -> str:
    """A diagnostic string (log line, reason, ErrorComment): control characters and lone surrogates
    escaped so nothing can inject lines or reach SQL as NUL; cut to ``limit`` characters."""
    text = str(value)
    out = []
    for ch in text:
        if unicodedata.category(ch) in ("Cc", "Cs"):
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)[:limit]
