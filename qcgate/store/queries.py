"""Read-only queries behind `qcgate audit`."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from qcgate.node.dicom_header import SEGMENTATION_STORAGE
from qcgate.store.models import Case, Instance, Job


def _iso(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:  # SQLite returns naive UTC
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.isoformat(timespec="seconds")


def list_cases(session: Session, state: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """One row per case: identity, state and reason, instance counts, and its job's state."""
    seg = str(SEGMENTATION_STORAGE)
    n_ct = func.count(Instance.id).filter(Instance.sop_class_uid != seg)
    n_seg = func.count(Instance.id).filter(Instance.sop_class_uid == seg)
    query = (
        select(Case, n_ct.label("n_ct"), n_seg.label("n_seg"))
        .outerjoin(Instance, Instance.case_id == Case.id)
        .group_by(Case.id)
        .order_by(Case.id)
    )
    if state:
        query = query.where(Case.state == state)
    if limit:
        query = query.limit(limit)
    jobs = {job.case_id: job for job in session.scalars(select(Job).where(Job.kind == "qc"))}
    rows = []
    for case, count_ct, count_seg in session.execute(query):
        job = jobs.get(case.id)
        rows.append({
            "case_id": case.id,
            "state": case.state,
            "study_instance_uid": case.study_instance_uid,
            "ct_series_uid": case.ct_series_uid,
            "ct_instances": int(count_ct),
            "seg_instances": int(count_seg),
            "created_at": _iso(case.created_at),
            "last_instance_at": _iso(case.last_instance_at),
            "ready_at": _iso(case.ready_at),
            "reason": case.reason,
            "job_id": job.id if job else None,
            "job_state": job.state if job else None,
        })
    return rows
