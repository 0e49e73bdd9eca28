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
- Every attempt is a row in ``delivery_attempts``, with the node that made it.

Any node delivers (:mod:`qcgate.delivery.leases`): `qcgate serve`, and each `qcgate worker` with
``worker.deliver``. A delivery is sent only under a lease its node claimed and renews while the send
runs; a dead node's deliveries are claimed by another once their leases expire (at least once after a
crash mid-send). The consecutive-failure count and the backoff live in ``destination_states``,
shared by every node, so a restart keeps the backoff and two nodes never probe a down PACS twice as
hard. Only `serve` runs the router (:mod:`qcgate.delivery.routing`): it alone decides the targets.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from qcgate.config import DeliverySettings, Destination
from qcgate.delivery import leases
from qcgate.delivery.fingerprint import delivery_document, differences, fingerprint_of, read_recorded
from qcgate.delivery.transports import (  # noqa: F401  (send_dataset: re-exported for callers and tests)
    PEER_ABORT_GRACE_SECONDS,
    AttemptOutcome,
    DeliveryInput,
    Target,
    make_target,
    send_dataset,
)
from qcgate.store.models import Delivery, DeliveryAttempt, DeliveryState, DestinationState, utcnow

LOG = logging.getLogger("qcgate.delivery")

_CHUNK = 500  # ids per IN (...) list


def backoff_seconds(attempt: int, settings: DeliverySettings) -> float:
    """Delay before the next try after ``attempt`` consecutive failures: min(base · 2^(attempt−1), max)."""
    exponent = min(max(attempt - 1, 0), 60)  # 2^60·base is past any cap; avoids float overflow
    return float(min(settings.backoff_base_seconds * 2**exponent, settings.backoff_max_seconds))


_aware = leases.aware


def send_file(path: Path, destination: Destination, calling_ae: str, timeout: float) -> AttemptOutcome:
    """One C-STORE of the file at ``path`` (see :func:`send_dataset`)."""
    import pydicom

    return send_dataset(pydicom.dcmread(path), destination, calling_ae, timeout)


class DestinationWorker(threading.Thread):
    """Empties the outbox for one destination, oldest first, under leases; backs the whole
    destination off, for every node, through ``destination_states``."""

    def __init__(self, destination: Target, settings: DeliverySettings, session_factory: sessionmaker[Session],
                 data_dir: Path, calling_ae: str, *, token: str | None = None, paused: threading.Event | None = None) -> None:
        super().__init__(name=f"qcgate-delivery-{destination.key}"[:64], daemon=True)
        self.destination = destination
        self.settings = settings
        self.session_factory = session_factory
        self.data_dir = data_dir
        self.calling_ae = calling_ae
        self.token = token or leases.sender_identity()
        self._paused = paused or threading.Event()  # set: claim nothing (settings differ from serve's)
        self._stop_event = threading.Event()
        self.consecutive_failures = 0  # the destination's count as this node last wrote or cleared it
        self.probes = 0  # associations this node attempted (for tests and logs)
        self._state_ready = False

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                while not self._paused.is_set() and self.deliver_one() and not self._stop_event.is_set():
                    pass
            except Exception:  # keep the outbox alive through database or disk hiccups
                LOG.exception("delivery to %s failed unexpectedly; retrying", self.destination)
            self._stop_event.wait(self.settings.poll_interval_seconds)

    @property
    def backing_off(self) -> bool:
        """Whether no node may try the destination now (its shared backoff)."""
        with self.session_factory() as session:
            state = session.get(DestinationState, self.destination.key)
        return state is not None and state.consecutive_failures > 0 and _aware(state.next_attempt_at) > utcnow()

    def deliver_one(self) -> bool:
        """Claim and attempt the oldest due delivery; False when none is due, the destination is
        backing off or another node is probing it."""
        if not self._state_ready:
            leases.ensure_destination_state(self.session_factory, self.destination.key)
            self._state_ready = True
        claim = leases.claim_delivery(self.session_factory, self.destination.key, self.token, self.settings.lease_seconds)
        if claim is None:
            return False
        item = DeliveryInput(delivery_id=claim.delivery_id, output_path=claim.output_path, case_id=claim.case_id, held=claim.held)
        try:
            payload = self.destination.load(self.session_factory, item)
        except Exception as exc:  # missing, unreadable or not DICOM: this output's problem, not the PACS's
            self._record_local(claim, AttemptOutcome("local", None, f"cannot read {claim.output_path}: {type(exc).__name__}: {exc}"))
            return True
        self.probes += 1
        try:
            outcome = self.destination.send(payload, item)
        except (OSError, ValueError, RuntimeError) as exc:
            outcome = AttemptOutcome("transient", None, f"{type(exc).__name__}: {exc}")
        if outcome.outcome == "transient":
            self._record_destination_failure(claim.delivery_id, outcome)
            return False
        self._record_answer(claim.delivery_id, claim.attempts + 1, outcome)
        return True

    def _dead_letter_cutoff(self, now: dt.datetime) -> dt.datetime:
        return now - dt.timedelta(hours=self.settings.dead_letter_after_hours)

    def _attempt(self, delivery_id: int, outcome: str, status: int | None, message: str | None) -> DeliveryAttempt:
        return DeliveryAttempt(delivery_id=delivery_id, outcome=outcome, dimse_status=status, message=message, sender=self.token)

    def _record_answer(self, delivery_id: int, attempt: int, outcome: AttemptOutcome) -> None:
        """The destination answered: sent, or refused for good. Recorded even if the lease was lost
        meanwhile (the object reached the PACS either way); the lease ends."""
        with self.session_factory() as session, session.begin():
            before = leases.destination_answered(session, self.destination.key)
            delivery = session.get(Delivery, delivery_id)
            assert delivery is not None
            if not leases.holds(session, delivery_id, self.token):
                LOG.warning("delivery %s to %s: this node's lease had expired during the send; another node may send it "
                            "too (at least once)", delivery_id, self.destination)
            delivery.attempts = max(delivery.attempts, attempt)
            delivery.sender = delivery.lease_until = None
            session.add(self._attempt(delivery_id, outcome.outcome, outcome.status, outcome.message))
            if outcome.outcome == "sent":
                delivery.state = DeliveryState.SENT.value
                delivery.delivered_at = utcnow()
                delivery.last_error = None
                LOG.info("delivery %s to %s: %s", delivery_id, self.destination, outcome.message)
            elif delivery.state == DeliveryState.PENDING.value:
                delivery.state = DeliveryState.DEAD.value
                delivery.last_error = outcome.message
                LOG.error("delivery %s to %s is dead (permanent refusal) after %d attempt(s): %s", delivery_id, self.destination, attempt, outcome.message)
        if before:
            LOG.warning("destination %s answers again after %d failed tries; sending its backlog oldest first",
                        self.destination, before)
        self.consecutive_failures = 0

    def _record_local(self, claim: leases.DeliveryClaim, outcome: AttemptOutcome) -> None:
        """This delivery's own file failed: it alone backs off; the destination goes on."""
        now = utcnow()
        attempt = claim.attempts + 1
        with self.session_factory() as session, session.begin():
            leases.release_probe(session, self.destination.key, self.token)  # the destination was not tried
            delivery = session.get(Delivery, claim.delivery_id)
            assert delivery is not None
            delivery.attempts = attempt
            delivery.last_error = outcome.message
            delivery.sender = delivery.lease_until = None
            session.add(self._attempt(claim.delivery_id, "transient", None, outcome.message))
            if claim.queued_at <= self._dead_letter_cutoff(now):
                delivery.state = DeliveryState.DEAD.value
                LOG.error("delivery %s to %s is dead after %.1f h: %s", claim.delivery_id, self.destination,
                          (now - claim.queued_at).total_seconds() / 3600, outcome.message)
            else:
                delay = backoff_seconds(attempt, self.settings)
                delivery.next_attempt_at = now + dt.timedelta(seconds=delay)
                LOG.warning("delivery %s to %s: %s; retry in %.0f s", claim.delivery_id, self.destination, outcome.message, delay)

    def _record_destination_failure(self, probe_id: int, outcome: AttemptOutcome) -> None:
        """The destination failed transiently: it waits its backoff (for every node), and so does
        every due delivery of it that no other node is sending right now."""
        now = utcnow()
        cutoff = self._dead_letter_cutoff(now)
        hours = self.settings.dead_letter_after_hours
        with self.session_factory() as session, session.begin():
            count, next_at = leases.destination_failed(session, self.destination.key, outcome.message,
                                                       lambda n: backoff_seconds(n, self.settings))
            waiting = session.execute(
                select(Delivery.id, Delivery.queued_at)
                .where(Delivery.destination == self.destination.key, Delivery.state == DeliveryState.PENDING.value,
                       (Delivery.next_attempt_at <= now) | (Delivery.id == probe_id))
                .order_by(Delivery.id)
            ).all()
            busy = leases.leased_by_others(session, [delivery_id for delivery_id, _ in waiting], self.token)
            waiting = [(delivery_id, queued_at) for delivery_id, queued_at in waiting if delivery_id not in busy]
            dead = [delivery_id for delivery_id, queued_at in waiting if _aware(queued_at) <= cutoff]
            alive = [delivery_id for delivery_id, queued_at in waiting if _aware(queued_at) > cutoff]
            behind = f"not sent: {self.destination} is unreachable (delivery {probe_id} tried it): {outcome.message}"
            if waiting:
                session.execute(insert(DeliveryAttempt), [
                    {"delivery_id": delivery_id, "attempted_at": now, "outcome": "transient", "dimse_status": outcome.status,
                     "message": outcome.message if delivery_id == probe_id else behind, "sender": self.token}
                    for delivery_id, _ in waiting])
            for chunk in (alive[i:i + _CHUNK] for i in range(0, len(alive), _CHUNK)):
                session.execute(update(Delivery).where(Delivery.id.in_(chunk)).values(
                    attempts=Delivery.attempts + 1, next_attempt_at=next_at, last_error=outcome.message, sender=None, lease_until=None))
            for chunk in (dead[i:i + _CHUNK] for i in range(0, len(dead), _CHUNK)):
                session.execute(update(Delivery).where(Delivery.id.in_(chunk)).values(
                    attempts=Delivery.attempts + 1, state=DeliveryState.DEAD.value, sender=None, lease_until=None,
                    last_error=f"dead letter: failing transiently for more than {hours:g} h (delivery.dead_letter_after_hours): {outcome.message}"))
        self.consecutive_failures = count
        LOG.warning("destination %s failed (%s), try %d; %d deliveries wait, next try in %.1f s",
                    self.destination, outcome.message, count, len(alive), (next_at - now).total_seconds())
        if dead:
            LOG.error("%d deliveries to %s are dead letters after %g h of transient failures (ids %s); "
                      "`qcgate deliveries retry --dead` re-queues them", len(dead), self.destination, hours, dead[:20])

    def stop(self) -> None:
        self._stop_event.set()


class LeaseKeeper(threading.Thread):
    """Renews this node's delivery leases every ``delivery.heartbeat_seconds``; on a node that must
    match serve's record (``expected``: a delivering `qcgate worker`), pauses the outbox while the
    database holds another fingerprint, and resumes it when they agree again."""

    def __init__(self, settings: DeliverySettings, session_factory: sessionmaker[Session], token: str,
                 paused: threading.Event, *, check_fingerprint: bool) -> None:
        super().__init__(name="qcgate-delivery-leases", daemon=True)
        self.settings = settings
        self.session_factory = session_factory
        self.token = token
        self.paused = paused
        self.check_fingerprint = check_fingerprint
        self._document = delivery_document(settings)
        self._fingerprint = fingerprint_of(self._document)
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.settings.heartbeat_seconds):
            try:
                leases.renew_delivery_leases(self.session_factory, self.token, self.settings.lease_seconds)
                if self.check_fingerprint:
                    self._check()
            except Exception:  # a database hiccup: the leases are renewed at the next beat (lease >= 2 beats)
                LOG.exception("renewing delivery leases failed; retrying")

    def _check(self) -> None:
        recorded = read_recorded(self.session_factory)
        agrees = recorded is not None and recorded.fingerprint == self._fingerprint
        if agrees and self.paused.is_set():
            LOG.warning("delivery settings agree with serve's record again: delivering")
            self.paused.clear()
        elif not agrees and not self.paused.is_set():
            why = differences(self._document, recorded.document) if recorded is not None else ["serve's record is gone"]
            LOG.error("delivery paused: serve recorded other delivery settings (%s by %s): %s; fix this node's [delivery] "
                      "and restart it", recorded.recorded_at if recorded else "-", recorded.recorded_by if recorded else "-",
                      "; ".join(why))
            self.paused.set()

    def stop(self) -> None:
        self._stop_event.set()


class Outbox:
    """One worker thread per configured destination, the lease keeper, and (``route=True``, in
    `serve` only) the router that fills their queues. ``check_fingerprint``: a delivering
    `qcgate worker`, which must keep matching serve's record of the destinations."""

    def __init__(self, settings: DeliverySettings, session_factory: sessionmaker[Session], data_dir: Path, calling_ae: str,
                 *, route: bool = True, check_fingerprint: bool = False) -> None:
        from qcgate.delivery.routing import Router

        if settings.max_attempts is not None:
            LOG.warning("delivery.max_attempts (%d) is deprecated and ignored: transient failures are retried until a delivery "
                        "has waited delivery.dead_letter_after_hours (%g h); remove it from the configuration",
                        settings.max_attempts, settings.dead_letter_after_hours)
        self.token = leases.sender_identity()
        self.session_factory = session_factory
        self.paused = threading.Event()
        self.workers = [DestinationWorker(make_target(d, settings, data_dir, calling_ae), settings, session_factory, data_dir,
                                          calling_ae, token=self.token, paused=self.paused)
                        for d in settings.targets()]
        self.keeper = LeaseKeeper(settings, session_factory, self.token, self.paused, check_fingerprint=check_fingerprint)
        self.router = Router(settings, session_factory, data_dir) if route else None

    def start(self) -> None:
        if self.router is not None:
            self.router.start()
        self.keeper.start()
        for worker in self.workers:
            worker.start()

    def is_alive(self) -> bool:
        """Every destination's thread, the lease keeper and the router run."""
        return all(worker.is_alive() for worker in self.workers) and self.keeper.is_alive() \
            and (self.router is None or self.router.is_alive())

    def stop(self) -> None:
        threads: list[Any] = [*self.workers, self.keeper, *([self.router] if self.router is not None else [])]
        for thread in threads:
            thread.stop()
        for thread in threads:
            if thread.is_alive():
                thread.join(timeout=10)
        try:  # hand back what a send cut short holds, so another node goes on without waiting out the lease
            leases.release_leases(self.session_factory, self.token)
        except Exception:
            LOG.exception("releasing delivery leases at stop failed; they expire by themselves")
