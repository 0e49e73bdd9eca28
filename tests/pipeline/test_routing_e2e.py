"""Routing by verdict, end to end: storescu -> `qcgate serve` -> QC job -> two DCMTK storescp
destinations with different rules; held outputs released by a reviewer's decision; and a
`qcgate worker` without destinations whose cases are still delivered (serve routes them)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest

from tests.delivery.conftest import StoreSCP
from tests.support import storescu, wait_until, write_phantom_case

pytestmark = pytest.mark.slow  # storescu -> qcgate serve -> QC job -> two storescp peers

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"




def _routing_gate(make_gate: Any, clinical: StoreSCP, review: StoreSCP, workers: int) -> Any:
    gate = make_gate(start=False, pipeline={"workers": workers, "model": "phantom-full"},
                     delivery={"backoff_base_seconds": 0.5, "backoff_max_seconds": 2})
    gate.config_path.write_text(gate.config_path.read_text() + f"""
[[delivery.destination]]
name = "clinical-pacs"
address = "{clinical.address}"
objects = ["ai-seg", "sr", "sc", "pdf"]
verdicts = ["accept"]

[[delivery.destination]]
name = "review-station"
address = "{review.address}"
objects = ["ai-seg", "qc-seg", "sr", "sc", "pdf", "pmap"]
verdicts = ["review", "reject"]
""")
    gate.start()
    return gate


def _classes(scp: StoreSCP) -> list[str]:
    return sorted(str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID) for p in scp.folder.iterdir() if p.is_file())


def _done(gate: Any) -> dict[str, Any] | None:
    cases = gate.audit_cases()
    if cases and cases[0]["state"] == "failed":
        raise AssertionError(f"job failed: {cases[0]['reason']}\n{gate.log_text()[-4000:]}")
    return cases[0] if cases and cases[0]["state"] == "done" else None


def _states(gate: Any) -> list[tuple[str, str, str]]:
    return sorted((d["destination"], d["kind"], d["state"]) for d in gate.audit_deliveries())


@pytest.fixture
def peers(tmp_path: Path) -> Any:
    clinical, review = StoreSCP(tmp_path / "clinical").start(), StoreSCP(tmp_path / "review").start()
    yield clinical, review
    clinical.stop()
    review.stop()


def test_a_review_case_reaches_the_review_station_now_and_the_clinical_pacs_once_released(make_gate: Any, peers: Any,
                                                                                          tmp_path: Path) -> None:
    clinical, review = peers
    gate = _routing_gate(make_gate, clinical, review, workers=1)
    ct_files, members = write_phantom_case(tmp_path / "input")
    members = members[:1]  # one member of the phantom's weak AI: the series is review or reject, never accept
    ai_seg_uid = str(pydicom.dcmread(members[0], stop_before_pixels=True).SOPInstanceUID)
    assert storescu(gate.port, [*ct_files, *members]).returncode == 0
    case = wait_until(lambda: _done(gate))
    assert case["series_verdict"] in ("review", "reject"), case  # either way: held for the accept-only PACS
    wait_until(lambda: [s for _, _, s in _states(gate) if s == "sent"] == ["sent"] * 3)
    assert _states(gate) == [("clinical-pacs", "ai-seg", "held"), ("clinical-pacs", "sr", "held"),
                             ("review-station", "ai-seg", "sent"), ("review-station", "seg", "sent"), ("review-station", "sr", "sent")]
    assert _classes(review) == [SEG_CLASS, SEG_CLASS, SR_CLASS]
    time.sleep(1.0)
    assert _classes(clinical) == []  # the accept-only destination gets nothing for a review case

    added = subprocess.run([sys.executable, "-m", "qcgate.cli", "users", "add", "dr.reviewer", "--role", "reviewer",
                            "--password-stdin", "--config", str(gate.config_path)],
                           input="a long reviewer password\n", capture_output=True, text=True, timeout=120)
    assert added.returncode == 0, added.stderr
    decided = gate.cli("review", "accept", str(case["case_id"]), "--reason", "outline confirmed", "--user", "dr.reviewer")
    assert decided.returncode == 0 and "2 held output(s) released" in decided.stdout, decided.stdout + decided.stderr
    wait_until(lambda: [s for d, _, s in _states(gate) if d == "clinical-pacs"] == ["sent", "sent"], timeout=60)
    time.sleep(1.5)  # nothing more may arrive
    assert _classes(clinical) == [SEG_CLASS, SR_CLASS]  # exactly once each
    uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in clinical.folder.iterdir()}
    assert ai_seg_uid in uids  # the AI's own SEG, from the spool, unchanged
    actions = gate.sql('SELECT action, "user" FROM actions ORDER BY id')  # "user": a keyword in PostgreSQL
    assert actions == [("delivery.hold", "qcgate"), ("delivery.release", "dr.reviewer"), ("review.accept", "dr.reviewer")]


def test_a_worker_without_destinations_still_delivers_through_serve(make_gate: Any, peers: Any, tmp_path: Path) -> None:
    clinical, review = peers
    gate = _routing_gate(make_gate, clinical, review, workers=0)  # serve only queues, routes and delivers
    log = open(tmp_path / "worker.log", "ab")
    from qcgate.config import load_settings

    database = load_settings(gate.config_path).database.url  # the gate's database; no [delivery] settings at all
    worker = subprocess.Popen([sys.executable, "-m", "qcgate.cli", "worker", "--data-dir", str(gate.data_dir),
                               *(["--db-url", database] if database else []),
                               "--model", "phantom-full", "--workers", "1"], stdout=log, stderr=subprocess.STDOUT)
    try:
        ct_files, members = write_phantom_case(tmp_path / "input")
        members = members[:1]
        assert storescu(gate.port, [*ct_files, *members]).returncode == 0
        wait_until(lambda: _done(gate))
        wait_until(lambda: [s for d, _, s in _states(gate) if d == "review-station"] == ["sent"] * 3)
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        log.close()
    assert [s for d, _, s in _states(gate) if d == "clinical-pacs"] == ["held", "held"]
    assert _classes(review) == [SEG_CLASS, SEG_CLASS, SR_CLASS]
