"""The node's TCP side: who may connect, for how long before asking, and how big a PDU may be.

pynetdicom's server starts an association thread for every TCP connection, counts it against the
association limit before it has said anything, wraps TLS in the accepting thread and reads a PDU
whole, whatever length it announces. Here, using only socketserver's public hooks:

* ``verify_request`` checks the peer address at accept, before a byte is read, and applies the
  connection caps: per host, and for connections that have not yet sent their A-ASSOCIATE-RQ
  ("pending"). A new connection never waits for a pending one: when a cap is reached, the oldest
  pending connection (of that host, or overall) is closed to make room; a host whose connections
  have all completed their request is refused at its cap.
* the TLS handshake runs in the connection's own thread, under the same deadline;
* ``service_actions`` (the accept loop's idle hook) closes connections whose A-ASSOCIATE-RQ has
  not arrived, complete, within ``association_request_timeout_seconds`` of the accept;
* a guarded socket (a ``socket.socket`` / ``ssl.SSLSocket`` subclass, so pynetdicom sees an
  ordinary socket) follows the PDU stream as pynetdicom reads it and closes the connection when a
  PDU header announces more than the limits: ``max_association_request_bytes`` for anything
  before and around association, ``max_pdu_bytes`` for P-DATA (with an A-ABORT), before the body
  is read. A read that times out or fails ends the connection quietly instead of with a traceback.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from qcgate.node.refusals import printable

LOG = logging.getLogger("qcgate.node.transport")

_A_ASSOCIATE_RQ = 0x01
_P_DATA_TF = 0x04
# A-ABORT, source 2 (service provider), reason 6 (invalid PDU parameter value).
_A_ABORT_INVALID_PDU = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0x02, 0x06])


# --- allowed hosts ---------------------------------------------------------------------------

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def resolve_allowed_hosts(entries: Iterable[str], *, key: str = "node.allowed_hosts") -> list[Network]:
    """Addresses and CIDR networks as they are; names resolved now (every address they have).

    Raises ValueError naming ``key`` when a name does not resolve.
    """
    networks: list[Network] = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
            continue
        except ValueError:
            pass
        try:
            infos = socket.getaddrinfo(entry, None, proto=socket.IPPROTO_TCP)
        except OSError as exc:
            raise ValueError(f"{key}: cannot resolve {entry!r}: {exc.strerror or exc}") from None
        for info in infos:
            address = _address(str(info[4][0]))
            if address is not None:
                network = ipaddress.ip_network(address)
                if network not in networks:
                    networks.append(network)
        LOG.info("%s: %s resolves to %s", key, entry, ", ".join(str(n.network_address) for n in networks[-len(infos):]))
    return networks


def address_allowed(host: str, networks: list[Network]) -> bool:
    """True when ``networks`` is empty or the peer address ``host`` is in one of them."""
    if not networks:
        return True
    address = _address(host)
    return address is not None and any(address.version == n.version and address in n for n in networks)


# --- connection table --------------------------------------------------------------------------

@dataclass(eq=False)
class Connection:
    """One accepted TCP connection, from accept until it closes."""

    host: str
    port: int
    accepted_at: float
    sock: socket.socket
    requested: bool = False  # a complete A-ASSOCIATE-RQ has been read
    closed_by_us: str | None = None

    def close(self, reason: str) -> None:
        """Close from any thread: shutdown wakes the thread blocked reading it."""
        if self.closed_by_us is None:
            self.closed_by_us = reason
        try:
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)  # the fd, not the TLS layer
        except OSError:
            pass


@dataclass(frozen=True)
class ConnectionLimits:
    request_timeout: float = 10.0
    max_pending: int = 32
    max_per_host: int = 32
    max_request_bytes: int = 65_536
    max_pdu_bytes: int = 4_194_304  # 0: unlimited
    network_timeout: float = 60.0


@dataclass
class ConnectionTable:
    """Every open connection, for the caps and the request deadline. Thread-safe."""

    limits: ConnectionLimits
    on_closed: Callable[[Connection, str], None] = lambda connection, reason: None
    _connections: list[Connection] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def admit(self, host: str, port: int, sock: socket.socket) -> tuple[Connection | None, str | None]:
        """Register a new connection; returns it, or None and why it is refused."""
        evicted: list[tuple[Connection, str]] = []
        with self._lock:
            self._prune()
            same_host = [c for c in self._connections if c.host == host]
            if len(same_host) >= self.limits.max_per_host:
                pending = [c for c in same_host if not c.requested]
                if not pending:
                    return None, f"{len(same_host)} connections from {host} (node.max_connections_per_host)"
                evicted.append((pending[0], "evicted: per-host connection cap reached"))
            pending_all = [c for c in self._connections if not c.requested and c not in (e for e, _ in evicted)]
            while len(pending_all) >= self.limits.max_pending:
                evicted.append((pending_all.pop(0), "evicted: pending-connection cap reached"))
            for connection, _ in evicted:
                self._connections.remove(connection)
            connection = Connection(host, port, time.monotonic(), sock)
            self._connections.append(connection)
        for old, reason in evicted:
            old.close(reason)
            self.on_closed(old, reason)
        return connection, None

    def forget(self, connection: Connection) -> None:
        with self._lock:
            if connection in self._connections:
                self._connections.remove(connection)

    def reap(self) -> int:
        """Close pending connections past the request deadline; returns how many."""
        deadline = time.monotonic() - self.limits.request_timeout
        with self._lock:
            self._prune()
            overdue = [c for c in self._connections if not c.requested and c.accepted_at < deadline]
            for connection in overdue:
                self._connections.remove(connection)
        for connection in overdue:
            reason = f"no complete A-ASSOCIATE-RQ within {self.limits.request_timeout:g} s"
            connection.close(reason)
            self.on_closed(connection, reason)
        return len(overdue)

    def _prune(self) -> None:
        self._connections = [c for c in self._connections if c.sock.fileno() != -1]

    def counts(self) -> tuple[int, int]:
        """(open connections, pending ones)."""
        with self._lock:
            self._prune()
            return len(self._connections), sum(1 for c in self._connections if not c.requested)


# --- the guarded socket ---------------------------------------------------------------------------

class PduGuard:
    """Follows the PDU stream as it is read and says when a PDU header breaks a limit."""

    def __init__(self, connection: Connection, limits: ConnectionLimits) -> None:
        self.connection = connection
        self.limits = limits
        self._header = bytearray()
        self._remaining = 0
        self._type = 0

    def feed(self, data: bytes) -> tuple[str, bool] | None:
        """Account for ``data``; returns (why, send an A-ABORT) when the connection must close."""
        view = memoryview(data)
        while view:
            if self._remaining:
                step = min(self._remaining, len(view))
                self._remaining -= step
                view = view[step:]
                if not self._remaining:
                    self._pdu_done()
                continue
            need = 6 - len(self._header)
            self._header += view[:need]
            view = view[need:]
            if len(self._header) < 6:
                break
            self._type, _, length = struct.unpack(">BBL", self._header)
            self._header.clear()
            problem = self._check(self._type, length)
            if problem is not None:
                return problem
            self._remaining = length
            if not length:
                self._pdu_done()
        return None

    def _check(self, pdu_type: int, length: int) -> tuple[str, bool] | None:
        if not self.connection.requested:
            if length > self.limits.max_request_bytes:
                return (f"a PDU of {length} bytes before association (limit {self.limits.max_request_bytes}, "
                        "node.max_association_request_bytes)", False)
            return None
        if pdu_type == _P_DATA_TF:
            if self.limits.max_pdu_bytes and length > self.limits.max_pdu_bytes:
                return f"a P-DATA PDU of {length} bytes (negotiated maximum {self.limits.max_pdu_bytes})", True
            return None
        if length > self.limits.max_request_bytes:
            return f"a type 0x{pdu_type:02X} PDU of {length} bytes (limit {self.limits.max_request_bytes})", True
        return None

    def _pdu_done(self) -> None:
        if self._type == _A_ASSOCIATE_RQ and not self.connection.requested:
            self.connection.requested = True


class _GuardMixin:
    """recv() through a PduGuard; failures and violations read as a closed connection."""

    _qcgate_guard: PduGuard | None = None
    _qcgate_refused: bool = False

    def recv(self, bufsize: int, flags: int = 0) -> bytes:  # type: ignore[override]
        if self._qcgate_refused:
            return b""
        try:
            data: bytes = super().recv(bufsize, flags)  # type: ignore[misc]
        except (OSError, ValueError) as exc:  # timeout, reset, TLS error, closed by the reaper
            guard = self._qcgate_guard
            if guard is not None and guard.connection.closed_by_us is None:
                LOG.info("connection from %s:%d ended: %s", guard.connection.host, guard.connection.port,
                         printable(exc, 200) or type(exc).__name__)
            return b""
        guard = self._qcgate_guard
        if data and guard is not None:
            problem = guard.feed(data)
            if problem is not None:
                reason, abort = problem
                self._qcgate_refused = True
                LOG.warning("closing the connection from %s:%d: %s", guard.connection.host, guard.connection.port, reason)
                if abort:
                    try:
                        self.sendall(_A_ABORT_INVALID_PDU)  # type: ignore[attr-defined]
                    except (OSError, ValueError):
                        pass
                guard.connection.close(reason)
                return b""
        return data


class GuardedSocket(_GuardMixin, socket.socket):
    """A plain TCP socket read through a PduGuard."""


class GuardedSSLSocket(_GuardMixin, ssl.SSLSocket):
    """A TLS socket read through a PduGuard (set as the server context's ``sslsocket_class``)."""


# --- server and request handler -------------------------------------------------------------------

class GuardedRequestHandler(RequestHandler):
    """Per connection, in its own thread: the TLS handshake under the deadline, then the guard."""

    server: "GuardedAssociationServer"

    def setup(self) -> None:
        self._usable = False
        connection = self.server.take_admitted(self.request)
        if connection is None:  # refused or closed between accept and here
            return
        sock = connection.sock
        if isinstance(sock, ssl.SSLSocket):
            try:
                if connection.closed_by_us is not None:
                    raise OSError(connection.closed_by_us)
                sock.settimeout(self.server.limits.request_timeout)
                sock.do_handshake()  # the reaper's shutdown ends a silent or slow handshake
                sock.settimeout(self.server.limits.network_timeout)
            except (OSError, ValueError) as exc:
                if connection.closed_by_us is None:
                    LOG.warning("TLS handshake with %s:%d failed: %s", connection.host, connection.port, printable(exc, 200))
                    self.server.table.on_closed(connection, "TLS handshake failed")
                connection.close("TLS handshake failed")
                try:
                    sock.close()
                except OSError:
                    pass
                self.server.table.forget(connection)
                return
        self.request = sock
        self._usable = True

    def handle(self) -> None:
        if self._usable:
            super().handle()


class GuardedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the connection policy of this module."""

    daemon_threads = True  # no list of finished threads kept (ThreadingMixIn)

    def __init__(self, *args: object, limits: ConnectionLimits, allowed: list[Network],
                 tls_context: ssl.SSLContext | None, on_refused: Callable[[str, int, str], None],
                 on_closed: Callable[[Connection, str], None], **kwargs: object) -> None:
        self.limits = limits
        self.allowed = allowed
        self.tls_context = tls_context
        if tls_context is not None:
            tls_context.sslsocket_class = GuardedSSLSocket
        self.on_refused = on_refused
        self.table = ConnectionTable(limits, on_closed)
        self._admitted: dict[int, Connection] = {}
        self._admitted_lock = threading.Lock()
        super().__init__(*args, request_handler=GuardedRequestHandler, **kwargs)  # type: ignore[arg-type]

    def verify_request(self, request: socket.socket, client_address: tuple[str, int]) -> bool:  # type: ignore[override]
        host, port = str(client_address[0]), int(client_address[1])
        if not address_allowed(host, self.allowed):
            self.on_refused(host, port, f"host {host} is not in the allow-list")
            return False
        connection, why = self.table.admit(host, port, request)
        if connection is None:
            self.on_refused(host, port, why or "connection cap reached")
            return False
        # No I/O here: the guarded socket takes over the descriptor; a TLS handshake waits for
        # the connection's own thread.
        try:
            if self.tls_context is not None:
                sock: socket.socket = self.tls_context.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
            else:
                sock = GuardedSocket(request.family, request.type, request.proto, fileno=request.detach())
                sock.settimeout(self.limits.network_timeout)
        except (OSError, ValueError) as exc:
            LOG.warning("connection from %s:%d could not be set up: %s", host, port, printable(exc, 200))
            self.table.forget(connection)
            return False
        sock._qcgate_guard = PduGuard(connection, self.limits)  # type: ignore[attr-defined]
        connection.sock = sock
        with self._admitted_lock:
            self._admitted[id(request)] = connection
        return True

    def take_admitted(self, request: socket.socket) -> Connection | None:
        with self._admitted_lock:
            return self._admitted.pop(id(request), None)

    def service_actions(self) -> None:
        super().service_actions()
        self.table.reap()

    def handle_error(self, request: object, client_address: object) -> None:
        # socketserver would print a traceback to stderr for an error in a connection's thread.
        LOG.error("connection from %s failed", printable(client_address, 80), exc_info=LOG.isEnabledFor(logging.DEBUG))
