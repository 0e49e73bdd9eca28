"""Wake-ups for dispatchers: on PostgreSQL a NOTIFY on one channel whenever a job becomes pending.

Sent inside the transaction that makes the job pending, so listeners hear it once it is committed
(PostgreSQL delivers notifications at commit, and drops them on rollback). Elsewhere a no-op: the
dispatchers' poll finds the job.
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.orm import Session

JOBS_CHANNEL = "qcgate_jobs"


def notify_job_pending(session: Session) -> None:
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text(f"NOTIFY {JOBS_CHANNEL}"))
