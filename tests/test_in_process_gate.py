"""The gate in-process (fast tier): `GateService` on loopback with SQLite, driven by a pynetdicom
client and read through the audit queries. The node, the assembler, the dispatcher's queue and the
outbox are exercised without a `qcgate serve` process, DCMTK tools or PostgreSQL; the slow tier
does the same end to end with real clients."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, SegmentationStorage, Verification
from sqlalchemy import text

from qcgate.config import load_settings
from qcgate.service import GateService
from qcgate.store import queries
from qcgate.store.models import Delivery, DeliveryAttempt, Job, Output
from tests.support import free_port, write_synthetic_case


def _wait(predicate, timeout: float = 20):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)
    return value


class PacsSCP:
    """An in-process pynetdicom storage SCP that keeps what it receives (CT only, so a SEG is refused)."""

    def __init__(self) -> None:
        self.received: list[str] = []
        self.port = free_port()
        ae = AE(ae_title="PACS")
        ae.add_supported_context(CTImageStorage)
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event: Any) -> int:
        self.received.append(str(event.dataset.SOPInstanceUID))
        return 0x0000

    @property
    def address(self) -> str:
        return f"PACS@127.0.0.1:{self.port}"


@pytest.fixture
def pacs() -> Iterator[PacsSCP]:
    scp = PacsSCP()
    yield scp
    scp.server.shutdown()


@pytest.fixture
def service(tmp_path: Path, pacs: PacsSCP) -> Iterator[GateService]:
    settings = load_settings(None, {
        "node": {"port": free_port(), "ae_title": "QCGATE"},
        "storage": {"data_dir": str(tmp_path / "data"), "min_free_mb": 1},
        "assembly": {"stable_seconds": 0.3, "poll_interval_seconds": 0.05, "incomplete_timeout_seconds": 30},
        "pipeline": {"workers": 0},  # queue only: the job is claimed by the test below
        "delivery": {"destinations": [pacs.address], "poll_interval_seconds": 0.05, "max_attempts": 3,
                     "backoff_base_seconds": 0.05, "backoff_max_seconds": 0.1},
        "observability": {"enabled": False},
    })
    gate = GateService(settings)
    gate.start()
    try:
        yield gate
    finally:
        gate.stop()


def _cases(gate: GateService) -> list[dict[str, Any]]:
    with gate.session_factory() as session:
        return json.loads(json.dumps(queries.list_cases(session, filters=queries.AuditFilters())))


def _send(port: int, files: list[Path], calling: str = "INPROC") -> list[int]:
    ae = AE(ae_title=calling)
    for context in (Verification, CTImageStorage, SegmentationStorage):
        ae.add_requested_context(context)
    assoc = ae.associate("127.0.0.1", port, ae_title="QCGATE")
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0
        return [int(assoc.send_c_store(pydicom.dcmread(path)).Status) for path in files]
    finally:
        assoc.release()


def test_a_case_sent_in_process_is_stored_assembled_queued_and_its_output_delivered(service: GateService, pacs: PacsSCP,
                                                                                  tmp_path: Path) -> None:
    from qcgate.pipeline.dispatcher import claim_next_job

    ct_files, seg_file = write_synthetic_case(tmp_path / "case", n_slices=4, size=64)
    assert _send(service.node.bound_port, [*ct_files, seg_file]) == [0] * 5
    series_uid = str(pydicom.dcmread(ct_files[0], stop_before_pixels=True).SeriesInstanceUID)

    # node + assembler: one case, ready once quiet, with a pending job
    (case,) = _wait(lambda: [c for c in _cases(service) if c["state"] == "ready" and c["job_state"] == "pending"])
    assert (case["ct_series_uid"], case["ct_instances"], case["seg_instances"]) == (series_uid, 4, 1)
    assert case["calling_aes"] == "INPROC"

    # the dispatcher's queue: the job is claimed once
    claimed = claim_next_job(service.session_factory)
    assert claimed is not None and claim_next_job(service.session_factory) is None

    # the outbox: a CT-class output is delivered; a SEG-class one is refused at negotiation (dead letter)
    with service.session_factory() as session, session.begin():
        job = session.get(Job, claimed[0])
        assert job is not None and job.state == "running"
        instances = {str(i.sop_class_uid): i for i in job.case.instances}
        ct, seg = instances["1.2.840.10008.5.1.4.1.1.2"], instances["1.2.840.10008.5.1.4.1.1.66.4"]
        for kind, instance in (("sr", ct), ("seg", seg)):  # stand-ins: spooled files as the job's outputs
            output = Output(case_id=job.case_id, job_id=job.id, kind=kind, sop_class_uid=instance.sop_class_uid,
                            sop_instance_uid=instance.sop_instance_uid, path=str(Path("spool") / instance.spool_path))
            session.add(output)
            session.flush()
            session.add(Delivery(output_id=output.id, destination=pacs.address))

    def settled() -> list[dict[str, Any]] | None:
        with service.session_factory() as session:
            rows = queries.list_deliveries(session)
        return rows if len(rows) == 2 and all(r["state"] != "pending" for r in rows) else None

    by_kind = {row["kind"]: row for row in _wait(settled)}
    assert by_kind["sr"]["state"] == "sent" and by_kind["sr"]["attempts"] == 1
    assert by_kind["seg"]["state"] == "dead" and by_kind["seg"]["attempts"] == 1
    assert "presentation context" in by_kind["seg"]["last_error"]
    assert pacs.received == [ct.sop_instance_uid]
    with service.session_factory() as session:
        assert sorted(a.outcome for a in session.query(DeliveryAttempt)) == ["permanent", "sent"]


def test_an_unknown_called_ae_title_is_rejected_in_process(service: GateService) -> None:
    ae = AE(ae_title="INPROC")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", service.node.bound_port, ae_title="SOMEONE_ELSE")
    assert not assoc.is_established
    ok = ae.associate("127.0.0.1", service.node.bound_port, ae_title="QCGATE")
    assert ok.is_established
    ok.release()

    def outcomes() -> list[str] | None:
        with service.session_factory() as session:
            rows = [str(o) for (o,) in session.execute(text("SELECT outcome FROM associations ORDER BY id"))]
        return rows if rows == ["rejected", "released"] else None

    assert _wait(outcomes)
