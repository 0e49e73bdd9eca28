"""Review decisions: a person accepts or rejects a case the gate sent to ``review``.

``decide_review`` is the one place the rule lives; `qcgate review accept|reject` and the web console
(and its API) all call it. It checks the user (enabled, role reviewer or admin), the case (its series
verdict is ``review``, or it has held outputs, and nobody decided it yet) and the reason (mandatory),
then writes the ``review_decisions`` row and the ``actions`` row in the caller's transaction.

Held outputs: "routing by verdict" (not built yet) will keep a case's deliveries in the state
``held`` until a person decides. ``release_or_discard_held_outputs`` is the hook for it: it moves
those rows to ``pending`` (accept: the outbox sends them) or ``discarded`` (reject). Today no
delivery is ever ``held``, so it changes nothing and says so (0 rows).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from qcgate.errors import QcgateError
from qcgate.store.actions import record_action
from qcgate.store.models import Case, Delivery, Output, ReviewDecision, User, UserRole, utcnow

DECISIONS = ("accept", "reject")
HELD = "held"  # a delivery kept back until a person decides (routing by verdict)
DISCARDED = "discarded"  # a held delivery the reviewer rejected: never sent
MAX_REASON = 2000


class ActionRefused(QcgateError):
    """A person's action that the rules refuse; ``status`` is the HTTP status the console answers."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ReviewOutcome:
    case_id: int
    decision: str
    user: str
    reason: str
    decided_at: str
    held_released: int  # held deliveries now pending (accept)
    held_discarded: int  # held deliveries now discarded (reject)


def held_deliveries(session: Session, case_id: int) -> int:
    """How many of the case's deliveries are held (waiting for a review decision)."""
    return int(session.scalar(
        select(func.count(Delivery.id)).join(Output, Output.id == Delivery.output_id)
        .where(Output.case_id == case_id, Delivery.state == HELD)
    ) or 0)


def release_or_discard_held_outputs(session: Session, case_id: int, decision: str) -> int:
    """The routing-by-verdict hook: the case's ``held`` deliveries become ``pending`` (accept) or
    ``discarded`` (reject). Returns how many rows moved (0 today: nothing holds deliveries yet)."""
    target = "pending" if decision == "accept" else DISCARDED
    values: dict[str, object] = {"state": target}
    if target == "pending":
        now = utcnow()
        values.update(next_attempt_at=now, queued_at=now)
    result = session.execute(
        update(Delivery)
        .where(Delivery.state == HELD, Delivery.output_id.in_(select(Output.id).where(Output.case_id == case_id)))
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount or 0)


def check_reviewer(session: Session, user: str) -> User:
    """The enabled user ``user`` with the role reviewer or admin."""
    row = session.scalar(select(User).where(User.name == user))
    if row is None:
        raise ActionRefused(f"no user {user!r}", 403)
    if row.disabled:
        raise ActionRefused(f"user {user!r} is disabled", 403)
    if row.role not in (UserRole.REVIEWER.value, UserRole.ADMIN.value):
        raise ActionRefused(f"user {user!r} is a {row.role}: deciding reviews needs the role reviewer or admin", 403)
    return row


def decide_review(session: Session, case_id: int, decision: str, user: str, reason: str) -> ReviewOutcome:
    """Record ``user``'s ``decision`` (accept | reject) on case ``case_id`` because of ``reason``.

    Raises ActionRefused (with the HTTP status: 400 bad input, 403 not a reviewer, 404 no such case,
    409 not in review or already decided). Does not commit.
    """
    if decision not in DECISIONS:
        raise ActionRefused(f"decision {decision!r} is not one of {', '.join(DECISIONS)}", 400)
    reason = (reason or "").strip()
    if not reason:
        raise ActionRefused("a review decision needs a reason", 400)
    if len(reason) > MAX_REASON:
        raise ActionRefused(f"the reason is longer than {MAX_REASON} characters", 400)
    check_reviewer(session, user)
    case = session.get(Case, case_id, with_for_update=True)
    if case is None:
        raise ActionRefused(f"no case with id {case_id}", 404)
    held = held_deliveries(session, case_id)
    if case.series_verdict != "review" and not held:
        raise ActionRefused(f"case {case_id} is not waiting for a review (series verdict {case.series_verdict or 'none'}, "
                            "no held outputs)")
    earlier = session.scalar(select(ReviewDecision).where(ReviewDecision.case_id == case_id))
    if earlier is not None:
        raise ActionRefused(f"case {case_id} was already decided: {earlier.decision} by {earlier.user_name}")
    now = utcnow()
    session.add(ReviewDecision(case_id=case_id, decision=decision, user_name=user, reason=reason, decided_at=now))
    moved = release_or_discard_held_outputs(session, case_id, decision)
    record_action(session, user=user, action=f"review.{decision}", object_type="case", object_id=case_id, reason=reason,
                  details={"series_verdict": case.series_verdict, "ct_series_uid": case.ct_series_uid,
                           "held_released" if decision == "accept" else "held_discarded": moved})
    session.flush()
    return ReviewOutcome(case_id=case_id, decision=decision, user=user, reason=reason,
                         decided_at=now.isoformat(timespec="seconds"),
                         held_released=moved if decision == "accept" else 0,
                         held_discarded=moved if decision == "reject" else 0)


def decision_for(session: Session, case_id: int) -> dict[str, object] | None:
    row = session.scalar(select(ReviewDecision).where(ReviewDecision.case_id == case_id))
    if row is None:
        return None
    decided = row.decided_at if row.decided_at.tzinfo else row.decided_at.replace(tzinfo=dt.timezone.utc)  # SQLite: naive UTC
    return {"decision": row.decision, "user": row.user_name, "reason": row.reason,
            "decided_at": decided.isoformat(timespec="seconds")}
