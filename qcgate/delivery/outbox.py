"""The outbox: deliver each output to each destination by C-STORE, with retries and a dead letter.

- Transient failures (connection refused or lost, association rejected transiently, 0xA7xx out of
  resources) retry with exponential backoff, base·2^(attempt−1) capped at the maximum, up to
  ``max_attempts``; then the delivery is dead.
- Permanent refusals (association rejected permanently, SOP class or transfer syntax not
  accepted, any other failure status) are dead at once: retrying cannot help.
- Each destination has its own thread, so an unreachable PACS never delays another one.
- Every attempt is a row in ``delivery_attempts``.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from pynetdicom import AE
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from qcgate.config import DeliverySettings, Destination
from qcgate.store.models import Delivery, DeliveryAttempt, DeliveryState, Output, utcnow

LOG = logging.getLogger("qcgate.delivery")


@dataclass(frozen=True)
class AttemptOutcome:
    outcome: str  # sent | transient | permanent
    status: int | None
    message: str


def backoff_seconds(attempt: int, settings: DeliverySettings) -> float:
    """Delay before the next try after ``attempt`` failures: min(base · 2^(attempt−1), max)."""
    return float(min(settings.backoff_base_seconds * 2 ** max(attempt - 1, 0), settings.backoff_max_seconds))


def send_file(path: Path, destination: Destination, calling_ae: str, timeout: float) -> AttemptOutcome:
    """One C-STORE of ``path`` to ``destination``, classified as sent, transient or permanent."""
    import pydicom

    dataset = pydicom.dcmread(path)
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    ae.add_requested_context(dataset.SOPClassUID, [str(dataset.file_meta.TransferSyntaxUID)])
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if assoc.is_rejected:
        result = getattr(assoc.acceptor, "primitive", None)
        permanent = result is not None and getattr(result, "result", None) == 0x01
        kind = "permanent" if permanent else "transient"
        return AttemptOutcome(kind, None, f"association rejected ({'permanent' if permanent else 'transient'})")
    if not assoc.is_established:
        if assoc.rejected_contexts and not assoc.accepted_contexts:
            # The peer answered but accepts none of our contexts (pynetdicom then aborts): permanent.
            return AttemptOutcome("permanent", None, f"destination accepts no presentation context for {dataset.SOPClassUID}")
        return AttemptOutcome("transient", None, "no association (destination unreachable or aborted)")
    try:
        if not assoc.accepted_contexts:
            return AttemptOutcome("permanent", None, f"destination accepts no presentation context for {dataset.SOPClassUID}")
        status = assoc.send_c_store(dataset)
        if status is None or "Status" not in status:
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


class DestinationWorker(threading.Thread):
    """Empties the outbox for one destination."""

    def __init__(self, destination: Destination, settings: DeliverySettings, session_factory: sessionmaker[Session],
                 data_dir: Path, calling_ae: str) -> None:
        super().__init__(name=f"qcgate-delivery-{destination.ae_title}", daemon=True)
        self.destination = destination
        self.settings = settings
        self.session_factory = session_factory
        self.data_dir = data_dir
        self.calling_ae = calling_ae
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                while self.deliver_one() and not self._stop_event.is_set():
                    pass
            except Exception:  # keep the outbox alive through database or disk hiccups
                LOG.exception("delivery to %s failed unexpectedly; retrying", self.destination)
            self._stop_event.wait(self.settings.poll_interval_seconds)

    def deliver_one(self) -> bool:
        """Attempt the oldest due delivery; False when none is due."""
        with self.session_factory() as session:
            row = session.execute(
                select(Delivery.id, Delivery.attempts, Output.path)
                .join(Output, Output.id == Delivery.output_id)
                .where(Delivery.destination == str(self.destination), Delivery.state == DeliveryState.PENDING.value,
                       Delivery.next_attempt_at <= utcnow())
                .order_by(Delivery.next_attempt_at, Delivery.id).limit(1)
            ).first()
        if row is None:
            return False
        delivery_id, attempts, relative = row
        try:
            outcome = send_file(self.data_dir / relative, self.destination, self.calling_ae, self.settings.connect_timeout_seconds)
        except (OSError, ValueError, RuntimeError) as exc:
            outcome = AttemptOutcome("transient", None, f"{type(exc).__name__}: {exc}")
        self._record(delivery_id, attempts + 1, outcome)
        return True

    def _record(self, delivery_id: int, attempt: int, outcome: AttemptOutcome) -> None:
        with self.session_factory() as session, session.begin():
            delivery = session.get(Delivery, delivery_id)
            assert delivery is not None
            delivery.attempts = attempt
            session.add(DeliveryAttempt(delivery_id=delivery_id, outcome=outcome.outcome, dimse_status=outcome.status, message=outcome.message))
            if outcome.outcome == "sent":
                delivery.state = DeliveryState.SENT.value
                delivery.delivered_at = utcnow()
                delivery.last_error = None
                LOG.info("delivery %s to %s: %s", delivery_id, self.destination, outcome.message)
            elif outcome.outcome == "permanent" or attempt >= self.settings.max_attempts:
                delivery.state = DeliveryState.DEAD.value
                delivery.last_error = outcome.message
                LOG.error("delivery %s to %s is dead after %d attempt(s): %s", delivery_id, self.destination, attempt, outcome.message)
            else:
                delay = backoff_seconds(attempt, self.settings)
                delivery.next_attempt_at = utcnow() + dt.timedelta(seconds=delay)
                delivery.last_error = outcome.message
                LOG.warning("delivery %s to %s failed (%s); retry in %.0f s", delivery_id, self.destination, outcome.message, delay)

    def stop(self) -> None:
        self._stop_event.set()


class Outbox:
    """One worker thread per configured destination."""

    def __init__(self, settings: DeliverySettings, session_factory: sessionmaker[Session], data_dir: Path, calling_ae: str) -> None:
        self.workers = [DestinationWorker(d, settings, session_factory, data_dir, calling_ae) for d in settings.parsed_destinations()]

    def start(self) -> None:
        for worker in self.workers:
            worker.start()

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()
        for worker in self.workers:
            worker.join(timeout=10)
