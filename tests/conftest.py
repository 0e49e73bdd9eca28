"""Fixtures: a real `qcgate serve` process on loopback, over SQLite or the PostgreSQL server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support import free_port

POSTGRES_ADMIN_URL = os.environ.get("QCGATE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


def _postgres_database() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test; dropped afterwards."""
    import psycopg

    name = f"qcgate_test_{uuid.uuid4().hex[:10]}"
    try:
        admin = psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        if os.environ.get("QCGATE_REQUIRE_POSTGRES"):
            pytest.fail(f"PostgreSQL required but unreachable at {POSTGRES_ADMIN_URL}: {exc}")
        pytest.skip(f"PostgreSQL unreachable at {POSTGRES_ADMIN_URL}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}".replace("postgresql://", "postgresql+psycopg://", 1)
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# PostgreSQL runs in the slow tier (`-m slow`); the fast tier uses the embedded SQLite.
@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=[pytest.mark.postgres, pytest.mark.slow])])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The audit database URL: empty for the embedded SQLite default, or a fresh PostgreSQL DB."""
    if request.param == "sqlite":
        yield ""
    else:
        yield from _postgres_database()


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


@dataclass
class RunningGate:
    """A `qcgate serve` subprocess and what a test needs to talk to it."""

    data_dir: Path
    config_path: Path
    port: int
    log_path: Path
    http_port: int = 0
    process: subprocess.Popen[bytes] | None = None
    _logs: list[Path] = field(default_factory=list)
    _engine: Any = None
    _session_factory: Any = None

    def start(self, timeout: float = 60) -> None:
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "qcgate.cli", "serve", "--config", str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT,
        )
        # Wait for the node's own "listening" line: a probe connection would occupy an
        # association slot until the ACSE timeout.
        marker = f"listening on 127.0.0.1:{self.port}"
        already = self.log_text().count(marker)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"qcgate serve exited with {self.process.returncode}:\n{self.log_text()}")
            if self.log_text().count(marker) > already:
                return
            time.sleep(0.1)
        raise AssertionError(f"qcgate serve did not listen within {timeout}s:\n{self.log_text()}")

    def stop(self) -> None:
        self._dispose()
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill9(self) -> None:
        assert self.process is not None
        self._dispose()
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run the `qcgate` CLI against this gate (for tests of the CLI itself; polls use the DB)."""
        return subprocess.run([sys.executable, "-m", "qcgate.cli", *args, "--config", str(self.config_path)],
                              capture_output=True, text=True, timeout=120)

    def _sessions(self):  # type: ignore[no-untyped-def]
        """A session factory on the gate's database, made once (not a CLI process per poll)."""
        if self._session_factory is None:
            from qcgate.config import load_settings
            from qcgate.store.database import create_db_engine, make_session_factory

            self._engine = create_db_engine(load_settings(self.config_path).database_url, must_exist=True)
            self._session_factory = make_session_factory(self._engine)
        return self._session_factory

    def _dispose(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
        self._engine = self._session_factory = None

    def _query(self, function, *args: Any, **kwargs: Any) -> Any:  # type: ignore[no-untyped-def]
        # Through JSON, as `qcgate audit ... --format json` prints it.
        with self._sessions()() as session:
            return json.loads(json.dumps(function(session, *args, **kwargs)))

    def audit_cases(self) -> list[dict[str, Any]]:
        """What `qcgate audit cases --format json` prints, read in-process from the database."""
        from qcgate.store import queries

        return self._query(queries.list_cases, filters=queries.AuditFilters())  # type: ignore[no-any-return]

    def audit_case(self, case_id: int) -> dict[str, Any] | None:
        """What `qcgate audit case ID --format json` prints, read in-process."""
        from qcgate.store import queries

        return self._query(queries.case_detail, case_id)  # type: ignore[no-any-return]

    def audit_deliveries(self, **filters: Any) -> list[dict[str, Any]]:
        """What `qcgate audit deliveries --format json` prints, read in-process."""
        from qcgate.store import queries

        return self._query(queries.list_deliveries, **filters)  # type: ignore[no-any-return]

    def wait_for_cases(self, predicate, timeout: float = 30) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
        """Poll the audit database until ``predicate(cases)`` holds; return the cases."""
        deadline = time.monotonic() + timeout
        cases = self.audit_cases()
        while not predicate(cases):
            if time.monotonic() > deadline:
                raise AssertionError(f"cases never reached the expected state: {json.dumps(cases, indent=1)}\n{self.log_text()[-3000:]}")
            time.sleep(0.1)
            cases = self.audit_cases()
        return cases

    def http_get(self, path: str) -> tuple[int, str]:
        """GET from the gate's metrics/health endpoint."""
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def sql(self, query: str) -> list[tuple[Any, ...]]:
        """Run a read-only SQL query against the gate's database."""
        from sqlalchemy import text

        from qcgate.config import load_settings
        from qcgate.store.database import create_db_engine

        engine = create_db_engine(load_settings(self.config_path).database_url)
        try:
            with engine.connect() as connection:
                return [tuple(row) for row in connection.execute(text(query))]
        finally:
            engine.dispose()


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> None:
    lines: list[str] = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items() if value is not None]
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")


@pytest.fixture
def make_gate(tmp_path: Path, db_url: str) -> Iterator[Any]:
    """Factory: ``make_gate(node={...}, storage={...}, assembly={...})`` starts a gate."""
    gates: list[RunningGate] = []

    def _make(start: bool = True, **sections: dict[str, Any]) -> RunningGate:
        index = len(gates)
        data_dir = tmp_path / f"gate{index}"
        port = free_port()
        config = {
            "node": {"port": port, "ae_title": "QCGATE", **sections.get("node", {})},
            "storage": {"data_dir": str(data_dir), "min_free_mb": 1, **sections.get("storage", {})},
            "database": {"url": db_url},
            "assembly": {"stable_seconds": 1.0, "poll_interval_seconds": 0.2, "incomplete_timeout_seconds": 30, **sections.get("assembly", {})},
            # Node tests only queue jobs; pipeline tests ask for workers.
            "pipeline": {"workers": 0, **sections.get("pipeline", {})},
            "delivery": {"poll_interval_seconds": 0.2, **sections.get("delivery", {})},
            "observability": {"port": free_port(), **sections.get("observability", {})},
            "logging": {"level": "INFO"},
        }
        config_path = tmp_path / f"gate{index}.toml"
        write_config(config_path, config)
        gate = RunningGate(data_dir=data_dir, config_path=config_path, port=port, log_path=tmp_path / f"gate{index}.log",
                           http_port=int(config["observability"]["port"]))
        gates.append(gate)
        if start:
            gate.start()
        return gate

    yield _make
    for gate in gates:
        gate.stop()


@pytest.fixture
def gate(make_gate: Any) -> RunningGate:
    """A running gate with the default test settings."""
    return make_gate()


# Run with `-n N` (pytest-xdist, as .ci/run does), the slow tier's wall time is set by its longest
# tests: started first, they overlap the many short ones instead of trailing alone at the end.
# Measured durations (`--durations`); an order only, no test is skipped or changed.
LONGEST_FIRST = (
    "tests/ops/test_deploy.py::test_full_install",
    "tests/ops/test_harness.py",
    "tests/predictors/test_lidc.py",
    "tests/ops/test_audit_real_run.py",
    "tests/stow/test_stow_e2e.py",
    "tests/pipeline/test_pipeline_e2e.py::test_real_lung2_ct",
    "tests/science/test_analyze_phantom.py",
    "tests/orthanc/test_deploy_orthanc.py",
    "tests/pipeline/test_routing_e2e.py",
    "tests/pipeline/test_dask.py",
    "tests/pipeline/test_scale_out.py",
    "tests/delivery/test_outage_gate.py",
    "tests/console/test_browser.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        return next((i for i, prefix in enumerate(LONGEST_FIRST) if item.nodeid.startswith(prefix)), len(LONGEST_FIRST))

    items.sort(key=rank)  # stable: everything else keeps its collection order
