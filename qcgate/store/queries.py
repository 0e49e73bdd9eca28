"""Read-only queries behind `qcgate audit`.

Filters (``AuditFilters``) are shared by cases and slices: verdict, date range, calling AE, the AI
algorithm and vendor of a case's SEGs, and the threshold model's version. Vendor, algorithm and
calling AE are tested with EXISTS on the case's instances, so a case with two vendors' SEGs is found
under both. The indexes of migration 0003 keep these fast on a million slice rows
(bench/bench_audit.py).
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import ColumnElement, and_, exists, func, select
from sqlalchemy.orm import Session

from qcgate.core.dicom import SEGMENTATION_STORAGE
from qcgate.store.models import (
    Action,
    AssociationRecord,
    Case,
    Delivery,
    DeliveryAttempt,
    Instance,
    Job,
    Output,
    SliceResultRecord,
)

_IN_CHUNK = 500  # ids per IN (...) list: well below SQLite's bound-parameter limit


@dataclass(frozen=True)
class AuditFilters:
    """What `qcgate audit cases|slices` can filter on; None means "any".

    ``since``/``until`` bound the case's creation time (first instance received) for cases, and
    the slice result's creation time (when it was judged) for slices; ``until`` is exclusive.
    """

    state: str | None = None
    verdict: str | None = None
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    calling_ae: str | None = None
    vendor: str | None = None
    algorithm: str | None = None
    model_version: str | None = None
    series_uid: str | None = None
    limit: int | None = None
    # Paging (the web console): skip this many rows; newest cases first instead of oldest.
    offset: int | None = None
    newest_first: bool = False


def _apply_verdict_and_time(query: Any, filters: "AuditFilters", verdict_column: Any, time_column: Any) -> Any:
    """Narrow ``query`` by the filters' verdict, [since, until) time range and row limit."""
    if filters.verdict:
        query = query.where(verdict_column == filters.verdict)
    if filters.since:
        query = query.where(time_column >= filters.since)
    if filters.until:
        query = query.where(time_column < filters.until)
    if filters.limit:
        query = query.limit(filters.limit)
    return query


def _iso(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:  # SQLite returns naive UTC
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.isoformat(timespec="seconds")


def _case_conditions(filters: AuditFilters) -> list[ColumnElement[bool]]:
    """Conditions on ``Case`` shared by cases and slices (all but verdict and dates)."""
    conditions: list[ColumnElement[bool]] = []
    if filters.state:
        conditions.append(Case.state == filters.state)
    if filters.series_uid:
        conditions.append(Case.ct_series_uid == filters.series_uid)
    if filters.model_version:
        conditions.append(Case.model_version == filters.model_version)
    # EXISTS (not JOIN): a case with many matching instances is still one row.
    if filters.vendor:
        conditions.append(exists().where(Instance.case_id == Case.id, Instance.manufacturer == filters.vendor))
    if filters.algorithm:
        conditions.append(exists().where(Instance.case_id == Case.id, Instance.algorithm_name == filters.algorithm))
    if filters.calling_ae:
        calling = select(AssociationRecord.id).where(AssociationRecord.calling_ae == filters.calling_ae)
        conditions.append(exists().where(Instance.case_id == Case.id, Instance.association_id.in_(calling)))
    return conditions


def _chunks(ids: list[int]) -> list[list[int]]:
    return [ids[i:i + _IN_CHUNK] for i in range(0, len(ids), _IN_CHUNK)]


def _seg_sources(session: Session, case_ids: list[int]) -> dict[int, dict[str, list[str]]]:
    """Per case: the vendors, algorithms (with version) of its SEGs, and the calling AEs that sent it."""
    seg = str(SEGMENTATION_STORAGE)
    found: dict[int, dict[str, set[str]]] = {cid: {"vendors": set(), "algorithms": set(), "calling_aes": set()} for cid in case_ids}
    for chunk in _chunks(case_ids):
        for case_id, vendor, algorithm, version in session.execute(
            select(Instance.case_id, Instance.manufacturer, Instance.algorithm_name, Instance.algorithm_version)
            .where(Instance.case_id.in_(chunk), Instance.sop_class_uid == seg)
        ):
            if vendor:
                found[case_id]["vendors"].add(vendor)
            if algorithm:
                found[case_id]["algorithms"].add(f"{algorithm} {version}" if version else algorithm)
        for case_id, calling_ae in session.execute(
            select(Instance.case_id, AssociationRecord.calling_ae).distinct()
            .join(AssociationRecord, AssociationRecord.id == Instance.association_id)
            .where(Instance.case_id.in_(chunk))
        ):
            found[case_id]["calling_aes"].add(calling_ae)
    return {cid: {key: sorted(values) for key, values in parts.items()} for cid, parts in found.items()}


def list_cases(session: Session, state: str | None = None, limit: int | None = None, verdict: str | None = None,
               filters: AuditFilters | None = None) -> list[dict[str, Any]]:
    """One row per case: identity, state and reason, instance counts, its job's state, and the
    vendors, algorithms and calling AEs of its instances. ``filters`` narrows the cases; the
    older keyword arguments (``state``, ``limit``, ``verdict``) still work and fill in its gaps."""
    base = filters or AuditFilters()
    filters = AuditFilters(**{**base.__dict__, "state": base.state or state, "verdict": base.verdict or verdict,
                              "limit": base.limit or limit})
    seg = str(SEGMENTATION_STORAGE)
    # Correlated counts (ix_instances_case) instead of a join + GROUP BY over every instance.
    n_ct = (select(func.count(Instance.id)).where(Instance.case_id == Case.id, Instance.sop_class_uid != seg)
            .correlate(Case).scalar_subquery())
    n_seg = (select(func.count(Instance.id)).where(Instance.case_id == Case.id, Instance.sop_class_uid == seg)
             .correlate(Case).scalar_subquery())
    query = (
        select(Case, Job, n_ct.label("n_ct"), n_seg.label("n_seg"))
        .outerjoin(Job, and_(Job.case_id == Case.id, Job.kind == "qc"))
        .where(*_case_conditions(filters))
        .order_by(Case.id.desc() if filters.newest_first else Case.id)
    )
    query = _apply_verdict_and_time(query, filters, Case.series_verdict, Case.created_at)
    if filters.offset:
        query = query.offset(filters.offset)
    found = session.execute(query).all()
    sources = _seg_sources(session, [case.id for case, *_ in found])
    rows = []
    for case, job, count_ct, count_seg in found:
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
            "processed_at": _iso(case.processed_at),
            "vendors": ";".join(sources[case.id]["vendors"]),
            "algorithms": ";".join(sources[case.id]["algorithms"]),
            "calling_aes": ";".join(sources[case.id]["calling_aes"]),
        })
    return rows


def list_slices(session: Session, filters: AuditFilters) -> list[dict[str, Any]]:
    """Slice results with their case: tau, q and its source, both margins, verdict, why review was
    forced (``review_reason``), key features.

    ``filters.verdict`` is the slice verdict; dates bound the slice result's creation time; the
    other filters apply to the slice's case.
    """
    # Plain columns, not ORM entities: exports can be tens of thousands of rows.
    result = SliceResultRecord
    query = (
        select(result.case_id, Case.ct_series_uid, Case.series_verdict, result.slice_index, result.sop_instance_uid,
               result.tau, result.q, result.q_source, result.margin, result.margin_reject, result.verdict,
               result.review_reason, result.lesion_area_mm2, result.um_mean, result.um_p90, Case.model_name, Case.model_version, result.created_at, result.key_features)
        .join(Case, Case.id == result.case_id)
        .where(*_case_conditions(filters))
        .order_by(result.case_id, result.slice_index)
    )
    query = _apply_verdict_and_time(query, filters, result.verdict, result.created_at)
    rows = []
    for row in session.execute(query):
        rows.append({
            "case_id": row.case_id, "ct_series_uid": row.ct_series_uid, "series_verdict": row.series_verdict,
            "slice_index": row.slice_index, "sop_instance_uid": row.sop_instance_uid,
            "tau": row.tau, "q": row.q, "q_source": row.q_source, "margin": row.margin,
            "margin_reject": row.margin_reject, "verdict": row.verdict, "review_reason": row.review_reason,
            "lesion_area_mm2": row.lesion_area_mm2, "um_mean": row.um_mean, "um_p90": row.um_p90,
            "model": f"{row.model_name} {row.model_version}" if row.model_name else None,
            "created_at": _iso(row.created_at),
            "key_features": row.key_features or "{}",  # JSON text: one CSV cell
        })
    return rows


def vendor_summary(session: Session, filters: AuditFilters) -> list[dict[str, Any]]:
    """"How often does vendor X fail?": processed cases per SEG vendor and algorithm, by series verdict.

    A case counts once per (vendor, algorithm, version) among its SEGs. Dates bound the case's
    creation time; ``filters.verdict`` is ignored (every verdict is a column).
    """
    seg = str(SEGMENTATION_STORAGE)
    pairs = (
        select(Instance.manufacturer, Instance.algorithm_name, Instance.algorithm_version, Instance.case_id).distinct()
        .where(Instance.sop_class_uid == seg, Instance.case_id.is_not(None))
        .subquery()
    )
    conditions = [c for c in _case_conditions(AuditFilters(**{**filters.__dict__, "vendor": None, "algorithm": None}))]
    query = (
        select(pairs.c.manufacturer, pairs.c.algorithm_name, pairs.c.algorithm_version, Case.series_verdict, Case.state,
               func.count())
        .join(Case, Case.id == pairs.c.case_id)
        .where(*conditions)
        .group_by(pairs.c.manufacturer, pairs.c.algorithm_name, pairs.c.algorithm_version, Case.series_verdict, Case.state)
    )
    if filters.vendor:
        query = query.where(pairs.c.manufacturer == filters.vendor)
    if filters.algorithm:
        query = query.where(pairs.c.algorithm_name == filters.algorithm)
    if filters.since:
        query = query.where(Case.created_at >= filters.since)
    if filters.until:
        query = query.where(Case.created_at < filters.until)
    table: dict[tuple[str, str, str], dict[str, Any]] = {}
    for vendor, algorithm, version, verdict, state, count in session.execute(query):
        key = (vendor or "", algorithm or "", version or "")
        row = table.setdefault(key, {"vendor": key[0], "algorithm": key[1], "algorithm_version": key[2], "cases": 0,
                                     "accept": 0, "review": 0, "reject": 0, "failed": 0, "not_processed": 0})
        row["cases"] += count
        if verdict in ("accept", "review", "reject"):
            row[verdict] += count
        elif state == "failed":
            row["failed"] += count
        else:
            row["not_processed"] += count
    rows = sorted(table.values(), key=lambda r: (r["vendor"], r["algorithm"], r["algorithm_version"]))
    for row in rows:
        judged = row["accept"] + row["review"] + row["reject"]
        row["reject_rate"] = round(row["reject"] / judged, 4) if judged else None
    return rows


def slice_locations(session: Session, case_id: int, spool_root: Path | None) -> dict[str, tuple[int | None, float | None]]:
    """{SOP Instance UID: (InstanceNumber, z mm)} of a case's CT images, read from the spooled headers
    (two tags each, no pixels); empty without a spool root, None values where a file is gone (retention).

    The slice numbering of every output is the CT InstanceNumber with its z position; slice_results
    keeps the SOP Instance UID, and the spooled header is the source of truth for the rest."""
    if spool_root is None:
        return {}
    import pydicom

    found: dict[str, tuple[int | None, float | None]] = {}
    rows = session.execute(select(Instance.sop_instance_uid, Instance.spool_path).where(
        Instance.case_id == case_id, Instance.sop_class_uid != str(SEGMENTATION_STORAGE))).all()
    for uid, path in rows:
        number: int | None = None
        z: float | None = None
        try:
            ds = pydicom.dcmread(Path(spool_root) / path, stop_before_pixels=True,
                                 specific_tags=["InstanceNumber", "ImagePositionPatient"])
            number = int(ds.InstanceNumber) if ds.get("InstanceNumber") not in (None, "") else None
            position = ds.get("ImagePositionPatient")
            z = float(position[2]) if position is not None and len(position) == 3 else None
        except (OSError, ValueError, TypeError, pydicom.errors.InvalidDicomError):
            pass
        found[str(uid)] = (number, z)
    return found


def case_detail(session: Session, case_id: int, spool_root: Path | None = None) -> dict[str, Any] | None:
    """One case slice by slice: tau, q and its source, the margins (``margin`` = m_accept,
    ``margin_reject`` = m_reject; NULL before migration 0009), verdict, why review was forced
    (``review_reason``) and key features; outputs and deliveries.

    ``spool_root``: the spool (DataLayout.spool); each slice then has ``instance_number`` and ``z_mm``
    of its CT image (the numbering of the SR, the report, the SC and the PDF)."""
    case = session.get(Case, case_id)
    if case is None:
        return None
    job = session.scalar(select(Job).where(Job.case_id == case_id, Job.kind == "qc"))
    slices = session.scalars(select(SliceResultRecord).where(SliceResultRecord.case_id == case_id).order_by(SliceResultRecord.slice_index)).all()
    outputs = session.scalars(select(Output).where(Output.case_id == case_id).order_by(Output.id)).all()
    deliveries = list_deliveries(session, case_id=case_id)
    locations = slice_locations(session, case_id, spool_root) if slices else {}
    return {
        "case_id": case.id, "state": case.state, "reason": case.reason, "series_verdict": case.series_verdict,
        "study_instance_uid": case.study_instance_uid, "ct_series_uid": case.ct_series_uid,
        "model": f"{case.model_name} {case.model_version}" if case.model_name else None,
        "q_source": case.q_source, "n_members": case.n_members, "uses_uncertainty": case.uses_uncertainty,
        "notes": case.notes, "processed_at": _iso(case.processed_at),
        "job": None if job is None else {"id": job.id, "state": job.state, "attempts": job.attempts, "error": job.error,
                                          "timings": json.loads(job.timings) if job.timings else None},
        "slices": [{"instance_number": locations.get(s.sop_instance_uid, (None, None))[0],
                    "z_mm": locations.get(s.sop_instance_uid, (None, None))[1],
                    "slice_index": s.slice_index, "sop_instance_uid": s.sop_instance_uid, "tau": s.tau, "q": s.q,
                    "q_source": s.q_source, "margin": s.margin, "margin_reject": s.margin_reject, "verdict": s.verdict,
                    "review_reason": s.review_reason, "lesion_area_mm2": s.lesion_area_mm2,
                    "um_mean": s.um_mean, "key_features": json.loads(s.key_features) if s.key_features else {}} for s in slices],
        "outputs": [{"kind": o.kind, "sop_instance_uid": o.sop_instance_uid, "path": o.path} for o in outputs],
        "deliveries": deliveries,
    }


def list_deliveries(session: Session, state: str | None = None, case_id: int | None = None, *,
                    series_uid: str | None = None, kind: str | None = None, sop_instance_uid: str | None = None,
                    destination: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """Outbox rows with their output, state, attempts, last error and (pending) next attempt time.

    "Was the SR delivered?": ``series_uid`` (the CT series) or ``sop_instance_uid`` (the SR's own
    UID) with ``kind="sr"``. "What is waiting and why?": ``state="pending"``; ``queued_at`` is when
    it joined the queue (the dead-letter age counts from there).
    """
    n_attempts = (select(func.count(DeliveryAttempt.id)).where(DeliveryAttempt.delivery_id == Delivery.id)
                  .correlate(Delivery).scalar_subquery())
    query = (select(Delivery, Output, Case.ct_series_uid, n_attempts.label("n_attempts"))
             .join(Output, Output.id == Delivery.output_id)
             .join(Case, Case.id == Output.case_id)
             .order_by(Delivery.id))
    if state:
        query = query.where(Delivery.state == state)
    if case_id is not None:
        query = query.where(Output.case_id == case_id)
    if series_uid:
        query = query.where(Case.ct_series_uid == series_uid)
    if kind:
        query = query.where(Output.kind == kind)
    if sop_instance_uid:
        query = query.where(Output.sop_instance_uid == sop_instance_uid)
    if destination:
        query = query.where(Delivery.destination == destination)
    if limit:
        query = query.limit(limit)
    rows = []
    for delivery, output, ct_series_uid, attempts in session.execute(query):
        pending = delivery.state == "pending"
        rows.append({"delivery_id": delivery.id, "case_id": output.case_id, "kind": output.kind,
                     "destination": delivery.destination, "state": delivery.state, "attempts": int(attempts or 0),
                     "sender": delivery.sender,  # sent: the node that sent it; pending: the node sending it now
                     "next_attempt_at": _iso(delivery.next_attempt_at) if pending else None,
                     "last_error": delivery.last_error, "queued_at": _iso(delivery.queued_at),
                     "delivered_at": _iso(delivery.delivered_at),
                     "ct_series_uid": ct_series_uid, "sop_instance_uid": output.sop_instance_uid})
    return rows


def list_actions(session: Session, *, user: str | None = None, action: str | None = None,
                 object_type: str | None = None, object_id: str | None = None,
                 since: dt.datetime | None = None, until: dt.datetime | None = None,
                 limit: int | None = None) -> list[dict[str, Any]]:
    """People's actions (``actions`` rows), oldest first: who did what to which object, and why."""
    query = select(Action).order_by(Action.at, Action.id)
    if user:
        query = query.where(Action.user == user)
    if action:
        query = query.where(Action.action == action)
    if object_type:
        query = query.where(Action.object_type == object_type)
    if object_id is not None:
        query = query.where(Action.object_id == str(object_id))
    if since:
        query = query.where(Action.at >= since)
    if until:
        query = query.where(Action.at < until)
    if limit:
        query = query.limit(limit)
    return [{"action_id": a.id, "at": _iso(a.at), "user": a.user, "action": a.action, "object_type": a.object_type,
             "object_id": a.object_id, "reason": a.reason, "details": json.loads(a.details) if a.details else None}
            for a in session.scalars(query)]


def case_id_for_series(session: Session, series_uid: str) -> int | None:
    """The case of a CT series (unique), for `qcgate audit case --series UID`."""
    return session.scalar(select(Case.id).where(Case.ct_series_uid == series_uid))
