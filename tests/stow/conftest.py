"""Fixtures for STOW-RS in: the gate's app (Starlette's TestClient) over a fresh SQLite database with the
node's Ingestor and spool, one user per role with a token, and small SYNTHETIC instances."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest

from tests.console.conftest import PASSWORD, make_test_client_class

BOUNDARY = "qcgate-test-boundary"
CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


def multipart(parts: list[bytes], boundary: str = BOUNDARY, content_type: str | None = "application/dicom",
              close: bool = True) -> bytes:
    """A multipart/related body of ``parts`` (with a preamble, as some senders write one)."""
    out = [b"this preamble is ignored\r\n"]
    for payload in parts:
        out.append(f"--{boundary}\r\n".encode())
        if content_type:
            out.append(f"Content-Type: {content_type}\r\n".encode())
        out.append(b"\r\n" + payload + b"\r\n")
    if close:
        out.append(f"--{boundary}--\r\nepilogue ignored too".encode())
    return b"".join(out)


@dataclass
class StowFixture:
    client: Any
    settings: Any
    session_factory: Any
    spool: Any
    tokens: dict[str, str]

    def bearer(self, role: str = "sender") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}

    def post(self, body: Any, path: str = "/dicomweb/studies", role: str = "sender", content_type: str = CONTENT_TYPE,
             headers: dict[str, str] | None = None) -> Any:
        return self.client.post(path, content=body, headers={**self.bearer(role), "Content-Type": content_type,
                                                             "Accept": "application/dicom+json", **(headers or {})})

    def sql(self, statement: str) -> list[tuple[Any, ...]]:
        from sqlalchemy import text

        with self.session_factory() as session:
            return [tuple(row) for row in session.execute(text(statement))]

    def stored_uids(self) -> set[str]:
        return {row[0] for row in self.sql("SELECT sop_instance_uid FROM instances")}

    def incoming(self) -> list[Path]:
        return sorted(self.spool.incoming.iterdir())


@contextlib.contextmanager
def make_stow(tmp_path: Path, http: dict[str, Any] | None = None, metrics: Any = None) -> Iterator[StowFixture]:
    TestClient = make_test_client_class()

    from qcgate.config import load_settings
    from qcgate.console.app import create_app
    from qcgate.node.ingest import Ingestor
    from qcgate.node.spool import Spool
    from qcgate.store import users
    from qcgate.store.database import create_db_engine, make_session_factory, upgrade_database

    settings = load_settings(None, {"storage": {"data_dir": str(tmp_path / "data"), "min_free_mb": 1, "fsync": False},
                                    "http": http or {}})
    engine = create_db_engine(settings.database_url)
    upgrade_database(engine)
    factory = make_session_factory(engine)
    spool = Spool(settings.storage.data_dir, fsync=False)
    ingestor = Ingestor(spool, factory, min_free_mb=settings.storage.min_free_mb)
    tokens = {}
    with factory() as session, session.begin():
        for role in ("viewer", "reviewer", "admin", "sender"):
            users.add_user(session, role, role, PASSWORD)
            tokens[role] = users.issue_token(session, role)
    with TestClient(create_app(settings, factory, ingestor=ingestor, metrics=metrics), base_url="http://127.0.0.1") as client:
        yield StowFixture(client, settings, factory, spool, tokens)
    engine.dispose()


@pytest.fixture
def stow(tmp_path: Path) -> Iterator[StowFixture]:
    with make_stow(tmp_path) as fixture:
        yield fixture
        assert fixture.incoming() == [], "the spool's incoming folder must be empty after every request"


@dataclass(frozen=True)
class Instances:
    """Two SYNTHETIC cases (two studies): CT slices and a SEG each, as Part 10 bytes."""

    ct: list[bytes]
    seg: bytes
    other_ct: list[bytes]
    big_ct: bytes  # 128x128, larger than the small ones (64x64)

    @staticmethod
    def uid(payload: bytes, keyword: str = "SOPInstanceUID") -> str:
        import io

        return str(pydicom.dcmread(io.BytesIO(payload), stop_before_pixels=True).get(keyword))


@pytest.fixture(scope="session")
def instances(tmp_path_factory: pytest.TempPathFactory) -> Instances:
    from tests.support import write_synthetic_case

    root = tmp_path_factory.mktemp("stow-instances")
    ct, seg = write_synthetic_case(root / "a", n_slices=4, size=64, seed=1, patient_id="STOWA")
    other, _ = write_synthetic_case(root / "b", n_slices=2, size=64, seed=2, patient_id="STOWB")
    big, _ = write_synthetic_case(root / "c", n_slices=1, size=128, seed=3, patient_id="STOWC")
    return Instances([p.read_bytes() for p in ct], seg.read_bytes(), [p.read_bytes() for p in other], big[0].read_bytes())


def new_uid() -> str:
    return f"2.25.{uuid.uuid4().int}"
