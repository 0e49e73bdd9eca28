"""Delivery leases on SQLite and PostgreSQL (real server; the slow tier): two nodes never claim one
delivery, a dead sender's delivery is claimed again once its lease expires (and not before), a live
sender's renewed lease holds, a stop hands leases back, and two nodes probe a down destination no
harder than one."""

from __future__ import annotations

import datetime as dt
import itertools
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from qcgate.config import DeliverySettings
from qcgate.delivery import leases
from qcgate.delivery.outbox import Outbox, backoff_seconds
from qcgate.store.database import (
    create_db_engine,
    make_session_factory,
    upgrade_database,
)
from qcgate.store.models import Delivery, DeliveryAttempt, DestinationState, utcnow
from tests.delivery.conftest import OutboxDb, RecordingSCP, add_outputs, wait_until

FAST = {"backoff_base_seconds": 0.2, "backoff_max_seconds": 0.4, "poll_interval_seconds": 0.02, "connect_timeout_seconds": 2,
        "lease_seconds": 1.0, "heartbeat_seconds": 0.2}
DEST = "PACS@127.0.0.1:1"


@pytest.fixture
def db(db_url: str, tmp_path: Path) -> Any:
    """An empty, migrated audit database: SQLite, or a fresh PostgreSQL database."""
    url = db_url or f"sqlite:///{tmp_path / 'data' / 'qcgate.db'}"
    engine = create_db_engine(url)
    upgrade_database(engine)
    yield OutboxDb(url, tmp_path / "data", make_session_factory(engine), engine)
    engine.dispose()


def _claim(db: OutboxDb, token: str, lease: float = 5.0) -> leases.DeliveryClaim | None:
    leases.ensure_destination_state(db.session_factory, DEST)
    return leases.claim_delivery(db.session_factory, DEST, token, lease)


def test_two_nodes_claiming_at_once_never_take_the_same_delivery(db: OutboxDb) -> None:
    add_outputs(db.session_factory, db.data_dir, DEST, 30)
    taken: dict[str, list[int]] = {"a": [], "b": [], "c": []}
    start = threading.Barrier(len(taken))

    def node(name: str) -> None:
        start.wait()
        while (claim := _claim(db, f"host:{name}:1")) is not None:
            taken[name].append(claim.delivery_id)

    threads = [threading.Thread(target=node, args=(name,)) for name in taken]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    claimed = [i for ids in taken.values() for i in ids]
    assert sorted(claimed) == sorted(set(claimed)) and len(claimed) == 30, taken
    with db.session_factory() as session:
        senders = dict(session.execute(select(Delivery.id, Delivery.sender)).all())
    assert all(senders[i] == f"host:{name}:1" for name, ids in taken.items() for i in ids)
    for ids in taken.values():
        assert ids == sorted(ids)  # each node takes the oldest free one


def test_a_dead_senders_delivery_is_claimed_again_only_after_its_lease_expires(db: OutboxDb) -> None:
    add_outputs(db.session_factory, db.data_dir, DEST, 1)
    first = _claim(db, "dead:1:x", lease=1.0)
    assert first is not None
    assert _claim(db, "live:2:y") is None  # leased: nobody else sends it
    renewed = leases.renew_delivery_leases(db.session_factory, "dead:1:x", 1.0)
    assert renewed == 1 and _claim(db, "live:2:y") is None
    time.sleep(1.2)  # "dead" stops renewing: its lease runs out
    second = _claim(db, "live:2:y")
    assert second is not None and second.delivery_id == first.delivery_id
    assert leases.renew_delivery_leases(db.session_factory, "dead:1:x", 1.0) == 0  # the old sender holds nothing now
    with db.session_factory() as session:
        assert not leases.holds(session, first.delivery_id, "dead:1:x") and leases.holds(session, first.delivery_id, "live:2:y")


def test_a_stop_hands_back_its_leases_at_once(db: OutboxDb) -> None:
    add_outputs(db.session_factory, db.data_dir, DEST, 2)
    assert _claim(db, "a:1:x", lease=60) is not None and _claim(db, "a:1:x", lease=60) is not None
    assert _claim(db, "b:2:y") is None
    leases.release_leases(db.session_factory, "a:1:x")
    assert _claim(db, "b:2:y") is not None and _claim(db, "b:2:y") is not None


def test_a_sent_or_backed_off_delivery_is_not_claimed(db: OutboxDb) -> None:
    add_outputs(db.session_factory, db.data_dir, DEST, 2)
    later = utcnow() + dt.timedelta(minutes=5)
    with db.session_factory() as session, session.begin():
        session.execute(update(Delivery).where(Delivery.id == 1).values(state="sent"))
        session.execute(update(Delivery).where(Delivery.id == 2).values(next_attempt_at=later))
    assert _claim(db, "a:1:x") is None
    with db.session_factory() as session, session.begin():
        session.execute(update(Delivery).where(Delivery.id == 2).values(next_attempt_at=utcnow()))
        session.execute(update(DestinationState).values(consecutive_failures=3, next_attempt_at=later))
    assert _claim(db, "a:1:x") is None  # the destination backs off, for every node


def test_only_one_node_probes_a_failing_destination(db: OutboxDb) -> None:
    add_outputs(db.session_factory, db.data_dir, DEST, 3)
    leases.ensure_destination_state(db.session_factory, DEST)
    with db.session_factory() as session, session.begin():
        session.execute(update(DestinationState).values(consecutive_failures=2, next_attempt_at=utcnow()))
    probe = _claim(db, "a:1:x")
    assert probe is not None and probe.probe
    assert _claim(db, "b:2:y") is None  # other deliveries are free, but the destination's one probe is out
    with db.session_factory() as session:
        state = session.get(DestinationState, DEST)
        assert state is not None and state.prober == "a:1:x"
    with db.session_factory() as session, session.begin():
        assert leases.destination_answered(session, DEST) == 2
    assert _claim(db, "b:2:y") is not None  # it answered: every node sends again


def test_two_outboxes_probe_a_down_destination_once_per_backoff_step_then_deliver_each_once(db: OutboxDb) -> None:
    pacs = RecordingSCP()  # not listening yet: connection refused
    uids = add_outputs(db.session_factory, db.data_dir, pacs.address, 8)
    settings = DeliverySettings(destinations=[pacs.address], **FAST)
    nodes = [Outbox(settings, db.session_factory, db.data_dir, "QCGATE", route=False) for _ in range(2)]
    for node in nodes:
        node.start()
    try:
        time.sleep(2.5)
        with db.session_factory() as session:
            probes = session.execute(select(DeliveryAttempt.attempted_at).where(~DeliveryAttempt.message.like("not sent:%"))
                                     .order_by(DeliveryAttempt.attempted_at)).scalars().all()
            failures = session.get(DestinationState, pacs.address).consecutive_failures  # type: ignore[union-attr]
        pacs.start()
        wait_until(lambda: all(r["state"] == "sent" for r in db.deliveries()), timeout=10)
        time.sleep(0.3)  # nothing more may arrive
    finally:
        for node in nodes:
            node.stop()
        pacs.stop()
    assert sorted(pacs.received) == sorted(uids) and len(pacs.received) == len(uids)  # each once
    # Once the first failure is recorded, one association try per backoff step for both nodes
    # together: never two nodes at once. (Before it, each node may have had one send in flight.)
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(probes)]
    assert len(probes) == failures >= 3, (probes, failures)
    assert all(gap >= 0.9 * backoff_seconds(1, settings) for gap in gaps[1:]), gaps
    assert len(probes) <= 2 + 2.5 / backoff_seconds(1, settings)  # one node's schedule, not two
    with db.session_factory() as session:
        sent_by = session.scalars(select(DeliveryAttempt.sender).where(DeliveryAttempt.outcome == "sent")).all()
    assert len(sent_by) == len(uids) and set(sent_by) <= {node.token for node in nodes}


def test_a_send_cut_short_by_a_dead_node_is_sent_by_another_after_the_lease(db: OutboxDb) -> None:
    pacs = RecordingSCP().start()
    uids = add_outputs(db.session_factory, db.data_dir, pacs.address, 2)
    leases.ensure_destination_state(db.session_factory, pacs.address)
    dead = leases.claim_delivery(db.session_factory, pacs.address, "gone:99999:dead", 1.5)  # claimed, then the node died
    assert dead is not None
    outbox = Outbox(DeliverySettings(destinations=[pacs.address], **FAST), db.session_factory, db.data_dir, "QCGATE", route=False)
    started = time.monotonic()
    outbox.start()
    try:
        wait_until(lambda: len(pacs.received) == 1, timeout=5)
        assert pacs.received == [uids[1]]  # the free one goes at once; the leased one waits
        wait_until(lambda: len(pacs.received) == 2, timeout=5)
        waited = time.monotonic() - started
    finally:
        outbox.stop()
        pacs.stop()
    assert pacs.received == [uids[1], uids[0]] and waited >= 1.0
    with db.session_factory() as session:
        row = session.get(Delivery, dead.delivery_id)
        assert row is not None and row.state == "sent" and row.sender is None and row.lease_until is None
        assert session.scalars(select(DeliveryAttempt.sender).where(DeliveryAttempt.delivery_id == dead.delivery_id)).all() == [outbox.token]
