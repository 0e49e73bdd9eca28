"""Why the node did not accept an instance: the refusal codes and the DIMSE status each one answers.

A refusal code is the short, machine-readable reason stored in ``refused_instances.reason_code``,
written to the quarantine sidecar and used as the ``reason`` label of
``qcgate_instances_refused_total``. The values are part of the audit record: never rename one.

============================  ============================================  =========================
code                          meaning                                       C-STORE status
============================  ============================================  =========================
``unparseable``               the payload (or a header element) is not      0xC000 cannot understand
                              DICOM
``transfer-syntax-mismatch``  bytes not encoded in the negotiated transfer  0xC000 cannot understand
                              syntax
``internal-error``            a bug: the handler raised                     0xC000 cannot understand
``missing-attribute``         a required attribute is missing or blank      0xA900 data set mismatch
``invalid-attribute``         present but unusable (Rows 0, PixelSpacing    0xA900 data set mismatch
                              0, non-numeric position)
``invalid-uid``               not a PS3.5 UID (≤ 64 characters, digits and  0xA900 data set mismatch
                              dots, no empty component, no NUL)
``pixel-data``                pixel data missing, shorter than stated, or   0xA900 data set mismatch
                              not encapsulated as the syntax says
``unsupported``               SOP class neither CT nor Segmentation         0xA900 data set mismatch
``uid-mismatch``              data set UIDs differ from the request's       0xA900 data set mismatch
``disk-full``                 free disk below the watermark, or the disk    0xA700 out of resources
                              filled during the transfer
``storage-unavailable``       the database or spool failed (I/O,            0xA700 out of resources
                              connection)
``conflict``                  a re-send whose content differs from the      0x0000 success: the new
                              stored copy                                   copy is kept aside
============================  ============================================  =========================

0xA900 and 0xC000 are permanent (re-sending the same bytes cannot help); 0xA700 is transient and
used only for real resource trouble. A code without an entry in :data:`DIMSE_STATUS` answers 0xC000.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType

# C-STORE response statuses the node answers with (DICOM PS3.4 Annex B.2.3, PS3.7 Annex C).
STATUS_SUCCESS = 0x0000
STATUS_PROCESSING_FAILURE = 0x0110
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900  # data set does not match SOP class / lacks what it needs
STATUS_CANNOT_UNDERSTAND = 0xC000


class RefusalCode(enum.StrEnum):
    """The reason codes of refused (and conflicting) instances; each is its own string value."""

    UNPARSEABLE = "unparseable"
    ENCODING_MISMATCH = "transfer-syntax-mismatch"
    INTERNAL_ERROR = "internal-error"
    MISSING_ATTRIBUTE = "missing-attribute"
    INVALID_ATTRIBUTE = "invalid-attribute"
    INVALID_UID = "invalid-uid"
    PIXEL_DATA = "pixel-data"
    UNSUPPORTED = "unsupported"
    UID_MISMATCH = "uid-mismatch"
    DISK_FULL = "disk-full"
    STORAGE_UNAVAILABLE = "storage-unavailable"
    CONFLICT = "conflict"


DIMSE_STATUS: Mapping[str, int] = MappingProxyType({
    RefusalCode.UNPARSEABLE: STATUS_CANNOT_UNDERSTAND,
    RefusalCode.ENCODING_MISMATCH: STATUS_CANNOT_UNDERSTAND,
    RefusalCode.INTERNAL_ERROR: STATUS_CANNOT_UNDERSTAND,
    RefusalCode.MISSING_ATTRIBUTE: STATUS_DATASET_MISMATCH,
    RefusalCode.INVALID_ATTRIBUTE: STATUS_DATASET_MISMATCH,
    RefusalCode.INVALID_UID: STATUS_DATASET_MISMATCH,
    RefusalCode.PIXEL_DATA: STATUS_DATASET_MISMATCH,
    RefusalCode.UNSUPPORTED: STATUS_DATASET_MISMATCH,
    RefusalCode.UID_MISMATCH: STATUS_DATASET_MISMATCH,
    RefusalCode.DISK_FULL: STATUS_OUT_OF_RESOURCES,
    RefusalCode.STORAGE_UNAVAILABLE: STATUS_OUT_OF_RESOURCES,
    RefusalCode.CONFLICT: STATUS_SUCCESS,
})


def dimse_status_for(code: str) -> int:
    """The C-STORE status that answers a refusal with ``code`` (0xC000 for an unknown code)."""
    return DIMSE_STATUS.get(code, STATUS_CANNOT_UNDERSTAND)
