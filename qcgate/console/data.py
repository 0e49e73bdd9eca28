"""What the console's pages read, beyond ``qcgate.store.queries`` (which the case list and case page
reuse): the dashboard's counts, the review queue, dead letters, failed jobs, a case's trail, the
InstanceNumber of judged slices, and the weekly trends."""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any

from sqlalchemy import and_, exists, func, or_, select, tuple_
from sqlalchemy.orm import Session

from qcgate.core.dicom import SEGMENTATION_STORAGE
from qcgate.store.models import (
    Action,
    Case,
    Delivery,
    DeliveryAttempt,
    Instance,
    Job,
    Output,
    ReviewDecision,
    SliceResultRecord,
)
from qcgate.store.review import HELD

LOG = logging.getLogger("qcgate.console")


def iso(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:  # SQLite returns naive UTC
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.isoformat(timespec="seconds")


def counts_by_state(session: Session, column: Any) -> dict[str, int]:
    return {state: int(n) for state, n in session.execute(select(column, func.count()).group_by(column))}


def _awaiting_review() -> Any:
    """Cases waiting for a person: series verdict review, or a held delivery; and not yet decided."""
    held = exists().where(Output.case_id == Case.id, Delivery.output_id == Output.id, Delivery.state == HELD)
    decided = exists().where(ReviewDecision.case_id == Case.id)
    return and_(or_(Case.series_verdict == "review", held), ~decided)


def dashboard(session: Session) -> dict[str, Any]:
    jobs = counts_by_state(session, Job.state)
    recent = session.execute(
        select(Case.id, Case.ct_series_uid, Case.processed_at, Case.model_version)
        .where(Case.series_verdict == "reject").order_by(Case.id.desc()).limit(10)
    ).all()
    return {
        "cases": counts_by_state(session, Case.state),
        "jobs": jobs,
        "queue_depth": jobs.get("pending", 0) + jobs.get("running", 0),
        "deliveries": counts_by_state(session, Delivery.state),
        "awaiting_review": int(session.scalar(select(func.count(Case.id)).where(_awaiting_review())) or 0),
        "recent_rejects": [{"case_id": r.id, "ct_series_uid": r.ct_series_uid, "processed_at": iso(r.processed_at),
                            "model_version": r.model_version} for r in recent],
    }


def review_queue(session: Session, offset: int, limit: int) -> list[dict[str, Any]]:
    held = (select(func.count(Delivery.id)).join(Output, Output.id == Delivery.output_id)
            .where(Output.case_id == Case.id, Delivery.state == HELD).correlate(Case).scalar_subquery())
    n_slices = (select(func.count(SliceResultRecord.id)).where(SliceResultRecord.case_id == Case.id)
                .correlate(Case).scalar_subquery())
    rows = session.execute(
        select(Case.id, Case.ct_series_uid, Case.series_verdict, Case.processed_at, Case.model_name, Case.model_version,
               Case.notes, held.label("held"), n_slices.label("slices"))
        .where(_awaiting_review()).order_by(Case.id.desc()).offset(offset).limit(limit)
    ).all()
    return [{"case_id": r.id, "ct_series_uid": r.ct_series_uid, "series_verdict": r.series_verdict,
             "processed_at": iso(r.processed_at), "model": f"{r.model_name} {r.model_version}" if r.model_name else None,
             "notes": r.notes, "held": int(r.held or 0), "slices": int(r.slices or 0)} for r in rows]


def recent_decisions(session: Session, limit: int = 10) -> list[dict[str, Any]]:
    rows = session.scalars(select(ReviewDecision).order_by(ReviewDecision.decided_at.desc(), ReviewDecision.id.desc()).limit(limit))
    return [{"case_id": r.case_id, "decision": r.decision, "user": r.user_name, "reason": r.reason,
             "decided_at": iso(r.decided_at)} for r in rows]


def deliveries_in_state(session: Session, state: str, offset: int, limit: int) -> list[dict[str, Any]]:
    last_attempt = (select(func.max(DeliveryAttempt.attempted_at)).where(DeliveryAttempt.delivery_id == Delivery.id)
                    .correlate(Delivery).scalar_subquery())
    rows = session.execute(
        select(Delivery, Output.case_id, Output.kind, last_attempt.label("last_attempt"))
        .join(Output, Output.id == Delivery.output_id)
        .where(Delivery.state == state).order_by(Delivery.id.desc()).offset(offset).limit(limit)
    ).all()
    return [{"delivery_id": d.id, "case_id": case_id, "kind": kind, "destination": d.destination, "state": d.state,
             "attempts": d.attempts, "last_error": d.last_error, "last_attempt_at": iso(last),
             "next_attempt_at": iso(d.next_attempt_at)} for d, case_id, kind, last in rows]


def failed_jobs(session: Session, offset: int, limit: int) -> list[dict[str, Any]]:
    rows = session.execute(
        select(Job, Case.ct_series_uid).join(Case, Case.id == Job.case_id)
        .where(Job.state == "failed").order_by(Job.finished_at.desc(), Job.id.desc()).offset(offset).limit(limit)
    ).all()
    return [{"job_id": j.id, "case_id": j.case_id, "ct_series_uid": series, "attempts": j.attempts, "error": j.error,
             "finished_at": iso(j.finished_at)} for j, series in rows]


def case_trail(session: Session, case_id: int) -> list[dict[str, Any]]:
    """What happened to a case, oldest first: the gate's own steps and people's actions on the case,
    its job and its deliveries."""
    case = session.get(Case, case_id)
    if case is None:
        return []
    events: list[dict[str, Any]] = []

    def add(at: dt.datetime | None, who: str, what: str, detail: str | None = None, reason: str | None = None) -> None:
        if at is not None:
            events.append({"at": iso(at), "who": who, "what": what, "detail": detail, "reason": reason})

    add(case.created_at, "gate", "first instance received")
    add(case.ready_at, "gate", "case ready: job queued")
    jobs = session.scalars(select(Job).where(Job.case_id == case_id)).all()
    for job in jobs:
        add(job.started_at, "gate", f"job {job.id} started (attempt {job.attempts})")
        if job.finished_at is not None:
            add(job.finished_at, "gate", f"job {job.id} {job.state}", job.error)
    if case.processed_at is not None and case.series_verdict:
        add(case.processed_at, "gate", f"judged: series verdict {case.series_verdict}", case.model_name and f"{case.model_name} {case.model_version}")
    deliveries = session.execute(
        select(Delivery.id, Delivery.destination, Output.kind).join(Output, Output.id == Delivery.output_id)
        .where(Output.case_id == case_id)
    ).all()
    kinds = {d.id: (d.kind, d.destination) for d in deliveries}
    if kinds:
        for attempt in session.scalars(select(DeliveryAttempt).where(DeliveryAttempt.delivery_id.in_(list(kinds)))
                                       .order_by(DeliveryAttempt.id)):
            kind, destination = kinds[attempt.delivery_id]
            add(attempt.attempted_at, "outbox", f"{kind} to {destination}: {attempt.outcome}", attempt.message)
    objects = [("case", str(case_id))] + [("job", str(j.id)) for j in jobs] + [("delivery", str(d)) for d in kinds]
    for action in session.scalars(select(Action).where(tuple_(Action.object_type, Action.object_id).in_(objects))):
        details = json.loads(action.details) if action.details else None
        add(action.at, action.user, f"{action.action} ({action.object_type} {action.object_id})",
            None if not details else ", ".join(f"{k}={v}" for k, v in details.items() if v not in (None, "")), action.reason)
    events.sort(key=lambda e: e["at"])
    return events


class InstanceNumbers:
    """InstanceNumber of CT slices, read from the spool's headers (the database does not keep it);
    remembered per SOP Instance UID. A slice whose file retention removed shows none."""

    def __init__(self, spool_root: Path, capacity: int = 100_000) -> None:
        self.spool_root = spool_root
        self.capacity = capacity
        self._known: dict[str, int | None] = {}
        self._lock = threading.Lock()

    def lookup(self, session: Session, sop_uids: list[str]) -> dict[str, int | None]:
        with self._lock:
            found = {uid: self._known[uid] for uid in sop_uids if uid in self._known}
        missing = [uid for uid in sop_uids if uid not in found]
        if not missing:
            return found
        import pydicom

        paths = dict(session.execute(select(Instance.sop_instance_uid, Instance.spool_path)
                                     .where(Instance.sop_instance_uid.in_(missing[:2000]))).all())
        for uid in missing:
            number: int | None = None
            relative = paths.get(uid)
            if relative:
                try:
                    header = pydicom.dcmread(self.spool_root / relative, stop_before_pixels=True,
                                             specific_tags=["InstanceNumber"])
                    value = header.get("InstanceNumber")
                    number = int(value) if value not in (None, "") else None
                except (OSError, ValueError, TypeError, pydicom.errors.InvalidDicomError):
                    number = None
            found[uid] = number
        with self._lock:
            if len(self._known) > self.capacity:
                self._known.clear()
            self._known.update({uid: found[uid] for uid in missing})
        return found


DIMENSIONS = {"vendor": "SEG vendor (Manufacturer)", "algorithm": "AI algorithm", "model_version": "threshold model version"}


def week_start(value: dt.datetime) -> dt.date:
    day = value.date()
    return day - dt.timedelta(days=day.weekday())


def trends(session: Session, dimension: str, since: dt.datetime) -> dict[str, Any]:
    """Judged cases per week (of ``processed_at``) and group: counts and review / reject rates.

    A case counts once per vendor (or algorithm) among its SEGs; once for its model version."""
    if dimension not in DIMENSIONS:
        raise ValueError(dimension)
    seg = str(SEGMENTATION_STORAGE)
    if dimension == "model_version":
        query = select(Case.id, Case.processed_at, Case.series_verdict,
                       func.coalesce(Case.model_name, "") + " " + func.coalesce(Case.model_version, ""))
    else:
        column = Instance.manufacturer if dimension == "vendor" else Instance.algorithm_name
        pairs = (select(Instance.case_id, column.label("grp")).distinct()
                 .where(Instance.sop_class_uid == seg, Instance.case_id.is_not(None)).subquery())
        query = select(Case.id, Case.processed_at, Case.series_verdict, pairs.c.grp).join(pairs, pairs.c.case_id == Case.id)
    query = query.where(Case.series_verdict.is_not(None), Case.processed_at >= since)
    table: dict[str, dict[dt.date, dict[str, int]]] = defaultdict(lambda: defaultdict(lambda: {"cases": 0, "review": 0, "reject": 0}))
    for _, processed_at, verdict, group in session.execute(query):
        if processed_at.tzinfo is None:
            processed_at = processed_at.replace(tzinfo=dt.timezone.utc)
        cell = table[(group or "(none)").strip() or "(none)"][week_start(processed_at)]
        cell["cases"] += 1
        if verdict in ("review", "reject"):
            cell[verdict] += 1
    weeks = sorted({week for groups in table.values() for week in groups})
    rows = []
    for group in sorted(table):
        for week in sorted(table[group]):
            cell = table[group][week]
            rows.append({"group": group, "week": week.isoformat(), "cases": cell["cases"],
                         "review": cell["review"], "reject": cell["reject"],
                         "review_rate": round(cell["review"] / cell["cases"], 4),
                         "reject_rate": round(cell["reject"] / cell["cases"], 4)})
    return {"dimension": dimension, "weeks": [w.isoformat() for w in weeks], "rows": rows,
            "since": week_start(since).isoformat(), "until": (dt.date.today() + dt.timedelta(days=7)).isoformat()}


def trend_png(data: dict[str, Any]) -> bytes:
    """Two panels (reject rate, review rate) with one line per group: a matplotlib PNG."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 5.5), dpi=90)
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 1, sharex=True)
    groups = sorted({r["group"] for r in data["rows"]})
    for group in groups[:12]:
        rows = [r for r in data["rows"] if r["group"] == group]
        weeks = [dt.date.fromisoformat(r["week"]) for r in rows]
        axes[0].plot(weeks, [100 * r["reject_rate"] for r in rows], marker="o", label=group)
        axes[1].plot(weeks, [100 * r["review_rate"] for r in rows], marker="o", label=group)
    import matplotlib.dates as mdates

    first = dt.date.fromisoformat(data["since"]) if data.get("since") else None
    last = dt.date.fromisoformat(data["until"]) if data.get("until") else None
    for ax, title in zip(axes, ("reject rate per week (%)", "review rate per week (%)")):
        ax.set_title(title, fontsize=10)
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        if first and last:  # the requested window, not matplotlib's guess around one point
            ax.set_xlim(first, last)
        locator = mdates.AutoDateLocator(minticks=3, maxticks=10)
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    if groups:
        axes[0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title=DIMENSIONS[data["dimension"]], title_fontsize=8)
    else:
        axes[0].text(0.5, 0.5, "no judged cases in this period", ha="center", va="center", transform=axes[0].transAxes)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
