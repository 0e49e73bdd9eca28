"""The node against real DCMTK clients and real DICOM from other implementations."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from tests.support import (
    DCMQI_LIVER,
    GANTRY_TILT_CT,
    HIGHDICOM_FILES,
    echoscu,
    storescu,
    write_seg_for_real_ct,
    write_synthetic_case,
)

pytestmark = pytest.mark.slow  # slow tier: real DCMTK clients against a qcgate serve process


def _ready_with_job(cases: list[dict], series_uid: str) -> bool:
    return any(c["ct_series_uid"] == series_uid and c["state"] == "ready" and c["job_state"] == "pending" for c in cases)


def test_echo_and_a_multislice_case_become_a_ready_case_with_a_pending_job(gate, tmp_path: Path) -> None:
    assert echoscu(gate.port).returncode == 0
    ct_files, seg_file = write_synthetic_case(tmp_path / "case", n_slices=12)
    sent = storescu(gate.port, [*ct_files, seg_file])
    assert sent.returncode == 0, sent.stderr
    series_uid = str(pydicom.dcmread(ct_files[0], stop_before_pixels=True).SeriesInstanceUID)
    cases = gate.wait_for_cases(lambda cs: _ready_with_job(cs, series_uid))
    (case,) = [c for c in cases if c["ct_series_uid"] == series_uid]
    assert case["ct_instances"] == 12
    assert case["seg_instances"] == 1
    # Every instance is in the spool exactly as sent.
    stored = gate.sql("SELECT sop_instance_uid, spool_path, size_bytes FROM instances")
    assert len(stored) == 13
    for _, spool_path, size in stored:
        assert (gate.data_dir / "spool" / spool_path).stat().st_size == size
    outcomes = gate.sql("SELECT outcome, instances_stored FROM associations ORDER BY id")
    assert outcomes == [("released", 0), ("released", 13)]


def test_dcmqi_liver_ct_and_both_segs_assemble_into_one_case(gate) -> None:
    files = sorted((DCMQI_LIVER / "ct-3slice").glob("*")) + [DCMQI_LIVER / "liver.dcm", DCMQI_LIVER / "partial_overlaps.dcm"]
    assert storescu(gate.port, files).returncode == 0
    series_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    cases = gate.wait_for_cases(lambda cs: _ready_with_job(cs, series_uid))
    (case,) = cases
    assert (case["ct_instances"], case["seg_instances"]) == (3, 2)


def test_highdicom_test_files_assemble_per_referenced_series(gate) -> None:
    ct_series = sorted((HIGHDICOM_FILES / "pydicom_dicomdirtests_77654033_CT2").glob("*"))
    segs = sorted(HIGHDICOM_FILES.glob("seg_*.dcm"))
    assert storescu(gate.port, [*ct_series, HIGHDICOM_FILES / "ct_image.dcm", *segs]).returncode == 0
    multi = str(pydicom.dcmread(ct_series[0], stop_before_pixels=True).SeriesInstanceUID)
    single = str(pydicom.dcmread(HIGHDICOM_FILES / "ct_image.dcm", stop_before_pixels=True).SeriesInstanceUID)
    cases = gate.wait_for_cases(lambda cs: _ready_with_job(cs, multi) and _ready_with_job(cs, single))
    by_series = {c["ct_series_uid"]: c for c in cases}
    # Binary, fractional, overlapping and true-fractional SEGs all reference the 4-slice series.
    assert (by_series[multi]["ct_instances"], by_series[multi]["seg_instances"]) == (4, 4)
    assert (by_series[single]["ct_instances"], by_series[single]["seg_instances"]) == (1, 1)


def test_gantry_tilted_head_ct_with_a_seg_is_accepted_and_assembled(gate, tmp_path: Path) -> None:
    ct_files = sorted(GANTRY_TILT_CT.glob("*.dcm"))
    seg = write_seg_for_real_ct(ct_files, tmp_path / "bone.dcm")
    assert storescu(gate.port, [*ct_files, seg]).returncode == 0
    series_uid = str(pydicom.dcmread(ct_files[0], stop_before_pixels=True).SeriesInstanceUID)
    cases = gate.wait_for_cases(lambda cs: _ready_with_job(cs, series_uid))
    assert cases[0]["ct_instances"] == 28


def test_a_seg_whose_ct_is_missing_is_marked_incomplete_with_the_reason(make_gate, tmp_path: Path) -> None:
    gate = make_gate(assembly={"stable_seconds": 0.5, "incomplete_timeout_seconds": 2})
    ct_files, seg_file = write_synthetic_case(tmp_path / "case", n_slices=6)
    assert storescu(gate.port, [*ct_files[:4], seg_file]).returncode == 0
    cases = gate.wait_for_cases(lambda cs: cs and cs[0]["state"] == "incomplete")
    assert "2 CT instance(s) referenced by the SEGs never arrived" in cases[0]["reason"]
    assert cases[0]["job_state"] is None
    # The missing slices arrive late: the case completes after all.
    assert storescu(gate.port, ct_files[4:]).returncode == 0
    gate.wait_for_cases(lambda cs: cs[0]["state"] == "ready" and cs[0]["job_state"] == "pending")


def test_assembly_resumes_after_a_restart(make_gate, tmp_path: Path) -> None:
    gate = make_gate(assembly={"stable_seconds": 3})
    ct_files, seg_file = write_synthetic_case(tmp_path / "case", n_slices=5)
    assert storescu(gate.port, [*ct_files, seg_file]).returncode == 0
    gate.stop()  # before the case has been quiet long enough
    assert gate.sql("SELECT state FROM cases") == [("collecting",)]
    gate.start()
    gate.wait_for_cases(lambda cs: cs[0]["state"] == "ready" and cs[0]["job_state"] == "pending")


def test_audit_cases_formats(gate, tmp_path: Path) -> None:
    ct_files, seg_file = write_synthetic_case(tmp_path / "case", n_slices=3)
    assert storescu(gate.port, [*ct_files, seg_file]).returncode == 0
    gate.wait_for_cases(lambda cs: cs and cs[0]["state"] == "ready")
    table = gate.cli("audit", "cases")
    assert table.returncode == 0 and "ready" in table.stdout and "case_id" in table.stdout
    csv_out = gate.cli("audit", "cases", "--format", "csv")
    header, row = csv_out.stdout.strip().splitlines()
    assert header.startswith("case_id,state") and row.startswith("1,ready")
