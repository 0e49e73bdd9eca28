"""The qcgate cohort format: round trip, and bad input named clearly (never a bare traceback)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from qcgate.cli import main
from qcgate.cohort import Case, Cohort, load_cohort, read_case, write_cohort
from qcgate.errors import InputError


def make_case(case_id: str = "C1", patient_id: str = "P1", slices: int = 2, with_lesion: bool = True) -> Case:
    rng = np.random.default_rng(abs(hash(case_id)) % 2**32)
    shape = (slices, 24, 20)
    masks = {r: np.zeros(shape, bool) for r in ("R1A", "R1B", "R2")}
    if with_lesion:
        masks["R1A"][0, 5:12, 5:12] = True
        masks["R1B"][0, 6:12, 5:12] = True
        masks["R2"][0, 5:14, 4:12] = True
        masks["R2"][1, 2:4, 2:4] = True
    return Case(
        case_id=case_id, patient_id=patient_id, pixel_spacing=(0.7, 0.8), reader_masks=masks,
        image_hu=rng.normal(-850, 20, shape).astype(np.float32),
        ai_probabilities=rng.uniform(0, 1, (2, *shape)).astype(np.float32),
        lung_mask=np.ones(shape, bool), reference_reader="R1A", repeat_reader="R1B", synthetic=True,
    )


def test_round_trip_keeps_every_array(tmp_path: Path) -> None:
    cases = [make_case("C1", "P1"), make_case("C2", "P1"), make_case("C3", "P2", slices=3)]
    write_cohort(Cohort("demo", cases, synthetic=True), tmp_path)
    manifest = json.loads((tmp_path / "cohort.json").read_text())
    assert manifest["format"] == "qcgate-cohort" and manifest["synthetic"] is True
    loaded = load_cohort(tmp_path)
    assert loaded.synthetic and loaded.patients == ["P1", "P2"] and len(loaded) == 3
    for original, back in zip(cases, loaded.cases):
        assert back.reference_reader == "R1A" and back.repeat_reader == "R1B"
        assert back.pixel_spacing == pytest.approx(original.pixel_spacing)
        for reader in original.reader_masks:
            np.testing.assert_array_equal(back.reader_masks[reader], original.reader_masks[reader])
        np.testing.assert_array_equal(back.image_hu, original.image_hu)
        np.testing.assert_array_equal(back.ai_probabilities, original.ai_probabilities)
        assert back.lesion_slices() == [0, 1]
        assert back.dsc_lesion(0) == pytest.approx(original.dsc_lesion(0))
    # slice 1: only R2 drew -> both pairs against the (empty) reference: R2 counts 0, R1B-R1A left out
    assert loaded.cases[0].dsc_lesion(1) == 0.0
    assert loaded.cases[0].feature_mask(1).sum() == 4  # reference empty -> the first reader who drew


def expect_input_error(path: Path, *fragments: str) -> None:
    with pytest.raises(InputError) as info:
        load_cohort(path)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_missing_and_malformed_files_are_named(tmp_path: Path) -> None:
    expect_input_error(tmp_path / "nowhere", "nowhere", "no such")
    empty = tmp_path / "empty"
    empty.mkdir()
    expect_input_error(empty, "not a cohort")
    write_cohort(Cohort("demo", [make_case("C1"), make_case("C2", "P2")]), tmp_path / "c")
    (tmp_path / "c" / "cases" / "C2.npz").unlink()
    expect_input_error(tmp_path / "c", "C2.npz", "not found")
    (tmp_path / "c" / "cases" / "C2.npz").write_bytes(b"this is not a zip archive")
    expect_input_error(tmp_path / "c", "C2.npz", "not a readable")
    (tmp_path / "c" / "cohort.json").write_text("{ not json")
    expect_input_error(tmp_path / "c", "cohort.json", "not valid JSON")


def test_skip_bad_cases_keeps_the_good_ones(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_cohort(Cohort("demo", [make_case("C1"), make_case("C2", "P2")]), tmp_path)
    (tmp_path / "cases" / "C2.npz").write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING):
        cohort = load_cohort(tmp_path, skip_bad_cases=True)
    assert [c.case_id for c in cohort] == ["C1"]
    assert "C2.npz" in caplog.text


def test_pickled_arrays_are_refused(tmp_path: Path) -> None:
    write_cohort(Cohort("demo", [make_case("C1")]), tmp_path)
    np.savez(tmp_path / "cases" / "C1.npz", reader_ids=np.array(["a"], dtype=object),
             reader_masks=np.zeros((1, 1, 2, 2), bool), pixel_spacing=np.ones(2))
    expect_input_error(tmp_path, "C1.npz", "not a readable")


def test_shape_mismatch_is_named(tmp_path: Path) -> None:
    case = make_case("C1")
    write_cohort(Cohort("demo", [case]), tmp_path)
    with np.load(tmp_path / "cases" / "C1.npz") as archive:
        arrays = dict(archive)
    arrays["image_hu"] = arrays["image_hu"][:, :10]
    np.savez_compressed(tmp_path / "cases" / "C1.npz", **arrays)
    expect_input_error(tmp_path, "C1.npz", "image shape", "does not match")
    with pytest.raises(InputError, match="differ in shape"):
        bad = make_case("C2")
        bad.reader_masks["R2"] = bad.reader_masks["R2"][:, :5]
        bad.validate()


def test_patient_without_lesion_slice_is_skipped_with_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_cohort(Cohort("demo", [make_case("C1"), make_case("C2", "P2", with_lesion=False)]), tmp_path)
    with caplog.at_level(logging.WARNING):
        cohort = load_cohort(tmp_path)
    assert cohort.patients == ["P1"]
    assert "C2.npz" in caplog.text and "no lesion slice" in caplog.text
    only_empty = tmp_path / "only_empty"
    write_cohort(Cohort("demo", [make_case("C3", with_lesion=False)]), only_empty)
    expect_input_error(only_empty, "no usable case", "no lesion slice")


def test_read_case_reports_missing_arrays(tmp_path: Path) -> None:
    np.savez_compressed(tmp_path / "x.npz", pixel_spacing=np.ones(2))
    with pytest.raises(InputError, match=r"x\.npz: missing array\(s\) reader_ids, reader_masks"):
        read_case(tmp_path / "x.npz")


def test_cli_reports_bad_cohort_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_cohort(Cohort("demo", [make_case("C1")]), tmp_path / "c")
    (tmp_path / "c" / "cases" / "C1.npz").write_bytes(b"\x00" * 10)
    code = main(["analyze", str(tmp_path / "c"), "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert "C1.npz" in err and "Traceback" not in err
    assert err.startswith("qcgate analyze: error:")
