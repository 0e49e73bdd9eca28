"""The DICOM listener: C-ECHO and C-STORE (CT, Enhanced CT, SEG), driven by pynetdicom events.

Received data sets stream to a file inside the spool's incoming folder (pynetdicom's chunked
receive), so a several-hundred-MB SEG never sits in memory, and the final rename is atomic.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import uid
from pydicom.dataset import Dataset
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from qcgate.config import NodeSettings
from qcgate.errors import ConfigError
from qcgate.core.dicom import CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE, SEGMENTATION_STORAGE
from qcgate.node.ingest import STATUS_CANNOT_UNDERSTAND, STATUS_OUT_OF_RESOURCES, Ingestor
from qcgate.observability.metrics import MetricsRegistry
from qcgate.store.models import AssociationRecord, utcnow

LOG = logging.getLogger("qcgate.node")

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
    """True when ``allowed`` is empty, or ``host`` matches an address, a CIDR network or a name in it."""
    if not allowed:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host in allowed
    for entry in allowed:
        try:
            if address in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            if entry == host:
                return True
    return False


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
        self.server: ThreadedAssociationServer | None = None
        self.ae = self._build_ae()

    def _build_ae(self) -> AE:
        # Stream data sets to disk; the temporary files land in the spool so renames are atomic.
        _config.STORE_RECV_CHUNKED_DATASET = True
        tempfile.tempdir = str(self.ingestor.spool.incoming)
        ae = AE(ae_title=self.settings.ae_title)
        ae.maximum_pdu_size = self.settings.max_pdu_bytes
        ae.maximum_associations = self.settings.max_associations
        ae.network_timeout = self.settings.network_timeout_seconds
        ae.acse_timeout = self.settings.network_timeout_seconds
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
            (evt.EVT_REQUESTED, self.on_requested),
            (evt.EVT_ACCEPTED, self.on_accepted),
            (evt.EVT_REJECTED, self.on_rejected),
            (evt.EVT_RELEASED, self.on_ended),
            (evt.EVT_ABORTED, self.on_ended),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_C_STORE, self.on_store),
        ]
        try:
            self.server = self.ae.start_server(
                (self.settings.host, self.settings.port),
                block=False,
                evt_handlers=handlers,
                ssl_context=build_ssl_context(self.settings),
            )
        except OSError as exc:
            raise ConfigError(f"cannot listen on {self.settings.host}:{self.settings.port}: {exc.strerror or exc}") from None
        LOG.info("listening on %s:%d as %s", self.settings.host, self.bound_port, self.settings.ae_title)

    @property
    def bound_port(self) -> int:
        return int(self.server.server_address[1]) if self.server else self.settings.port

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    # --- association policy ----------------------------------------------------------------

    def refusal_reason(self, calling_ae: str, called_ae: str, host: str) -> tuple[str, int] | None:
        """Why an association must be rejected, with the A-ASSOCIATE-RJ diagnostic; None if allowed."""
        if self.settings.require_called_ae_title and called_ae != self.settings.ae_title:
            return f"called AE title {called_ae!r} is not {self.settings.ae_title!r}", 0x07
        allowed_aes = self.settings.allowed_calling_ae_titles
        if allowed_aes and calling_ae not in allowed_aes:
            return f"calling AE title {calling_ae!r} is not in the allow-list", 0x03
        if not host_is_allowed(host, self.settings.allowed_hosts):
            return f"host {host} is not in the allow-list", 0x01
        return None

    def on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        primitive = assoc.requestor.primitive
        calling = str(primitive.calling_ae_title).strip()
        called = str(primitive.called_ae_title).strip()
        host, port = _peer(assoc)
        refusal = self.refusal_reason(calling, called, host)
        if refusal is None:
            return
        reason, diagnostic = refusal
        LOG.warning("association from %s@%s:%d rejected: %s", calling, host, port, reason)
        self.metrics.increment("qcgate_associations_total", outcome="rejected")
        self._write_association(AssociationRecord(
            calling_ae=calling[:16], called_ae=called[:16], peer_host=host[:64], peer_port=port,
            ended_at=utcnow(), outcome="rejected", reason=reason,
        ))
        # Permanent rejection by the service user: a misconfigured peer will not fix itself.
        assoc.acse.send_reject(0x01, 0x01, diagnostic)
        # As pynetdicom does for its own rejections: let the DUL flush the A-ASSOCIATE-RJ first.
        assoc.kill()

    def on_rejected(self, event: evt.Event) -> None:
        # Rejections made by pynetdicom itself (e.g. the association limit); ours are logged above.
        assoc = event.assoc
        primitive = assoc.requestor.primitive
        calling = str(primitive.calling_ae_title).strip() if primitive else ""
        host, port = _peer(assoc)
        if primitive is not None and self.refusal_reason(calling, str(primitive.called_ae_title).strip(), host) is not None:
            return
        LOG.warning("association from %s@%s:%d rejected: limit of %d concurrent associations reached",
                    calling, host, port, self.settings.max_associations)
        self.metrics.increment("qcgate_associations_total", outcome="rejected")
        self._write_association(AssociationRecord(
            calling_ae=calling[:16], called_ae=self.settings.ae_title, peer_host=host[:64], peer_port=port,
            ended_at=utcnow(), outcome="rejected", reason="association limit reached",
        ))

    def on_accepted(self, event: evt.Event) -> None:
        assoc = event.assoc
        host, port = _peer(assoc)
        record = AssociationRecord(
            calling_ae=str(assoc.requestor.ae_title).strip()[:16],
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
            received = Path(event.dataset_path)
        except AttributeError:
            received = None
        try:
            if self.ingestor.disk_is_low():
                result = self.ingestor.refuse_for_disk(received, state.record_id, sop_uid)
                LOG.warning("refused %s with 0xA700: %s", sop_uid, result.message)
            else:
                if received is None:
                    incoming = self.ingestor.spool.write_incoming(event.encoded_dataset())
                else:
                    incoming = self.ingestor.spool.new_incoming_path()
                    received.rename(incoming)  # same folder: pynetdicom wrote it into the spool
                result = self.ingestor.ingest(
                    incoming,
                    association_id=state.record_id,
                    expected_sop_instance_uid=sop_uid,
                    expected_sop_class_uid=sop_class,
                )
        except (SQLAlchemyError, OSError) as exc:
            # Nothing was acknowledged, so nothing is lost: the sender keeps its copy and retries.
            LOG.error("refused %s with 0xA700: storage unavailable: %s", sop_uid, exc)
            self.metrics.increment("qcgate_instances_refused_total", reason="storage-unavailable")
            return _status(STATUS_OUT_OF_RESOURCES, "storage unavailable, retry later")
        except Exception as exc:  # a bug must cost one refusal, not the association
            LOG.exception("refused %s with 0xC000: unexpected error: %s", sop_uid, exc)
            self.metrics.increment("qcgate_instances_refused_total", reason="internal-error")
            return _status(STATUS_CANNOT_UNDERSTAND, f"unexpected error: {type(exc).__name__}")
        with state.lock:
            if result.status == 0x0000:
                state.stored += 1
            else:
                state.refused += 1
        if result.outcome == "refused":
            self.metrics.increment("qcgate_instances_refused_total", reason=result.reason_code or "unknown")
        else:
            self.metrics.increment("qcgate_instances_received_total", sop_class=sop_class, outcome=result.outcome)
        return _status(result.status, result.message)


def _status(code: int, comment: str) -> Dataset:
    status = Dataset()
    status.Status = code
    if code != 0x0000:
        status.ErrorComment = comment[:64]
    return status

