"""Ingest one received instance: check it, store it durably, record it, link it to its case.

The order is what makes an acknowledgement safe: the file is fsynced and renamed into the spool,
then the database row is committed, and only then does the caller return Success. A crash between
the two leaves a spool file without a row, which is harmless: the sender was not acknowledged and
re-sends, and the re-send finds the same bytes at the same path.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import insert, select
from sqlalchemy.exc import DataError, IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from qcgate.core.dicom import InstanceHeader
from qcgate.node import refusals as R
from qcgate.node.dicom_header import HeaderError, read_header
from qcgate.node.spool import Spool, sha256_of_file
from qcgate.store.cases import case_series_for, get_or_create_case_id, touch_case
from qcgate.store.models import Instance, RefusedInstance, SegReference, utcnow

LOG = logging.getLogger("qcgate.ingest")

DISK_REFUSAL_WINDOW_SECONDS = 300.0  # /healthz reports disk refusals this recent

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
    ) -> IngestResult:
        """Ingest a complete Part 10 file at ``incoming`` (inside the spool's incoming folder).

        ``expected_*`` are what the request said (C-STORE's affected UIDs, STOW-RS's study in the
        path): a data set that differs is refused as ``uid-mismatch``."""
        header: InstanceHeader | None = None
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
            # The request's UIDs, else the data set's where its header could be read (STOW-RS has no request UIDs).
            return self._quarantine(incoming, exc.code, str(exc), association_id,
                                    expected_sop_instance_uid or (header.sop_instance_uid if header else None),
                                    expected_sop_class_uid or (header.sop_class_uid if header else None))
        self.spool.sync_file(incoming)
        digest = sha256_of_file(incoming)
        size = incoming.stat().st_size
        relative = self.spool.relative_path_for(header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid)
        try:
            return self._store(incoming, header, relative, digest, size, association_id)
        except DataError as exc:
            # A value the database refuses is a defect of the data set that validation missed: permanent.
            LOG.error("the database refused a value of %s: %s", header.sop_instance_uid, R.printable(exc.orig, 300))
            return self._quarantine(incoming, R.INVALID_ATTRIBUTE, f"a value cannot be stored: {exc.orig}", association_id,
                                    header.sop_instance_uid, header.sop_class_uid)

    def _store(self, incoming: Path, header: InstanceHeader, relative: Path, digest: str, size: int, association_id: int | None) -> IngestResult:
        # Core statements, not ORM objects: this runs once per instance on the acknowledgement path.
        with self._write_lock, self.session_factory() as session:
            existing = session.execute(
                select(Instance.sha256, Instance.case_id).where(Instance.sop_instance_uid == header.sop_instance_uid)
            ).first()
            if existing is not None:
                return self._resend(incoming, header, existing.sha256, existing.case_id, digest, association_id)
            try:
                case_id = self._insert_rows(session, header, relative, digest, size, association_id)
            except IntegrityError:
                # The cached case was deleted (retention): forget the cache and link afresh, once.
                session.rollback()
                self._case_ids.clear()
                case_id = self._insert_rows(session, header, relative, digest, size, association_id)
            # The rows are written but not committed: the file is made durable in its place first.
            self.spool.commit(incoming, relative)
            session.commit()
            LOG.debug("stored %s (%d bytes) in case %s", header.sop_instance_uid, size, case_id)
            return IngestResult(R.STATUS_SUCCESS, "stored", "stored", header.sop_instance_uid, case_id,
                                sop_class_uid=header.sop_class_uid)

    def _insert_rows(self, session: Session, header: InstanceHeader, relative: Path, digest: str, size: int,
                     association_id: int | None) -> int | None:
        """Insert the instance (and a SEG's references), link and touch its case; no commit."""
        now = utcnow()
        case_id = self._case_id(session, header)
        instance_id = session.execute(insert(Instance).values(
            sop_instance_uid=header.sop_instance_uid,
            sop_class_uid=header.sop_class_uid,
            study_instance_uid=header.study_instance_uid,
            series_instance_uid=header.series_instance_uid,
            modality=header.modality,
            transfer_syntax_uid=header.transfer_syntax_uid,
            spool_path=str(relative),
            size_bytes=size,
            sha256=digest,
            received_at=now,
            association_id=association_id,
            case_id=case_id,
            referenced_series_uid=header.referenced_series_uids[0] if header.referenced_series_uids else None,
            manufacturer=header.manufacturer,
            algorithm_name=header.algorithm_name,
            algorithm_version=header.algorithm_version,
        ).returning(Instance.id)).scalar_one()
        if header.referenced_sop_instance_uids:
            session.execute(insert(SegReference), [
                {"seg_instance_id": instance_id, "referenced_sop_instance_uid": uid}
                for uid in sorted(header.referenced_sop_instance_uids)
            ])
        if case_id is not None:
            touch_case(session, case_id, now)
        return case_id

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
