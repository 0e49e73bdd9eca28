"""The DICOM network node: association policy, C-STORE ingest, the spool, and the service loop."""
