"""How one delivery reaches one destination: C-STORE (optionally over TLS), STOW-RS, or a signed webhook.

Every transport answers with an :class:`AttemptOutcome` the outbox classifies the same way:
``sent``; ``transient`` (the destination's problem now: it backs off, the delivery waits, and dies
only after ``delivery.dead_letter_after_hours``); ``permanent`` (refused for good: a dead letter at
once); ``local`` (this delivery's own input could not be read).

Secrets (tokens, passwords, HMAC secrets) are read once when the outbox starts and never logged:
messages name the destination by its name, and URLs never carry credentials (the settings refuse them).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.pdu_primitives import A_ABORT, A_P_ABORT
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from qcgate.config import DeliverySettings, Destination, DestinationSettings
from qcgate.core.dicom import SEGMENTATION_STORAGE
from qcgate.errors import ConfigError
from qcgate.store.models import Case, Instance, Output, SliceResultRecord


@dataclass(frozen=True)
class AttemptOutcome:
    outcome: str  # sent | transient | permanent | local (the output file could not be read)
    status: int | None  # the DIMSE status, or the HTTP status for STOW-RS and webhooks
    message: str


PEER_ABORT_GRACE_SECONDS = 0.5


def dimse_tls_context(target: DestinationSettings) -> tuple[ssl.SSLContext, str | None]:
    """The client TLS context for a DIMSE destination, and the server name to check (None: not checked)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                         cafile=str(target.tls_ca_file) if target.tls_ca_file else None)
    if target.tls_cert_file is not None and target.tls_key_file is not None:
        context.load_cert_chain(str(target.tls_cert_file), str(target.tls_key_file))
    context.check_hostname = target.tls_check_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    address = Destination.parse(target.address)
    return context, address.host if target.tls_check_hostname else None


def send_dataset(dataset: Any, destination: Destination, calling_ae: str, timeout: float,
                 tls: tuple[ssl.SSLContext, str | None] | None = None) -> AttemptOutcome:
    """One C-STORE of ``dataset`` to ``destination`` (over TLS when ``tls`` is given), classified as
    sent, transient or permanent."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    ae.add_requested_context(dataset.SOPClassUID, [str(dataset.file_meta.TransferSyntaxUID)])
    peer_aborted = threading.Event()

    def on_acse_received(event: Any) -> None:
        if isinstance(event.primitive, (A_ABORT, A_P_ABORT)):
            peer_aborted.set()

    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                         evt_handlers=[(evt.EVT_ACSE_RECV, on_acse_received)], tls_args=tls)
    if assoc.is_rejected:
        result = getattr(assoc.acceptor, "primitive", None)
        permanent = result is not None and getattr(result, "result", None) == 0x01
        kind = "permanent" if permanent else "transient"
        return AttemptOutcome(kind, None, f"association rejected ({'permanent' if permanent else 'transient'})")
    if not assoc.is_established:
        if assoc.rejected_contexts and not assoc.accepted_contexts:
            # The peer answered but accepts none of our contexts (pynetdicom then aborts): permanent.
            return AttemptOutcome("permanent", None, f"destination accepts no presentation context for {dataset.SOPClassUID}")
        if tls is not None:
            return AttemptOutcome("transient", None, "no association over TLS (destination unreachable, aborted, "
                                  "or the TLS handshake failed: check tls_ca_file, the certificate's name and the client certificate)")
        return AttemptOutcome("transient", None, "no association (destination unreachable or aborted)")
    try:
        if not assoc.accepted_contexts:
            return AttemptOutcome("permanent", None, f"destination accepts no presentation context for {dataset.SOPClassUID}")
        status = assoc.send_c_store(dataset)
        if status is None or "Status" not in status:
            # The peer's A-ABORT is read by the association's own thread, a moment after the empty answer.
            if peer_aborted.wait(PEER_ABORT_GRACE_SECONDS):
                # Orthanc, for one, accepts the association of an AE it does not know and aborts on the request.
                return AttemptOutcome("transient", None, "the destination aborted the association on C-STORE "
                                      "(not authorised? check its AE title and IP host check for this gate)")
            return AttemptOutcome("transient", None, "no C-STORE response (connection lost or timed out)")
        code = int(status.Status)
        if code == 0x0000 or 0xB000 <= code <= 0xBFFF:
            return AttemptOutcome("sent", code, "stored" if code == 0 else f"stored with warning 0x{code:04X}")
        if 0xA700 <= code <= 0xA7FF:
            return AttemptOutcome("transient", code, f"destination out of resources (0x{code:04X})")
        return AttemptOutcome("permanent", code, f"destination refused with 0x{code:04X}")
    finally:
        if assoc.is_established:
            assoc.release()


def classify_http(status: int) -> str:
    """2xx sent; 408, 429 and 5xx transient; any other status (4xx, an unfollowed 3xx) permanent."""
    if 200 <= status < 300:
        return "sent"
    if status in (408, 429) or status >= 500:
        return "transient"
    return "permanent"


def _read_secret(value: Any, path: Path | None, what: str, name: str) -> str | None:
    if value is not None:
        return str(value.get_secret_value())
    if path is None:
        return None
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"delivery destination {name!r}: cannot read {what} {path}: {exc.strerror or exc}") from None
    if not text:
        raise ConfigError(f"delivery destination {name!r}: {what} {path} is empty")
    return text


@dataclass
class DeliveryInput:
    """What the outbox knows about one due delivery."""

    delivery_id: int
    output_path: str  # relative to the data dir
    case_id: int
    held: bool  # it was held for review and released


class Target:
    """One destination: its key in ``deliveries.destination`` and its transport."""

    kind = "dimse"

    def __init__(self, settings: DestinationSettings, delivery: DeliverySettings, data_dir: Path, calling_ae: str) -> None:
        self.settings = settings
        self.key = settings.key
        self.timeout = delivery.connect_timeout_seconds
        self.data_dir = data_dir
        self.calling_ae = calling_ae

    def __str__(self) -> str:
        return self.key

    def load(self, session_factory: sessionmaker[Session], item: DeliveryInput) -> Any:
        """The thing to send; an exception here is the delivery's own (``local``) problem."""
        import pydicom

        return pydicom.dcmread(self.data_dir / item.output_path)

    def send(self, payload: Any, item: DeliveryInput) -> AttemptOutcome:
        raise NotImplementedError


class DimseTarget(Target):
    kind = "dimse"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.address = Destination.parse(self.settings.address)
        self.tls = None
        if self.settings.tls:
            try:
                self.tls = dimse_tls_context(self.settings)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"delivery destination {self.key!r}: TLS files unusable: {exc}") from None

    def send(self, payload: Any, item: DeliveryInput) -> AttemptOutcome:
        return send_dataset(payload, self.address, self.calling_ae, self.timeout, self.tls)


def _http_verify(settings: DestinationSettings) -> str | bool:
    return str(settings.tls_ca_file) if settings.tls_ca_file else True


def _client_cert(settings: DestinationSettings) -> tuple[str, str] | None:
    if settings.tls_cert_file is not None and settings.tls_key_file is not None:
        return str(settings.tls_cert_file), str(settings.tls_key_file)
    return None


class StowTarget(Target):
    """STOW-RS (PS3.18 10.5) to ``<address>/studies`` with dicomweb-client, one instance per request."""

    kind = "stow"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        s = self.settings
        self._token = _read_secret(s.token, s.token_file, "token_file", self.key)
        self._password = _read_secret(s.password, s.password_file, "password_file", self.key)
        self._client: Any = None

    def _make_client(self) -> Any:
        import requests
        from dicomweb_client.api import DICOMwebClient

        session = requests.Session()
        session.verify = _http_verify(self.settings)
        cert = _client_cert(self.settings)
        if cert:
            session.cert = cert
        if self._token:
            session.headers["Authorization"] = f"Bearer {self._token}"
        elif self.settings.username:
            session.auth = (self.settings.username, self._password or "")
        # One body with a Content-Length (no chunked transfer encoding): every STOW-RS server takes it.
        client = DICOMwebClient(self.settings.address, session=session, timeout=self.timeout, chunk_size=2**40)
        client.set_http_retry_params(retry=False)  # the outbox retries, with its backoff and dead letters
        return client

    def send(self, payload: Any, item: DeliveryInput) -> AttemptOutcome:
        import requests

        if self._client is None:
            self._client = self._make_client()
        try:
            response = self._client.store_instances([payload])
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            kind = classify_http(status)
            reason = (exc.response.reason if exc.response is not None else "") or ""
            hint = " (check token / username / password)" if status in (401, 403) else ""
            return AttemptOutcome(kind, status, f"STOW-RS answered HTTP {status} {reason}{hint}".rstrip())
        except (requests.Timeout, requests.ConnectionError) as exc:
            return AttemptOutcome("transient", None, f"STOW-RS not reachable: {type(exc).__name__}")
        except requests.RequestException as exc:
            return AttemptOutcome("transient", None, f"STOW-RS request failed: {type(exc).__name__}")
        failed = list(getattr(response, "FailedSOPSequence", []) or [])
        if failed:
            reason = getattr(failed[0], "FailureReason", None)
            return AttemptOutcome("permanent", None, f"STOW-RS refused the instance (FailureReason {reason})")
        return AttemptOutcome("sent", 200, "stored (STOW-RS)")


def case_summary(session: Session, case_id: int, console_url: str = "") -> dict[str, Any]:
    """The JSON a webhook receives about a case: UIDs, verdicts, counts, model, q source, outputs, link."""
    case = session.get(Case, case_id)
    if case is None:
        raise LookupError(f"case {case_id} no longer exists")
    counts = {"accept": 0, "review": 0, "reject": 0}
    for (verdict,) in session.execute(select(SliceResultRecord.verdict).where(SliceResultRecord.case_id == case_id)):
        counts[verdict] = counts.get(verdict, 0) + 1
    ai_segs = session.scalars(select(Instance.sop_instance_uid).where(
        Instance.case_id == case_id, Instance.sop_class_uid == str(SEGMENTATION_STORAGE)).order_by(Instance.id)).all()
    outputs = [{"kind": kind, "sop_class_uid": sop_class, "sop_instance_uid": sop_instance}
               for kind, sop_class, sop_instance in session.execute(
                   select(Output.kind, Output.sop_class_uid, Output.sop_instance_uid)
                   .where(Output.case_id == case_id, Output.kind != "ai-seg").order_by(Output.id))]
    summary: dict[str, Any] = {
        "event": "case.verdict",
        "case_id": case.id,
        "study_instance_uid": case.study_instance_uid,
        "series_instance_uid": case.ct_series_uid,
        "seg_sop_instance_uids": list(ai_segs),
        "series_verdict": case.series_verdict,
        "lesion_slices": sum(counts.values()),
        "slice_verdicts": counts,
        "model": {"name": case.model_name, "version": case.model_version},
        "q_source": case.q_source,
        "n_members": case.n_members,
        "processed_at": case.processed_at.isoformat() if case.processed_at else None,
        "outputs": outputs,
    }
    if console_url:
        summary["link"] = f"{console_url.rstrip('/')}/cases/{case.id}"
    return summary


def sign(secret: str, body: bytes) -> str:
    """The ``X-Qcgate-Signature`` value: ``sha256=`` and the hex HMAC-SHA256 of the body."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


class WebhookTarget(Target):
    """POST a signed JSON summary of the case; its delivery row hangs on the case's SR output."""

    kind = "webhook"

    def __init__(self, settings: DestinationSettings, delivery: DeliverySettings, data_dir: Path, calling_ae: str) -> None:
        super().__init__(settings, delivery, data_dir, calling_ae)
        self.url = settings.address.removeprefix("webhook+")
        self.console_url = delivery.console_url
        secret = _read_secret(settings.hmac_secret, settings.hmac_secret_file, "hmac_secret_file", self.key)
        assert secret is not None  # the settings require one
        self._secret = secret
        self._token = _read_secret(settings.token, settings.token_file, "token_file", self.key)
        self._password = _read_secret(settings.password, settings.password_file, "password_file", self.key)
        self._client: Any = None

    def load(self, session_factory: sessionmaker[Session], item: DeliveryInput) -> Any:
        with session_factory() as session:
            summary = case_summary(session, item.case_id, self.console_url)
        summary["released_after_review"] = item.held
        summary["delivery_id"] = item.delivery_id
        return summary

    def send(self, payload: Any, item: DeliveryInput) -> AttemptOutcome:
        import httpx

        if self._client is None:
            auth = (self.settings.username, self._password or "") if self.settings.username else None
            self._client = httpx.Client(timeout=self.timeout, verify=_http_verify(self.settings),
                                        cert=_client_cert(self.settings), auth=auth, follow_redirects=False)
        now = time.time()
        body = json.dumps({**payload, "sent_at": dt.datetime.fromtimestamp(now, dt.timezone.utc).isoformat()},
                          sort_keys=True).encode("utf-8")
        headers = {"Content-Type": "application/json", "User-Agent": "qcgate",
                   "X-Qcgate-Signature": sign(self._secret, body), "X-Qcgate-Timestamp": str(int(now)),
                   "X-Qcgate-Delivery": str(item.delivery_id)}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        try:
            response = self._client.post(self.url, content=body, headers=headers)
        except httpx.TimeoutException:
            return AttemptOutcome("transient", None, "webhook timed out")
        except httpx.HTTPError as exc:
            return AttemptOutcome("transient", None, f"webhook not reachable: {type(exc).__name__}")
        kind = classify_http(response.status_code)
        return AttemptOutcome(kind, response.status_code, f"webhook answered HTTP {response.status_code}"
                              + (" (notified)" if kind == "sent" else ""))


TARGET_TYPES: dict[str, type[Target]] = {"dimse": DimseTarget, "stow": StowTarget, "webhook": WebhookTarget}


def make_target(settings: DestinationSettings, delivery: DeliverySettings, data_dir: Path, calling_ae: str) -> Target:
    return TARGET_TYPES[settings.type or "dimse"](settings, delivery, data_dir, calling_ae)

