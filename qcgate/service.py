"""`qcgate serve`: the node, the assembler, the router and outbox, the HTTP server and the systemd handshake in one process."""

from __future__ import annotations

import logging
import signal
import threading

from sqlalchemy import text

from qcgate.config import Settings
from qcgate.errors import ConfigError
from qcgate.delivery import fingerprint
from qcgate.delivery.outbox import Outbox
from qcgate import systemd
from qcgate.node import pynetdicom_adapter
from qcgate.node.ingest import DISK_REFUSAL_WINDOW_SECONDS, Ingestor
from qcgate.node.scp import GateNode
from qcgate.node.spool import Spool
from qcgate.observability.health import latest_job_health, recent_dead_letters
from qcgate.console.app import create_app
from qcgate.observability.http import HttpServer, observability_routes
from qcgate.observability.metrics import MetricsRegistry, render
from qcgate.pipeline.assembler import AssemblerThread
from qcgate.pipeline.dispatcher import Dispatcher
from qcgate.predictors.artifacts import verify_configured_model
from qcgate.store.database import create_db_engine, make_session_factory, upgrade_database

LOG = logging.getLogger("qcgate.service")

# Checks a restart would not fix: /healthz reports them, the watchdog ignores them.
NOT_LIVENESS = ("disk_above_watermark", "no_recent_disk_refusals", "model", "recent_jobs", "dead_letters")


class GateService:
    """Everything `qcgate serve` runs; ``start()`` returns once the port is bound."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Process wiring, once: received data sets stream to files that the node places in its
        # spool per association (pynetdicom's chunked receive is a process-wide switch).
        pynetdicom_adapter.install()
        self.engine = create_db_engine(settings.database_url)
        upgrade_database(self.engine)
        self.session_factory = make_session_factory(self.engine)
        self.spool = Spool(settings.storage.data_dir, fsync=settings.storage.fsync)
        self.ingestor = Ingestor(self.spool, self.session_factory, min_free_mb=settings.storage.min_free_mb)
        self.metrics = MetricsRegistry()
        self.node = GateNode(settings.node, self.ingestor, self.session_factory, self.metrics)
        self.assembler = AssemblerThread(self.session_factory, settings.assembly)
        # workers = 0: this node only queues jobs; `qcgate worker` processes run them elsewhere.
        self.dispatcher = Dispatcher(settings, self.session_factory) if settings.pipeline.workers > 0 else None
        if self.dispatcher is not None:  # a typo'd model would otherwise fail every job as "internal error"
            LOG.info("threshold model %s verified", verify_configured_model(settings))
        # One source of delivery targets: serve records its destinations and rules; a delivering
        # `qcgate worker` must match them (qcgate.delivery.fingerprint).
        recorded, changes = fingerprint.record(self.session_factory, settings.delivery)
        LOG.info("delivery settings recorded in the database (fingerprint %s)", recorded[:12])
        if changes:
            LOG.warning("delivery settings changed since the last serve: %s; delivering workers with the old ones pause "
                        "until they are restarted with these", "; ".join(changes))
        self.outbox = Outbox(settings.delivery, self.session_factory, self.spool.data_dir, settings.node.ae_title)
        self._stopped = threading.Event()
        self.http = self._http_server() if settings.http_enabled else None

    def _http_server(self) -> HttpServer:
        """One HTTP server on http.host:port: the web console, /api, STOW-RS in, /metrics and /healthz."""
        host, port = self.settings.http_bind
        observability = observability_routes(lambda: render(self.metrics, self.session_factory, self.is_alive),
                                             self.health_checks, self.health_details)
        app = create_app(self.settings, self.session_factory, extra_routes=observability,
                         health=self.health_checks, details=self.health_details, ingestor=self.ingestor, metrics=self.metrics)
        http = self.settings.http
        return HttpServer(host, port, app, cert_file=http.tls_cert_file, key_file=http.tls_key_file)

    def start(self) -> None:
        leftovers = self.spool.purge_incoming()
        if leftovers:
            LOG.info("removed %d partial receive(s) left by an earlier stop; none was acknowledged", leftovers)
        self.assembler.start()
        if self.dispatcher is not None:
            self.dispatcher.start()
        self.outbox.start()
        self.node.start()
        if self.http is not None:
            self.http.start()

    def health_checks(self) -> dict[str, bool]:
        """Each check: database reachable, spool writable, disk above the watermark, threads alive; and,
        read from the database, the model still verifies, jobs are not all failing, deliveries not dying."""
        checks: dict[str, bool] = {}
        try:
            with self.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
            checks["database"] = True
        except Exception as exc:  # any failure means "not reachable"
            LOG.error("health: database unreachable: %s", exc)
            checks["database"] = False
        try:
            probe = self.spool.incoming / ".alive"
            probe.write_bytes(b"1")
            probe.unlink()
            checks["spool_writable"] = True
        except OSError as exc:
            LOG.error("health: spool not writable: %s", exc)
            checks["spool_writable"] = False
        checks["disk_above_watermark"] = not self.ingestor.disk_is_low()
        recent = self.ingestor.recent_disk_refusals()
        if recent:
            LOG.warning("health: %d instance(s) refused for disk space in the last %.0f s", recent, DISK_REFUSAL_WINDOW_SECONDS)
        checks["no_recent_disk_refusals"] = recent == 0
        checks["assembler"] = self.assembler.is_alive()
        checks["workers"] = self.dispatcher is None or self.dispatcher.is_alive()
        checks["delivery"] = self.outbox.is_alive()  # the destinations' threads and the router
        if self.dispatcher is not None:
            try:
                verify_configured_model(self.settings)
                checks["model"] = True
            except ConfigError as exc:
                LOG.error("health: %s", exc)
                checks["model"] = False
        details = self.health_details() if checks["database"] else {}
        observability = self.settings.observability
        checks["recent_jobs"] = bool(details) and details["latest_jobs_failed"] < observability.failed_jobs_unhealthy
        checks["dead_letters"] = bool(details) and details["recent_dead_letters"] < observability.dead_letters_unhealthy
        return checks

    def health_details(self) -> dict[str, int]:
        """The numbers behind the database checks, shown beside them in /healthz."""
        observability = self.settings.observability
        try:
            with self.session_factory() as session:
                jobs = latest_job_health(session, observability.failed_jobs_unhealthy)
                dead = recent_dead_letters(session, observability.dead_letter_window_hours)
        except Exception as exc:  # the database check reports the outage itself
            LOG.error("health: cannot read job and delivery facts: %s", exc)
            return {}
        # All of the latest N failed -> N; otherwise 0 (some recent job succeeded).
        failing = jobs.failed if not jobs.healthy(observability.failed_jobs_unhealthy) else 0
        return {"latest_jobs_failed": failing, "recent_dead_letters": dead}

    def is_alive(self) -> bool:
        """Liveness for the watchdog: every check but those in NOT_LIVENESS passes. A full disk, a
        broken model, failing jobs or dead letters are reported by /healthz, but a restart fixes none."""
        checks = self.health_checks()
        return all(ok for name, ok in checks.items() if name not in NOT_LIVENESS)

    def run_forever(self) -> None:
        """Serve until SIGTERM/SIGINT, feeding the systemd watchdog while alive."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self._stopped.set())
        self.start()
        systemd.notify("READY=1")
        systemd.notify(f"STATUS=listening on port {self.node.bound_port}")
        interval = systemd.watchdog_interval_seconds()
        while not self._stopped.wait(interval or 3600):
            if interval and self.is_alive():
                systemd.notify("WATCHDOG=1")
        systemd.notify("STOPPING=1")
        self.stop()

    def stop(self) -> None:
        LOG.info("shutting down")
        self.node.stop()
        if self.http is not None:
            self.http.stop()
        self.assembler.stop()
        self.assembler.join(timeout=10)
        if self.dispatcher is not None:
            self.dispatcher.stop()
        self.outbox.stop()
        self.engine.dispose()
