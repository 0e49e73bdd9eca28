"""/healthz tells the truth: it fails when jobs keep failing, deliveries keep dying or the model
breaks, while the watchdog's liveness (qcgate_up) stays up, since a restart would fix none of these."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow  # each test drives a `qcgate serve` process

from qcgate.config import load_settings
from qcgate.store.database import create_db_engine, make_session_factory
from qcgate.store.models import Case, Delivery, DeliveryAttempt, Job, Output, utcnow

REPO = Path(__file__).resolve().parents[2]


def _session_factory(gate: Any):  # type: ignore[no-untyped-def]
    return make_session_factory(create_db_engine(load_settings(gate.config_path).database_url))


def _add_finished_jobs(gate: Any, states: list[str], first_case: int = 0) -> None:
    with _session_factory(gate)() as session, session.begin():
        for offset, state in enumerate(states):
            case = Case(study_instance_uid="1.2.3", ct_series_uid=f"1.2.3.{first_case + offset}", state=state)
            session.add(case)
            session.flush()
            session.add(Job(case_id=case.id, kind="qc", state=state, attempts=1, finished_at=utcnow(),
                            error="no SEG of the case has a lesion segment" if state == "failed" else None))


def _health(gate: Any) -> tuple[int, dict[str, Any]]:
    status, body = gate.http_get("/healthz")
    return status, json.loads(body)


def _up(gate: Any) -> bool:
    _, text = gate.http_get("/metrics")
    return "\nqcgate_up 1" in "\n" + text


def test_health_fails_after_the_latest_jobs_all_failed_and_recovers_after_a_success(make_gate) -> None:
    gate = make_gate(observability={"failed_jobs_unhealthy": 3})
    status, report = _health(gate)
    assert status == 200 and report["checks"]["recent_jobs"] is True
    _add_finished_jobs(gate, ["failed", "failed"])
    assert _health(gate)[0] == 200  # 2 of 3: not yet
    _add_finished_jobs(gate, ["failed"], first_case=2)
    status, report = _health(gate)
    assert status == 503 and report["checks"]["recent_jobs"] is False
    assert report["details"]["latest_jobs_failed"] == 3
    assert _up(gate), "failing jobs must not make the watchdog restart the gate"
    _add_finished_jobs(gate, ["done"], first_case=3)
    status, report = _health(gate)
    assert status == 200 and report["checks"]["recent_jobs"] is True


def test_health_fails_when_deliveries_keep_dying(make_gate) -> None:
    gate = make_gate(observability={"dead_letters_unhealthy": 2})
    _add_finished_jobs(gate, ["done"])
    with _session_factory(gate)() as session, session.begin():
        job = session.query(Job).one()
        for n in range(2):
            output = Output(case_id=job.case_id, job_id=job.id, kind=("seg", "sr")[n], path=f"outputs/x{n}.dcm")
            session.add(output)
            session.flush()
            delivery = Delivery(output_id=output.id, destination=f"PACS{n}@127.0.0.1:1", state="dead", attempts=1,
                                last_error="refused: 0xA900")
            session.add(delivery)
            session.flush()
            session.add(DeliveryAttempt(delivery_id=delivery.id, outcome="permanent", dimse_status=0xA900))
    status, report = _health(gate)
    assert status == 503 and report["checks"]["dead_letters"] is False and report["details"]["recent_dead_letters"] == 2
    assert _up(gate)


def test_health_fails_when_the_model_no_longer_verifies(make_gate, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(REPO / "models" / "lidc-geometry", model)
    gate = make_gate(pipeline={"workers": 1, "model": str(model)})
    status, report = _health(gate)
    assert status == 200 and report["checks"]["model"] is True
    weights = next(p for p in model.iterdir() if p.name != "manifest.json" and p.suffix == ".json")
    weights.write_text(weights.read_text().replace("0", "1", 1))
    status, report = _health(gate)
    assert status == 503 and report["checks"]["model"] is False
    assert "does not match its sha256" in gate.log_text()


def test_serve_and_check_config_refuse_a_missing_model(make_gate, tmp_path: Path) -> None:
    gate = make_gate(start=False, pipeline={"workers": 1, "model": "lidc-geometri"})
    result = subprocess.run([sys.executable, "-m", "qcgate.cli", "check-config", str(gate.config_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "pipeline.model = 'lidc-geometri'" in result.stderr
    with pytest.raises(AssertionError, match="exited with 2"):
        gate.start(timeout=30)
    assert "pipeline.model = 'lidc-geometri'" in gate.log_text()
