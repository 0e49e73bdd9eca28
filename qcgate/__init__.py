"""qcgate: a DICOM quality-gate daemon with image-specific segmentation QC thresholds."""

__version__ = "0.1.0"
