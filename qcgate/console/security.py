"""The console's defences: security headers on every response, a login rate limit, CSRF checks.

- Headers: CSP ``default-src 'self'`` (no script at all: the console has no JavaScript), no framing,
  ``nosniff``, the referrer only to this origin, ``no-store`` caching, and HSTS when served over TLS.
- Login rate limit: at most N failed sign-ins per minute per user name and per client address
  (``http.login_attempts_per_minute``); while either is over, even the right password is refused
  (429), so guessing cannot continue at one try per success.
- CSRF: a session's POSTs must carry its token (form field ``csrf_token`` or header
  ``X-CSRF-Token``); the login form uses a double-submit cookie; a cross-site ``Origin`` is refused.
  Bearer-token API calls carry no ambient credential and need no CSRF token.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import deque
from typing import Any
from urllib.parse import urlsplit

CSP = ("default-src 'self'; script-src 'none'; object-src 'none'; img-src 'self' data:; style-src 'self'; "
       "frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
# The per-case HTML report is a stored file with inline styles and images: it gets its own, stricter
# policy (sandboxed, nothing loaded from anywhere).
REPORT_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; sandbox; frame-ancestors 'none'"

SESSION_COOKIE = "qcgate_session"
LOGIN_CSRF_COOKIE = "qcgate_login_csrf"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"


class SecurityHeaders:
    """ASGI middleware: add the security headers to every HTTP response (a route may set its own CSP)."""

    def __init__(self, app: Any, *, tls: bool) -> None:
        self.app = app
        self.headers = [
            (b"x-frame-options", b"DENY"),
            (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"same-origin"),  # not no-referrer: Chromium would then send "Origin: null" on our own forms
            (b"cross-origin-opener-policy", b"same-origin"),
            (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
        ]
        if tls:
            self.headers.append((b"strict-transport-security", b"max-age=31536000"))

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers += [(name, value) for name, value in self.headers if name not in present]
                if b"content-security-policy" not in present:
                    headers.append((b"content-security-policy", CSP.encode()))
                if b"cache-control" not in present:
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class LoginLimiter:
    """Failed sign-ins in a sliding window, per user name and per client address (thread-safe)."""

    def __init__(self, per_minute: int, window_seconds: float = 60.0) -> None:
        self.per_minute = per_minute
        self.window = window_seconds
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _keys(self, user: str, address: str) -> list[str]:
        return [f"user:{user.strip().lower()[:64]}", f"addr:{address}"]

    def retry_after(self, user: str, address: str) -> int:
        """0 when a sign-in may be tried now; else the seconds until it may."""
        now = time.monotonic()
        wait = 0.0
        with self._lock:
            for key in self._keys(user, address):
                failures = self._failures.get(key)
                if not failures:
                    continue
                while failures and failures[0] <= now - self.window:
                    failures.popleft()
                if len(failures) >= self.per_minute:
                    wait = max(wait, failures[0] + self.window - now)
        return int(wait) + 1 if wait > 0 else 0

    def failed(self, user: str, address: str) -> None:
        now = time.monotonic()
        with self._lock:
            if len(self._failures) > 10_000:  # bounded memory under a spray of names
                self._failures = {k: v for k, v in self._failures.items() if v and v[-1] > now - self.window}
            for key in self._keys(user, address):
                self._failures.setdefault(key, deque()).append(now)

    def succeeded(self, user: str) -> None:
        with self._lock:
            self._failures.pop(self._keys(user, "")[0], None)


def same_token(expected: str | None, given: str | None) -> bool:
    return bool(expected) and bool(given) and secrets.compare_digest(str(expected), str(given))


def cross_site(headers: Any) -> bool:
    """True when the request's Origin (if sent) is another host than the one it was sent to."""
    origin = headers.get("origin")
    if not origin or origin == "null":
        return origin == "null"
    host = headers.get("host", "")
    return urlsplit(origin).netloc.lower() != host.lower()


def safe_next(target: str | None) -> str:
    """Where to go after sign-in: a path on this server only (no //host, no scheme)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target
