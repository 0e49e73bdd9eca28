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
   association stays up, where pynetdicom would abort it.
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

``install()`` is called once by ``qcgate.service`` at process start (wiring), never by a
constructor. Without it the node still works: data sets arrive in memory.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pynetdicom import _config, dimse_messages, evt

LOG = logging.getLogger("qcgate.node")
_UID_KEYWORDS = ("AffectedSOPClassUID", "AffectedSOPInstanceUID")
_installed = False
_install_lock = threading.Lock()
_original_named_temporary_file = dimse_messages.NamedTemporaryFile
# DUL thread -> (directory, called with each new file's path)
_receivers: "weakref.WeakKeyDictionary[threading.Thread, tuple[Path, Callable[[Path], None]]]" = weakref.WeakKeyDictionary()
_receivers_lock = threading.Lock()
# path -> the OSError that stopped the write
_failed_writes: dict[str, OSError] = {}
_failed_lock = threading.Lock()


class ReceiveFile:
    """What pynetdicom writes a received data set into: a real file that stops at the first error."""

    def __init__(self, directory: Path) -> None:
        fd, name = tempfile.mkstemp(suffix=".dcm", prefix="rx-", dir=directory)
        self._file = os.fdopen(fd, "wb")
        self.name = name
        self.error: OSError | None = None

    @property
    def file(self) -> "ReceiveFile":  # pynetdicom calls ``.file.flush()``
        return self

    def write(self, data: bytes) -> int:
        if self.error is None:
            try:
                self._file.write(data)
            except OSError as exc:
                self._fail(exc)
        return len(data)

    def flush(self) -> None:
        if self.error is None:
            try:
                self._file.flush()
            except OSError as exc:
                self._fail(exc)

    def close(self) -> None:
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
