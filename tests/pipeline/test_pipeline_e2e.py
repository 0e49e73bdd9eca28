"""The product end to end: storescu -> qcgate serve -> QC job -> SEG + SR at a DCMTK storescp PACS."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import pydicom
import pytest

from tests.support import (
    DCMQI_LIVER,
    StoreSCP,
    wait_until,
    free_port,
    storescu,
    write_lung2_case,
    write_phantom_case,
)

pytestmark = pytest.mark.slow  # slow tier: storescu -> qcgate serve -> QC job -> storescp, kill -9

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[StoreSCP]:
    scp = StoreSCP(tmp_path / "pacs").start()
    yield scp
    scp.stop()




def pipeline_gate(make_gate, pacs: StoreSCP | None, model: str, **extra):  # type: ignore[no-untyped-def]
    delivery = {"destinations": [pacs.address] if pacs else [], "backoff_base_seconds": 0.5, "backoff_max_seconds": 2, **extra.pop("delivery", {})}
    return make_gate(pipeline={"workers": 1, "model": model, **extra.pop("pipeline", {})}, delivery=delivery, **extra)


def case_done(gate) -> dict | None:  # type: ignore[no-untyped-def]
    cases = gate.audit_cases()
    if cases and cases[0]["state"] == "failed":
        raise AssertionError(f"job failed: {cases[0]['reason']}\n{gate.log_text()[-4000:]}")
    return cases[0] if cases and cases[0]["state"] == "done" else None


def check_outputs(pacs: "StoreSCP", ct_files: list[Path], slices: list[dict]) -> None:
    """The PACS holds one QC SEG and one QC SR that pass dciodvfy and read back with highdicom,
    referencing the right CT slices with the values the audit database holds."""
    from qcgate.writers.sr import read_qc_sr
    from qcgate.writers.validate import dciodvfy_errors

    files = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID): p for p in sorted(pacs.folder.iterdir())}
    assert set(files) == {SEG_CLASS, SR_CLASS} and len(list(pacs.folder.iterdir())) == 2
    for path in files.values():
        assert dciodvfy_errors(path) == [], path.name
    ct_uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in ct_files}
    seg = hd.seg.segread(files[SEG_CLASS])
    assert {str(uid) for _, _, uid in seg.get_source_image_uids()} <= ct_uids
    report = read_qc_sr(files[SR_CLASS])
    by_uid = {s["sop_instance_uid"]: s for s in slices}
    assert sorted(s.sop_instance_uid for s in report.slices) == sorted(by_uid)
    for item in report.slices:
        expected = by_uid[item.sop_instance_uid]
        assert item.tau == pytest.approx(expected["tau"], abs=1e-4)
        assert item.verdict.value == expected["verdict"]
        assert (item.q is None) == (expected["q"] is None)


def test_a_synthetic_case_flows_from_storescu_to_the_pacs(make_gate, pacs: StoreSCP, tmp_path: Path) -> None:
    gate = pipeline_gate(make_gate, pacs, "phantom-full")
    ct_files, members = write_phantom_case(tmp_path / "input")
    assert storescu(gate.port, [*ct_files, *members]).returncode == 0
    case = wait_until(lambda: case_done(gate))
    detail = gate.cli("audit", "case", str(case["case_id"]), "--format", "json")
    import json

    info = json.loads(detail.stdout)
    # q on tau's scale from the model's q estimator, never the raw ensemble agreement
    assert info["n_members"] == 2 and info["uses_uncertainty"] is True and info["q_source"] == "learned-um"
    assert "SYNTHETIC model phantom-full" in info["notes"]
    assert len(info["slices"]) >= 1
    assert all(s["verdict"] in ("accept", "review", "reject") and 0 <= s["tau"] <= 1 for s in info["slices"])
    assert gate.sql("SELECT count(*) FROM slice_results") == [(len(info["slices"]),)]
    wait_until(lambda: len(pacs.received()) >= 2)
    check_outputs(pacs, ct_files, info["slices"])
    deliveries = wait_until(lambda: [d for d in gate_deliveries(gate) if d["state"] == "sent"])
    assert sorted(d["kind"] for d in deliveries) == ["seg", "sr"]


def gate_deliveries(gate) -> list[dict]:  # type: ignore[no-untyped-def]
    return gate.audit_deliveries()  # polled: read from the database, not a CLI process per poll


def gate_case(gate, case_id: int = 1) -> dict:  # type: ignore[no-untyped-def]
    import json

    result = gate.cli("audit", "case", str(case_id), "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_real_lung2_ct_with_a_two_member_fractional_ensemble(make_gate, pacs: StoreSCP, tmp_path: Path) -> None:
    gate = pipeline_gate(make_gate, pacs, "phantom-full")
    ct_files, members = write_lung2_case(tmp_path / "lung2")
    assert storescu(gate.port, [*ct_files, *members]).returncode == 0
    wait_until(lambda: case_done(gate))
    info = gate_case(gate)
    assert info["n_members"] == 2 and info["uses_uncertainty"] is True
    assert 8 <= len(info["slices"]) <= 11  # the label spans 11 slices; blurred edges may drop tiny ones
    assert all(s["um_mean"] is not None and s["um_mean"] > 0 for s in info["slices"])
    wait_until(lambda: len(pacs.received()) >= 2)
    check_outputs(pacs, ct_files, info["slices"])


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_single_fractional_member_gets_q_and_band_verdicts_end_to_end(make_gate, pacs: StoreSCP, tmp_path: Path) -> None:
    """One FRACTIONAL member on a real chest CT: q from the probability map (no ensemble), verdicts by
    the conformal band, and the SR read back names the q source, its validation error and the rule."""
    from qcgate.writers.sr import read_qc_sr

    gate = pipeline_gate(make_gate, pacs, "lidc-geometry")
    ct_files, members = write_lung2_case(tmp_path / "lung2")
    assert storescu(gate.port, [*ct_files, members[0]]).returncode == 0
    wait_until(lambda: case_done(gate))
    info = gate_case(gate)
    assert info["n_members"] == 1 and info["q_source"] in ("probability", "learned")
    assert info["slices"] and all(s["q"] is not None for s in info["slices"])
    wait_until(lambda: len(pacs.received()) >= 2)
    check_outputs(pacs, ct_files, info["slices"])
    sr_path = next(p for p in sorted(pacs.folder.iterdir())
                   if str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID) == SR_CLASS)
    report = read_qc_sr(sr_path)
    assert report.q_source == info["q_source"] and report.q_validation_mae is not None
    assert "conformal" in report.verdict_rule and report.synthetic_model == ""
    for item in report.slices:  # each verdict is the band's answer for its (tau, q)
        assert item.q is not None
        accept = item.margin is not None and item.q >= item.tau + item.margin - 1e-6
        reject_margin = item.margin if item.margin_reject is None else item.margin_reject
        reject = not accept and reject_margin is not None and item.q < item.tau - reject_margin + 1e-6
        if abs(item.q - item.tau - (item.margin or 0)) > 1e-4 and abs(item.q - item.tau + (reject_margin or 0)) > 1e-4:
            assert item.verdict.value == ("accept" if accept else "reject" if reject else "review")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_dcmqi_liver_with_one_binary_member_gets_the_mask_only_q(make_gate, pacs: StoreSCP) -> None:
    gate = pipeline_gate(make_gate, pacs, "lidc-geometry", pipeline={"lesion_segment_labels": ["liver"]})
    files = sorted((DCMQI_LIVER / "ct-3slice").glob("*")) + [DCMQI_LIVER / "liver.dcm"]
    assert storescu(gate.port, files).returncode == 0
    wait_until(lambda: case_done(gate))
    info = gate_case(gate)
    # one BINARY member: no probabilities, so q comes from the mask-only estimator, and it says so
    assert info["n_members"] == 1 and info["uses_uncertainty"] is False and info["q_source"] == "learned-mask"
    assert info["slices"] and all(s["q"] is not None and 0 <= s["tau"] <= 1 for s in info["slices"])
    assert "no uncertainty map" in info["notes"] and "BINARY member" in info["notes"]
    wait_until(lambda: len(pacs.received()) >= 2)
    check_outputs(pacs, files[:3], info["slices"])


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_destination_down_then_back_receives_each_output_once(make_gate, tmp_path: Path) -> None:
    later = StoreSCP(tmp_path / "late-pacs")
    gate = make_gate(pipeline={"workers": 1, "model": "phantom-full"},
                     delivery={"destinations": [later.address], "backoff_base_seconds": 0.5, "backoff_max_seconds": 1, "max_attempts": 1000})
    ct_files, members = write_phantom_case(tmp_path / "input")
    assert storescu(gate.port, [*ct_files, *members]).returncode == 0
    wait_until(lambda: case_done(gate))
    wait_until(lambda: all(d["attempts"] >= 2 and d["state"] == "pending" for d in gate_deliveries(gate)) and gate_deliveries(gate))
    later.start()
    try:
        wait_until(lambda: all(d["state"] == "sent" for d in gate_deliveries(gate)))
        time.sleep(2)  # nothing more may arrive
        received = later.received()
        assert sorted(str(ds.SOPClassUID) for ds in received) == sorted([SEG_CLASS, SR_CLASS])
    finally:
        later.stop()
    attempts = gate.sql("SELECT outcome, count(*) FROM delivery_attempts GROUP BY outcome ORDER BY outcome")
    assert dict(attempts)["sent"] == 2 and dict(attempts)["transient"] >= 4


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_destination_that_refuses_the_sop_class_is_a_dead_letter(make_gate, tmp_path: Path) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    picky = AE(ae_title="PICKY")
    picky.add_supported_context(CTImageStorage)
    port = free_port()
    server = picky.start_server(("127.0.0.1", port), block=False)
    try:
        gate = make_gate(pipeline={"workers": 1, "model": "phantom-full"},
                         delivery={"destinations": [f"PICKY@127.0.0.1:{port}"], "backoff_base_seconds": 0.5, "max_attempts": 50})
        ct_files, members = write_phantom_case(tmp_path / "input")
        assert storescu(gate.port, [*ct_files, *members]).returncode == 0
        wait_until(lambda: case_done(gate))
        dead = wait_until(lambda: [d for d in gate_deliveries(gate) if d["state"] == "dead"] if len([d for d in gate_deliveries(gate) if d["state"] == "dead"]) == 2 else None)
        assert all(d["attempts"] == 1 and "presentation context" in d["last_error"] for d in dead)
    finally:
        server.shutdown()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_kill9_during_a_job_then_restart_completes_and_delivers_once(make_gate, pacs: StoreSCP, tmp_path: Path) -> None:
    gate = pipeline_gate(make_gate, pacs, "phantom-full")
    ct_files, members = write_lung2_case(tmp_path / "lung2")
    assert storescu(gate.port, [*ct_files, *members]).returncode == 0
    wait_until(lambda: gate.sql("SELECT state FROM jobs") == [("running",)], interval=0.1)
    gate.kill9()
    assert gate.sql("SELECT state FROM jobs") == [("running",)]
    gate.start()
    wait_until(lambda: case_done(gate))
    wait_until(lambda: len(pacs.received()) >= 2)
    time.sleep(2)
    assert sorted(str(ds.SOPClassUID) for ds in pacs.received()) == sorted([SEG_CLASS, SR_CLASS])
    assert gate.sql("SELECT state, attempts FROM jobs") == [("done", 2)]


def _retarget_seg(seg_path: Path, ct_files: list[Path], out: Path) -> Path:
    """Point a SEG's references at another CT series (to build a SEG on the wrong grid)."""
    seg = pydicom.dcmread(seg_path)
    cts = [pydicom.dcmread(p, stop_before_pixels=True) for p in ct_files]
    seg.FrameOfReferenceUID = cts[0].FrameOfReferenceUID
    seg.ReferencedSeriesSequence[0].SeriesInstanceUID = cts[0].SeriesInstanceUID
    for item, ct in zip(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence, cts):
        item.ReferencedSOPInstanceUID = ct.SOPInstanceUID
    for frame, ct in zip(seg.PerFrameFunctionalGroupsSequence, cts):
        for derivation in frame.get("DerivationImageSequence", []):
            for source in derivation.SourceImageSequence:
                source.ReferencedSOPInstanceUID = ct.SOPInstanceUID
    seg.save_as(out)
    return out


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_awkward_input_ends_with_a_stated_outcome(make_gate, pacs: StoreSCP, tmp_path: Path) -> None:
    import numpy as np

    from qcgate.phantom.dicom_export import write_seg
    from tests.support import HIGHDICOM_FILES, write_synthetic_case

    gate = pipeline_gate(make_gate, pacs, "phantom-full")
    # 1. a SEG without a lesion segment (two segments: neither labelled nor coded as a lesion)
    ct2 = sorted((HIGHDICOM_FILES / "pydicom_dicomdirtests_77654033_CT2").glob("*"))
    assert storescu(gate.port, [*ct2, HIGHDICOM_FILES / "seg_image_ct_binary_overlap.dcm"]).returncode == 0
    # 2. an empty segmentation: a valid "no lesion" result
    empty_ct, _ = write_synthetic_case(tmp_path / "empty", n_slices=3, size=64, seed=1, patient_id="EMPTY")
    datasets = [pydicom.dcmread(p) for p in empty_ct]
    empty_seg = tmp_path / "empty-seg.dcm"
    write_seg(datasets, np.zeros((3, 64, 64), bool), empty_seg, algorithm_name="TestAI", manufacturer="qcgate tests")
    assert storescu(gate.port, [*empty_ct, empty_seg]).returncode == 0
    # 3. a SEG whose frames lie on another grid than the CT it references
    small_ct, small_seg = write_synthetic_case(tmp_path / "small", n_slices=3, size=32, seed=2, patient_id="SMALL")
    big_ct, _ = write_synthetic_case(tmp_path / "big", n_slices=3, size=48, seed=3, patient_id="BIG")
    wrong = _retarget_seg(small_seg, big_ct, tmp_path / "wrong-grid.dcm")
    assert storescu(gate.port, [*big_ct, wrong]).returncode == 0

    def settled() -> list[dict] | None:
        cases = gate.audit_cases()
        return cases if len(cases) == 3 and all(c["state"] in ("done", "failed") for c in cases) else None

    by_series = {c["ct_series_uid"]: c for c in wait_until(settled)}
    no_lesion = by_series[str(pydicom.dcmread(ct2[0], stop_before_pixels=True).SeriesInstanceUID)]
    assert no_lesion["state"] == "failed" and "no SEG of the case has a lesion segment" in no_lesion["reason"]
    empty = by_series[str(datasets[0].SeriesInstanceUID)]
    assert empty["state"] == "done" and empty["series_verdict"] == "review"
    assert [o["kind"] for o in gate_case(gate, empty["case_id"])["outputs"] if o["kind"] != "report"] == ["sr"]
    grid = by_series[str(pydicom.dcmread(big_ct[0], stop_before_pixels=True).SeriesInstanceUID)]
    assert grid["state"] == "failed" and "cannot be mapped onto the CT" in grid["reason"]
