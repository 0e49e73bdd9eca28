"""STOW-RS in: ``POST /dicomweb/studies[/{study}]`` (DICOM PS3.18 Store Transaction) on the gate's HTTP server.

The body, ``multipart/related; type="application/dicom"``, is parsed as it arrives
(``qcgate.console.multipart``): each part streams into a file in the spool's incoming folder and, once
complete, goes through the same ``Ingestor.ingest`` as a C-STORE (checked, fsynced, renamed into the
spool, its row committed) before the next part is read. Only then does the response say "stored": an
instance listed in ReferencedSOPSequence is durable, joined to its case like one sent by C-STORE.

Answers (PS3.18 Store Transaction; application/dicom+json, a Store Instances Response):

=====  ==========================================================================================
200    every instance stored (ReferencedSOPSequence)
202    some stored, some failed (FailedSOPSequence with a FailureReason per failed instance)
409    none stored: every instance failed
400    a malformed request: no boundary, a broken or truncated body, no part, a path study that is
       not a UID. Complete parts before the defect are stored and listed; the defective part is not
413    the body is larger than ``http.stow_max_bytes`` (parts already complete stay stored, listed)
415    the Content-Type is not multipart/related with type application/dicom
401    no valid bearer token; 403: the user is neither a ``sender`` nor an ``admin``
=====  ==========================================================================================

FailureReason is the C-STORE status the ingest step answered (0xA900 data set does not match the SOP
class — e.g. a study UID other than the path's —, 0xC000 cannot understand, 0xA700 out of resources:
disk, storage, or a part over ``http.stow_max_part_bytes``). A failed item also carries its reason as
text in ErrorComment (0000,0902), as a DIMSE response would, and the response a ``Warning`` header.
"""

from __future__ import annotations

import errno
import logging
import time
from pathlib import Path
from typing import Any, BinaryIO

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from qcgate.config import Settings
from qcgate.console.multipart import MultipartError, MultipartParser, PartData, PartHeaders, parse_media_type
from qcgate.core.refusals import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SUCCESS,
    RefusalCode,
)
from qcgate.node import refusals as R
from qcgate.node.ingest import IngestResult, Ingestor
from qcgate.store import users
from qcgate.store.users import Principal

LOG = logging.getLogger("qcgate.stow")

DICOM_JSON = "application/dicom+json"
DICOM = "application/dicom"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_SEQUENCE = "00081199"
FAILURE_REASON = "00081197"
REFERENCED_SOP_CLASS_UID = "00081150"
REFERENCED_SOP_INSTANCE_UID = "00081155"
ERROR_COMMENT = "00000902"
ERROR_COMMENT_LENGTH = 64  # LO
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_WRITE_BUFFER = 1 << 20


class _Part:
    """One part of the request while it is being received."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.path: Path | None = None
        self.handle: BinaryIO | None = None
        self.size = 0
        self.failure: tuple[int, str] | None = None  # (FailureReason, why) decided before ingest
        self.disk_full = False


class StoreOutcome:
    """What became of each instance of one request, and the answer built from it."""

    def __init__(self) -> None:
        self.stored: list[dict[str, Any]] = []
        self.failed: list[dict[str, Any]] = []
        self.reasons: dict[int, int] = {}
        self.messages: list[str] = []

    def add(self, result: IngestResult) -> None:
        if result.status == STATUS_SUCCESS:
            self.stored.append(_item(result.sop_class_uid, result.sop_instance_uid))
        else:
            comment = f"{result.reason_code}: {result.message}" if result.reason_code else result.message
            self.fail(result.status, comment, result.sop_class_uid, result.sop_instance_uid)

    def fail(self, reason: int, comment: str, sop_class: str | None = None, sop_uid: str | None = None) -> None:
        item = _item(sop_class, sop_uid)
        item[FAILURE_REASON] = {"vr": "US", "Value": [reason]}
        item[ERROR_COMMENT] = {"vr": "LO", "Value": [R.printable(comment, ERROR_COMMENT_LENGTH)]}
        self.failed.append(item)
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        self.messages.append(R.printable(comment, 300))

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if self.failed:
            body[FAILED_SOP_SEQUENCE] = {"vr": "SQ", "Value": self.failed}
        if self.stored:
            body[REFERENCED_SOP_SEQUENCE] = {"vr": "SQ", "Value": self.stored}
        return body

    def status(self) -> int:
        if not self.failed:
            return 200
        return 202 if self.stored else 409


def _item(sop_class: str | None, sop_uid: str | None) -> dict[str, Any]:
    item: dict[str, Any] = {}
    if sop_class and not R.uid_problem(sop_class):
        item[REFERENCED_SOP_CLASS_UID] = {"vr": "UI", "Value": [sop_class]}
    if sop_uid and not R.uid_problem(sop_uid):
        item[REFERENCED_SOP_INSTANCE_UID] = {"vr": "UI", "Value": [sop_uid]}
    return item


class RequestRefused(Exception):
    """A request-level answer (4xx) with a message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def check_content_type(value: str) -> str:
    """The boundary of a STOW-RS Content-Type; RequestRefused (415 or 400) when it is not one."""
    media_type, params = parse_media_type(value or "")
    if media_type != "multipart/related":
        raise RequestRefused(415, f"Content-Type {R.printable(media_type or '(none)', 100)!r} is not supported: "
                                  'send multipart/related; type="application/dicom"')
    part_type = params.get("type", DICOM).strip().lower()
    if part_type != DICOM:
        raise RequestRefused(415, f"multipart/related of type {R.printable(part_type, 100)!r} is not supported: only "
                                  'type="application/dicom" (Part 10 instances)')
    boundary = params.get("boundary", "")
    if not boundary or len(boundary) > 70:
        raise RequestRefused(400, "the Content-Type has no usable boundary parameter (1 to 70 characters)")
    return boundary


class StowService:
    """The STOW-RS routes over the gate's ``Ingestor``."""

    def __init__(self, settings: Settings, session_factory: sessionmaker[Session], ingestor: Ingestor,
                 metrics: Any = None) -> None:
        self.session_factory = session_factory
        self.ingestor = ingestor
        self.spool = ingestor.spool
        self.metrics = metrics
        self.max_bytes = settings.http.stow_max_bytes
        self.max_part_bytes = settings.http.stow_max_part_bytes

    def routes(self) -> list[Any]:
        from starlette.routing import Route

        return [Route("/dicomweb/studies", self.store, methods=["POST"]),
                Route("/dicomweb/studies/{study}", self.store, methods=["POST"])]

    # --- the request ---------------------------------------------------------------------

    async def store(self, request: Any) -> Any:
        from starlette.concurrency import run_in_threadpool
        from starlette.requests import ClientDisconnect

        started = time.monotonic()
        study = request.path_params.get("study")
        client = request.client.host if request.client else "unknown"
        who = "-"
        outcome = StoreOutcome()
        received = 0
        parser: MultipartParser | None = None
        part: _Part | None = None
        try:
            principal = await run_in_threadpool(self._principal, request.headers.get("authorization", ""))
            if principal is None:
                raise RequestRefused(401, "authentication required: a bearer token (qcgate users token NAME)")
            who = principal.name
            if not principal.may_store():
                raise RequestRefused(403, f"storing needs the role sender or admin; {principal.name} is a {principal.role}")
            boundary = check_content_type(request.headers.get("content-type", ""))
            if study is not None and R.uid_problem(study):
                raise RequestRefused(400, f"the study in the path {R.printable(study, 80)!r} {R.uid_problem(study)}")
            declared = request.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
                raise RequestRefused(413, f"the body ({int(declared)} bytes) is larger than http.stow_max_bytes ({self.max_bytes})")
            parser = MultipartParser(boundary)
            async for chunk in request.stream():
                received += len(chunk)
                over = received - self.max_bytes
                if over > 0:  # the bytes within the limit are parsed (parts complete in them are stored), then 413
                    chunk = chunk[:len(chunk) - over]
                for event in parser.feed(chunk):
                    if isinstance(event, PartData):
                        if part is not None:
                            self._write(part, event.data)
                    elif isinstance(event, PartHeaders):
                        part = self._begin(parser.parts, event.headers)
                    else:  # the part is complete
                        assert part is not None
                        done, part = part, None
                        outcome.add(await run_in_threadpool(self._finish, done, study))
                if parser.done:
                    break
                if over > 0:
                    raise RequestRefused(413, f"the body is larger than http.stow_max_bytes ({self.max_bytes})")
            parser.finish()
            if parser.parts == 0:
                raise RequestRefused(400, "the request holds no instance")
            status = outcome.status()
        except RequestRefused as refused:
            status = refused.status
            self._fail_open_part(part, outcome, refused)
            outcome.messages.insert(0, str(refused))
        except MultipartError as exc:
            status = 400
            self._fail_open_part(part, outcome, exc)
            outcome.messages.insert(0, f"malformed multipart body: {exc}")
        except ClientDisconnect:
            status = 400  # nobody reads it; the log says what happened
            outcome.messages.insert(0, "the client disconnected before the end of the body")
            self._fail_open_part(part, outcome, None)
        except Exception as exc:  # a bug costs this request, never a traceback to the client
            LOG.exception("STOW-RS request failed: %s", exc)
            status = 500
            outcome.messages.insert(0, f"internal error: {type(exc).__name__}")
            self._fail_open_part(part, outcome, None)
        finally:
            if part is not None:
                self._discard(part)
        self._log(status, who, client, study, outcome, received, time.monotonic() - started)
        return self._response(status, outcome)

    def _principal(self, authorization: str) -> Principal | None:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        with self.session_factory() as db:
            principal = users.principal_for_token(db, token.strip())
            db.commit()  # the token's last use
            return principal

    # --- one part -----------------------------------------------------------------------

    def _begin(self, index: int, headers: dict[str, str]) -> _Part:
        part = _Part(index)
        media_type, _ = parse_media_type(headers.get("content-type", DICOM))
        if media_type != DICOM:
            part.failure = (STATUS_CANNOT_UNDERSTAND, f"part {index} is {R.printable(media_type, 60)}, not {DICOM}")
            return part
        if self.ingestor.disk_is_low():
            part.disk_full = True
            return part
        part.path = self.spool.new_incoming_path()
        try:
            part.handle = open(part.path, "wb", buffering=_WRITE_BUFFER)
        except OSError as exc:
            self._write_failed(part, exc)
        return part

    def _write(self, part: _Part, data: bytes) -> None:
        part.size += len(data)
        if part.handle is None:
            return  # failed already: the rest of the part is read and dropped
        if part.size > self.max_part_bytes:
            self._discard(part)
            part.failure = (STATUS_OUT_OF_RESOURCES, f"part {part.index} is larger than http.stow_max_part_bytes ({self.max_part_bytes})")
            return
        try:
            part.handle.write(data)
        except OSError as exc:
            self._write_failed(part, exc)

    def _write_failed(self, part: _Part, exc: OSError) -> None:
        self._discard(part)
        if exc.errno in _NO_SPACE:
            part.disk_full = True
        else:
            LOG.error("STOW-RS: cannot write part %d into the spool: %s", part.index, R.printable(exc, 300))
            part.failure = (STATUS_OUT_OF_RESOURCES, f"{RefusalCode.STORAGE_UNAVAILABLE}: cannot write to the spool")

    def _finish(self, part: _Part, study: str | None) -> IngestResult:
        """Close the complete part and ingest it (in a worker thread: fsync and a commit)."""
        if part.disk_full:
            self._discard(part)
            return self.ingestor.refuse_for_disk(None, None, None)
        if part.failure is not None:
            self._discard(part)
            return IngestResult(part.failure[0], "refused", part.failure[1])
        assert part.handle is not None and part.path is not None
        path, part.path = part.path, None
        try:
            part.handle.close()
            part.handle = None
            result = self.ingestor.ingest(path, expected_study_instance_uid=study)
        except (SQLAlchemyError, OSError) as exc:
            # Nothing acknowledged, nothing lost: the sender keeps its copy and retries this one.
            if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
                return self.ingestor.refuse_for_disk(None, None, None, f"disk full: {exc.strerror}")
            LOG.error("STOW-RS: part %d refused with 0xA700: storage unavailable: %s", part.index, R.printable(exc, 500))
            self._count("qcgate_instances_refused_total", reason=RefusalCode.STORAGE_UNAVAILABLE)
            return IngestResult(STATUS_OUT_OF_RESOURCES, "refused", "storage unavailable, retry later",
                                reason_code=RefusalCode.STORAGE_UNAVAILABLE)
        except Exception as exc:  # a bug costs this instance, not the request
            LOG.exception("STOW-RS: part %d refused with 0xC000: unexpected error: %s", part.index, exc)
            self._count("qcgate_instances_refused_total", reason=RefusalCode.INTERNAL_ERROR)
            return IngestResult(STATUS_CANNOT_UNDERSTAND, "refused", f"unexpected error: {type(exc).__name__}",
                                reason_code=RefusalCode.INTERNAL_ERROR)
        finally:
            path.unlink(missing_ok=True)  # an ingested file has moved on; this removes only a failure's leftover
        if result.outcome == "refused":
            self._count("qcgate_instances_refused_total", reason=result.reason_code or "unknown")
        else:
            self._count("qcgate_instances_received_total", sop_class=result.sop_class_uid or "", outcome=result.outcome)
        return result

    def _fail_open_part(self, part: _Part | None, outcome: StoreOutcome, why: Exception | None) -> None:
        """The request ended inside a part: that part is dropped, and said so."""
        if part is None:
            return
        self._discard(part)
        reason = f"part {part.index} incomplete, not stored" + (f": {why}" if why else "")
        outcome.fail(STATUS_CANNOT_UNDERSTAND, reason)

    @staticmethod
    def _discard(part: _Part) -> None:
        if part.handle is not None:
            try:
                part.handle.close()
            except OSError:
                pass
            part.handle = None
        if part.path is not None:
            part.path.unlink(missing_ok=True)
            part.path = None

    # --- the answer ---------------------------------------------------------------------

    def _response(self, status: int, outcome: StoreOutcome) -> Any:
        import json

        from starlette.responses import Response

        headers: dict[str, str] = {}
        if status == 401:
            headers["www-authenticate"] = 'Bearer realm="qcgate"'
        if outcome.messages:
            # PS3.18 §8.4 (Warning header): the reasons in words, for people reading logs of the sender.
            text = "; ".join(outcome.messages)[:900].replace('"', "'").encode("ascii", "backslashreplace").decode("ascii")
            headers["warning"] = f'299 qcgate "{text}"'
        body = outcome.body()
        if not body:  # nothing was received: the request itself was refused
            return Response(json.dumps({"error": outcome.messages[0] if outcome.messages else "refused"}),
                            status_code=status, media_type="application/json", headers=headers)
        return Response(json.dumps(body), status_code=status, media_type=DICOM_JSON, headers=headers)

    def _count(self, name: str, **labels: str) -> None:
        if self.metrics is not None:
            self.metrics.increment(name, **labels)

    def _log(self, status: int, who: str, client: str, study: str | None, outcome: StoreOutcome, received: int,
             seconds: float) -> None:
        reasons = ", ".join(f"0x{code:04X}x{count}" for code, count in sorted(outcome.reasons.items()))
        level = logging.INFO if status == 200 else logging.WARNING
        LOG.log(level, "STOW-RS %s from %s@%s%s: %d stored, %d failed%s, %.1f MB in %.2f s%s", status, R.printable(who, 64),
                client, f" study {R.printable(study, 80)}" if study else "", len(outcome.stored), len(outcome.failed),
                f" ({reasons})" if reasons else "", received / 1e6, seconds,
                f": {outcome.messages[0]}" if outcome.messages else "")


def stow_routes(settings: Settings, session_factory: sessionmaker[Session], ingestor: Ingestor,
                metrics: Any = None) -> list[Any]:
    """The STOW-RS routes, for ``create_app``."""
    return StowService(settings, session_factory, ingestor, metrics).routes()

