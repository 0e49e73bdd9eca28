"""DICOM identifiers every layer shares: the SOP classes the gate handles and the instance header.

SOP Class and Transfer Syntax UIDs are pydicom's named constants, never typed by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydicom import uid as _uid

CT_IMAGE_STORAGE = _uid.CTImageStorage
ENHANCED_CT_IMAGE_STORAGE = _uid.EnhancedCTImageStorage
SEGMENTATION_STORAGE = _uid.SegmentationStorage
COMPREHENSIVE_3D_SR_STORAGE = _uid.Comprehensive3DSRStorage
PARAMETRIC_MAP_STORAGE = _uid.ParametricMapStorage
CT_SOP_CLASSES = frozenset({CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE})

# Maximum lengths (characters) of the value representations the gate stores or writes (PS3.5 §6.2).
AE_MAX_LENGTH = 16  # AE: Application Entity title
CS_MAX_LENGTH = 16  # CS: Code String (Modality)
LO_MAX_LENGTH = 64  # LO: Long String (descriptions, Manufacturer, algorithm name and version)
UI_MAX_LENGTH = 64  # UI: Unique Identifier


@dataclass(frozen=True)
class InstanceHeader:
    """The identifying attributes of a received instance."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str
    transfer_syntax_uid: str
    # SEG only
    referenced_series_uids: tuple[str, ...] = ()
    referenced_sop_instance_uids: frozenset[str] = field(default_factory=frozenset)
    manufacturer: str | None = None
    algorithm_name: str | None = None
    algorithm_version: str | None = None

    @property
    def is_segmentation(self) -> bool:
        return self.sop_class_uid == SEGMENTATION_STORAGE
