"""A real `qcgate serve` and a real DCMTK storescp PACS that is down, then back: nothing is lost.

Outputs are put in the gate's outbox directly (no QC jobs: the CPU goes to the delivery under test).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from tests.delivery.conftest import StoreSCP, add_outputs, wait_until

pytestmark = pytest.mark.slow

N_OUTPUTS = 8
# The old rule: max_attempts = 8 on this schedule made everything dead after 0.5 + 1 + 2·5 = 11.5 s.
SCHEDULE = {"backoff_base_seconds": 0.5, "backoff_max_seconds": 2, "max_attempts": 8}
OLD_DEAD_AFTER_S = 11.5


def _outbox(gate: Any) -> Any:
    from qcgate.config import load_settings
    from qcgate.store.database import create_db_engine, make_session_factory

    engine = create_db_engine(load_settings(gate.config_path).database_url)
    return engine, make_session_factory(engine)


def _json(gate: Any, *args: str) -> Any:
    result = gate.cli(*args, "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _metric(text: str, name: str, **labels: str) -> float | None:
    label_text = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    match = re.search(rf"^{re.escape(name)}\{{{re.escape(label_text)}\}} (\S+)$", text, re.M)
    return float(match.group(1)) if match else None


def test_an_outage_past_the_old_schedule_loses_nothing(make_gate: Any, tmp_path: Path) -> None:
    pacs = StoreSCP(tmp_path / "pacs")  # down: nothing listens on its port yet
    gate = make_gate(delivery={"destinations": [pacs.address], **SCHEDULE})
    engine, session_factory = _outbox(gate)
    try:
        uids = add_outputs(session_factory, gate.data_dir, pacs.address, N_OUTPUTS)
    finally:
        engine.dispose()
    started = time.monotonic()
    outage_s = OLD_DEAD_AFTER_S + 8.5
    time.sleep(outage_s - 3)
    # What is waiting and why: every delivery pending, with its attempts, next attempt and last error.
    pending = _json(gate, "audit", "deliveries", "--state", "pending", "--destination", pacs.address)
    assert len(pending) == N_OUTPUTS
    assert all(d["attempts"] >= 5 and d["next_attempt_at"] and "no association" in d["last_error"] for d in pending)
    status, metrics = gate.http_get("/metrics")
    assert status == 200
    assert _metric(metrics, "qcgate_destination_deliveries", destination=pacs.address, state="pending") == N_OUTPUTS
    assert _metric(metrics, "qcgate_destination_deliveries", destination=pacs.address, state="dead") == 0
    assert (_metric(metrics, "qcgate_destination_oldest_pending_seconds", destination=pacs.address) or 0) >= OLD_DEAD_AFTER_S
    table = gate.cli("audit", "deliveries", "--state", "pending")
    assert "next_attempt_at" in table.stdout and "no association" in table.stdout
    time.sleep(max(0.0, outage_s - (time.monotonic() - started)))
    assert not _json(gate, "audit", "deliveries", "--state", "dead")
    back = time.monotonic()
    pacs.start()
    try:
        wait_until(lambda: all(d["state"] == "sent" for d in _json(gate, "audit", "deliveries")), timeout=30, interval=0.3)
        drained_s = time.monotonic() - back
        time.sleep(2)  # nothing more may arrive
        received = pacs.received_in_order()
    finally:
        pacs.stop()
    assert received == uids  # each exactly once, oldest first
    attempts = dict(gate.sql("SELECT outcome, count(*) FROM delivery_attempts GROUP BY outcome"))
    assert attempts["sent"] == N_OUTPUTS and "permanent" not in attempts
    assert "delivery.max_attempts (8) is deprecated and ignored" in gate.log_text()
    print(f"\noutage {outage_s:.1f} s (old schedule: dead after {OLD_DEAD_AFTER_S} s); {N_OUTPUTS} outputs; "
          f"0 dead; {len(received)} received once each, in order, {drained_s:.1f} s after the PACS came back; "
          f"transient attempt rows {attempts.get('transient', 0)}")


def test_a_dead_letter_is_re_queued_by_hand_and_then_delivered(make_gate: Any, tmp_path: Path) -> None:
    pacs = StoreSCP(tmp_path / "pacs")
    gate = make_gate(delivery={"destinations": [pacs.address], "backoff_base_seconds": 0.5, "backoff_max_seconds": 1,
                               "dead_letter_after_hours": 2 / 3600})
    engine, session_factory = _outbox(gate)
    try:
        uids = add_outputs(session_factory, gate.data_dir, pacs.address, 2)
    finally:
        engine.dispose()
    wait_until(lambda: [d["state"] for d in _json(gate, "audit", "deliveries")] == ["dead", "dead"], timeout=30, interval=0.3)
    dead = _json(gate, "audit", "deliveries", "--state", "dead")
    assert all("dead_letter_after_hours" in d["last_error"] for d in dead)
    refused = gate.cli("deliveries", "retry", "--user", "alice", "--reason", "no selection")
    assert refused.returncode != 0 and "--dead" in refused.stderr
    pacs.start()
    try:
        result = gate.cli("deliveries", "retry", "--dead", "--destination", pacs.address, "--user", "alice",
                          "--reason", "PACS restored after maintenance")
        assert result.returncode == 0, result.stderr
        assert "re-queued 2 dead letter(s)" in result.stdout
        wait_until(lambda: all(d["state"] == "sent" for d in _json(gate, "audit", "deliveries")), timeout=30, interval=0.3)
        time.sleep(1)
        assert pacs.received_in_order() == uids
    finally:
        pacs.stop()
    actions = _json(gate, "audit", "actions", "--user", "alice", "--since", "1h")
    assert [(a["action"], a["object_type"], a["object_id"]) for a in actions] == [
        ("delivery.retry", "delivery", str(d["delivery_id"])) for d in dead]
    assert all(a["reason"] == "PACS restored after maintenance" and a["details"]["previous_state"] == "dead"
               and a["details"]["attempts"] >= 1 for a in actions)
    sent = _json(gate, "audit", "deliveries")
    assert all(d["attempts"] > dead[i]["attempts"] for i, d in enumerate(sent))  # attempts kept, one more to send
    again = gate.cli("deliveries", "retry", "--id", str(sent[0]["delivery_id"]), "--user", "alice", "--reason", "x")
    assert again.returncode != 0 and "not a dead letter" in again.stderr
    csv_out = gate.cli("audit", "actions", "--format", "csv")
    assert csv_out.returncode == 0 and csv_out.stdout.splitlines()[0].startswith("action_id,at,user,action")
