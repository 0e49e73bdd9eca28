"""The synthetic cohort generator: deterministic, realistic in HU, disagreement from mechanisms, labelled."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from scipy import ndimage

from qcgate.cohort import load_cohort
from qcgate.phantom.generator import PhantomConfig, generate_cohort, write_phantom
from qcgate.core.agreement import dice

SMALL = PhantomConfig(patients=8, seed=11, slices_min=3, slices_max=4)


@pytest.fixture(scope="module")
def small_cohort():
    return generate_cohort(SMALL, workers=1)


def test_deterministic_from_seed(small_cohort) -> None:
    again = generate_cohort(PhantomConfig(patients=2, seed=11, slices_min=3, slices_max=4), workers=2)
    for first, second in zip(small_cohort.cases[:2], again.cases):
        assert first.case_id == second.case_id
        np.testing.assert_array_equal(first.image_hu, second.image_hu)
        for reader in first.reader_masks:
            np.testing.assert_array_equal(first.reader_masks[reader], second.reader_masks[reader])
        np.testing.assert_array_equal(first.ai_probabilities, second.ai_probabilities)
    other = generate_cohort(PhantomConfig(patients=1, seed=12, slices_min=3, slices_max=4), workers=1)
    assert not np.array_equal(other.cases[0].image_hu[0], small_cohort.cases[0].image_hu[0][: other.cases[0].image_hu.shape[1]])


def test_hu_levels_are_chest_ct_like(small_cohort) -> None:
    for case in small_cohort:
        case.validate()
        assert case.synthetic and case.reference_reader == "R1A" and case.repeat_reader == "R1B"
        for k in range(case.n_slices):
            image = case.image_hu[k]
            drawn = np.any([m[k] for m in case.reader_masks.values()], axis=0)
            healthy = ndimage.binary_erosion(case.lung_mask[k], iterations=3) & ~ndimage.binary_dilation(drawn, iterations=6)
            assert -900 < np.median(image[healthy]) < -700  # aerated lung
            assert image.min() < -900 and image.max() > 300  # air and bone present
            kind = case.attributes["kinds"][k]
            core = case.reader_masks["R1A"][k]
            if core.sum() >= 30:
                median, p99 = np.percentile(image[core], [50, 99])
                if kind == "consolidation":
                    assert median > -800, (case.case_id, k, median)
                    # 0..100 HU where it is dense; small fragments lose contrast to blur (partial volume)
                    if core.sum() >= 150 and case.attributes["textures"][k] != "fragmented":
                        assert p99 > -250, (case.case_id, k, p99)
                else:  # ground glass (-700..-250 HU), or ground glass with a consolidated core:
                    # denser than the aerated lung around it, far below soft tissue
                    assert np.median(image[healthy]) + 20 < median < 0, (case.case_id, k, kind, median)


def test_readers_disagree_by_mechanism(small_cohort) -> None:
    repeat, others, scores, drawn = [], [], [], []
    for case in small_cohort:
        for k in range(case.n_slices):
            masks = case.slice_masks(k)
            drawn += [bool(m.any()) for m in masks.values()]
            repeat.append(dice(masks["R1A"], masks["R1B"]))
            others.append(np.mean([dice(masks["R1A"], masks[r]) for r in ("R2", "R3")]))
            scores.append(case.dsc_lesion(k))
    scores = np.array(scores)
    # a reader may miss a faint lesion altogether, but rarely
    assert np.mean(drawn) >= 0.9
    # the repeat of the reference reader agrees with it more than the other readers do
    assert np.mean(repeat) > np.mean(others)
    # agreement varies from slice to slice: difficulty is case-specific
    assert scores.std() > 0.04 and 0.4 < scores.mean() < 0.97


def test_ai_ensemble_is_probabilistic_and_imperfect(small_cohort) -> None:
    for case in small_cohort:
        assert case.ai_probabilities.shape[0] == 2
        for k in range(case.n_slices):
            um = case.uncertainty_map(k)
            assert um is not None and um.max() > 0.05  # members disagree somewhere
            score = dice(case.ai_mask(k), case.reader_masks["R1A"][k])
            assert 0.0 <= score < 0.999


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy not installed")
def test_written_files_are_labelled_synthetic_and_dicom_valid(tmp_path: Path) -> None:
    cohort = write_phantom(PhantomConfig(patients=1, seed=5, slices_min=2, slices_max=2), tmp_path, dicom=True)
    manifest = json.loads((tmp_path / "cohort.json").read_text())
    assert manifest["synthetic"] is True and "SYNTHETIC" in manifest["description"]
    assert "SYNTHETIC" in (tmp_path / "SYNTHETIC.txt").read_text()
    loaded = load_cohort(tmp_path)
    assert loaded.synthetic and all(case.synthetic for case in loaded)
    case = cohort.cases[0]
    case_dir = tmp_path / "dicom" / case.case_id
    ct_files = sorted((case_dir / "ct").glob("*.dcm"))
    assert len(ct_files) == case.n_slices
    cts = [pydicom.dcmread(f) for f in ct_files]
    assert all("SYNTHETIC" in ds.SeriesDescription and "SYNTHETIC" in ds.ImageComments for ds in cts)
    segs = sorted(case_dir.glob("seg_*.dcm"))
    assert {p.name for p in segs} == {"seg_reader_R1A.dcm", "seg_reader_R1B.dcm", "seg_reader_R2.dcm",
                                      "seg_reader_R3.dcm", "seg_ai_member1.dcm", "seg_ai_member2.dcm"}
    for path in [ct_files[0], *segs]:
        output = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True).stdout
        output += subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True).stderr
        assert not [line for line in output.splitlines() if line.startswith("Error")], path
    seg = hd.seg.segread(case_dir / "seg_reader_R2.dcm")
    assert "SYNTHETIC" in seg.SeriesDescription
    pixels = seg.get_pixels_by_source_instance([ds.SOPInstanceUID for ds in cts], segment_numbers=[1],
                                               assert_missing_frames_are_empty=True)[..., 0]
    np.testing.assert_array_equal(pixels.astype(bool), case.reader_masks["R2"])


def test_cli_refuses_a_non_empty_output_and_bad_counts(tmp_path: Path, capsys) -> None:
    from qcgate.cli import main

    (tmp_path / "keep.txt").write_text("mine")
    assert main(["phantom", "--patients", "1", "--out", str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["phantom", "--patients", "1", "--members", "1", "--out", str(tmp_path / "new")]) == 2
    assert "at least 2 members" in capsys.readouterr().err
