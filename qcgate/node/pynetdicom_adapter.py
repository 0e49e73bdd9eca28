"""The node's only uses of pynetdicom internals, in one place (written against pynetdicom 3.0.x;
pyproject pins ``pynetdicom ~= 3.0.4``, and tests/node/test_node_abuse.py checks each behaviour).

1. **Where chunked receives land.** With ``_config.STORE_RECV_CHUNKED_DATASET`` (pynetdicom's
   documented switch, process-wide by design) a C-STORE data set streams into a file made by
   ``NamedTemporaryFile`` in ``pynetdicom.dimse_messages``, in ``tempfile.gettempdir()``. Instead of
   changing the process's temporary directory, ``install()`` replaces that one name with a factory
   that puts the file in the directory registered for the receiving association (its DUL thread,
   which is where the file is made) and remembers it, so that the files of an association that
   ends or aborts mid-transfer can be removed. Threads nobody registered get the standard
   behaviour. The file object also stops at the first write error (a full disk): it removes its
   file and swallows the rest of the transfer, so the handler can answer 0xA700 and the
   association stays up, where pynetdicom would abort it. It hashes what it writes (SHA-256), so
   the handler gets the file's digest from ``received_sha256`` without reading the file again.
2. **Over-long UIDs in the C-STORE request.** pynetdicom aborts the association when the command
   set's Affected SOP Class/Instance UID is over 64 characters (its primitive refuses the value).
   ``RequestUidGuard`` handles ``EVT_DIMSE_RECV``, which pynetdicom triggers with the decoded
   message just before converting it, keeps the original value and cuts the one in the command
   set to 64 characters; the C-STORE handler then refuses the instance with a status.

3. **A DIMSE message pynetdicom cannot decode.** A C-STORE request without an Affected SOP
   Instance UID (or with a command set pydicom cannot read) raises inside
   ``DIMSEMessage.decode_msg`` on the DUL thread: pynetdicom logs a traceback, its reactor thread
   dies and the association hangs until the peer gives up. ``install()`` wraps ``decode_msg`` so
   that such a message is logged in one line and the association is aborted (the DUL's Evt19, as
   pynetdicom does for a message it can decode but not convert); its partial file is removed when
   the association ends.

4. **Reactors that wait instead of sleeping.** pynetdicom's DUL and association threads poll with
   1 ms sleeps, several per C-STORE. ``install_reactors()`` (called by ``install()``) swaps in
   copies of the 3.0.4 loops whose idle sleeps are waits that end when there is work (select()
   on the socket and a wake-up pipe; a wait on the message queue), and socket reads of 256 KiB
   instead of 4 KiB. Acceptor associations only, and only when the originals' sources are the
   3.0.4 ones (section 4 below).

``install()`` is called once by ``qcgate.service`` at process start (wiring), never by a
constructor. Without it the node still works: data sets arrive in memory.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import queue
import select
import ssl
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pynetdicom
from pynetdicom import _config, association, dimse_messages, dul, evt, pdu, transport

LOG = logging.getLogger("qcgate.node")
_DUL_LOGGER = dul.LOGGER  # the copied reactors log as pynetdicom's own
_ASSOC_LOGGER = association.LOGGER
_UID_KEYWORDS = ("AffectedSOPClassUID", "AffectedSOPInstanceUID")
_installed = False
_install_lock = threading.Lock()
_original_named_temporary_file = dimse_messages.NamedTemporaryFile
# DUL thread -> (directory, called with each new file's path)
_receivers: weakref.WeakKeyDictionary[threading.Thread, tuple[Path, Callable[[Path], None]]] = weakref.WeakKeyDictionary()
_receivers_lock = threading.Lock()
# path -> the file being received there (dropped when pynetdicom closes or forgets it)
_receiving: weakref.WeakValueDictionary[str, ReceiveFile] = weakref.WeakValueDictionary()
_receiving_lock = threading.Lock()
# path -> the OSError that stopped the write
_failed_writes: dict[str, OSError] = {}
_failed_lock = threading.Lock()


class ReceiveFile:
    """What pynetdicom writes a received data set into: a real file that stops at the first error
    and hashes what it writes (SHA-256 while streaming: the handler need not read the file again)."""

    def __init__(self, directory: Path) -> None:
        fd, name = tempfile.mkstemp(suffix=".dcm", prefix="rx-", dir=directory)
        self._file = os.fdopen(fd, "wb")
        self.name = name
        self.error: OSError | None = None
        self._digest = hashlib.sha256()
        with _receiving_lock:
            _receiving[name] = self

    @property
    def file(self) -> ReceiveFile:  # pynetdicom calls ``.file.flush()``
        return self

    def write(self, data: bytes) -> int:
        if self.error is None:
            try:
                self._file.write(data)
            except OSError as exc:
                self._fail(exc)
            else:
                self._digest.update(data)  # pynetdicom writes in file order, never seeks
        return len(data)

    def flush(self) -> None:
        if self.error is None:
            try:
                self._file.flush()
            except OSError as exc:
                self._fail(exc)

    def sha256(self) -> str | None:
        """Hex SHA-256 of everything written so far (the whole file once pynetdicom hands it to the
        C-STORE handler, which runs before pynetdicom closes it); None after a write error."""
        return None if self.error is not None else self._digest.hexdigest()

    def close(self) -> None:
        with _receiving_lock:
            if _receiving.get(self.name) is self:
                del _receiving[self.name]
        try:
            self._file.close()
        except OSError as exc:
            if self.error is None:
                self._fail(exc)

    def _fail(self, exc: OSError) -> None:
        self.error = exc
        with _failed_lock:
            _failed_writes[self.name] = exc
        try:
            self._file.close()
        except OSError:
            pass
        Path(self.name).unlink(missing_ok=True)  # free the space now, not at the end of the transfer


def _named_temporary_file(*args: Any, **kwargs: Any) -> Any:
    with _receivers_lock:
        receiver = _receivers.get(threading.current_thread())
    if receiver is None:
        return _original_named_temporary_file(*args, **kwargs)
    directory, on_created = receiver
    handle = ReceiveFile(directory)
    on_created(Path(handle.name))
    return handle


def install() -> None:
    """Stream received data sets to files (pynetdicom's chunked receive) placed per association."""
    global _installed
    with _install_lock:
        if _installed:
            return
        _config.STORE_RECV_CHUNKED_DATASET = True
        dimse_messages.NamedTemporaryFile = _named_temporary_file  # type: ignore[assignment]
        dimse_messages.DIMSEMessage.decode_msg = _guarded_decode(dimse_messages.DIMSEMessage.decode_msg)  # type: ignore[method-assign]
        _installed = True
    install_reactors()


def _guarded_decode(decode: Callable[..., bool]) -> Callable[..., bool]:
    def decode_msg(self: Any, primitive: Any, assoc: Any = None) -> bool:
        try:
            return decode(self, primitive, assoc)
        except Exception as exc:  # a malformed message from the peer: abort its association, keep the DUL alive
            peer = getattr(getattr(assoc, "requestor", None), "address", "?")
            LOG.warning("invalid DIMSE message from %s (%s: %s): association aborted", peer, type(exc).__name__,
                        str(exc).encode("ascii", "backslashreplace").decode()[:200])
            handle = getattr(self, "_data_set_file", None)
            if handle is not None:
                try:
                    handle.close()
                except OSError:
                    pass
            if assoc is not None:
                assoc.dul.event_queue.put("Evt19")
            return False

    decode_msg.__wrapped__ = decode  # type: ignore[attr-defined]
    return decode_msg


def installed() -> bool:
    return _installed


def register_receiver(assoc: Any, directory: Path, on_created: Callable[[Path], None]) -> None:
    """Files received on ``assoc`` go into ``directory``; ``on_created`` hears of each."""
    with _receivers_lock:
        _receivers[assoc.dul] = (directory, on_created)


def unregister_receiver(assoc: Any) -> None:
    with _receivers_lock:
        _receivers.pop(assoc.dul, None)


def received_sha256(path: Path) -> str | None:
    """SHA-256 (hex) of the data set received into ``path``, hashed while it streamed in; None when
    it did not come through a ``ReceiveFile`` (data set in memory) or its write failed. Call it in
    the C-STORE handler, before the file is renamed."""
    with _receiving_lock:
        handle = _receiving.get(str(path))
    if handle is None:
        return None
    handle.flush()
    return handle.sha256()


def write_error(path: Path) -> OSError | None:
    """The error that stopped writing ``path`` (and removed it), if any; forgets it."""
    with _failed_lock:
        return _failed_writes.pop(str(path), None)


class RequestUidGuard:
    """EVT_DIMSE_RECV handler: keeps C-STORE requests with over-long UIDs from aborting the association."""

    def __init__(self) -> None:
        self._invalid: dict[tuple[int, int], dict[str, str]] = {}
        self._lock = threading.Lock()

    def on_dimse_recv(self, event: evt.Event) -> None:
        message = event.message
        command = getattr(message, "command_set", None)
        if command is None or type(message).__name__ != "C_STORE_RQ":
            return
        originals: dict[str, str] = {}
        for keyword in _UID_KEYWORDS:
            value = command.get(keyword)
            if value is not None and len(str(value)) > 64:
                originals[keyword] = str(value)
                setattr(command, keyword, str(value)[:64])
        if originals:
            with self._lock:
                if len(self._invalid) > 10_000:
                    self._invalid.clear()
                self._invalid[(id(event.assoc), int(command.MessageID))] = originals

    def pop(self, assoc: Any, message_id: int | None) -> dict[str, str] | None:
        """The original over-long UIDs of this request, if it had any."""
        if message_id is None:
            return None
        with self._lock:
            return self._invalid.pop((id(assoc), int(message_id)), None)


# --- 4. reactors that wait instead of sleeping ----------------------------------------------------
#
# pynetdicom 3.0.4's two reactor loops poll: the DUL thread sleeps 1 ms whenever a pass found no
# event, and the acceptor's association thread sleeps 1 ms before every look at its message queue.
# A C-STORE therefore pays several wake-ups of ≥ 1 ms (≈ 2 ms each on a loaded machine) between the
# last PDU arriving, the handler running, the response leaving and the next request being read.
# The copies below are the 3.0.4 loops with each idle sleep replaced by a wait that ends as soon as
# there is work: the DUL waits in select() on its socket and on a wake-up pipe that is written when
# a primitive is queued for it; the association thread waits on its message queue. The timeouts
# are pynetdicom's own delays, so timers (ARTIM, network idle) and idle CPU behave as before.
# Only acceptor associations (the node's) use them; requestors keep pynetdicom's loops. Each copy
# is used only when the original's source is the one it was copied from (``_REACTOR_SOURCES``):
# another pynetdicom version keeps its own loops, with one warning.

_READ_CHUNK = 1 << 18  # bytes per socket read; pynetdicom reads 4 KiB at a time


class _WakingQueue(queue.Queue):  # type: ignore[type-arg]
    """The DUL's to_provider_queue: each put also writes one byte to the reactor's wake-up pipe."""

    def __init__(self) -> None:
        super().__init__()
        self._wake_lock = threading.Lock()
        self._wake_fd: int | None = None  # the pipe's write end while our reactor runs

    def _put(self, item: Any) -> None:
        super()._put(item)
        with self._wake_lock:  # never write to a closed (and perhaps reused) descriptor
            if self._wake_fd is not None:
                try:
                    os.write(self._wake_fd, b"\0")
                except (BlockingIOError, OSError):  # pipe full: the reactor is awake anyway
                    pass

    def arm(self, fd: int) -> None:
        with self._wake_lock:
            self._wake_fd = fd

    def disarm(self) -> None:
        with self._wake_lock:
            self._wake_fd = None


def _dul_init(original: Callable[..., None]) -> Callable[..., None]:
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self.to_provider_queue = _WakingQueue()

    __init__.__wrapped__ = original  # type: ignore[attr-defined]
    return __init__


def _idle_wait(dul: Any, wake_read: int, delay: float) -> None:
    """Wait up to ``delay`` for data on the DUL's socket or a wake-up; where neither can be
    watched (no socket yet, or closed), sleep as pynetdicom does."""
    sock = getattr(dul.socket, "socket", None)
    if sock is None:
        time.sleep(delay)
        return
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return  # decrypted bytes already buffered: select() cannot see them
    try:
        ready, _, _ = select.select([sock, wake_read], [], [], delay)
    except (OSError, ValueError):  # closed under us: the reactor's next pass notices
        time.sleep(delay)
        return
    if wake_read in ready:
        try:
            os.read(wake_read, 4096)
        except (BlockingIOError, OSError):
            pass


def _dul_run_reactor(self: Any) -> None:
    """pynetdicom 3.0.4's ``DULServiceProvider.run_reactor``; the idle sleep is ``_idle_wait``."""
    wake = self.to_provider_queue
    if not self.assoc.is_acceptor or not isinstance(wake, _WakingQueue):
        _ORIGINALS["run_reactor"](self)
        return
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_read, False)
    os.set_blocking(wake_write, False)
    wake.arm(wake_write)
    try:
        _dul_loop(self, wake_read)
    finally:
        wake.disarm()
        os.close(wake_read)
        os.close(wake_write)


def _dul_loop(self: Any, wake_read: int) -> None:
    self._idle_timer.start()
    sleep = False
    while True:
        if not self.assoc._dul_ready.is_set():
            self.assoc._dul_ready.set()
            sleep = True
        if sleep:
            _idle_wait(self, wake_read, self._run_loop_delay)
        if self._kill_thread:
            break
        if self.artim_timer.expired:
            self.event_queue.put("Evt18")
        try:
            if self._process_recv_primitive():
                pass
            elif self._is_transport_event():
                self._idle_timer.restart()
        except Exception:  # as pynetdicom: any failure aborts the association
            _DUL_LOGGER.exception("Exception in DUL.run(), aborting association")
            abort_pdu = pdu.A_ABORT_RQ()
            abort_pdu.source = 0x02
            abort_pdu.reason_diagnostic = 0x00
            self.socket.send(abort_pdu.encode())
            self.assoc.is_aborted = True
            self.assoc.is_established = False
            self.assoc._kill = True
            self._kill_thread = True
            return
        try:
            event = self.event_queue.get(block=False)
        except queue.Empty:
            sleep = True
            continue
        self.state_machine.do_action(event)
        sleep = False


def _association_run_reactor(self: Any) -> None:
    """pynetdicom 3.0.4's ``Association._run_reactor``; the 1 ms sleep before each look at the
    message queue is a wait of up to 1 ms on that queue."""
    if not self.is_acceptor:
        _ORIGINALS["_run_reactor"](self)
        return
    messages = self.dimse.msg_queue
    self._is_paused = False
    while not self._kill:
        self._is_paused = True
        self._reactor_checkpoint.wait()
        self._is_paused = False
        try:
            context_id, msg = messages.get(timeout=0.001)
        except queue.Empty:
            context_id, msg = None, None
        if msg:
            self._serve_request(msg, context_id)
        if self.is_established and self.acse.is_release_requested():
            self.acse.send_release(is_response=True)
            _ASSOC_LOGGER.info("Association Released")
            self.is_released = True
            self.is_established = False
            evt.trigger(self, evt.EVT_RELEASED, {})
            self.kill()
            return
        if self.acse.is_aborted():
            log_msg = "Association Aborted"
            if self.acse.is_aborted("a-p-abort"):
                log_msg += " (A-P-ABORT)"
            _ASSOC_LOGGER.info(log_msg)
            self.dul.receive_pdu(wait=False)
            self.is_aborted = True
            self.is_established = False
            evt.trigger(self, evt.EVT_ABORTED, {})
            self.kill()
            return
        if not self.dul.is_alive():
            self.kill()
            return
        if self.dul.idle_timer_expired():
            _ASSOC_LOGGER.error("Network timeout reached")
            if self.network_timeout_response == "A-RELEASE":
                self._is_paused = True
                self._reactor_checkpoint.wait()
                self.release()
                self._is_paused = False
            else:
                self.abort()
            self.kill()
            return


def _socket_recv(self: Any, nr_bytes: int) -> bytearray:
    """pynetdicom 3.0.4's ``AssociationSocket.recv`` reading up to 256 KiB per call, not 4 KiB
    (through the socket's own ``recv``, so the transport's PDU guard still sees every byte)."""
    sock = self.socket
    bytestream = bytearray()
    while len(bytestream) < nr_bytes:
        data = sock.recv(min(nr_bytes - len(bytestream), _READ_CHUNK))
        if not data:
            return bytestream
        bytestream += data
    return bytestream


# (owner, attribute) -> (sha-256 prefix of the 3.0.4 source, replacement)
_REACTOR_SOURCES: dict[tuple[Any, str], tuple[str, Callable[..., Any]]] = {
    (dul.DULServiceProvider, "__init__"): ("c82dafa9438ddf70", _dul_init(dul.DULServiceProvider.__init__)),
    (dul.DULServiceProvider, "run_reactor"): ("e3a10eb3a0931e48", _dul_run_reactor),
    (association.Association, "_run_reactor"): ("f28838c5559e462a", _association_run_reactor),
    (transport.AssociationSocket, "recv"): ("6bc20a33b1b7cfe7", _socket_recv),
}
_ORIGINALS: dict[str, Callable[..., Any]] = {name: getattr(owner, name) for owner, name in _REACTOR_SOURCES}
_reactors_installed = False


def source_digest(function: Callable[..., Any]) -> str:
    """The first 16 hex digits of sha256(source of ``function``): what a copy was made from."""
    return hashlib.sha256(inspect.getsource(function).encode()).hexdigest()[:16]


def install_reactors() -> bool:
    """Use the waiting reactors (and the larger socket reads) for acceptor associations; True if
    installed. All or nothing: one changed original keeps pynetdicom's loops everywhere."""
    global _reactors_installed
    with _install_lock:
        if _reactors_installed:
            return True
        changed = [f"{owner.__name__}.{name}" for (owner, name), (digest, _) in _REACTOR_SOURCES.items()
                   if source_digest(_ORIGINALS[name]) != digest]
        if changed:
            LOG.warning("pynetdicom %s: %s differ from 3.0.4's; keeping pynetdicom's polling reactors",
                        pynetdicom.__version__, ", ".join(changed))
            return False
        for (owner, name), (_, replacement) in _REACTOR_SOURCES.items():
            setattr(owner, name, replacement)
        _reactors_installed = True
        return True


def reactors_installed() -> bool:
    return _reactors_installed
