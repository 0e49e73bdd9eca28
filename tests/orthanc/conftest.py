"""Orthanc fixtures (tests/orthanc_support.py) for the tests of this folder."""

from tests.orthanc_support import make_orthanc, orthanc  # noqa: F401  (pytest fixtures)
