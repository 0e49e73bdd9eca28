"""The imaging group's fallback is a warning, never silent."""

from __future__ import annotations

import logging

import numpy as np

from qcgate.science.feature_table import FeatureTable, warn_imaging_fallback


def test_imaging_fallback_is_a_warning(caplog) -> None:  # type: ignore[no-untyped-def]
    flagged = np.zeros((3, 3), bool)
    flagged[1, 0] = True  # slice 1: an imaging descriptor is a fallback
    table = FeatureTable(patient_ids=["a", "b", "c"], case_ids=["a", "b", "c"], slice_indices=[0, 0, 0],
                         dsc_lesion=np.array([0.5, 0.6, 0.7]), feature_names=["imaging.x", "imaging.y", "geometry.z"],
                         values=np.zeros((3, 3)), groups={"imaging": [0, 1], "geometry": [2]}, flagged=flagged)
    with caplog.at_level(logging.WARNING):
        assert warn_imaging_fallback(table) == 1
    assert "imaging group: 1 of 3 slices fell back" in caplog.text
