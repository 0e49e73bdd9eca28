"""Delivery leases: any node sends a delivery, one node at a time; one backoff per destination.

Every delivering node (`qcgate serve`, and each `qcgate worker` with ``worker.deliver``) runs one
thread per destination. Before sending, a thread *claims* the oldest due delivery of its
destination: a pending row whose ``next_attempt_at`` has come and whose lease is free (NULL, or
``lease_until`` past: its sender died mid-send). The claim writes the node's token (``host:pid:
random``, one per outbox) into ``deliveries.sender`` and ``lease_until = now + delivery.lease_seconds``.
On PostgreSQL the candidate is read ``FOR UPDATE SKIP LOCKED``, so two nodes never wait for or take
the same row; on SQLite (one writer at a time) the claim is a compare-and-set UPDATE whose WHERE
repeats the conditions, so a second claimer updates nothing. The outbox's lease keeper renews every
lease it holds each ``delivery.heartbeat_seconds`` while the send runs.

The backoff is the destination's and lives in ``destination_states``, so two nodes never probe a
down PACS twice as hard: after the n-th consecutive transient failure nobody tries the destination
before ``next_attempt_at = now + min(base · 2^(n−1), max)``. Once it is due, the one node whose
compare-and-set moves ``next_attempt_at`` to ``now + lease_seconds`` (and sets ``prober``) sends the
probe; the others find the destination not due. A probe whose node died ends with its lease; an
answer resets the count to 0 and every node sends again, in parallel (so, across nodes, "oldest
first" is the claim order, not a strict arrival order).

Exactly once in the normal case: a row is sent only under a claim, and a sent row is never claimed
again. At least once after a crash mid-send: the PACS may have stored the object before the sender
died, and the next claimer sends it again (a C-STORE of the same SOP Instance UID replaces the same
instance at a PACS).
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass

from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from qcgate.store.models import (
    Delivery,
    DeliveryState,
    DestinationState,
    Output,
    utcnow,
)


def sender_identity() -> str:
    """A delivering node's token: host, pid and a random part (one per outbox)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def aware(value: dt.datetime) -> dt.datetime:
    """SQLite returns naive UTC datetimes, PostgreSQL aware ones: make both aware."""
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


@dataclass(frozen=True)
class DeliveryClaim:
    """A delivery this node may send now, with what it needs to send it."""

    delivery_id: int
    attempts: int
    queued_at: dt.datetime
    output_path: str
    case_id: int
    held: bool
    probe: bool  # the destination was failing: this send is its one probe


class _Lost(Exception):
    """Another node took the row (or the probe) between the read and the compare-and-set."""


def ensure_destination_state(session_factory: sessionmaker[Session], destination: str) -> None:
    """Create the destination's backoff row if no node has yet."""
    with session_factory() as session:
        if session.get(DestinationState, destination) is not None:
            return
    try:
        with session_factory() as session, session.begin():
            session.add(DestinationState(destination=destination, consecutive_failures=0, next_attempt_at=utcnow()))
    except IntegrityError:  # another node created it first
        pass


def _lease_free(now: dt.datetime):  # type: ignore[no-untyped-def]
    return or_(Delivery.lease_until.is_(None), Delivery.lease_until < now)


def claim_delivery(session_factory: sessionmaker[Session], destination: str, token: str,
                   lease_seconds: float) -> DeliveryClaim | None:
    """Claim the oldest due delivery of ``destination`` for ``token``; None when nothing is due, the
    destination is backing off, or its probe is another node's."""
    now = utcnow()
    lease_until = now + dt.timedelta(seconds=lease_seconds)
    try:
        with session_factory() as session, session.begin():
            state = session.get(DestinationState, destination)
            if state is not None and aware(state.next_attempt_at) > now:
                return None
            row = session.execute(
                select(Delivery.id, Delivery.attempts, Delivery.queued_at, Output.path, Output.case_id, Delivery.held_at)
                .join(Output, Output.id == Delivery.output_id)
                .where(Delivery.destination == destination, Delivery.state == DeliveryState.PENDING.value,
                       Delivery.next_attempt_at <= now, _lease_free(now))
                .order_by(Delivery.id).limit(1)
                .with_for_update(skip_locked=True, of=Delivery)  # SQLite: no row locks; the CAS below decides
            ).first()
            if row is None:
                return None
            delivery_id, attempts, queued_at, path, case_id, held_at = row
            probe = state is not None and state.consecutive_failures > 0
            if probe and session.execute(
                    update(DestinationState).where(DestinationState.destination == destination,
                                                   DestinationState.consecutive_failures > 0,
                                                   DestinationState.next_attempt_at <= now)
                    .values(next_attempt_at=lease_until, prober=token, updated_at=now)
                    .execution_options(synchronize_session=False)).rowcount != 1:
                raise _Lost()
            if session.execute(
                    update(Delivery).where(Delivery.id == delivery_id, Delivery.state == DeliveryState.PENDING.value,
                                           _lease_free(now))
                    .values(sender=token, lease_until=lease_until)
                    .execution_options(synchronize_session=False)).rowcount != 1:
                raise _Lost()
    except _Lost:
        return None
    return DeliveryClaim(delivery_id, attempts, aware(queued_at), path, case_id, held_at is not None, probe)


def renew_delivery_leases(session_factory: sessionmaker[Session], token: str, lease_seconds: float) -> int:
    """Heartbeat: extend every lease ``token`` holds (its sends and its probes); how many rows."""
    now = utcnow()
    until = now + dt.timedelta(seconds=lease_seconds)
    with session_factory() as session, session.begin():
        sends = session.execute(
            update(Delivery).where(Delivery.sender == token, Delivery.state == DeliveryState.PENDING.value,
                                   Delivery.lease_until.is_not(None))
            .values(lease_until=until).execution_options(synchronize_session=False)).rowcount
        probes = session.execute(
            update(DestinationState).where(DestinationState.prober == token)
            .values(next_attempt_at=until, updated_at=now).execution_options(synchronize_session=False)).rowcount
    return int(sends) + int(probes)


def release_leases(session_factory: sessionmaker[Session], token: str) -> None:
    """A deliberate stop: hand back what ``token`` holds, so another node goes on at once."""
    now = utcnow()
    with session_factory() as session, session.begin():
        session.execute(update(Delivery).where(Delivery.sender == token, Delivery.lease_until.is_not(None))
                        .values(sender=None, lease_until=None).execution_options(synchronize_session=False))
        session.execute(update(DestinationState).where(DestinationState.prober == token)
                        .values(prober=None, next_attempt_at=now, updated_at=now).execution_options(synchronize_session=False))


def holds(session: Session, delivery_id: int, token: str) -> bool:
    """Whether ``token`` still holds the lease on the delivery (read in the caller's transaction)."""
    return session.scalar(select(Delivery.id).where(Delivery.id == delivery_id, Delivery.sender == token,
                                                    Delivery.lease_until.is_not(None))) is not None


def destination_answered(session: Session, destination: str) -> int:
    """The destination answered: its failure count goes to 0 and it is due now; the count it had."""
    now = utcnow()
    before = session.scalar(select(DestinationState.consecutive_failures).where(DestinationState.destination == destination)) or 0
    session.execute(update(DestinationState).where(
        DestinationState.destination == destination,
        or_(DestinationState.consecutive_failures > 0, DestinationState.prober.is_not(None)))
        .values(consecutive_failures=0, next_attempt_at=now, prober=None, last_error=None, updated_at=now)
        .execution_options(synchronize_session=False))
    return int(before)


def destination_failed(session: Session, destination: str, error: str, delay_for: Callable[[int], float]) -> tuple[int, dt.datetime]:
    """Count one more transient failure of the destination and set when anybody may try it next;
    (the new count, that time). The increment is atomic, so two nodes failing at once both count."""
    now = utcnow()
    session.execute(update(DestinationState).where(DestinationState.destination == destination)
                    .values(consecutive_failures=DestinationState.consecutive_failures + 1, updated_at=now)
                    .execution_options(synchronize_session=False))
    count = int(session.scalar(select(DestinationState.consecutive_failures)
                               .where(DestinationState.destination == destination)) or 1)
    next_at = now + dt.timedelta(seconds=delay_for(count))
    session.execute(update(DestinationState).where(DestinationState.destination == destination)
                    .values(next_attempt_at=next_at, prober=None, last_error=error)
                    .execution_options(synchronize_session=False))
    return count, next_at


def release_probe(session: Session, destination: str, token: str) -> None:
    """The probe never reached the destination (its file was unreadable): another try may go now."""
    now = utcnow()
    session.execute(update(DestinationState).where(DestinationState.destination == destination, DestinationState.prober == token)
                    .values(prober=None, next_attempt_at=now, updated_at=now).execution_options(synchronize_session=False))


def leased_by_others(session: Session, ids: Collection[int], token: str) -> set[int]:
    """Of ``ids``, the deliveries another node is sending now (its lease is current)."""
    now = utcnow()
    if not ids:
        return set()
    return set(session.scalars(select(Delivery.id).where(
        Delivery.id.in_(list(ids)), Delivery.lease_until.is_not(None), Delivery.lease_until >= now,
        or_(Delivery.sender.is_(None), Delivery.sender != token))))
