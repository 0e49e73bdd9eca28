"""Held deliveries: what a reviewer's decision does to the outputs kept back for it.

Routing by verdict (``qcgate.delivery.routing``) keeps a case's deliveries ``held`` while its series
verdict is review or reject; a reviewer's decision (``qcgate.store.review.decide_review``, called by
`qcgate review` and the web console) releases them (``pending``: the outbox sends each once) or
discards them (never sent). Each is an ``actions`` row in the caller's transaction.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from qcgate.store.actions import record_action
from qcgate.store.models import Delivery, DeliveryState, Output, utcnow

HOLD, RELEASE, DISCARD = "delivery.hold", "delivery.release", "delivery.discard"
SYSTEM_USER = "qcgate"  # the user of the gate's own actions (holds)


def _held_rows(session: Session, case_id: int) -> list[Delivery]:
    return list(session.scalars(select(Delivery).join(Output, Output.id == Delivery.output_id)
                                .where(Output.case_id == case_id, Delivery.state == DeliveryState.HELD.value)
                                .order_by(Delivery.id).with_for_update()))


def _check(user: str, reason: str) -> None:
    if not user or not user.strip():
        raise ValueError("a review decision needs the user who made it")
    if not reason or not reason.strip():
        raise ValueError("a review decision needs a reason")


def release_held(session: Session, case_id: int, *, user: str, reason: str) -> int:
    """The reviewer accepted case ``case_id``: its held deliveries become pending (sent by the outbox,
    each once). Returns how many; one ``actions`` row (``delivery.release``), in the caller's
    transaction. If the case is not routed yet, the decision is applied when it is."""
    _check(user, reason)
    rows = _held_rows(session, case_id)
    now = utcnow()
    for row in rows:
        row.state = DeliveryState.PENDING.value
        row.next_attempt_at = now
        row.queued_at = now  # the dead-letter clock starts at the release
    record_action(session, user=user, action=RELEASE, object_type="case", object_id=case_id, reason=reason,
                  details={"delivery_ids": [r.id for r in rows], "destinations": sorted({r.destination for r in rows})})
    return len(rows)


def discard_held(session: Session, case_id: int, *, user: str, reason: str) -> int:
    """The reviewer rejected case ``case_id``: its held deliveries are ``discarded`` (never sent).
    Returns how many; one ``actions`` row (``delivery.discard``), in the caller's transaction."""
    _check(user, reason)
    rows = _held_rows(session, case_id)
    for row in rows:
        row.state = DeliveryState.DISCARDED.value
        row.last_error = f"discarded: the reviewer rejected the case ({reason.strip()[:200]})"
    record_action(session, user=user, action=DISCARD, object_type="case", object_id=case_id, reason=reason,
                  details={"delivery_ids": [r.id for r in rows], "destinations": sorted({r.destination for r in rows})})
    return len(rows)
