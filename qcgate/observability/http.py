"""The HTTP server of `qcgate serve`: an ASGI app (Starlette) served by uvicorn in a thread.

``observability_routes`` are /metrics (Prometheus) and /healthz (liveness as JSON), byte for byte
what the earlier ``http.server`` endpoint answered; the web console (``qcgate.console``) adds its
pages and /api to the same app, so one port serves all of it. ``HttpServer`` binds the socket in
the caller's thread (a busy port is a ConfigError at start, not a log line later) and runs uvicorn
on it in a daemon thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qcgate.errors import ConfigError

LOG = logging.getLogger("qcgate.http")

PROMETHEUS_TEXT = "text/plain; version=0.0.4"


def _plain(status: int, body: str, content_type: str) -> Any:
    from starlette.responses import Response

    # An explicit content-type header: Starlette would otherwise append "; charset=utf-8".
    return Response(body.encode("utf-8"), status_code=status, headers={"content-type": content_type})


def observability_routes(metrics: Callable[[], str], health: Callable[[], dict[str, bool]],
                         details: Callable[[], dict[str, Any]] | None = None) -> list[Any]:
    """Starlette routes: ``metrics()`` at /metrics, ``health()`` ({check: ok}) at /healthz and /health
    (503 when not ok), with ``details()`` (the numbers behind the checks) beside them. Sync handlers:
    Starlette runs them in its thread pool, so a slow database never blocks the event loop."""
    from starlette.routing import Route

    def metrics_endpoint(request: Any) -> Any:
        try:
            return _plain(200, metrics(), PROMETHEUS_TEXT)
        except Exception as exc:  # a failing scrape must not kill the server
            LOG.error("%s failed: %s", request.url.path, exc)
            return _plain(500, f"error: {exc}\n", "text/plain")

    def health_endpoint(request: Any) -> Any:
        try:
            checks = health()
            healthy = all(checks.values())
            report = {"healthy": healthy, "checks": checks, "details": details() if details is not None else {}}
            return _plain(200 if healthy else 503, json.dumps(report), "application/json")
        except Exception as exc:
            LOG.error("%s failed: %s", request.url.path, exc)
            return _plain(500, f"error: {exc}\n", "text/plain")

    return [Route("/metrics", metrics_endpoint, methods=["GET", "HEAD"]),
            Route("/healthz", health_endpoint, methods=["GET", "HEAD"]),
            Route("/health", health_endpoint, methods=["GET", "HEAD"])]


def observability_app(metrics: Callable[[], str], health: Callable[[], dict[str, bool]],
                      details: Callable[[], dict[str, Any]] | None = None) -> Any:
    """An app with only /metrics and /healthz (unknown paths: 404 ``not found``)."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException

    async def not_found(request: Any, exc: Exception) -> Any:
        return _plain(getattr(exc, "status_code", 404), "not found\n", "text/plain")

    return Starlette(routes=observability_routes(metrics, health, details), exception_handlers={HTTPException: not_found})


class HttpServer:
    """Serves ``app`` on ``host:port`` (HTTPS with ``cert_file``/``key_file``) from a daemon thread."""

    def __init__(self, host: str, port: int, app: Any, *, cert_file: Path | None = None, key_file: Path | None = None,
                 setting: str = "http") -> None:
        import uvicorn

        self.app = app
        self.tls = cert_file is not None
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((host, port))
        except OSError as exc:
            self.socket.close()
            raise ConfigError(f"{setting}: cannot listen on {host}:{port}: {exc.strerror or exc} "
                              f"(set [{setting}] port, or enabled = false)") from None
        self.socket.listen(128)
        self.host = host
        if self.tls:  # fail now on an unreadable certificate, not in the server thread
            try:
                ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(str(cert_file), str(key_file))
            except (OSError, ssl.SSLError) as exc:
                self.socket.close()
                raise ConfigError(f"{setting}.tls_cert_file / tls_key_file: cannot load: {exc}") from None
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", server_header=False,
                                ssl_certfile=str(cert_file) if cert_file else None,
                                ssl_keyfile=str(key_file) if key_file else None, timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, name="qcgate-http", daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self.server.serve(sockets=[self.socket]))
        except Exception:  # logged: the health check of the gate does not depend on this thread
            LOG.exception("HTTP server stopped unexpectedly")

    @property
    def port(self) -> int:
        return int(self.socket.getsockname()[1])

    def is_alive(self) -> bool:
        return self.thread.is_alive()

    def start(self, timeout: float = 10.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        scheme = "https" if self.tls else "http"
        LOG.info("console, API, metrics and health on %s://%s:%d/ (/metrics, /healthz)", scheme, self.host, self.port)

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout=10)
        self.socket.close()


class ObservabilityServer(HttpServer):
    """Only /metrics and /healthz, for a process without the console."""

    def __init__(self, host: str, port: int, metrics: Callable[[], str], health: Callable[[], dict[str, bool]],
                 details: Callable[[], dict[str, Any]] | None = None) -> None:
        super().__init__(host, port, observability_app(metrics, health, details), setting="observability")
