"""The uncertainty Parametric Map: valid, float frames on the lesion slices' source images."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pytest

from qcgate.writers import codes as qc_codes
from qcgate.writers.pmap import NoUncertaintyMapError, write_qc_pmap
from qcgate.writers.validate import dciodvfy_errors
from tests.writers.conftest import WriterCase


def test_uncertainty_map_round_trips_on_the_source_images(synthetic_case: WriterCase, tmp_path: Path) -> None:
    path = write_qc_pmap(synthetic_case.result, tmp_path / "qc-pmap.dcm")
    assert dciodvfy_errors(path) == []
    pmap = hd.pm.ParametricMap.from_dataset(hd.imread(path))  # highdicom reads it back as a Parametric Map
    assert pmap.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"
    assert int(pmap.NumberOfFrames) == len(synthetic_case.result.slices)
    mapping = pmap.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert mapping.QuantityDefinitionSequence[0].ConceptCodeSequence[0].CodeValue == qc_codes.UNCERTAINTY_MAP.value
    pixels = pmap.pixel_array
    for frame_index, frame in enumerate(pmap.PerFrameFunctionalGroupsSequence):
        uid = str(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        expected = next(s.uncertainty_map for s in synthetic_case.result.slices if str(s.source_image.SOPInstanceUID) == uid)
        np.testing.assert_array_equal(pixels[frame_index], expected.astype(np.float32))


def test_one_member_case_has_no_uncertainty_map(q_unknown_case: WriterCase, tmp_path: Path) -> None:
    with pytest.raises(NoUncertaintyMapError):
        write_qc_pmap(q_unknown_case.result, tmp_path / "qc-pmap.dcm")
