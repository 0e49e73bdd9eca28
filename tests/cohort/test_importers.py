"""Site importers: DICOM (CT + one SEG per reader) and NIfTI, round trips and bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from qcgate.cli import main
from qcgate.cohort import load_cohort
from qcgate.cohort.importers import import_dicom_case, import_nifti_case, import_site
from qcgate.errors import InputError
from qcgate.phantom.dicom_export import write_ct_series, write_seg
from qcgate.phantom.generator import PhantomConfig, write_phantom


@pytest.fixture(scope="module")
def phantom_site(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("site")
    cohort = write_phantom(PhantomConfig(patients=2, seed=5, slices_min=2, slices_max=3), root / "cohort",
                           dicom=True, workers=1)
    return cohort, root / "cohort" / "dicom"


def test_dicom_site_round_trips_the_phantom(phantom_site, tmp_path: Path, capsys) -> None:
    cohort, site = phantom_site
    imported = import_site(site, "dicom", reference_reader="R1A", repeat_reader="R1B")
    assert [c.case_id for c in imported] == [c.case_id for c in cohort]
    for original, back in zip(cohort.cases, imported.cases):
        assert back.patient_id == original.patient_id and back.synthetic
        assert back.pixel_spacing == pytest.approx(original.pixel_spacing, abs=1e-5)
        for reader, mask in original.reader_masks.items():
            np.testing.assert_array_equal(back.reader_masks[reader], mask)
        stored = original.image_hu > -1023.5  # air below -1024 HU is clipped on export
        assert np.abs(back.image_hu - original.image_hu)[stored].max() <= 0.5 + 1e-3  # rounding to integer stored values
        np.testing.assert_allclose(back.ai_probabilities, original.ai_probabilities, atol=1 / 255 + 1e-6)
        assert back.dsc_lesion(0) == pytest.approx(original.dsc_lesion(0))
    out = tmp_path / "imported"
    assert main(["import-cohort", str(site), "--format", "dicom", "--out", str(out), "--reference", "R1A",
                 "--repeat", "R1B"]) == 0
    assert "imported 2 cases" in capsys.readouterr().out
    assert load_cohort(out).has_reader_identity


def test_dicom_seg_of_another_series_is_named(phantom_site, tmp_path: Path) -> None:
    _, site = phantom_site
    case = tmp_path / "case"
    shutil.copytree(site / "PHANTOM-5-000", case)
    other = write_ct_series(np.zeros((2, 8, 8)), (1, 1), 1, tmp_path / "other_ct", patient_id="X")
    write_seg(other, np.ones((2, 8, 8), bool), case / "seg_reader_R9.dcm", algorithm_name="a", manufacturer="m")
    with pytest.raises(InputError, match=r"seg_reader_R9\.dcm: references none of the CT images"):
        import_dicom_case(case)
    (case / "seg_reader_R9.dcm").write_bytes(b"not dicom")
    with pytest.raises(InputError, match=r"seg_reader_R9\.dcm: not a readable DICOM Segmentation"):
        import_dicom_case(case)
    (case / "seg_reader_R9.dcm").unlink()
    with pytest.raises(InputError, match="reference reader 'R7' has no mask"):
        import_dicom_case(case, reference_reader="R7")
    shutil.rmtree(case / "ct")
    with pytest.raises(InputError, match="no CT files"):
        import_dicom_case(case)


def write_nifti(path: Path, array: np.ndarray, spacing=(0.8, 0.7, 5.0)) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))


def test_nifti_case_imports_and_checks_grids(tmp_path: Path) -> None:
    case = tmp_path / "site" / "case01"
    case.mkdir(parents=True)
    volume = np.full((4, 20, 24), -850, np.int16)
    volume[1:3, 5:10, 6:12] = -400
    write_nifti(case / "image.nii.gz", volume)
    a = np.zeros(volume.shape, np.uint8)
    a[1:3, 5:10, 6:12] = 1
    b = np.zeros(volume.shape, np.uint8)
    b[1, 5:11, 6:12] = 1
    write_nifti(case / "reader_A.nii.gz", a)
    write_nifti(case / "reader_B.nii.gz", b)
    write_nifti(case / "ai_net1.nii.gz", a.astype(np.float32) * 0.8)
    write_nifti(case / "ai_net2.nii.gz", b.astype(np.float32) * 0.6)
    (case / "patient_id.txt").write_text("PAT-9\n")
    imported = import_nifti_case(case, reference_reader="A")
    assert imported.patient_id == "PAT-9" and imported.n_slices == 2  # slices 1 and 2 carry a lesion
    assert imported.pixel_spacing == pytest.approx((0.7, 0.8))  # (row = y, col = x)
    assert imported.image_hu[0, 6, 7] == -400
    assert imported.ai_probabilities.shape == (2, 2, 20, 24)
    assert imported.dsc_lesion(0) == pytest.approx(2 * 30 / (30 + 36))
    assert imported.dsc_lesion(1) == 0.0  # B drew nothing on the reference's lesion
    write_nifti(case / "reader_C.nii.gz", a[:, :10])
    with pytest.raises(InputError, match=r"reader_C\.nii\.gz: shape .* does not match"):
        import_nifti_case(case)
    write_nifti(case / "reader_C.nii.gz", a, spacing=(1.0, 1.0, 5.0))
    with pytest.raises(InputError, match=r"reader_C\.nii\.gz: spacing/origin differ"):
        import_nifti_case(case)
    (case / "reader_C.nii.gz").write_bytes(b"garbage")
    with pytest.raises(InputError, match=r"reader_C\.nii\.gz: not a readable NIfTI"):
        import_nifti_case(case)
    (case / "reader_C.nii.gz").unlink()
    write_nifti(case / "reader_A.nii.gz", np.zeros_like(a))
    write_nifti(case / "reader_B.nii.gz", np.zeros_like(b))
    with pytest.raises(InputError, match="has no lesion slice"):
        import_nifti_case(case)
    code = main(["import-cohort", str(tmp_path / "site"), "--format", "nifti", "--out", str(tmp_path / "o")])
    assert code == 2


DCMQI = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "dicom" / "dcmqi-liver-ct-seg"


def test_real_dcmqi_ct_and_seg_import(tmp_path: Path) -> None:
    """A real GE CT with a dcmqi SEG (no SpatialLocationsPreserved) maps by source image."""
    case = tmp_path / "site" / "liver"
    shutil.copytree(DCMQI / "ct-3slice", case / "ct")
    shutil.copy(DCMQI / "liver.dcm", case / "seg_reader_A.dcm")
    imported = import_dicom_case(case)
    assert imported.shape[1:] == (512, 512) and imported.n_slices >= 1
    assert imported.reader_masks["A"].sum() > 1000
    assert imported.image_hu.min() < -900 and imported.image_hu.max() > 100  # HU after rescale
    shutil.copy(DCMQI / "partial_overlaps.dcm", case / "seg_reader_B.dcm")
    with pytest.raises(InputError, match=r"seg_reader_B\.dcm: 5 segments and none is a lesion"):
        import_dicom_case(case)
