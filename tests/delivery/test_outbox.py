"""The outbox against real C-STORE peers (pynetdicom SCPs in this process): an outage longer than
the old dead-letter schedule loses nothing, the backlog goes out oldest first, a down destination is
probed once per backoff step, and permanent refusals die at once."""

from __future__ import annotations

import time
from pathlib import Path

from qcgate.config import DeliverySettings
from qcgate.delivery.outbox import Outbox, backoff_seconds
from tests.delivery.conftest import OutboxDb, RecordingSCP, add_outputs, wait_until

# The old rule (max_attempts = 8 on this schedule) made every delivery dead after
# 0.1 + 0.2 + 0.4·5 = 2.3 s of outage.
FAST = {"backoff_base_seconds": 0.1, "backoff_max_seconds": 0.4, "poll_interval_seconds": 0.05, "connect_timeout_seconds": 2}
OLD_SCHEDULE_DEAD_AFTER = sum(min(0.1 * 2 ** (n - 1), 0.4) for n in range(1, 8))


def _outbox(db: OutboxDb, destination: str, **settings: object) -> Outbox:
    return Outbox(DeliverySettings(destinations=[destination], **{**FAST, **settings}), db.session_factory, db.data_dir, "QCGATE")


def test_backoff_is_capped_and_never_overflows() -> None:
    settings = DeliverySettings(backoff_base_seconds=5, backoff_max_seconds=300)
    assert [backoff_seconds(n, settings) for n in (1, 2, 3, 6, 7, 10_000)] == [5, 10, 20, 160, 300, 300]


def test_defaults_give_up_after_days_and_max_attempts_still_loads() -> None:
    defaults = DeliverySettings()
    assert defaults.dead_letter_after_hours == 72 and defaults.backoff_max_seconds == 300 and defaults.max_attempts is None
    assert DeliverySettings(max_attempts=8).max_attempts == 8  # deprecated, ignored, but an old config loads


def test_an_outage_longer_than_the_old_schedule_loses_nothing_and_the_backlog_goes_in_order(outbox_db: OutboxDb) -> None:
    pacs = RecordingSCP()
    uids = add_outputs(outbox_db.session_factory, outbox_db.data_dir, pacs.address, 6)
    outbox = _outbox(outbox_db, pacs.address, max_attempts=8)  # the deprecated key is ignored
    worker = outbox.workers[0]
    outbox.start()
    try:
        outage = OLD_SCHEDULE_DEAD_AFTER + 1.0  # nothing listens on the port: connection refused
        time.sleep(outage)
        rows = outbox_db.deliveries()
        assert [r["state"] for r in rows] == ["pending"] * 6
        assert all(r["attempts"] >= 5 and r["last_error"] and r["next_attempt_at"] for r in rows)
        pacs.start()
        wait_until(lambda: all(r["state"] == "sent" for r in outbox_db.deliveries()), timeout=5)
        time.sleep(0.3)  # nothing more may arrive
    finally:
        outbox.stop()
        pacs.stop()
    assert pacs.received == uids  # each once, oldest first
    assert worker.consecutive_failures == 0
    # One association attempt per backoff step for the whole destination, not one per delivery:
    # the oldest delivery was the probe; every other one waited behind it without a network try.
    rows = outbox_db.deliveries()
    failed_steps = rows[0]["attempts"] - 1
    assert worker.probes == failed_steps + 6
    assert 5 <= failed_steps <= outage / 0.1 + 1


def test_permanent_refusals_die_at_once_and_the_destination_goes_on(outbox_db: OutboxDb, tmp_path: Path) -> None:
    refused: set[str] = set()
    pacs = RecordingSCP(status_for=lambda uid: 0xA900 if uid in refused else 0x0000).start()
    uids = add_outputs(outbox_db.session_factory, outbox_db.data_dir, pacs.address, 3)
    refused.add(uids[1])
    outbox = _outbox(outbox_db, pacs.address)
    outbox.start()
    try:
        wait_until(lambda: all(r["state"] != "pending" for r in outbox_db.deliveries()), timeout=5)
    finally:
        outbox.stop()
        pacs.stop()
    rows = outbox_db.deliveries()
    assert [(r["state"], r["attempts"]) for r in rows] == [("sent", 1), ("dead", 1), ("sent", 1)]
    assert "0xA900" in rows[1]["last_error"] and pacs.received == [uids[0], uids[2]]


def test_a_refused_presentation_context_is_a_dead_letter_at_once(outbox_db: OutboxDb) -> None:
    picky = RecordingSCP(sop_classes=("1.2.840.10008.5.1.4.1.1.2",)).start()  # CT only
    add_outputs(outbox_db.session_factory, outbox_db.data_dir, picky.address, 1)
    outbox = _outbox(outbox_db, picky.address)
    outbox.start()
    try:
        wait_until(lambda: outbox_db.deliveries()[0]["state"] == "dead", timeout=5)
    finally:
        outbox.stop()
        picky.stop()
    row = outbox_db.deliveries()[0]
    assert row["attempts"] == 1 and "presentation context" in row["last_error"] and picky.received == []


def test_an_unreadable_output_backs_off_alone(outbox_db: OutboxDb) -> None:
    pacs = RecordingSCP().start()
    uids = add_outputs(outbox_db.session_factory, outbox_db.data_dir, pacs.address, 3)
    (outbox_db.data_dir / "outputs/1/sr.dcm").unlink()
    outbox = _outbox(outbox_db, pacs.address)
    outbox.start()
    try:
        wait_until(lambda: len(pacs.received) == 2, timeout=5)
    finally:
        outbox.stop()
        pacs.stop()
    first = outbox_db.deliveries()[0]
    assert pacs.received == uids[1:] and first["state"] == "pending" and "cannot read" in first["last_error"]


def test_a_transient_failure_older_than_the_dead_letter_age_dies(outbox_db: OutboxDb) -> None:
    pacs = RecordingSCP()  # never started
    add_outputs(outbox_db.session_factory, outbox_db.data_dir, pacs.address, 2)
    outbox = _outbox(outbox_db, pacs.address, dead_letter_after_hours=3 / 3600)
    outbox.start()
    try:
        time.sleep(2)
        assert {r["state"] for r in outbox_db.deliveries()} == {"pending"}
        wait_until(lambda: all(r["state"] == "dead" for r in outbox_db.deliveries()), timeout=5)
    finally:
        outbox.stop()
    assert all("dead_letter_after_hours" in r["last_error"] for r in outbox_db.deliveries())


def test_a_destination_that_aborts_on_c_store_is_named_as_such(outbox_db: OutboxDb) -> None:
    """Orthanc accepts the association of an AE it does not know, then aborts on the request: the
    error must say so instead of "no C-STORE response" (a misleading timeout)."""
    from pynetdicom import AE, evt
    from pynetdicom.presentation import build_context

    from qcgate.config import Destination
    from qcgate.delivery.outbox import send_dataset
    from tests.delivery.conftest import SECONDARY_CAPTURE, free_port

    def abort(event) -> int:  # type: ignore[no-untyped-def]
        event.assoc.abort()
        return 0x0000

    port = free_port()
    ae = AE(ae_title="PACS")
    ae.supported_contexts = [build_context(SECONDARY_CAPTURE)]
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, abort)])
    try:
        add_outputs(outbox_db.session_factory, outbox_db.data_dir, f"PACS@127.0.0.1:{port}", 1)
        import pydicom

        path = next(outbox_db.data_dir.rglob("*.dcm"))
        outcome = send_dataset(pydicom.dcmread(path), Destination.parse(f"PACS@127.0.0.1:{port}"), "QCGATE", 5)
    finally:
        server.shutdown()
    assert outcome.outcome == "transient" and "aborted the association on C-STORE" in outcome.message
