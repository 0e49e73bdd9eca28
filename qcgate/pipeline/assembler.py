"""The assembler: when a case is ready.

A case is one CT series plus the SEG instances that reference it. It is *ready* when it has at
least one SEG, every CT instance its SEGs reference is present, and nothing new has arrived for
``stable_seconds``. A case still missing referenced CT instances (or still without a SEG)
``incomplete_timeout_seconds`` after its last instance is marked *incomplete* with the reason.
A ready case gets a pending row in the jobs table. All state is in the database, so a restart
simply resumes. Which case an instance joins is decided at ingest (``qcgate.store.cases``); the
assembler only reads what the node recorded.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from qcgate.config import AssemblySettings
from qcgate.core.dicom import SEGMENTATION_STORAGE
from qcgate.pipeline.notify import notify_job_pending
from qcgate.store.models import Case, CaseState, Instance, Job, JobState, SegReference, utcnow

LOG = logging.getLogger("qcgate.assembler")


def missing_references(session: Session, case_id: int) -> tuple[int, int, int]:
    """(number of SEGs, number of CT instances, number of referenced CT instances not present)."""
    seg_class = str(SEGMENTATION_STORAGE)
    n_seg = session.scalar(
        select(func.count()).select_from(Instance).where(Instance.case_id == case_id, Instance.sop_class_uid == seg_class)
    ) or 0
    n_ct = session.scalar(
        select(func.count()).select_from(Instance).where(Instance.case_id == case_id, Instance.sop_class_uid != seg_class)
    ) or 0
    seg_ids = select(Instance.id).where(Instance.case_id == case_id, Instance.sop_class_uid == seg_class)
    present = select(Instance.sop_instance_uid).where(Instance.case_id == case_id, Instance.sop_class_uid != seg_class)
    n_missing = session.scalar(
        select(func.count(func.distinct(SegReference.referenced_sop_instance_uid))).where(
            SegReference.seg_instance_id.in_(seg_ids),
            SegReference.referenced_sop_instance_uid.not_in(present),
        )
    ) or 0
    return int(n_seg), int(n_ct), int(n_missing)


def assemble_once(session_factory: sessionmaker[Session], settings: AssemblySettings, now: dt.datetime | None = None) -> list[tuple[int, str]]:
    """Examine every quiet collecting case once; returns [(case id, new state)] for cases that moved."""
    now = now or utcnow()
    quiet_since = now - dt.timedelta(seconds=settings.stable_seconds)
    give_up_before = now - dt.timedelta(seconds=settings.incomplete_timeout_seconds)
    moved: list[tuple[int, str]] = []
    with session_factory() as session:
        candidates = session.scalars(
            select(Case.id).where(Case.state == CaseState.COLLECTING.value, Case.last_instance_at <= quiet_since)
        ).all()
    for case_id in candidates:
        with session_factory() as session, session.begin():
            case = session.get(Case, case_id, with_for_update=True)
            if case is None or case.state != CaseState.COLLECTING.value or case.last_instance_at > _naive_or_aware(quiet_since, case.last_instance_at):
                continue
            n_seg, n_ct, n_missing = missing_references(session, case_id)
            if n_seg > 0 and n_ct > 0 and n_missing == 0:
                case.state = CaseState.READY.value
                case.ready_at = now
                case.reason = None
                if session.scalar(select(Job.id).where(Job.case_id == case_id, Job.kind == "qc")) is None:
                    session.add(Job(case_id=case_id, kind="qc", state=JobState.PENDING.value))
                    notify_job_pending(session)  # PostgreSQL: wakes listening dispatchers at commit
                LOG.info("case %s ready: %d CT instances, %d SEG; job queued", case_id, n_ct, n_seg)
                moved.append((case_id, case.state))
            elif case.last_instance_at <= _naive_or_aware(give_up_before, case.last_instance_at):
                if n_seg == 0:
                    reason = f"no segmentation received ({n_ct} CT instances)"
                elif n_ct == 0:
                    reason = f"no CT instance of the referenced series received ({n_seg} SEG)"
                else:
                    reason = f"{n_missing} CT instance(s) referenced by the SEGs never arrived"
                case.state = CaseState.INCOMPLETE.value
                case.reason = reason
                LOG.warning("case %s incomplete: %s", case_id, reason)
                moved.append((case_id, case.state))
    return moved


def _naive_or_aware(moment: dt.datetime, like: dt.datetime) -> dt.datetime:
    # SQLite hands back naive UTC datetimes, PostgreSQL aware ones: compare like with like.
    return moment.replace(tzinfo=None) if like.tzinfo is None else moment


class AssemblerThread(threading.Thread):
    """Runs ``assemble_once`` every poll interval until stopped."""

    def __init__(self, session_factory: sessionmaker[Session], settings: AssemblySettings) -> None:
        super().__init__(name="qcgate-assembler", daemon=True)
        self._session_factory = session_factory
        self._settings = settings
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                assemble_once(self._session_factory, self._settings)
            except Exception:  # keep assembling after a transient database error
                LOG.exception("assembler pass failed; retrying")
            self._stop_event.wait(self._settings.poll_interval_seconds)

    def stop(self) -> None:
        self._stop_event.set()
