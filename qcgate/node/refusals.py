"""The node's refusal vocabulary and the sanitisers of values from the network.

The codes and their C-STORE statuses are defined once, in ``qcgate.core.refusals``; this module
names them for the node's modules (``R.UNPARSEABLE``, ``R.status_for(code)``) and adds the checks
and cleaning of UIDs and text before they reach SQL, logs or status comments.
"""

from __future__ import annotations

import re
import unicodedata

from qcgate.core.refusals import (  # noqa: F401  (re-exported for the node's modules)
    DIMSE_STATUS as STATUS_FOR_CODE,
)
from qcgate.core.refusals import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_DATASET_MISMATCH,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SUCCESS,
    RefusalCode,
)
from qcgate.core.refusals import dimse_status_for as status_for

UNPARSEABLE = RefusalCode.UNPARSEABLE
ENCODING_MISMATCH = RefusalCode.ENCODING_MISMATCH
MISSING_ATTRIBUTE = RefusalCode.MISSING_ATTRIBUTE
INVALID_ATTRIBUTE = RefusalCode.INVALID_ATTRIBUTE
INVALID_UID = RefusalCode.INVALID_UID
PIXEL_DATA = RefusalCode.PIXEL_DATA
UNSUPPORTED = RefusalCode.UNSUPPORTED
UID_MISMATCH = RefusalCode.UID_MISMATCH
DISK_FULL = RefusalCode.DISK_FULL
STORAGE_UNAVAILABLE = RefusalCode.STORAGE_UNAVAILABLE
INTERNAL_ERROR = RefusalCode.INTERNAL_ERROR
CONFLICT = RefusalCode.CONFLICT

__all__ = ["STATUS_CANNOT_UNDERSTAND", "STATUS_DATASET_MISMATCH", "STATUS_FOR_CODE", "STATUS_OUT_OF_RESOURCES",
           "STATUS_SUCCESS", "status_for", "uid_problem", "clean_text", "printable"]


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
