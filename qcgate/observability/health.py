"""Health facts read from the audit database: are jobs failing, are deliveries dying?

These are not liveness: a restart fixes neither a broken model nor a refusing PACS, so the systemd
watchdog ignores them, while ``/healthz`` reports them (HTTP 503) for monitoring to alert on.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from qcgate.store.models import Delivery, DeliveryAttempt, DeliveryState, Job, JobState, utcnow


@dataclass(frozen=True)
class JobHealth:
    """The latest finished jobs: how many there were and how many of them failed."""

    latest: int
    failed: int

    def healthy(self, failed_jobs_unhealthy: int) -> bool:
        """False when the latest ``failed_jobs_unhealthy`` finished jobs all failed."""
        return not (self.latest >= failed_jobs_unhealthy and self.failed == self.latest)


def latest_job_health(session: Session, window: int) -> JobHealth:
    """States of the ``window`` most recently finished jobs (done or failed)."""
    states = session.scalars(
        select(Job.state)
        .where(Job.state.in_((JobState.DONE.value, JobState.FAILED.value)), Job.finished_at.is_not(None))
        .order_by(Job.finished_at.desc(), Job.id.desc())
        .limit(window)
    ).all()
    return JobHealth(latest=len(states), failed=sum(state == JobState.FAILED.value for state in states))


def recent_dead_letters(session: Session, window_hours: float, now: dt.datetime | None = None) -> int:
    """Deliveries in the dead state whose last attempt lies within the last ``window_hours``."""
    since = (now or utcnow()) - dt.timedelta(hours=window_hours)
    return int(session.scalar(
        select(func.count(func.distinct(Delivery.id)))
        .join(DeliveryAttempt, DeliveryAttempt.delivery_id == Delivery.id)
        .where(Delivery.state == DeliveryState.DEAD.value, DeliveryAttempt.attempted_at >= since)
    ) or 0)
