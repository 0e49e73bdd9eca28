"""Ingest one received instance: check it, store it durably, record it, link it to its case.

The order is what makes an acknowledgement safe: the file is fsynced and renamed into the spool,
then the database row is committed, and only then does the caller return Success. A crash between
the two leaves a spool file without a row, which is harmless: the sender was not acknowledged and
re-sends, and the re-send finds the same bytes at the same path.

Group commit: instances that arrive while a commit is in progress (concurrent associations, or a
STOW-RS request) wait, and the next commit takes them all: one transaction, one fsync of each
spool directory, one touch per case, one database commit (one WAL fsync). Each caller returns only
after the commit that holds its row, so Success still means durable.

Per instance, the file's fsync (started on arrival, on a thread) overlaps the header parse, the
row's INSERT, the rename and the directory fsync; the commit waits for it. One prepared
``INSERT … ON CONFLICT (sop_instance_uid) DO NOTHING RETURNING id`` both inserts a new instance and
finds a re-send (no separate look-up); re-sends are answered after the commit. The node passes
the SHA-256 it took while the data set streamed in, so the file is not read again.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Insert, bindparam, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DataError, IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from qcgate.core.dicom import InstanceHeader
from qcgate.node import refusals as R
from qcgate.node.dicom_header import HeaderError, read_header
from qcgate.node.spool import Spool, fsync_directory, sha256_of_file
from qcgate.store.cases import case_series_for, get_or_create_case_id, touch_case
from qcgate.store.models import Instance, RefusedInstance, SegReference, utcnow

LOG = logging.getLogger("qcgate.ingest")

DISK_REFUSAL_WINDOW_SECONDS = 300.0  # /healthz reports disk refusals this recent
MAX_GROUP_COMMIT = 64  # instances in one group commit at most
_DIALECT_INSERTS = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}  # both have ON CONFLICT DO NOTHING
_STORED_INSTANCE = select(Instance.sha256, Instance.case_id).where(Instance.sop_instance_uid == bindparam("uid"))


def _fsync_and_close(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(eq=False)
class _Pending:
    """One checked instance waiting for the group commit that makes it durable."""

    incoming: Path
    header: InstanceHeader
    relative: Path
    digest: str
    size: int
    association_id: int | None
    synced: Future[None]  # the file's fsync; its commit waits for it
    result: IngestResult | None = None
    error: BaseException | None = None
    case_id: int | None = field(default=None, repr=False)

@dataclass(frozen=True)
class IngestResult:
    """What happened to one instance; ``status`` is the DIMSE status to return."""

    status: int
    outcome: str  # stored | duplicate | conflict | refused
    message: str
    sop_instance_uid: str | None = None
    case_id: int | None = None
    reason_code: str | None = None  # for refusals and conflicts
    sop_class_uid: str | None = None  # when known (a STOW-RS response names each instance's class)


class Ingestor:
    """Stores instances for the node (and for any other way in, such as an import command)."""

    def __init__(self, spool: Spool, session_factory: sessionmaker[Session], *, min_free_mb: float) -> None:
        self.spool = spool
        self.session_factory = session_factory
        self.min_free_mb = min_free_mb
        # One writer at a time for the check-rename-commit step: two associations sending the same
        # SOP instance must not both rename into one path. It is short (rename, fsync, one commit).
        self._write_lock = threading.Lock()
        self._case_ids: dict[str, int] = {}  # CT series UID -> case id; cases are never renumbered
        self._disk_refusals: deque[float] = deque(maxlen=100_000)  # monotonic times of disk refusals
        self._disk_lock = threading.Lock()
        # Group commit: waiting instances, and whether one caller is committing a batch now.
        self._group = threading.Condition()
        self._waiting: list[_Pending] = []
        self._committing = False
        self._fsyncer = ThreadPoolExecutor(max_workers=4, thread_name_prefix="qcgate-fsync")
        self._insert_instance: Insert | None = None  # prepared on first use, for the session's dialect

    def disk_is_low(self) -> bool:
        return self.spool.free_mb() < self.min_free_mb

    def recent_disk_refusals(self, window_seconds: float = DISK_REFUSAL_WINDOW_SECONDS) -> int:
        """How many instances were refused for disk space in the last ``window_seconds`` (for /healthz)."""
        cutoff = time.monotonic() - window_seconds
        with self._disk_lock:
            while self._disk_refusals and self._disk_refusals[0] < cutoff:
                self._disk_refusals.popleft()
            return len(self._disk_refusals)

    def refuse_for_disk(self, incoming: Path | None, association_id: int | None, sop_instance_uid: str | None,
                        message: str | None = None) -> IngestResult:
        """A700 without keeping the payload: there is no room to keep it. The partial file goes at once."""
        if incoming is not None:
            incoming.unlink(missing_ok=True)
        with self._disk_lock:
            self._disk_refusals.append(time.monotonic())
        if message is None:
            message = f"free disk {self.spool.free_mb():.0f} MB is below the {self.min_free_mb:.0f} MB watermark"
        try:
            self._record_refusal(association_id, sop_instance_uid, None, R.DISK_FULL, message, R.STATUS_OUT_OF_RESOURCES, None)
        except Exception as exc:  # the database may be on the same full disk: the A700 matters more than its row
            LOG.error("could not record the disk refusal of %s: %s", R.printable(sop_instance_uid, 80), R.printable(exc, 300))
        return IngestResult(R.STATUS_OUT_OF_RESOURCES, "refused", message, sop_instance_uid, reason_code=R.DISK_FULL)

    def refuse(self, incoming: Path | None, code: str, message: str, association_id: int | None,
               sop_uid: str | None, sop_class: str | None) -> IngestResult:
        """Refuse an instance for a defect found before its data set was read (e.g. in the request)."""
        if incoming is None:
            status = R.status_for(code)
            self._record_refusal(association_id, sop_uid, sop_class, code, message, status, None)
            LOG.warning("refused %s with 0x%04X (%s): %s", R.printable(sop_uid or "instance", 100), status, code, R.printable(message))
            return IngestResult(status, "refused", message, sop_uid, reason_code=code, sop_class_uid=sop_class)
        return self._quarantine(incoming, code, message, association_id, sop_uid, sop_class)

    def ingest(
        self,
        incoming: Path,
        *,
        association_id: int | None = None,
        expected_sop_instance_uid: str | None = None,
        expected_sop_class_uid: str | None = None,
        expected_study_instance_uid: str | None = None,
        sha256: str | None = None,
    ) -> IngestResult:
        """Ingest a complete Part 10 file at ``incoming`` (inside the spool's incoming folder).

        ``expected_*`` are what the request said (C-STORE's affected UIDs, STOW-RS's study in the
        path): a data set that differs is refused as ``uid-mismatch``. ``sha256``: the file's
        digest when the caller hashed it while writing it (the node's streamed receive); else the
        file is read and hashed here."""
        header: InstanceHeader | None = None
        # The file's fsync (I/O, no GIL) runs while this thread parses the header, inserts the row,
        # renames the file and fsyncs its directory; the commit waits for it.
        synced = self._start_file_sync(incoming)
        try:
            header = read_header(incoming)
            if expected_sop_instance_uid and header.sop_instance_uid != expected_sop_instance_uid.strip():
                raise HeaderError(R.UID_MISMATCH, f"SOPInstanceUID in the data set differs from the request's {expected_sop_instance_uid}")
            if expected_sop_class_uid and header.sop_class_uid != expected_sop_class_uid.strip():
                raise HeaderError(R.UID_MISMATCH, f"SOPClassUID {header.sop_class_uid} differs from the request's {expected_sop_class_uid}")
            if expected_study_instance_uid and header.study_instance_uid != expected_study_instance_uid.strip():
                raise HeaderError(R.UID_MISMATCH, f"StudyInstanceUID {header.study_instance_uid} differs from the study in the "
                                                  f"request's path {R.printable(expected_study_instance_uid, 80)}")
        except HeaderError as exc:
            synced.exception()  # wait for it; the quarantine moves the file
            # The request's UIDs, else the data set's where its header could be read (STOW-RS has no request UIDs).
            return self._quarantine(incoming, exc.code, str(exc), association_id,
                                    expected_sop_instance_uid or (header.sop_instance_uid if header else None),
                                    expected_sop_class_uid or (header.sop_class_uid if header else None))
        except BaseException:
            synced.exception()
            raise
        try:
            digest = sha256 if sha256 is not None else sha256_of_file(incoming)
            size = incoming.stat().st_size
        except BaseException:
            synced.exception()
            raise
        relative = self.spool.relative_path_for(header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid)
        try:
            return self._group_commit(_Pending(incoming, header, relative, digest, size, association_id, synced))
        except BaseException:
            synced.exception()
            incoming.unlink(missing_ok=True)  # not acknowledged: the sender keeps its copy and retries
            raise

    def _start_file_sync(self, path: Path) -> Future[None]:
        """fsync ``path``'s data on the fsync thread. The file is opened here, so the fsync reaches
        it even once it is renamed; the descriptor is closed when the fsync is done."""
        if not self.spool.fsync:
            done: Future[None] = Future()
            done.set_result(None)
            return done
        fd = os.open(path, os.O_RDONLY)
        try:
            return self._fsyncer.submit(_fsync_and_close, fd)
        except BaseException:
            os.close(fd)
            raise

    # --- group commit ------------------------------------------------------------------------

    def _group_commit(self, item: _Pending) -> IngestResult:
        """Queue ``item`` and return once a commit holding it is done. Whoever finds no commit in
        progress commits everything waiting (up to MAX_GROUP_COMMIT), its own item included."""
        with self._group:
            self._waiting.append(item)
            while True:
                if item.result is not None:
                    return item.result
                if item.error is not None:
                    raise item.error
                if not self._committing:
                    self._committing = True
                    batch, self._waiting = self._waiting[:MAX_GROUP_COMMIT], self._waiting[MAX_GROUP_COMMIT:]
                    self._group.release()
                    try:
                        self._commit_batch(batch)
                    except BaseException as exc:  # every instance of the failed batch gets the error
                        for pending in batch:
                            if pending.result is None and pending.error is None:
                                pending.error = exc
                    finally:
                        self._group.acquire()
                        self._committing = False
                        self._group.notify_all()
                else:
                    self._group.wait()

    def _commit_batch(self, batch: list[_Pending]) -> None:
        """One transaction for the batch; on a value the database refuses, each instance alone."""
        try:
            self._store_batch(batch)
        except DataError:
            for item in batch:
                if item.result is None:
                    item.result = self._store_one(item)

    def _store_one(self, item: _Pending) -> IngestResult:
        try:
            self._store_batch([item])
        except DataError as exc:
            # A value the database refuses is a defect of the data set that validation missed: permanent.
            header = item.header
            LOG.error("the database refused a value of %s: %s", header.sop_instance_uid, R.printable(exc.orig, 300))
            return self._quarantine(item.incoming, R.INVALID_ATTRIBUTE, f"a value cannot be stored: {exc.orig}", item.association_id,
                                    header.sop_instance_uid, header.sop_class_uid)
        assert item.result is not None
        return item.result

    def _store_batch(self, batch: list[_Pending]) -> None:
        """The new instances' rows inserted (a re-sent one is found by the same statement), their
        files renamed into the spool (each directory fsynced once), their cases touched once, and
        one commit; re-sends are answered after it."""
        with self._write_lock, self.session_factory() as session:
            fresh: dict[str, _Pending] = {}
            try:
                stored_before = self._insert_batch(session, batch, fresh)
            except IntegrityError:
                # A cached case was deleted (retention): forget the cache and link afresh, once.
                session.rollback()
                self._case_ids.clear()
                fresh.clear()
                stored_before = self._insert_batch(session, batch, fresh)
            if fresh:
                # The rows are written but not committed: the files are made durable in their places first.
                directories = set()
                for item in fresh.values():
                    final = self.spool.absolute(item.relative)
                    final.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(item.incoming, final)
                    directories.add(final.parent)
                if self.spool.fsync:
                    for directory in directories:
                        fsync_directory(directory)
            for item in batch:  # every file's own fsync (started on arrival) done before its row is durable
                item.synced.result()
            session.commit()
        for item in fresh.values():
            LOG.debug("stored %s (%d bytes) in case %s", item.header.sop_instance_uid, item.size, item.case_id)
            item.result = IngestResult(R.STATUS_SUCCESS, "stored", "stored", item.header.sop_instance_uid, item.case_id,
                                       sop_class_uid=item.header.sop_class_uid)
        # Re-sends, answered outside the write transaction (a conflict records its own row).
        for item in batch:
            if item.result is not None:
                continue
            uid = item.header.sop_instance_uid
            if uid in stored_before:
                stored_sha256, case_id = stored_before[uid]
            else:  # the same instance twice in one batch: a re-send of the first
                first = fresh[uid]
                stored_sha256, case_id = first.digest, first.case_id
            item.result = self._resend(item.incoming, item.header, stored_sha256, case_id, item.digest, item.association_id)

    def _insert_batch(self, session: Session, batch: list[_Pending], fresh: dict[str, _Pending]) -> dict[str, tuple[str, int | None]]:
        """Insert the rows of ``batch`` (no commit); fills ``fresh`` with the instances inserted and
        returns (sha256, case id) of those already stored before, by SOP Instance UID."""
        now = utcnow()
        touched: set[int] = set()
        stored_before: dict[str, tuple[str, int | None]] = {}
        for item in batch:
            uid = item.header.sop_instance_uid
            if uid in fresh or uid in stored_before:
                continue
            existing = self._insert_rows(session, item, now)
            if existing is not None:
                stored_before[uid] = existing
                continue
            fresh[uid] = item
            if item.case_id is not None:
                touched.add(item.case_id)
        for case_id in sorted(touched):
            touch_case(session, case_id, now)
        return stored_before

    def _insert_rows(self, session: Session, item: _Pending, now: dt.datetime) -> tuple[str, int | None] | None:
        """Insert the instance (and a SEG's references) and link its case, no commit; sets
        ``item.case_id``. An instance already stored is left as it is: its (sha256, case id) is
        returned instead. One statement for the common case (INSERT … ON CONFLICT DO NOTHING
        RETURNING id), prepared once."""
        header = item.header
        item.case_id = self._case_id(session, header)
        connection = session.connection()  # Core execution: a tenth of the ORM path's cost per statement
        instance_id = connection.execute(self._insert_instance_statement(session), {
            "sop_instance_uid": header.sop_instance_uid,
            "sop_class_uid": header.sop_class_uid,
            "study_instance_uid": header.study_instance_uid,
            "series_instance_uid": header.series_instance_uid,
            "modality": header.modality,
            "transfer_syntax_uid": header.transfer_syntax_uid,
            "spool_path": str(item.relative),
            "size_bytes": item.size,
            "sha256": item.digest,
            "received_at": now,
            "association_id": item.association_id,
            "case_id": item.case_id,
            "referenced_series_uid": header.referenced_series_uids[0] if header.referenced_series_uids else None,
            "manufacturer": header.manufacturer,
            "algorithm_name": header.algorithm_name,
            "algorithm_version": header.algorithm_version,
        }).scalar_one_or_none()
        if instance_id is None:  # the SOP instance UID is taken: a re-send
            row = connection.execute(_STORED_INSTANCE, {"uid": header.sop_instance_uid}).one()
            return str(row.sha256), row.case_id
        if header.referenced_sop_instance_uids:
            connection.execute(insert(SegReference), [
                {"seg_instance_id": instance_id, "referenced_sop_instance_uid": uid}
                for uid in sorted(header.referenced_sop_instance_uids)
            ])
        return None

    def _insert_instance_statement(self, session: Session) -> Insert:
        if self._insert_instance is None:
            dialect = session.get_bind().dialect.name
            dialect_insert = _DIALECT_INSERTS.get(dialect)
            if dialect_insert is None:
                raise ValueError(f"ingest supports SQLite and PostgreSQL, not {dialect}")
            self._insert_instance = (dialect_insert(Instance)
                                     .on_conflict_do_nothing(index_elements=[Instance.sop_instance_uid])
                                     .returning(Instance.id))
        return self._insert_instance

    def _case_id(self, session: Session, header: InstanceHeader) -> int | None:
        series_uid = case_series_for(session, header)
        if series_uid is None:
            return None
        case_id = self._case_ids.get(series_uid)
        if case_id is None:
            case_id = get_or_create_case_id(session, header.study_instance_uid, series_uid)
            if len(self._case_ids) > 100_000:
                self._case_ids.clear()
            self._case_ids[series_uid] = case_id
        return case_id

    def _resend(self, incoming: Path, header: InstanceHeader, stored_sha256: str, case_id: int | None, digest: str, association_id: int | None) -> IngestResult:
        if stored_sha256 == digest:
            incoming.unlink(missing_ok=True)
            LOG.info("identical re-send of %s: acknowledged, nothing new stored", header.sop_instance_uid)
            return IngestResult(R.STATUS_SUCCESS, "duplicate", "identical re-send", header.sop_instance_uid, case_id,
                                sop_class_uid=header.sop_class_uid)
        message = f"conflicting re-send of {header.sop_instance_uid}: content differs from the stored copy; first copy kept"
        kept = self.spool.set_aside(incoming, kind="conflict", details={
            "sop_instance_uid": header.sop_instance_uid, "reason": message,
            "stored_sha256": stored_sha256, "new_sha256": digest,
        })
        self._record_refusal(association_id, header.sop_instance_uid, header.sop_class_uid, R.CONFLICT, message, R.STATUS_SUCCESS, kept)
        LOG.warning(message)
        # The new copy is kept durably aside, so acknowledging it loses nothing.
        return IngestResult(R.STATUS_SUCCESS, "conflict", message, header.sop_instance_uid, case_id,
                            sop_class_uid=header.sop_class_uid)

    def _quarantine(self, incoming: Path, code: str, message: str, association_id: int | None, sop_uid: str | None, sop_class: str | None) -> IngestResult:
        status = R.status_for(code)
        kept = self.spool.set_aside(incoming, kind="quarantine", details={
            "reason_code": code, "reason": R.printable(message), "sop_instance_uid": sop_uid and R.printable(sop_uid, 200),
            "sop_class_uid": sop_class and R.printable(sop_class, 200), "dimse_status": f"0x{status:04X}",
        })
        self._record_refusal(association_id, sop_uid, sop_class, code, message, status, kept)
        LOG.warning("refused %s with 0x%04X (%s): %s", R.printable(sop_uid or "instance", 100), status, code, R.printable(message))
        return IngestResult(status, "refused", message, sop_uid, reason_code=code, sop_class_uid=sop_class)

    def _record_refusal(self, association_id: int | None, sop_uid: str | None, sop_class: str | None, code: str, message: str, status: int, kept: Path | None) -> None:
        with self.session_factory() as session, session.begin():
            session.add(RefusedInstance(
                association_id=association_id,
                # Values from the network, escaped: a NUL or an over-long UID must not make the
                # refusal itself fail (PostgreSQL refuses NUL; SQLite would store it).
                sop_instance_uid=R.printable(sop_uid, 128) if sop_uid else None,
                sop_class_uid=R.printable(sop_class, 128) if sop_class else None,
                reason_code=code[:32],
                reason=R.printable(message, 2000),
                dimse_status=status,
                quarantine_path=os.fspath(kept) if kept else None,
            ))
