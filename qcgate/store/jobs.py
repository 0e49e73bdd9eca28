"""Re-queue a failed QC job by hand (the console's jobs page, `POST /api/jobs/{id}/requeue`), audited.

The job goes back to ``pending`` with its attempt count **reset to 0** (the dispatcher counts the new
run as attempt 1, and ``pipeline.max_job_attempts`` applies afresh); its error, times and worker are
cleared; the case goes back to ``ready`` with its failure reason cleared. The earlier error and
attempt count are kept in the ``actions`` row, which is written in the same transaction.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from qcgate.store.actions import record_action
from qcgate.store.models import Case, CaseState, Job, JobState
from qcgate.store.review import ActionRefused

ACTION = "job.requeue"


def requeue_failed_job(session: Session, job_id: int, *, user: str, reason: str | None = None) -> Job:
    """Put the failed job ``job_id`` back in the queue (see the module docstring). Does not commit."""
    job = session.get(Job, job_id, with_for_update=True)
    if job is None:
        raise ActionRefused(f"no job with id {job_id}", 404)
    if job.state != JobState.FAILED.value:
        raise ActionRefused(f"job {job_id} is {job.state}: only failed jobs can be re-queued")
    case = session.get(Case, job.case_id, with_for_update=True)
    assert case is not None
    record_action(session, user=user, action=ACTION, object_type="job", object_id=job.id, reason=(reason or "").strip() or None,
                  details={"case_id": job.case_id, "previous_attempts": job.attempts, "previous_error": job.error,
                           "previous_case_state": case.state, "attempts_now": 0})
    job.state = JobState.PENDING.value
    job.attempts = 0
    job.error = None
    job.started_at = job.finished_at = None
    job.worker = None
    case.state = CaseState.READY.value
    case.reason = None
    session.flush()
    return job
