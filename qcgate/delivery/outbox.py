"""The outbox: deliver each output to each destination by C-STORE; an outage never becomes data loss.

- Each destination has its own thread, so an unreachable PACS never delays another one. It sends
  its pending deliveries oldest first (by id, i.e. in the order the outputs were made).
- A transient failure (connection refused or lost, association rejected transiently or aborted,
  0xA7xx out of resources, no response) is the destination's, not the delivery's: the whole
  destination waits ``min(base · 2^(n−1), backoff_max_seconds)`` after its n-th consecutive failure,
  and the one delivery it tried was the probe. Every other due delivery of that destination is
  recorded as waiting behind the same failure (an attempt row, its attempt count, last error and
  next attempt time), but is not sent: a destination that is down sees one association attempt per
  backoff step, not one per delivery. When a try succeeds the backlog goes out at once, in order.
- A delivery becomes a dead letter for transient failures only once it has waited
  ``delivery.dead_letter_after_hours`` (default 72) since it was queued (or re-queued by
  `qcgate deliveries retry`). ``delivery.max_attempts`` is deprecated and ignored.
- Permanent refusals (association rejected permanently, SOP class or transfer syntax not accepted,
  any failure status other than 0xA7xx) are dead at once: retrying cannot help. The destination
  answered, so the next delivery goes on.
- An output file that cannot be read is that delivery's problem (``local``): it alone backs off,
  and dies after the same age; the destination goes on with the next one.
- Every attempt is a row in ``delivery_attempts``.

The consecutive-failure count lives in the worker, so a restart starts the backoff afresh.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.pdu_primitives import A_ABORT, A_P_ABORT
from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from qcgate.config import DeliverySettings, Destination
from qcgate.store.models import Delivery, DeliveryAttempt, DeliveryState, Output, utcnow

LOG = logging.getLogger("qcgate.delivery")

_CHUNK = 500  # ids per IN (...) list


@dataclass(frozen=True)
class AttemptOutcome:
    outcome: str  # sent | transient | permanent | local (the output file could not be read)
    status: int | None
    message: str


PEER_ABORT_GRACE_SECONDS = 0.5


def backoff_seconds(attempt: int, settings: DeliverySettings) -> float:
    """Delay before the next try after ``attempt`` consecutive failures: min(base · 2^(attempt−1), max)."""
    exponent = min(max(attempt - 1, 0), 60)  # 2^60·base is past any cap; avoids float overflow
    return float(min(settings.backoff_base_seconds * 2**exponent, settings.backoff_max_seconds))


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)  # SQLite returns naive UTC


def send_dataset(dataset: Any, destination: Destination, calling_ae: str, timeout: float) -> AttemptOutcome:
    """One C-STORE of ``dataset`` to ``destination``, classified as sent, transient or permanent."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    ae.add_requested_context(dataset.SOPClassUID, [str(dataset.file_meta.TransferSyntaxUID)])
    peer_aborted = threading.Event()

    def on_acse_received(event: Any) -> None:
        if isinstance(event.primitive, (A_ABORT, A_P_ABORT)):
            peer_aborted.set()

    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                         evt_handlers=[(evt.EVT_ACSE_RECV, on_acse_received)])
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


def send_file(path: Path, destination: Destination, calling_ae: str, timeout: float) -> AttemptOutcome:
    """One C-STORE of the file at ``path`` (see :func:`send_dataset`)."""
    import pydicom

    return send_dataset(pydicom.dcmread(path), destination, calling_ae, timeout)


class DestinationWorker(threading.Thread):
    """Empties the outbox for one destination, oldest first; backs the whole destination off."""

    def __init__(self, destination: Destination, settings: DeliverySettings, session_factory: sessionmaker[Session],
                 data_dir: Path, calling_ae: str) -> None:
        super().__init__(name=f"qcgate-delivery-{destination.ae_title}", daemon=True)
        self.destination = destination
        self.settings = settings
        self.session_factory = session_factory
        self.data_dir = data_dir
        self.calling_ae = calling_ae
        self._stop_event = threading.Event()
        self.consecutive_failures = 0  # transient failures of the destination since it last answered
        self._blocked_until = 0.0  # time.monotonic() before which the destination is not tried
        self.probes = 0  # associations attempted (for tests and logs)

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                while self.deliver_one() and not self._stop_event.is_set():
                    pass
            except Exception:  # keep the outbox alive through database or disk hiccups
                LOG.exception("delivery to %s failed unexpectedly; retrying", self.destination)
            blocked = self._blocked_until - time.monotonic()
            self._stop_event.wait(blocked if blocked > 0 else self.settings.poll_interval_seconds)

    @property
    def backing_off(self) -> bool:
        return time.monotonic() < self._blocked_until

    def deliver_one(self) -> bool:
        """Attempt the oldest due delivery; False when none is due or the destination is backing off."""
        if self.backing_off:
            return False
        with self.session_factory() as session:
            row = session.execute(
                select(Delivery.id, Delivery.attempts, Delivery.queued_at, Output.path)
                .join(Output, Output.id == Delivery.output_id)
                .where(Delivery.destination == str(self.destination), Delivery.state == DeliveryState.PENDING.value,
                       Delivery.next_attempt_at <= utcnow())
                .order_by(Delivery.id).limit(1)
            ).first()
        if row is None:
            return False
        delivery_id, attempts, queued_at, relative = row
        import pydicom

        try:
            dataset = pydicom.dcmread(self.data_dir / relative)
        except Exception as exc:  # missing, unreadable or not DICOM: this output's problem, not the PACS's
            self._record_local(delivery_id, attempts + 1, _aware(queued_at), AttemptOutcome("local", None, f"cannot read {relative}: {type(exc).__name__}: {exc}"))
            return True
        self.probes += 1
        try:
            outcome = send_dataset(dataset, self.destination, self.calling_ae, self.settings.connect_timeout_seconds)
        except (OSError, ValueError, RuntimeError) as exc:
            outcome = AttemptOutcome("transient", None, f"{type(exc).__name__}: {exc}")
        if outcome.outcome == "transient":
            self._record_destination_failure(delivery_id, outcome)
            return False
        self._record_answer(delivery_id, attempts + 1, outcome)
        return True

    def _dead_letter_cutoff(self, now: dt.datetime) -> dt.datetime:
        return now - dt.timedelta(hours=self.settings.dead_letter_after_hours)

    def _record_answer(self, delivery_id: int, attempt: int, outcome: AttemptOutcome) -> None:
        """The destination answered: sent, or refused for good."""
        if self.consecutive_failures:
            LOG.warning("destination %s answers again after %d failed tries; sending its backlog oldest first",
                        self.destination, self.consecutive_failures)
        self.consecutive_failures = 0
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
            else:
                delivery.state = DeliveryState.DEAD.value
                delivery.last_error = outcome.message
                LOG.error("delivery %s to %s is dead (permanent refusal) after %d attempt(s): %s", delivery_id, self.destination, attempt, outcome.message)

    def _record_local(self, delivery_id: int, attempt: int, queued_at: dt.datetime, outcome: AttemptOutcome) -> None:
        """This delivery's own file failed: it alone backs off; the destination goes on."""
        now = utcnow()
        with self.session_factory() as session, session.begin():
            delivery = session.get(Delivery, delivery_id)
            assert delivery is not None
            delivery.attempts = attempt
            delivery.last_error = outcome.message
            session.add(DeliveryAttempt(delivery_id=delivery_id, outcome="transient", dimse_status=None, message=outcome.message))
            if queued_at <= self._dead_letter_cutoff(now):
                delivery.state = DeliveryState.DEAD.value
                LOG.error("delivery %s to %s is dead after %.1f h: %s", delivery_id, self.destination, (now - queued_at).total_seconds() / 3600, outcome.message)
            else:
                delay = backoff_seconds(attempt, self.settings)
                delivery.next_attempt_at = now + dt.timedelta(seconds=delay)
                LOG.warning("delivery %s to %s: %s; retry in %.0f s", delivery_id, self.destination, outcome.message, delay)

    def _record_destination_failure(self, probe_id: int, outcome: AttemptOutcome) -> None:
        """The destination failed transiently: it waits its backoff, and so does every due delivery of it."""
        self.consecutive_failures += 1
        delay = backoff_seconds(self.consecutive_failures, self.settings)
        self._blocked_until = time.monotonic() + delay
        now = utcnow()
        next_at = now + dt.timedelta(seconds=delay)
        cutoff = self._dead_letter_cutoff(now)
        hours = self.settings.dead_letter_after_hours
        with self.session_factory() as session, session.begin():
            waiting = session.execute(
                select(Delivery.id, Delivery.queued_at)
                .where(Delivery.destination == str(self.destination), Delivery.state == DeliveryState.PENDING.value,
                       (Delivery.next_attempt_at <= now) | (Delivery.id == probe_id))
                .order_by(Delivery.id)
            ).all()
            dead = [delivery_id for delivery_id, queued_at in waiting if _aware(queued_at) <= cutoff]
            alive = [delivery_id for delivery_id, queued_at in waiting if _aware(queued_at) > cutoff]
            behind = f"not sent: {self.destination} is unreachable (delivery {probe_id} tried it): {outcome.message}"
            session.execute(insert(DeliveryAttempt), [
                {"delivery_id": delivery_id, "attempted_at": now, "outcome": "transient", "dimse_status": outcome.status,
                 "message": outcome.message if delivery_id == probe_id else behind}
                for delivery_id, _ in waiting])
            for chunk in (alive[i:i + _CHUNK] for i in range(0, len(alive), _CHUNK)):
                session.execute(update(Delivery).where(Delivery.id.in_(chunk)).values(
                    attempts=Delivery.attempts + 1, next_attempt_at=next_at, last_error=outcome.message))
            for chunk in (dead[i:i + _CHUNK] for i in range(0, len(dead), _CHUNK)):
                session.execute(update(Delivery).where(Delivery.id.in_(chunk)).values(
                    attempts=Delivery.attempts + 1, state=DeliveryState.DEAD.value,
                    last_error=f"dead letter: failing transiently for more than {hours:g} h (delivery.dead_letter_after_hours): {outcome.message}"))
        LOG.warning("destination %s failed (%s), try %d; %d deliveries wait, next try in %.1f s",
                    self.destination, outcome.message, self.consecutive_failures, len(alive), delay)
        if dead:
            LOG.error("%d deliveries to %s are dead letters after %g h of transient failures (ids %s); "
                      "`qcgate deliveries retry --dead` re-queues them", len(dead), self.destination, hours, dead[:20])

    def stop(self) -> None:
        self._stop_event.set()


class Outbox:
    """One worker thread per configured destination."""

    def __init__(self, settings: DeliverySettings, session_factory: sessionmaker[Session], data_dir: Path, calling_ae: str) -> None:
        if settings.max_attempts is not None:
            LOG.warning("delivery.max_attempts (%d) is deprecated and ignored: transient failures are retried until a delivery "
                        "has waited delivery.dead_letter_after_hours (%g h); remove it from the configuration",
                        settings.max_attempts, settings.dead_letter_after_hours)
        self.workers = [DestinationWorker(d, settings, session_factory, data_dir, calling_ae) for d in settings.parsed_destinations()]

    def start(self) -> None:
        for worker in self.workers:
            worker.start()

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()
        for worker in self.workers:
            worker.join(timeout=10)
