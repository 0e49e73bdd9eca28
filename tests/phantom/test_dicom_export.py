"""DICOM export: valid CT + SEG files that read back with the right pixels and references."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from qcgate.errors import InputError
from qcgate.phantom.dicom_export import write_ct_series, write_seg


def dciodvfy_errors(path: Path) -> list[str]:
    """Lines starting with 'Error' in dciodvfy's output (it exits 0 even on errors)."""
    completed = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    lines = (completed.stdout + completed.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]


@pytest.fixture
def volume_and_masks() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    volume = rng.normal(-850.0, 30.0, size=(5, 40, 36))
    volume[:, 10:20, 8:18] = 35.0
    volume[0, 0, 0] = -2000.0  # below the storable range: must clip to -1024
    masks = np.zeros(volume.shape, dtype=bool)
    masks[1:4, 10:20, 8:18] = True
    masks[2, 12:14, 25:30] = True
    probabilities = np.where(masks, 0.9, 0.0)
    probabilities[3, 10:20, 8:18] = 0.4  # below 0.5: not in the binary SEG
    return volume, masks, probabilities


def test_ct_series_round_trips_hu_and_geometry(tmp_path: Path, volume_and_masks) -> None:
    volume, _, _ = volume_and_masks
    datasets = write_ct_series(volume, (0.7, 0.8), 2.5, tmp_path / "ct", patient_id="PH-7")
    files = sorted((tmp_path / "ct").glob("*.dcm"))
    assert len(files) == volume.shape[0] == len(datasets)
    for k, path in enumerate(files):
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.SOPClassUID == pydicom.uid.CTImageStorage
        assert ds.PatientID == "PH-7"
        assert "SYNTHETIC" in ds.SeriesDescription and "SYNTHETIC" in ds.ImageComments
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        expected = np.clip(np.rint(volume[k]), -1024, None)
        np.testing.assert_array_equal(hu, expected)
        assert [float(v) for v in ds.PixelSpacing] == [0.7, 0.8]
        assert float(ds.ImagePositionPatient[2]) == pytest.approx(-2.5 * k)
        assert ds.FrameOfReferenceUID == datasets[0].FrameOfReferenceUID
    assert len({ds.SOPInstanceUID for ds in datasets}) == volume.shape[0]


def test_deterministic_key_gives_identical_uids(tmp_path: Path, volume_and_masks) -> None:
    volume, _, _ = volume_and_masks
    first = write_ct_series(volume, (1, 1), 1, tmp_path / "a", patient_id="P", deterministic_key="seed-1")
    second = write_ct_series(volume, (1, 1), 1, tmp_path / "b", patient_id="P", deterministic_key="seed-1")
    other = write_ct_series(volume, (1, 1), 1, tmp_path / "c", patient_id="P", deterministic_key="seed-2")
    assert [d.SOPInstanceUID for d in first] == [d.SOPInstanceUID for d in second]
    assert first[0].SOPInstanceUID != other[0].SOPInstanceUID
    assert (tmp_path / "a" / "CT0001.dcm").read_bytes() == (tmp_path / "b" / "CT0001.dcm").read_bytes()


@pytest.mark.parametrize("fractional", [False, True])
@pytest.mark.parametrize("reverse_input", [False, True])
def test_seg_reads_back_with_references(tmp_path: Path, volume_and_masks, fractional: bool,
                                        reverse_input: bool) -> None:
    volume, masks, probabilities = volume_and_masks
    datasets = write_ct_series(volume, (0.7, 0.7), 2.0, tmp_path / "ct", patient_id="PH-1")
    given = probabilities if fractional else masks
    if reverse_input:  # the caller's order must not matter: masks[k] follows datasets[k]
        datasets, given = datasets[::-1], given[::-1]
    out = tmp_path / "seg.dcm"
    write_seg(datasets, given, out, fractional=fractional, algorithm_name="member-1", manufacturer="qcgate")
    seg = hd.seg.segread(out)
    assert seg.SegmentationType == ("FRACTIONAL" if fractional else "BINARY")
    assert "SYNTHETIC" in seg.SeriesDescription
    description = seg.SegmentSequence[0]
    assert description.SegmentAlgorithmType == "AUTOMATIC"
    assert description.SegmentedPropertyTypeCodeSequence[0].CodeValue == "52988006"
    assert description.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    assert seg.StudyInstanceUID == datasets[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == datasets[0].FrameOfReferenceUID
    uids = [ds.SOPInstanceUID for ds in datasets]
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=[1], ignore_spatial_locations=True,
        rescale_fractional=True, skip_overlap_checks=True, assert_missing_frames_are_empty=True,
    )[..., 0]
    if fractional:
        np.testing.assert_allclose(pixels, given, atol=1 / 255 + 1e-6)
    else:
        np.testing.assert_array_equal(pixels.astype(bool), given >= 0.5)
    referenced = {
        item.ReferencedSOPInstanceUID
        for series in seg.ReferencedSeriesSequence
        for item in series.ReferencedInstanceSequence
    }
    assert referenced == set(uids)


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy not installed")
def test_dciodvfy_reports_no_errors(tmp_path: Path, volume_and_masks) -> None:
    volume, masks, probabilities = volume_and_masks
    datasets = write_ct_series(volume, (0.6, 0.6), 5.0, tmp_path / "ct", patient_id="PH-2")
    write_seg(datasets, masks, tmp_path / "bin.dcm", algorithm_name="a", manufacturer="qcgate")
    write_seg(datasets, probabilities, tmp_path / "frac.dcm", fractional=True, algorithm_name="b",
              manufacturer="qcgate")
    write_seg(datasets, np.zeros_like(masks), tmp_path / "empty.dcm", algorithm_name="c", manufacturer="qcgate")
    for path in [tmp_path / "ct" / "CT0001.dcm", tmp_path / "ct" / "CT0005.dcm", tmp_path / "bin.dcm",
                 tmp_path / "frac.dcm", tmp_path / "empty.dcm"]:
        assert dciodvfy_errors(path) == [], path


def test_bad_inputs_raise_input_error(tmp_path: Path, volume_and_masks) -> None:
    volume, masks, probabilities = volume_and_masks
    with pytest.raises(InputError, match="shape"):
        write_ct_series(volume[0], (1, 1), 1, tmp_path, patient_id="P")
    with pytest.raises(InputError, match="NaN"):
        write_ct_series(np.full((1, 4, 4), np.nan), (1, 1), 1, tmp_path, patient_id="P")
    datasets = write_ct_series(volume, (1, 1), 1, tmp_path / "ct", patient_id="P")
    with pytest.raises(InputError, match="shape"):
        write_seg(datasets, masks[:, :10], tmp_path / "s.dcm", algorithm_name="a", manufacturer="m")
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        write_seg(datasets, probabilities * 3, tmp_path / "s.dcm", algorithm_name="a", manufacturer="m")
