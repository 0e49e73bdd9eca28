"""The ingest fast path (issue 13.9): pynetdicom reactors that wait instead of polling, the SHA-256
taken while the data set streams in, one INSERT … ON CONFLICT DO NOTHING per instance, and the
file's fsync overlapped with everything up to the commit that makes its row durable."""

from __future__ import annotations

import errno
import hashlib
import shutil
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import association, dul, transport
from sqlalchemy import func, select

from qcgate.config import load_settings
from qcgate.node import ingest as ingest_module
from qcgate.node import pynetdicom_adapter as adapter
from qcgate.node.dicom_header import read_header
from qcgate.node.ingest import Ingestor, _Pending
from qcgate.node.spool import Spool
from qcgate.service import GateService
from qcgate.store.database import (
    create_db_engine,
    make_session_factory,
    upgrade_database,
)
from qcgate.store.models import Instance, RefusedInstance
from tests.support import (
    dataset_bytes_without_meta,
    free_port,
    storescu,
    write_synthetic_case,
)


@pytest.fixture
def ct_files(tmp_path: Path) -> list[Path]:
    files, _ = write_synthetic_case(tmp_path / "case", n_slices=4, size=64)
    return files


@pytest.fixture
def ingestor(tmp_path: Path, db_url: str) -> Iterator[Ingestor]:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    engine = create_db_engine(db_url or f"sqlite:///{data_dir / 'qcgate.db'}")
    upgrade_database(engine)
    yield Ingestor(Spool(data_dir), make_session_factory(engine), min_free_mb=0)
    engine.dispose()


def _stage(ingestor: Ingestor, source: Path, payload: bytes | None = None) -> Path:
    """A copy of ``source`` (or ``payload``) in the spool's incoming folder, as a receive leaves it."""
    incoming = ingestor.spool.new_incoming_path()
    if payload is None:
        shutil.copyfile(source, incoming)
    else:
        incoming.write_bytes(payload)
    return incoming


def _count(ingestor: Ingestor, model: Any) -> int:
    with ingestor.session_factory() as session:
        return int(session.scalar(select(func.count()).select_from(model)))


# --- reactors --------------------------------------------------------------------------------------

def test_the_reactor_copies_are_of_the_pinned_pynetdicom_and_install() -> None:
    # A pynetdicom upgrade that changes a copied loop fails here, not silently in production.
    for (owner, name), (digest, _) in adapter._REACTOR_SOURCES.items():
        assert adapter.source_digest(adapter._ORIGINALS[name]) == digest, f"{owner.__name__}.{name} changed"
    assert adapter.install_reactors()
    assert dul.DULServiceProvider.run_reactor is adapter._dul_run_reactor
    assert association.Association._run_reactor is adapter._association_run_reactor
    assert transport.AssociationSocket.recv is adapter._socket_recv


def test_a_queued_primitive_wakes_the_reactor_through_its_pipe() -> None:
    import os

    queue = adapter._WakingQueue()
    queue.put("before")  # not armed: no pipe to write to, nothing fails
    read_end, write_end = os.pipe()
    try:
        queue.arm(write_end)
        queue.put("primitive")
        assert os.read(read_end, 16) == b"\0"
        queue.disarm()
        queue.put("after")  # disarmed: the descriptor is never written again
        os.set_blocking(read_end, False)
        with pytest.raises(BlockingIOError):
            os.read(read_end, 16)
    finally:
        os.close(read_end)
        os.close(write_end)
    assert [queue.get_nowait() for _ in range(3)] == ["before", "primitive", "after"]


# --- SHA-256 while streaming ---------------------------------------------------------------------

def test_the_receive_file_hashes_exactly_what_it_wrote(tmp_path: Path) -> None:
    handle = adapter.ReceiveFile(tmp_path)
    for chunk in (b"\0" * 128, b"DICM", bytes(range(256)) * 1000, b"tail"):
        handle.write(chunk)
        handle.file.flush()
    path = Path(handle.name)
    assert adapter.received_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    handle.close()
    assert adapter.received_sha256(path) is None  # closed: forgotten


def test_a_stored_instance_s_sha256_was_hashed_while_streaming_and_equals_the_file_s(
        tmp_path: Path, ct_files: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    def read_back(path: Path) -> str:
        raise AssertionError(f"{path.name} was read back to hash it: the streamed SHA-256 was not used")

    monkeypatch.setattr(ingest_module, "sha256_of_file", read_back)
    port = free_port()
    settings = load_settings(None, {"storage": {"data_dir": str(tmp_path / "gate"), "min_free_mb": 1}, "node": {"port": port},
                                    "pipeline": {"workers": 0}, "observability": {"enabled": False}})
    service = GateService(settings)
    service.start()
    try:
        result = storescu(port, ct_files)
        assert result.returncode == 0, result.stderr
        with service.session_factory() as session:
            rows = session.execute(select(Instance.spool_path, Instance.sha256)).all()
    finally:
        service.stop()
    assert len(rows) == len(ct_files)
    for spool_path, digest in rows:
        assert digest == hashlib.sha256((service.spool.root / spool_path).read_bytes()).hexdigest()
    # The data sets arrive intact (the file meta is the node's own, written by pynetdicom).
    stored = {dataset_bytes_without_meta(service.spool.root / spool_path) for spool_path, _ in rows}
    assert stored == {dataset_bytes_without_meta(p) for p in ct_files}


# --- one statement per instance, re-sends after the commit --------------------------------------

def _pending(ingestor: Ingestor, source: Path, payload: bytes | None = None) -> _Pending:
    incoming = _stage(ingestor, source, payload)
    header = read_header(incoming)
    data = incoming.read_bytes()
    done: Future[None] = Future()
    done.set_result(None)
    relative = ingestor.spool.relative_path_for(header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid)
    return _Pending(incoming, header, relative, hashlib.sha256(data).hexdigest(), len(data), None, done)


def test_one_batch_stores_new_instances_and_answers_repeats_and_resends(ingestor: Ingestor, ct_files: list[Path]) -> None:
    first = ingestor.ingest(_stage(ingestor, ct_files[0]))
    assert first.outcome == "stored"
    original = ct_files[0].read_bytes()
    changed = original[:-1] + bytes([original[-1] ^ 1])  # same SOP instance, one pixel bit flipped
    batch = [
        _pending(ingestor, ct_files[1]),            # new
        _pending(ingestor, ct_files[1]),            # the same instance again in the same batch
        _pending(ingestor, ct_files[0]),            # identical re-send of one stored before
        _pending(ingestor, ct_files[0], changed),   # conflicting re-send of it
        _pending(ingestor, ct_files[2]),            # new
    ]
    ingestor._commit_batch(batch)
    assert [item.result.outcome for item in batch if item.result] == ["stored", "duplicate", "duplicate", "conflict", "stored"]
    assert all(item.result is not None and item.result.status == 0x0000 for item in batch)
    assert {item.result.case_id for item in batch if item.result} == {first.case_id}
    assert _count(ingestor, Instance) == 3
    assert _count(ingestor, RefusedInstance) == 1  # the conflict's audit row
    assert len(list(ingestor.spool.conflicts_dir.glob("*.dcm"))) == 1
    assert not list(ingestor.spool.incoming.iterdir())  # every payload stored, dropped or set aside


def test_a_failed_file_fsync_commits_no_row(ingestor: Ingestor, ct_files: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    def failing_fsync(fd: int) -> None:
        os.close(fd)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(ingest_module, "_fsync_and_close", failing_fsync)
    with pytest.raises(OSError, match="Input/output error"):
        ingestor.ingest(_stage(ingestor, ct_files[0]))
    assert _count(ingestor, Instance) == 0  # not durable, so not recorded (and not acknowledged)
    monkeypatch.undo()
    assert ingestor.ingest(_stage(ingestor, ct_files[0])).outcome == "stored"  # the re-send is stored
