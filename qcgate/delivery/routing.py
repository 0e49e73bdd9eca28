"""Routing by verdict: which outputs go to which destination, now, later or never. One place decides.

A QC job records its outputs only. The router (a thread of `qcgate serve`, started by the outbox)
gives every output of a finished case that has not been routed yet its delivery rows, from serve's
settings (``delivery.destinations`` and ``[[delivery.destination]]``): so where a case goes never
depends on which process ran its job. Any delivering node then sends the rows under leases
(:mod:`qcgate.delivery.leases`); a `qcgate worker` that delivers must hold serve's destinations and
rules (:mod:`qcgate.delivery.fingerprint`), one that does not needs none.

For a destination with rule (objects, verdicts) and a case whose series verdict is ``v``:

- an output whose object is not in ``objects`` gets no row (a webhook sends one notification per
  case, on the case's SR output);
- ``v`` in ``verdicts``: a ``pending`` row, sent by the outbox now;
- ``v`` is review or reject and the rule has ``accept``: a ``held`` row, waiting for a reviewer.
  :func:`release_held` (the reviewer accepted the case) makes held rows pending; :func:`discard_held`
  (the reviewer rejected it) makes them ``discarded``. Both are audited in ``actions``, and so is
  every hold (user ``qcgate``). A decision taken before the router saw the case is remembered (its
  ``actions`` row) and applied when the router gets there;
- otherwise no row.

Objects: ``qc-seg`` (output kind ``seg``), ``sr``, ``pmap``, ``sc``, ``pdf``, ``report``, and ``ai-seg``:
the AI's own SEG instance(s) of the case (not a reference reader's MANUAL SEG), recorded by the router
as outputs of kind ``ai-seg`` pointing into the spool, when some destination's rule names them.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from qcgate.config import ROUTABLE_OBJECTS, DeliverySettings, DestinationSettings
from qcgate.core.dicom import SEGMENTATION_STORAGE
from qcgate.core.layout import DataLayout
from qcgate.store.actions import record_action
from qcgate.store.models import Action, Case, CaseState, Delivery, DeliveryState, Instance, Output, utcnow

LOG = logging.getLogger("qcgate.delivery.routing")

from qcgate.store.held import DISCARD, HOLD, RELEASE, SYSTEM_USER, discard_held, release_held  # noqa: E402,F401  (re-exported)
AI_SEG = "ai-seg"
_BATCH = 50  # cases per router pass


def object_of(kind: str) -> str:
    """The rule object of an output kind: ``seg`` is ``qc-seg``; ``sc-2`` or ``sc.summary`` is ``sc``."""
    if kind == "seg":
        return "qc-seg"
    if kind in ROUTABLE_OBJECTS:
        return kind
    head = re.split(r"[-._:]", kind, maxsplit=1)[0]
    return head if head in ROUTABLE_OBJECTS else kind


def decide(rule: DestinationSettings, verdict: str) -> str | None:
    """``pending``, ``held`` or None (no row) for a destination's rule and a series verdict."""
    if verdict in rule.verdicts:
        return DeliveryState.PENDING.value
    if verdict != "accept" and "accept" in rule.verdicts:
        return DeliveryState.HELD.value
    return None


class _Raced(Exception):
    """Another router claimed the case's outputs first."""


@dataclass
class RouteResult:
    case_id: int
    pending: list[int] = field(default_factory=list)
    held: list[int] = field(default_factory=list)
    discarded: list[int] = field(default_factory=list)


def _is_ai_seg(path: Path) -> bool:
    """An AI SEG, not a reference reader's: some segment is not MANUAL (as the loader decides)."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SegmentSequence"])
    except Exception:  # unreadable here: the job read it, so send it and let the outbox report the file
        return True
    types = {str(getattr(item, "SegmentAlgorithmType", "")) for item in getattr(ds, "SegmentSequence", [])}
    return types != {"MANUAL"}


def _add_ai_seg_outputs(session: Session, case: Case, job_id: int, data_dir: Path, now) -> list[Output]:  # type: ignore[no-untyped-def]
    existing = session.scalars(select(Output).where(Output.case_id == case.id, Output.kind == AI_SEG)).all()
    if existing:
        return []
    layout = DataLayout(data_dir)
    spool_prefix = layout.spool.relative_to(data_dir) if layout.spool.is_relative_to(data_dir) else layout.spool
    added = []
    for instance in session.scalars(select(Instance).where(Instance.case_id == case.id,
                                                           Instance.sop_class_uid == str(SEGMENTATION_STORAGE)).order_by(Instance.id)):
        if not _is_ai_seg(layout.spool / instance.spool_path):
            continue
        output = Output(case_id=case.id, job_id=job_id, kind=AI_SEG, sop_class_uid=instance.sop_class_uid,
                        sop_instance_uid=instance.sop_instance_uid, path=str(spool_prefix / instance.spool_path), routed_at=now)
        session.add(output)
        added.append(output)
    session.flush()
    return added


def _decision_before_routing(session: Session, case_id: int) -> str | None:
    """RELEASE or DISCARD if a reviewer decided the case before it was routed (latest wins)."""
    return session.scalars(select(Action.action).where(
        Action.object_type == "case", Action.object_id == str(case_id), Action.action.in_([RELEASE, DISCARD]))
        .order_by(Action.id.desc()).limit(1)).first()


def route_case(session: Session, case: Case, rules: list[DestinationSettings], data_dir: Path) -> RouteResult:
    """Give the case's unrouted outputs their delivery rows (in the caller's transaction)."""
    now = utcnow()
    result = RouteResult(case.id)
    outputs = session.scalars(select(Output).where(Output.case_id == case.id, Output.routed_at.is_(None)).order_by(Output.id)).all()
    if not outputs:
        return result
    ids = [o.id for o in outputs]
    claimed = session.execute(update(Output).where(Output.id.in_(ids), Output.routed_at.is_(None))
                              .values(routed_at=now).execution_options(synchronize_session=False)).rowcount
    if claimed != len(ids):
        raise _Raced()
    verdict = case.series_verdict or "review"
    dicom = [o for o in outputs if o.sop_class_uid]
    if any(rule.type != "webhook" and AI_SEG in rule.objects and decide(rule, verdict) for rule in rules):
        dicom += _add_ai_seg_outputs(session, case, outputs[0].job_id, data_dir, now)
    anchor = next((o for o in outputs if o.kind == "sr"), dicom[0] if dicom else outputs[0])
    existing = set(session.execute(select(Delivery.output_id, Delivery.destination)
                                   .where(Delivery.output_id.in_([o.id for o in dicom] + [anchor.id]))).all())
    decision = None
    held_by: dict[str, list[str]] = {}
    rows: list[Delivery] = []
    for rule in rules:
        state = decide(rule, verdict)
        if state is None:
            continue
        chosen = [anchor] if rule.type == "webhook" else [o for o in dicom if object_of(o.kind) in rule.objects]
        for output in chosen:
            if (output.id, rule.key) in existing:
                continue
            row_state = state
            if state == DeliveryState.HELD.value:
                decision = decision or _decision_before_routing(session, case.id) or HOLD
                held_by.setdefault(rule.key, []).append(object_of(output.kind) if rule.type != "webhook" else "notification")
                row_state = {RELEASE: DeliveryState.PENDING.value, DISCARD: DeliveryState.DISCARDED.value}.get(decision, state)
            row = Delivery(output_id=output.id, destination=rule.key, state=row_state, next_attempt_at=now, queued_at=now,
                           held_at=now if state == DeliveryState.HELD.value else None)
            session.add(row)
            rows.append(row)
    session.flush()
    for row in rows:
        {DeliveryState.PENDING.value: result.pending, DeliveryState.HELD.value: result.held,
         DeliveryState.DISCARDED.value: result.discarded}[row.state].append(row.id)
    if held_by:
        what = "; ".join(f"{name}: {', '.join(sorted(set(objects)))}" for name, objects in held_by.items())
        record_action(session, user=SYSTEM_USER, action=HOLD, object_type="case", object_id=case.id,
                      reason=f"series verdict {verdict}: held until a reviewer accepts the case ({what})",
                      details={"delivery_ids": [r.id for r in rows if r.held_at is not None], "destinations": held_by,
                               "applied_earlier_decision": decision if decision != HOLD else None})
    return result


def route_pending_cases(session_factory: sessionmaker[Session], settings: DeliverySettings, data_dir: Path,
                        limit: int = _BATCH) -> list[RouteResult]:
    """One router pass: route up to ``limit`` finished cases with unrouted outputs, one transaction each."""
    rules = settings.targets()
    with session_factory() as session:
        case_ids = session.scalars(
            select(Output.case_id).join(Case, Case.id == Output.case_id)
            .where(Output.routed_at.is_(None), Case.state == CaseState.DONE.value, Case.series_verdict.is_not(None))
            .group_by(Output.case_id).order_by(Output.case_id).limit(limit)).all()
    results = []
    for case_id in case_ids:
        try:
            with session_factory() as session, session.begin():
                case = session.get(Case, case_id)
                if case is None:
                    continue
                result = route_case(session, case, rules, data_dir)
        except _Raced:
            continue
        results.append(result)
        LOG.info("case %s (%s) routed: %d to send, %d held for review%s", case_id, case.series_verdict,
                 len(result.pending), len(result.held), f", {len(result.discarded)} discarded" if result.discarded else "")
    return results


class Router(threading.Thread):
    """Routes finished cases every ``delivery.poll_interval_seconds``; survives database hiccups."""

    def __init__(self, settings: DeliverySettings, session_factory: sessionmaker[Session], data_dir: Path) -> None:
        super().__init__(name="qcgate-router", daemon=True)
        self.settings = settings
        self.session_factory = session_factory
        self.data_dir = data_dir
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                while len(route_pending_cases(self.session_factory, self.settings, self.data_dir)) >= _BATCH:
                    if self._stop_event.is_set():
                        return
            except Exception:  # keep routing through database or disk hiccups
                LOG.exception("routing failed unexpectedly; retrying")
            self._stop_event.wait(self.settings.poll_interval_seconds)

    def stop(self) -> None:
        self._stop_event.set()
