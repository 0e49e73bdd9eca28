"""A small HTTP server for /metrics (Prometheus) and /healthz (liveness as JSON)."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from qcgate.errors import ConfigError

LOG = logging.getLogger("qcgate.http")


class ObservabilityServer:
    """Serves ``metrics()`` at /metrics and ``health()`` ({check: ok}) at /healthz (503 when not ok),
    with ``details()`` (the numbers behind the checks) beside them."""

    def __init__(self, host: str, port: int, metrics: Callable[[], str], health: Callable[[], dict[str, bool]],
                 details: Callable[[], dict[str, Any]] | None = None) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                try:
                    if self.path == "/metrics":
                        self._send(200, outer.metrics(), "text/plain; version=0.0.4")
                    elif self.path in ("/healthz", "/health"):
                        checks = outer.health()
                        healthy = all(checks.values())
                        report = {"healthy": healthy, "checks": checks,
                                  "details": outer.details() if outer.details is not None else {}}
                        self._send(200 if healthy else 503, json.dumps(report), "application/json")
                    else:
                        self._send(404, "not found\n", "text/plain")
                except Exception as exc:  # a failing scrape must not kill the server thread
                    LOG.error("%s failed: %s", self.path, exc)
                    self._send(500, f"error: {exc}\n", "text/plain")

            def _send(self, status: int, body: str, content_type: str) -> None:
                data = body.encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:  # scrapes every 15 s: keep them out of the log
                return

        self.metrics = metrics
        self.health = health
        self.details = details
        try:
            self.server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise ConfigError(f"observability: cannot listen on {host}:{port}: {exc.strerror or exc} "
                              "(set [observability] port, or enabled = false)") from None
        self.thread = threading.Thread(target=self.server.serve_forever, name="qcgate-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def start(self) -> None:
        self.thread.start()
        LOG.info("metrics and health on http://%s:%d/metrics and /healthz", self.server.server_address[0], self.port)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
