"""The DICOM listener: C-ECHO and C-STORE (CT, Enhanced CT, SEG), driven by pynetdicom events.

Received data sets stream to a file inside the spool's incoming folder (pynetdicom's chunked
receive, placed per association by ``pynetdicom_adapter``), so a several-hundred-MB SEG never sits
in memory, and the final rename is atomic. The files of an association that ends or aborts
mid-transfer are removed when it ends. Connection-level policy (allow-list at accept, caps,
deadlines, PDU limits, TLS handshake off the accept loop) is in ``transport``.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socketserver
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import uid
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from qcgate.config import NodeSettings
from qcgate.core.dicom import CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE, SEGMENTATION_STORAGE
from qcgate.errors import ConfigError
from qcgate.node import pynetdicom_adapter
from qcgate.node import refusals as R
from qcgate.node.ingest import IngestResult, Ingestor
from qcgate.node.transport import (
    Connection,
    ConnectionLimits,
    GuardedAssociationServer,
    Network,
    address_allowed,
    resolve_allowed_hosts,
)
from qcgate.observability.metrics import MetricsRegistry
from qcgate.store.models import AssociationRecord, utcnow

LOG = logging.getLogger("qcgate.node")

# Write errors that mean "no room": a full disk, a quota, a file-size limit.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
REFUSAL_LOG_INTERVAL_SECONDS = 60.0  # connection refusals: one log line and row per host and reason per interval

# Uncompressed and the compressed syntaxes real PACS and AI routers send. Stored as received;
# decoding happens only in the worker (pylibjpeg and its plugins).
ACCEPTED_TRANSFER_SYNTAXES: tuple[str, ...] = (
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.DeflatedExplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,  # retired, still seen
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
    uid.JPEGLossless,
    uid.JPEGLosslessSV1,
    uid.JPEGLSLossless,
    uid.JPEGLSNearLossless,
    uid.JPEG2000Lossless,
    uid.JPEG2000,
    uid.RLELossless,
)


@dataclass
class _AssociationState:
    record_id: int | None = None
    stored: int = 0
    refused: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _peer(assoc: Association) -> tuple[str, int]:
    address = assoc.requestor.address or ""
    return str(address), int(assoc.requestor.port or 0)


def host_is_allowed(host: str, allowed: list[str]) -> bool:
    """True when ``allowed`` is empty, or ``host`` (an address) is one of its addresses or networks.

    Names in ``allowed`` match nothing here: ``GateNode.start`` resolves them to addresses.
    """
    if not allowed:
        return True
    networks: list[Network] = []
    for entry in allowed:
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            continue
    return bool(networks) and address_allowed(host, networks)


def build_ssl_context(node: NodeSettings) -> ssl.SSLContext | None:
    tls = node.tls
    if not tls.enabled:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    if tls.ca_file is not None:
        context.load_verify_locations(cafile=str(tls.ca_file))
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    return context


def _closed_label(reason: str) -> str:
    """A short metrics label for why the node closed a connection."""
    if reason.startswith("evicted"):
        return "evicted"
    if reason.startswith("no complete A-ASSOCIATE-RQ"):
        return "request-timeout"
    if reason.startswith("TLS"):
        return "tls-handshake"
    if "PDU" in reason:
        return "pdu-too-large"
    if reason.startswith("host") and "allow-list" in reason:
        return "host-not-allowed"
    if "max_connections_per_host" in reason:
        return "host-cap"
    return "other"


class _ServerThread(threading.Thread):
    def __init__(self, server: GuardedAssociationServer) -> None:
        super().__init__(name="qcgate-accept", daemon=True)
        self.server = server

    def run(self) -> None:
        self.server.serve_forever(poll_interval=0.25)


class GateNode:
    """The Storage SCP. ``start()`` binds and returns; ``stop()`` shuts the listener down."""

    def __init__(self, node: NodeSettings, ingestor: Ingestor, session_factory: sessionmaker[Session],
                 metrics: MetricsRegistry | None = None) -> None:
        self.settings = node
        self.metrics = metrics or MetricsRegistry()
        self.ingestor = ingestor
        self.session_factory = session_factory
        self._states: dict[int, _AssociationState] = {}
        self._states_lock = threading.Lock()
        # Associations holding a slot of node.max_associations (granted in on_requested).
        self._slots: dict[int, Association] = {}
        # Received files per association not yet taken by on_store: removed when it ends.
        self._partials: dict[int, set[Path]] = {}
        self._refusals_logged: dict[tuple[str, str], float] = {}
        self._uid_guard = pynetdicom_adapter.RequestUidGuard()
        self._allowed: list[Network] = []
        self.server: GuardedAssociationServer | None = None
        self._thread: _ServerThread | None = None
        self.ae = self._build_ae()

    def _build_ae(self) -> AE:
        ae = AE(ae_title=self.settings.ae_title)
        ae.maximum_pdu_size = self.settings.max_pdu_bytes
        # The association cap is applied in on_requested to negotiated associations only; the
        # transport bounds the connections that have not negotiated yet. pynetdicom's own count
        # (every connection's thread) is set out of the way.
        ae.maximum_associations = self.settings.max_associations + self.settings.max_pending_connections + 16
        ae.network_timeout = self.settings.network_timeout_seconds
        ae.acse_timeout = self.settings.association_request_timeout_seconds
        ae.dimse_timeout = self.settings.network_timeout_seconds
        # Called-AE and calling-AE checks are done in on_requested, so each refusal is logged once.
        ae.require_called_aet = False
        ae.add_supported_context(Verification)
        sop_classes = [CT_IMAGE_STORAGE, SEGMENTATION_STORAGE]
        if self.settings.accept_enhanced_ct:
            sop_classes.append(ENHANCED_CT_IMAGE_STORAGE)
        for sop_class in sop_classes:
            ae.add_supported_context(sop_class, list(ACCEPTED_TRANSFER_SYNTAXES))
        return ae

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        handlers = [
            (evt.EVT_CONN_OPEN, self.on_conn_open),
            (evt.EVT_CONN_CLOSE, self.on_conn_close),
            (evt.EVT_REQUESTED, self.on_requested),
            (evt.EVT_ACCEPTED, self.on_accepted),
            (evt.EVT_REJECTED, self.on_rejected),
            (evt.EVT_RELEASED, self.on_ended),
            (evt.EVT_ABORTED, self.on_ended),
            (evt.EVT_DIMSE_RECV, self._uid_guard.on_dimse_recv),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_C_STORE, self.on_store),
        ]
        try:
            self._allowed = resolve_allowed_hosts(self.settings.allowed_hosts)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        s = self.settings
        limits = ConnectionLimits(
            request_timeout=s.association_request_timeout_seconds,
            max_pending=s.max_pending_connections,
            max_per_host=s.max_connections_per_host,
            max_request_bytes=s.max_association_request_bytes,
            max_pdu_bytes=s.max_pdu_bytes,
            network_timeout=s.network_timeout_seconds,
        )
        try:
            server = self.ae.make_server(
                (s.host, s.port),
                evt_handlers=handlers,
                server_class=GuardedAssociationServer,
                limits=limits,
                allowed=self._allowed,
                tls_context=build_ssl_context(s),
                on_refused=self.on_connection_refused,
                on_closed=self.on_connection_closed,
            )
        except OSError as exc:
            raise ConfigError(f"cannot listen on {s.host}:{s.port}: {exc.strerror or exc}") from None
        self.server = server
        self._thread = _ServerThread(server)
        self._thread.start()
        LOG.info("listening on %s:%d as %s", s.host, self.bound_port, s.ae_title)

    @property
    def bound_port(self) -> int:
        return int(self.server.server_address[1]) if self.server else self.settings.port

    def stop(self) -> None:
        if self.server is not None:
            socketserver.BaseServer.shutdown(self.server)  # stop the accept loop
            self.server.server_close()
            self.server = None

    def connection_counts(self) -> tuple[int, int]:
        """(open connections, those that have not sent their A-ASSOCIATE-RQ yet)."""
        return self.server.table.counts() if self.server else (0, 0)

    # --- connection policy (before anything is read) ------------------------------------------

    def _first_in_interval(self, host: str, reason: str) -> bool:
        now = time.monotonic()
        key = (host, _closed_label(reason))
        last = self._refusals_logged.get(key)
        if last is not None and now - last < REFUSAL_LOG_INTERVAL_SECONDS:
            return False
        if len(self._refusals_logged) > 10_000:
            self._refusals_logged.clear()
        self._refusals_logged[key] = now
        return True

    def on_connection_refused(self, host: str, port: int, reason: str) -> None:
        """A connection closed at accept (allow-list, per-host cap): nothing was read from it."""
        self.metrics.increment("qcgate_connections_closed_total", reason=_closed_label(reason))
        if not self._first_in_interval(host, reason):
            return
        LOG.warning("connection from %s:%d refused: %s (further refusals from this host for this reason are "
                    "counted, not logged, for %.0f s)", host, port, reason, REFUSAL_LOG_INTERVAL_SECONDS)
        self.metrics.increment("qcgate_associations_total", outcome="rejected")
        self._write_association(AssociationRecord(
            calling_ae="", called_ae="", peer_host=host[:64], peer_port=port,
            ended_at=utcnow(), outcome="rejected", reason=reason,
        ))

    def on_connection_closed(self, connection: Connection, reason: str) -> None:
        """A connection the node closed before association: deadline, eviction, TLS failure."""
        self.metrics.increment("qcgate_connections_closed_total", reason=_closed_label(reason))
        if self._first_in_interval(connection.host, reason):
            LOG.warning("connection from %s:%d closed: %s (further closes from this host for this reason are "
                        "counted, not logged, for %.0f s)", connection.host, connection.port, reason, REFUSAL_LOG_INTERVAL_SECONDS)

    def on_conn_open(self, event: evt.Event) -> None:
        assoc = event.assoc
        key = id(assoc)
        with self._states_lock:
            self._partials[key] = set()

        def created(path: Path) -> None:
            with self._states_lock:
                self._partials.setdefault(key, set()).add(path)

        pynetdicom_adapter.register_receiver(assoc, self.ingestor.spool.incoming, created)

    def on_conn_close(self, event: evt.Event) -> None:
        self._release(event.assoc)

    def _release(self, assoc: Association) -> None:
        """The association is over: free its slot and remove what it left half-received."""
        key = id(assoc)
        with self._states_lock:
            self._slots.pop(key, None)
            leftovers = self._partials.pop(key, set())
        pynetdicom_adapter.unregister_receiver(assoc)
        removed = 0
        for path in leftovers:
            try:
                path.unlink()
                removed += 1
            except FileNotFoundError:
                pass
            except OSError as exc:
                LOG.error("could not remove the partial receive %s: %s", path.name, exc)
        if removed:
            host, port = _peer(assoc)
            LOG.info("removed %d partial receive(s) of the association from %s:%d", removed, host, port)

    # --- association policy ----------------------------------------------------------------

    def refusal_reason(self, calling_ae: str, called_ae: str, host: str) -> tuple[str, int] | None:
        """Why an association must be rejected, with the A-ASSOCIATE-RJ diagnostic; None if allowed."""
        if self.settings.require_called_ae_title and called_ae != self.settings.ae_title:
            return f"called AE title {called_ae!r} is not {self.settings.ae_title!r}", 0x07
        allowed_aes = self.settings.allowed_calling_ae_titles
        if allowed_aes and calling_ae not in allowed_aes:
            return f"calling AE title {calling_ae!r} is not in the allow-list", 0x03
        if not address_allowed(host, self._allowed):
            return f"host {host} is not in the allow-list", 0x01
        return None

    def _take_slot(self, assoc: Association) -> bool:
        with self._states_lock:
            for key, holder in list(self._slots.items()):
                if not holder.is_alive():
                    del self._slots[key]
            if len(self._slots) >= self.settings.max_associations:
                return False
            self._slots[id(assoc)] = assoc
            return True

    def on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        primitive = assoc.requestor.primitive
        calling = R.clean_text(str(primitive.calling_ae_title), 16) or ""
        called = R.clean_text(str(primitive.called_ae_title), 16) or ""
        host, port = _peer(assoc)
        refusal = self.refusal_reason(calling, called, host)
        if refusal is None:
            if self._take_slot(assoc):
                return
            reason = f"limit of {self.settings.max_associations} concurrent associations reached"
            LOG.warning("association from %s@%s:%d rejected: %s", calling, host, port, reason)
            self.metrics.increment("qcgate_associations_total", outcome="rejected")
            self._write_association(AssociationRecord(
                calling_ae=calling, called_ae=called, peer_host=host[:64], peer_port=port,
                ended_at=utcnow(), outcome="rejected", reason="association limit reached",
            ))
            # Transient, by the service provider (presentation): local limit exceeded.
            assoc.acse.send_reject(0x02, 0x03, 0x02)
            assoc.kill()
            return
        reason, diagnostic = refusal
        LOG.warning("association from %s@%s:%d rejected: %s", calling, host, port, reason)
        self.metrics.increment("qcgate_associations_total", outcome="rejected")
        self._write_association(AssociationRecord(
            calling_ae=calling, called_ae=called, peer_host=host[:64], peer_port=port,
            ended_at=utcnow(), outcome="rejected", reason=reason,
        ))
        # Permanent rejection by the service user: a misconfigured peer will not fix itself.
        assoc.acse.send_reject(0x01, 0x01, diagnostic)
        # As pynetdicom does for its own rejections: let the DUL flush the A-ASSOCIATE-RJ first.
        assoc.kill()

    def on_rejected(self, event: evt.Event) -> None:
        # Rejections made by pynetdicom itself (ours are logged in on_requested).
        assoc = event.assoc
        self._release(assoc)
        primitive = assoc.requestor.primitive
        calling = R.clean_text(str(primitive.calling_ae_title), 16) or "" if primitive else ""
        host, port = _peer(assoc)
        LOG.warning("association from %s@%s:%d rejected by the DICOM stack", calling, host, port)
        self.metrics.increment("qcgate_associations_total", outcome="rejected")
        self._write_association(AssociationRecord(
            calling_ae=calling, called_ae=self.settings.ae_title, peer_host=host[:64], peer_port=port,
            ended_at=utcnow(), outcome="rejected", reason="rejected during negotiation",
        ))

    def on_accepted(self, event: evt.Event) -> None:
        assoc = event.assoc
        host, port = _peer(assoc)
        record = AssociationRecord(
            calling_ae=R.clean_text(str(assoc.requestor.ae_title), 16) or "",
            called_ae=self.settings.ae_title,
            peer_host=host[:64],
            peer_port=port,
        )
        state = _AssociationState(record_id=self._write_association(record))
        self.metrics.increment("qcgate_associations_total", outcome="accepted")
        with self._states_lock:
            self._states[id(assoc)] = state
        LOG.info("association %s accepted from %s@%s:%d", state.record_id, record.calling_ae, host, port)

    def on_ended(self, event: evt.Event) -> None:
        outcome = "released" if event.event is evt.EVT_RELEASED else "aborted"
        self._release(event.assoc)
        with self._states_lock:
            state = self._states.pop(id(event.assoc), None)
        if state is None or state.record_id is None:
            return
        try:
            with self.session_factory() as session, session.begin():
                record = session.get(AssociationRecord, state.record_id)
                if record is not None:
                    record.ended_at = utcnow()
                    record.outcome = outcome
                    record.instances_stored = state.stored
                    record.instances_refused = state.refused
        except SQLAlchemyError as exc:
            LOG.error("could not record the end of association %s: %s", state.record_id, exc)
        LOG.info("association %s %s: %d stored, %d refused", state.record_id, outcome, state.stored, state.refused)

    def _write_association(self, record: AssociationRecord) -> int | None:
        try:
            with self.session_factory() as session, session.begin():
                session.add(record)
                session.flush()
                return int(record.id)
        except SQLAlchemyError as exc:
            LOG.error("could not record association from %s: %s", record.peer_host, exc)
            return None

    # --- services ----------------------------------------------------------------------------

    def on_echo(self, event: evt.Event) -> int:
        return 0x0000

    def on_store(self, event: evt.Event) -> Dataset:
        request = event.request
        sop_uid = str(request.AffectedSOPInstanceUID or "").strip()
        sop_class = str(request.AffectedSOPClassUID or "").strip()
        state = self._states.get(id(event.assoc)) or _AssociationState()
        try:
            received: Path | None = Path(event.dataset_path)
        except AttributeError:
            received = None
        if received is not None:
            with self._states_lock:
                self._partials.get(id(event.assoc), set()).discard(received)
        incoming = received
        try:
            result = self._store(event, request, received, sop_uid, sop_class, state)
        except (SQLAlchemyError, OSError) as exc:
            # Nothing was acknowledged, so nothing is lost: the sender keeps its copy and retries.
            for leftover in (received, getattr(exc, "_qcgate_incoming", None)):
                if isinstance(leftover, Path):
                    leftover.unlink(missing_ok=True)
            if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
                result = self.ingestor.refuse_for_disk(incoming, state.record_id, sop_uid, f"disk full: {exc.strerror}")
                LOG.warning("refused %s with 0xA700: %s", R.printable(sop_uid, 100), result.message)
            else:
                LOG.error("refused %s with 0xA700: storage unavailable: %s", R.printable(sop_uid, 100), R.printable(exc, 500))
                self.metrics.increment("qcgate_instances_refused_total", reason=R.STORAGE_UNAVAILABLE)
                return _status(R.STATUS_OUT_OF_RESOURCES, "storage unavailable, retry later")
        except Exception as exc:  # a bug must cost one refusal, not the association
            LOG.exception("refused %s with 0xC000: unexpected error: %s", R.printable(sop_uid, 100), exc)
            self.metrics.increment("qcgate_instances_refused_total", reason=R.INTERNAL_ERROR)
            return _status(R.STATUS_CANNOT_UNDERSTAND, f"unexpected error: {type(exc).__name__}")
        with state.lock:
            if result.status == R.STATUS_SUCCESS:
                state.stored += 1
            else:
                state.refused += 1
        if result.outcome == "refused":
            self.metrics.increment("qcgate_instances_refused_total", reason=result.reason_code or "unknown")
        else:
            self.metrics.increment("qcgate_instances_received_total", sop_class=sop_class, outcome=result.outcome)
        return _status(result.status, result.message)

    def _store(self, event: evt.Event, request: object, received: Path | None, sop_uid: str, sop_class: str,
               state: _AssociationState) -> IngestResult:
        if received is not None:
            failure = pynetdicom_adapter.write_error(received)
            if failure is not None:  # the disk filled during the transfer; the file is gone already
                disk_full = failure.errno in _NO_SPACE
                message = f"{'disk full' if disk_full else 'write failed'} while receiving: {failure.strerror or failure}"
                LOG.warning("refused %s with 0xA700: %s", R.printable(sop_uid, 100), message)
                if disk_full:
                    return self.ingestor.refuse_for_disk(None, state.record_id, sop_uid, message)
                raise failure
        if self.ingestor.disk_is_low():
            result = self.ingestor.refuse_for_disk(received, state.record_id, sop_uid)
            LOG.warning("refused %s with 0xA700: %s", R.printable(sop_uid, 100), result.message)
            return result
        if received is None:
            incoming = self.ingestor.spool.write_incoming(event.encoded_dataset())
            streamed_sha256 = None
        else:
            streamed_sha256 = pynetdicom_adapter.received_sha256(received)  # hashed as it arrived
            incoming = self.ingestor.spool.new_incoming_path()
            received.rename(incoming)  # same folder: pynetdicom wrote it into the spool
        try:
            originals = self._uid_guard.pop(event.assoc, getattr(request, "MessageID", None))
            for keyword, value in (originals or {}).items():
                return self.ingestor.refuse(incoming, R.INVALID_UID, f"{keyword} in the C-STORE request is {len(value)} characters long (at most 64)",
                                            state.record_id, value, sop_class)
            for keyword, value in (("AffectedSOPInstanceUID", sop_uid), ("AffectedSOPClassUID", sop_class)):
                problem = R.uid_problem(value)
                if problem:
                    return self.ingestor.refuse(incoming, R.INVALID_UID, f"{keyword} {R.printable(value, 80)!r} in the C-STORE request {problem}",
                                                state.record_id, sop_uid, sop_class)
            return self.ingestor.ingest(
                incoming,
                association_id=state.record_id,
                expected_sop_instance_uid=sop_uid,
                expected_sop_class_uid=sop_class,
                sha256=streamed_sha256,
            )
        except OSError as exc:
            exc._qcgate_incoming = incoming  # type: ignore[attr-defined]
            raise


def _status(code: int, comment: str) -> Dataset:
    status = Dataset()
    status.Status = code
    if code != R.STATUS_SUCCESS:
        status.ErrorComment = R.printable(comment, 64)
    return status
