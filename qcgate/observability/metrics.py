"""Prometheus metrics in the text exposition format, without a client library.

Two kinds: counters the node increments as events happen (instances received and refused,
associations), and gauges read from the audit database at scrape time (cases and jobs by state,
verdicts, deliveries, stage durations), so they are right even across restarts and worker processes.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
from collections import defaultdict
from collections.abc import Callable

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from qcgate.store.models import Case, Delivery, DeliveryAttempt, DeliveryState, Job, JobState, SliceResultRecord

_HELP = {
    "qcgate_instances_received_total": ("counter", "Instances acknowledged with Success, by SOP class and outcome."),
    "qcgate_instances_refused_total": ("counter", "Instances refused, by reason code."),
    "qcgate_associations_total": ("counter", "Associations, by outcome (accepted, rejected)."),
    "qcgate_cases": ("gauge", "Cases by state."),
    "qcgate_jobs": ("gauge", "QC jobs by state."),
    "qcgate_case_verdicts": ("gauge", "Processed cases by series verdict."),
    "qcgate_slice_verdicts": ("gauge", "Lesion slices by verdict."),
    "qcgate_deliveries": ("gauge", "Outbox rows by state (pending, sent, dead)."),
    "qcgate_delivery_attempts": ("gauge", "Delivery attempts by outcome (sent, transient, permanent)."),
    "qcgate_destination_deliveries": ("gauge", "Outbox rows waiting (pending) or given up (dead), by destination."),
    "qcgate_destination_oldest_pending_seconds": ("gauge", "Age of the oldest pending delivery per destination (since it was queued)."),
    "qcgate_job_stage_seconds_sum": ("gauge", "Summed wall time per job stage over the last 1000 finished jobs."),
    "qcgate_job_stage_seconds_count": ("gauge", "Jobs counted in qcgate_job_stage_seconds_sum."),
    "qcgate_up": ("gauge", "1 when every liveness check passes."),
}


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class MetricsRegistry:
    """Thread-safe counters keyed by (name, sorted labels)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = defaultdict(float)

    def increment(self, name: str, amount: float = 1.0, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._counters[key] += amount

    def value(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._counters.get((name, tuple(sorted(labels.items()))), 0.0)

    def samples(self) -> list[tuple[str, dict[str, str], float]]:
        with self._lock:
            return [(name, dict(labels), value) for (name, labels), value in self._counters.items()]


def database_samples(session: Session) -> list[tuple[str, dict[str, str], float]]:
    """Gauges computed from the audit database."""
    samples: list[tuple[str, dict[str, str], float]] = []
    for name, column in (("qcgate_cases", Case.state), ("qcgate_jobs", Job.state), ("qcgate_case_verdicts", Case.series_verdict),
                         ("qcgate_slice_verdicts", SliceResultRecord.verdict), ("qcgate_deliveries", Delivery.state),
                         ("qcgate_delivery_attempts", DeliveryAttempt.outcome)):
        label = "verdict" if "verdict" in name else ("outcome" if "attempts" in name else "state")
        for value, count in session.execute(select(column, func.count()).group_by(column)):
            if value is not None:
                samples.append((name, {label: str(value)}, float(count)))
    samples += _destination_samples(session)
    totals: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    recent = session.scalars(select(Job.timings).where(Job.state == JobState.DONE.value, Job.timings.is_not(None))
                             .order_by(Job.id.desc()).limit(1000))
    for timings in recent:
        for stage, seconds in json.loads(timings).items():
            totals[stage] += float(seconds)
            counts[stage] += 1
    for stage in sorted(totals):
        samples.append(("qcgate_job_stage_seconds_sum", {"stage": stage}, totals[stage]))
        samples.append(("qcgate_job_stage_seconds_count", {"stage": stage}, float(counts[stage])))
    return samples


def _destination_samples(session: Session) -> list[tuple[str, dict[str, str], float]]:
    """Per destination: pending and dead counts, and how long the oldest pending one has waited."""
    samples: list[tuple[str, dict[str, str], float]] = []
    now = dt.datetime.now(dt.timezone.utc)
    waiting = (DeliveryState.PENDING.value, DeliveryState.DEAD.value)
    counts = {(destination, state): count for destination, state, count in session.execute(
        select(Delivery.destination, Delivery.state, func.count()).where(Delivery.state.in_(waiting))
        .group_by(Delivery.destination, Delivery.state))}
    for destination in sorted({destination for destination, _ in counts}):
        for state in waiting:  # both states for every destination that has either, so "dead" reads 0, not absent
            samples.append(("qcgate_destination_deliveries", {"destination": destination, "state": state},
                            float(counts.get((destination, state), 0))))
    for destination, oldest in session.execute(
            select(Delivery.destination, func.min(Delivery.queued_at)).where(Delivery.state == DeliveryState.PENDING.value)
            .group_by(Delivery.destination)):
        if oldest is not None:
            oldest = oldest if oldest.tzinfo else oldest.replace(tzinfo=dt.timezone.utc)  # SQLite: naive UTC
            samples.append(("qcgate_destination_oldest_pending_seconds", {"destination": destination},
                            max((now - oldest).total_seconds(), 0.0)))
    return samples


def render(registry: MetricsRegistry, session_factory: sessionmaker[Session], alive: Callable[[], bool]) -> str:
    """The full exposition: node counters, database gauges and qcgate_up."""
    samples = registry.samples()
    with session_factory() as session:
        samples += database_samples(session)
    samples.append(("qcgate_up", {}, 1.0 if alive() else 0.0))
    by_name: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for name, labels, value in samples:
        by_name[name].append((labels, value))
    lines: list[str] = []
    for name in sorted(by_name):
        kind, text = _HELP.get(name, ("gauge", name))
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
        for labels, value in sorted(by_name[name], key=lambda item: sorted(item[0].items())):
            label_text = ",".join(f'{key}="{_escape(val)}"' for key, val in sorted(labels.items()))
            lines.append(f"{name}{{{label_text}}} {value:g}" if label_text else f"{name} {value:g}")
    return "\n".join(lines) + "\n"
