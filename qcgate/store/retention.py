"""Retention: delete old cases' spool files, outputs and rows, by age and by a disk watermark.

Rules (`storage.retention_days`, `storage.retention_free_mb`):

- a case is *eligible* when it is finished — state done, failed or incomplete, and no job of it is
  pending or running — and none of its outputs has a pending or held delivery (held: waiting for a
  reviewer). Unfinished cases and undelivered outputs are never deleted, whatever their age or the
  disk;
- by age: every eligible case created more than ``retention_days`` ago (0: never);
- by disk: while free space is below ``retention_free_mb`` (0: off), the oldest eligible cases,
  one at a time, re-measuring after each.

Per case, the rows go first, in one transaction that re-checks eligibility (a late instance may have
reopened the case), then the files. A crash between the two leaves unreferenced files, never rows
that point at deleted files. Associations and refused-instance rows are kept (they are small and
say who sent what); quarantine/ and conflicts/ files older than ``retention_days`` are deleted.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import delete, exists, func, select
from sqlalchemy.orm import Session, sessionmaker

from qcgate.config import Settings
from qcgate.store.models import (
    Case,
    CaseState,
    Delivery,
    DeliveryAttempt,
    DeliveryState,
    Instance,
    Job,
    JobState,
    Output,
    SegReference,
    SliceResultRecord,
)

LOG = logging.getLogger("qcgate.retention")
FINISHED_STATES = (CaseState.DONE.value, CaseState.FAILED.value, CaseState.INCOMPLETE.value)


@dataclass
class RetentionReport:
    """What one retention run deleted (or, dry, would delete) and what it had to keep."""

    dry_run: bool
    cases_by_age: list[int] = field(default_factory=list)
    cases_by_disk: list[int] = field(default_factory=list)
    files_deleted: int = 0
    bytes_freed: int = 0
    kept_unfinished: int = 0
    kept_undelivered: int = 0
    side_files_deleted: int = 0
    free_mb_before: float = 0.0
    free_mb_after: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def summary(self) -> str:
        verb = "would delete" if self.dry_run else "deleted"
        return (f"retention {'(dry run) ' if self.dry_run else ''}{verb} {len(self.cases_by_age)} case(s) by age and "
                f"{len(self.cases_by_disk)} by the disk watermark: {self.files_deleted} file(s), "
                f"{self.bytes_freed / 1_048_576:.1f} MB; {self.side_files_deleted} quarantine/conflict file(s); "
                f"kept {self.kept_unfinished} old unfinished case(s) and {self.kept_undelivered} with undelivered outputs; "
                f"free {self.free_mb_before:.0f} MB -> {self.free_mb_after:.0f} MB")


def _undelivered():  # -> a SQL condition on Case
    """Some output of the case still waits: a pending delivery, or a held one (for a reviewer)."""
    return exists().where(Output.case_id == Case.id, Delivery.output_id == Output.id,
                          Delivery.state.in_((DeliveryState.PENDING.value, DeliveryState.HELD.value)))


def _eligible_condition() -> Any:
    """SQL condition on Case: finished and nothing left to deliver."""
    unfinished_job = exists().where(Job.case_id == Case.id, Job.state.in_([JobState.PENDING.value, JobState.RUNNING.value]))
    return Case.state.in_(FINISHED_STATES) & ~unfinished_job & ~_undelivered()


def _case_files(session: Session, case_id: int, settings: Settings) -> list[Path]:
    """The spool files of the case's instances and the files of its outputs (absolute)."""
    spool = settings.storage.spool_dir.resolve()
    data_dir = settings.storage.data_dir.resolve()
    files = [spool / path for path in session.scalars(select(Instance.spool_path).where(Instance.case_id == case_id))]
    files += [data_dir / path for path in session.scalars(select(Output.path).where(Output.case_id == case_id))]
    # Never follow a row outside the data directory (rows are ours, but be strict about deletes).
    return [path for path in files if path.resolve().is_relative_to(data_dir)]


def _delete_case_rows(session: Session, case_id: int) -> None:
    outputs = select(Output.id).where(Output.case_id == case_id)
    deliveries = select(Delivery.id).where(Delivery.output_id.in_(outputs))
    instances = select(Instance.id).where(Instance.case_id == case_id)
    session.execute(delete(DeliveryAttempt).where(DeliveryAttempt.delivery_id.in_(deliveries)))
    session.execute(delete(Delivery).where(Delivery.output_id.in_(outputs)))
    session.execute(delete(Output).where(Output.case_id == case_id))
    session.execute(delete(SliceResultRecord).where(SliceResultRecord.case_id == case_id))
    session.execute(delete(Job).where(Job.case_id == case_id))
    session.execute(delete(SegReference).where(SegReference.seg_instance_id.in_(instances)))
    session.execute(delete(Instance).where(Instance.case_id == case_id))
    session.execute(delete(Case).where(Case.id == case_id))


def _remove_files(files: list[Path], stop_at: list[Path]) -> tuple[int, int]:
    """Delete files and then their directories that became empty (never ``stop_at`` roots)."""
    removed = freed = 0
    parents: set[Path] = set()
    for path in files:
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            continue
        removed += 1
        freed += size
        parents.add(path.parent)
    roots = {root.resolve() for root in stop_at}
    for directory in sorted(parents, key=lambda p: len(p.parts), reverse=True):
        current = directory
        while current.resolve() not in roots and any(current.resolve().is_relative_to(r) for r in roots):
            try:
                current.rmdir()  # only succeeds when empty
            except OSError:
                break
            current = current.parent
    return removed, freed


def _sizes(files: list[Path]) -> tuple[int, int]:
    count = size = 0
    for path in files:
        try:
            size += path.stat().st_size
            count += 1
        except FileNotFoundError:
            pass
    return count, size


def _spool_free_mb(settings: Settings) -> float:
    target = settings.storage.spool_dir if settings.storage.spool_dir.exists() else settings.storage.data_dir
    return shutil.disk_usage(target).free / 1_048_576


def _purge_side_files(settings: Settings, cutoff: dt.datetime, dry_run: bool) -> int:
    """quarantine/ and conflicts/ files (payload + JSON reason) older than the cutoff."""
    count = 0
    for directory in settings.storage.layout.side_folders:
        if not directory.is_dir():
            continue
        for path in directory.iterdir():
            if path.is_file() and dt.datetime.fromtimestamp(path.stat().st_mtime, dt.timezone.utc) < cutoff:
                count += 1
                if not dry_run:
                    path.unlink(missing_ok=True)
    return count


def run_retention(settings: Settings, session_factory: sessionmaker[Session], *, dry_run: bool = False,
                  now: dt.datetime | None = None, free_mb: Callable[[], float] | None = None) -> RetentionReport:
    """Apply the retention policy once; see the module docstring. ``free_mb`` measures free space
    (default: the spool's filesystem) and is re-read after each case deleted for the watermark."""
    now = now or dt.datetime.now(dt.timezone.utc)
    measure = free_mb or (lambda: _spool_free_mb(settings))
    storage = settings.storage
    report = RetentionReport(dry_run=dry_run, free_mb_before=measure())
    roots = [storage.layout.spool, storage.layout.outputs]
    simulated_freed_mb = 0.0  # dry run: what would have been freed, to simulate the watermark

    def remove(case_id: int, bucket: list[int]) -> bool:
        nonlocal simulated_freed_mb
        with session_factory() as session:
            with session.begin():
                # Re-check inside the transaction: a late instance may have reopened the case.
                if session.scalar(select(Case.id).where(Case.id == case_id, _eligible_condition())) is None:
                    return False
                files = _case_files(session, case_id, settings)
                if dry_run:
                    count, size = _sizes(files)
                    simulated_freed_mb += size / 1_048_576
                else:
                    _delete_case_rows(session, case_id)
        if not dry_run:
            count, size = _remove_files(files, roots)
        report.files_deleted += count
        report.bytes_freed += size
        bucket.append(case_id)
        LOG.info("retention: %s case %d (%d files, %d bytes)", "would delete" if dry_run else "deleted", case_id, count, size)
        return True

    with session_factory() as session:
        if storage.retention_days > 0:
            cutoff = now - dt.timedelta(days=storage.retention_days)
            old = Case.created_at < cutoff
            aged = list(session.scalars(select(Case.id).where(old, _eligible_condition()).order_by(Case.created_at, Case.id)))
            unfinished_job = exists().where(Job.case_id == Case.id, Job.state.in_([JobState.PENDING.value, JobState.RUNNING.value]))
            report.kept_unfinished = _count(session, old & (~Case.state.in_(FINISHED_STATES) | unfinished_job))
            report.kept_undelivered = _count(session, old & Case.state.in_(FINISHED_STATES) & _undelivered())
        else:
            cutoff = None
            aged = []
    for case_id in aged:
        remove(case_id, report.cases_by_age)
    if cutoff is not None:
        report.side_files_deleted = _purge_side_files(settings, cutoff, dry_run)
    if storage.retention_free_mb > 0:
        done = set(report.cases_by_age)
        while measure() + simulated_freed_mb < storage.retention_free_mb:
            with session_factory() as session:
                query = select(Case.id).where(_eligible_condition()).order_by(Case.created_at, Case.id)
                if done:
                    query = query.where(Case.id.not_in(done))
                oldest = session.scalar(query.limit(1))
            if oldest is None:
                LOG.warning("retention: free space %.0f MB is below retention_free_mb %.0f MB and nothing more may be deleted",
                            measure(), storage.retention_free_mb)
                break
            done.add(oldest)
            remove(oldest, report.cases_by_disk)
    report.free_mb_after = measure() + simulated_freed_mb
    return report


def _count(session: Session, condition: Any) -> int:
    return int(session.scalar(select(func.count()).select_from(Case).where(condition)) or 0)
