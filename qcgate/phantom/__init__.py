"""Synthetic multi-reader chest CT cohorts (labelled synthetic everywhere) and DICOM export."""
