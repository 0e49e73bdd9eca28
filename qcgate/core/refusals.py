"""Why the node did not accept an instance: the refusal codes and the DIMSE status each one answers.

A refusal code is the short, machine-readable reason stored in ``refused_instances.reason_code``,
written to the quarantine sidecar and used as the ``reason`` label of
``qcgate_instances_refused_total``. The values are part of the audit record: never rename one.

=====================  ===============================================  =========================
code                   meaning                                          C-STORE status
=====================  ===============================================  =========================
``unparseable``        the payload (or a header element) is not DICOM   0xC000 cannot understand
``missing-attribute``  a required attribute is missing or blank         0xA900 data set mismatch
``invalid-attribute``  an attribute is malformed (e.g. a UID > 64)      0xA900 data set mismatch
``unsupported``        SOP class neither CT nor Segmentation            0xA900 data set mismatch
``uid-mismatch``       data set UIDs differ from the C-STORE request's  0xA900 data set mismatch
``disk-full``          free disk below the watermark                    0xA700 out of resources
``conflict``           a re-send whose content differs from the stored  0x0000 success: the new
                       copy                                             copy is kept aside
=====================  ===============================================  =========================

A code without an entry in :data:`DIMSE_STATUS` answers 0xC000.
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
    MISSING_ATTRIBUTE = "missing-attribute"
    INVALID_ATTRIBUTE = "invalid-attribute"
    UNSUPPORTED = "unsupported"
    UID_MISMATCH = "uid-mismatch"
    DISK_FULL = "disk-full"
    CONFLICT = "conflict"


DIMSE_STATUS: Mapping[str, int] = MappingProxyType({
    RefusalCode.UNPARSEABLE: STATUS_CANNOT_UNDERSTAND,
    RefusalCode.MISSING_ATTRIBUTE: STATUS_DATASET_MISMATCH,
    RefusalCode.INVALID_ATTRIBUTE: STATUS_DATASET_MISMATCH,
    RefusalCode.UNSUPPORTED: STATUS_DATASET_MISMATCH,
    RefusalCode.UID_MISMATCH: STATUS_DATASET_MISMATCH,
    RefusalCode.DISK_FULL: STATUS_OUT_OF_RESOURCES,
    RefusalCode.CONFLICT: STATUS_SUCCESS,
})


def dimse_status_for(code: str) -> int:
    """The C-STORE status that answers a refusal with ``code`` (0xC000 for an unknown code)."""
    return DIMSE_STATUS.get(code, STATUS_CANNOT_UNDERSTAND)
