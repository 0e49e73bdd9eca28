"""Read-only queries behind `qcgate audit`."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from qcgate.node.dicom_header import SEGMENTATION_STORAGE
from qcgate.store.models import Case, Delivery, DeliveryAttempt, Instance, Job, Output, SliceResultRecord


def _iso(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:  # SQLite returns naive UTC
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.isoformat(timespec="seconds")


def list_cases(session: Session, state: str | None = None, limit: int | None = None, verdict: str | None = None) -> list[dict[str, Any]]:
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
    if verdict:
        query = query.where(Case.series_verdict == verdict)
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
            "series_verdict": case.series_verdict,
            "model": f"{case.model_name} {case.model_version}" if case.model_name else None,
            "job_id": job.id if job else None,
            "job_state": job.state if job else None,
        })
    return rows


def case_detail(session: Session, case_id: int) -> dict[str, Any] | None:
    """One case slice by slice: tau, q, margin, verdict and key features; outputs and deliveries."""
    case = session.get(Case, case_id)
    if case is None:
        return None
    job = session.scalar(select(Job).where(Job.case_id == case_id, Job.kind == "qc"))
    slices = session.scalars(select(SliceResultRecord).where(SliceResultRecord.case_id == case_id).order_by(SliceResultRecord.slice_index)).all()
    outputs = session.scalars(select(Output).where(Output.case_id == case_id).order_by(Output.id)).all()
    deliveries = list_deliveries(session, case_id=case_id)
    return {
        "case_id": case.id, "state": case.state, "reason": case.reason, "series_verdict": case.series_verdict,
        "study_instance_uid": case.study_instance_uid, "ct_series_uid": case.ct_series_uid,
        "model": f"{case.model_name} {case.model_version}" if case.model_name else None,
        "q_source": case.q_source, "n_members": case.n_members, "uses_uncertainty": case.uses_uncertainty,
        "notes": case.notes, "processed_at": _iso(case.processed_at),
        "job": None if job is None else {"id": job.id, "state": job.state, "attempts": job.attempts, "error": job.error,
                                          "timings": json.loads(job.timings) if job.timings else None},
        "slices": [{"slice_index": s.slice_index, "sop_instance_uid": s.sop_instance_uid, "tau": s.tau, "q": s.q,
                    "margin": s.margin, "verdict": s.verdict, "lesion_area_mm2": s.lesion_area_mm2,
                    "um_mean": s.um_mean, "key_features": json.loads(s.key_features) if s.key_features else {}} for s in slices],
        "outputs": [{"kind": o.kind, "sop_instance_uid": o.sop_instance_uid, "path": o.path} for o in outputs],
        "deliveries": deliveries,
    }


def list_deliveries(session: Session, state: str | None = None, case_id: int | None = None) -> list[dict[str, Any]]:
    """Outbox rows with their output, state, attempts and last error."""
    query = select(Delivery, Output).join(Output, Output.id == Delivery.output_id).order_by(Delivery.id)
    if state:
        query = query.where(Delivery.state == state)
    if case_id is not None:
        query = query.where(Output.case_id == case_id)
    rows = []
    for delivery, output in session.execute(query):
        n_attempts = session.scalar(select(func.count()).select_from(DeliveryAttempt).where(DeliveryAttempt.delivery_id == delivery.id))
        rows.append({"delivery_id": delivery.id, "case_id": output.case_id, "kind": output.kind,
                     "destination": delivery.destination, "state": delivery.state, "attempts": int(n_attempts or 0),
                     "last_error": delivery.last_error, "delivered_at": _iso(delivery.delivered_at)})
    return rows
