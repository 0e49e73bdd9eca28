"""The spool: instances on disk exactly as received, written durably, named safely.

The folders are named in ``qcgate.core.layout.DataLayout``.

UIDs come from the network, so they are never trusted as path components: a UID that is not a
valid DICOM UID (digits and dots, at most 64 characters) is replaced by a hash of itself.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import BinaryIO

from qcgate.core.layout import DataLayout

_VALID_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_COPY_CHUNK = 1 << 20


def safe_uid_component(uid: str) -> str:
    """A path component for ``uid`` that can never leave its directory.

    Valid UIDs (``[0-9.]``, ≤ 64 chars, no empty component) are used as they are, which keeps the
    spool readable; anything else becomes ``x-`` + the first 32 hex digits of sha256(uid).
    """
    if 0 < len(uid) <= 64 and _VALID_UID.match(uid):
        return uid
    return "x-" + hashlib.sha256(uid.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def fsync_directory(path: Path) -> None:
    """fsync a directory so that a rename inside it survives a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_COPY_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


class Spool:
    """Durable, path-safe storage for received instances."""

    def __init__(self, data_dir: Path, *, fsync: bool = True) -> None:
        self.data_dir = Path(data_dir).resolve()
        layout = DataLayout(self.data_dir)
        self.root = layout.spool
        self.incoming = layout.incoming
        self.quarantine_dir = layout.quarantine
        self.conflicts_dir = layout.conflicts
        self.fsync = fsync
        for directory in (self.root, self.incoming, self.quarantine_dir, self.conflicts_dir):
            directory.mkdir(parents=True, exist_ok=True)

    def relative_path_for(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
        """Spool-relative path of an instance; always inside the spool (see ``safe_uid_component``)."""
        return Path(safe_uid_component(study_uid)) / safe_uid_component(series_uid) / (
            safe_uid_component(sop_instance_uid) + ".dcm"
        )

    def absolute(self, relative: str | Path) -> Path:
        path = (self.root / relative).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"{relative!s} is outside the spool")
        return path

    def new_incoming_path(self) -> Path:
        return self.incoming / f"{uuid.uuid4().hex}.part"

    def write_incoming(self, source: BinaryIO | bytes) -> Path:
        """Copy a stream (or bytes) into a new incoming file, fsynced; returns its path."""
        path = self.new_incoming_path()
        with open(path, "wb") as handle:
            if isinstance(source, (bytes, bytearray, memoryview)):
                handle.write(source)
            else:
                shutil.copyfileobj(source, handle, _COPY_CHUNK)
            self._sync(handle)
        return path

    def sync_file(self, path: Path) -> None:
        """fsync an existing file's data (for files written by someone else, e.g. pynetdicom)."""
        if not self.fsync:
            return
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def commit(self, incoming: Path, relative: Path) -> Path:
        """Atomically move an fsynced incoming file to its final place; returns the final path.

        The final directory is fsynced after the rename so the name itself is durable.
        """
        final = self.absolute(relative)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(incoming, final)
        if self.fsync:
            fsync_directory(final.parent)
        return final

    def set_aside(self, incoming: Path, *, kind: str, details: dict[str, object]) -> Path:
        """Move a payload to quarantine/ or conflicts/ with a JSON sidecar explaining why."""
        target_dir = self.quarantine_dir if kind == "quarantine" else self.conflicts_dir
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
        target = target_dir / f"{stamp}-{uuid.uuid4().hex[:12]}.dcm"
        os.replace(incoming, target)
        sidecar = target.with_suffix(".json")
        sidecar.write_text(json.dumps(details, indent=2, default=str), encoding="utf-8")
        if self.fsync:
            fsync_directory(target_dir)
        return target

    def purge_incoming(self) -> int:
        """Delete partial receives left by a crash; none of them was acknowledged. Returns the count."""
        removed = 0
        for leftover in self.incoming.iterdir():
            if leftover.is_file():
                leftover.unlink(missing_ok=True)
                removed += 1
        return removed

    def free_mb(self) -> float:
        usage = shutil.disk_usage(self.root)
        return usage.free / 1_048_576

    def _sync(self, handle: BinaryIO) -> None:
        handle.flush()
        if self.fsync:
            os.fsync(handle.fileno())
