"""Re-queue dead letters by hand (`qcgate deliveries retry`), each one audited in ``actions``."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session

from qcgate.store.actions import record_action
from qcgate.store.models import Delivery, DeliveryState, utcnow

ACTION = "delivery.retry"


class RequeueError(ValueError):
    """The selection names a delivery that is not a dead letter, or no selection was given."""


@dataclass
class RequeueResult:
    requeued: list[int] = field(default_factory=list)


def requeue_dead_letters(session: Session, *, user: str, reason: str, destination: str | None = None,
                         delivery_id: int | None = None, all_dead: bool = False) -> RequeueResult:
    """Put dead letters back in the outbox: state pending, next attempt now, attempts kept, and a
    fresh dead-letter clock (``queued_at`` = now). One ``actions`` row per delivery, in the
    caller's transaction.

    Selection: ``delivery_id`` (that one, which must be dead), or ``all_dead`` (every dead letter),
    either narrowed by ``destination`` (``AE@host:port``).
    """
    if delivery_id is None and not all_dead:
        raise RequeueError("say which dead letters: --dead (all of them, or with --destination) or --id N")
    if not reason or not reason.strip():
        raise RequeueError("a re-queue needs a --reason")
    query = select(Delivery).where(Delivery.state == DeliveryState.DEAD.value).order_by(Delivery.id)
    if delivery_id is not None:
        row = session.get(Delivery, delivery_id)
        if row is None:
            raise RequeueError(f"no delivery with id {delivery_id}")
        if row.state != DeliveryState.DEAD.value:
            raise RequeueError(f"delivery {delivery_id} is {row.state}, not a dead letter")
        query = query.where(Delivery.id == delivery_id)
    if destination:
        query = query.where(Delivery.destination == destination)
    result = RequeueResult()
    now = utcnow()
    for delivery in session.scalars(query.with_for_update()):
        record_action(session, user=user, action=ACTION, object_type="delivery", object_id=delivery.id, reason=reason,
                      details={"destination": delivery.destination, "output_id": delivery.output_id,
                               "attempts": delivery.attempts, "last_error": delivery.last_error, "previous_state": delivery.state})
        delivery.state = DeliveryState.PENDING.value
        delivery.next_attempt_at = now
        delivery.queued_at = now
        result.requeued.append(delivery.id)
    return result
