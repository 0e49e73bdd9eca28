"""The service around the node: systemd notify/watchdog, `db upgrade`, audit on a missing database."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.support import free_port


def _qcgate(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qcgate.cli", *args], capture_output=True, text=True, timeout=120, env=env)


def test_serve_tells_systemd_it_is_ready_and_feeds_the_watchdog(tmp_path: Path) -> None:
    notify_path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify_path))
    listener.settimeout(30)
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "1000000"}
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "qcgate.cli", "serve", "--data-dir", str(tmp_path / "data"),
                                "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        messages: list[str] = []
        deadline = time.monotonic() + 30
        while "WATCHDOG=1" not in messages and time.monotonic() < deadline:
            messages.append(listener.recv(4096).decode())
        assert messages[0] == "READY=1"
        assert any(m.startswith("STATUS=listening on port") for m in messages)
        assert "WATCHDOG=1" in messages
    finally:
        process.terminate()
        process.wait(timeout=20)
        listener.close()
    assert process.returncode == 0


def test_db_upgrade_then_an_empty_audit(tmp_path: Path) -> None:
    upgraded = _qcgate("db", "upgrade", "--data-dir", str(tmp_path))
    assert upgraded.returncode == 0, upgraded.stderr
    assert (tmp_path / "qcgate.db").exists()
    audit = _qcgate("audit", "cases", "--data-dir", str(tmp_path), "--format", "json")
    assert audit.returncode == 0 and audit.stdout.strip() == "[]"


def test_audit_without_a_database_names_the_problem(tmp_path: Path) -> None:
    audit = _qcgate("audit", "cases", "--data-dir", str(tmp_path / "nothing-here"))
    assert audit.returncode == 2
    assert "no qcgate database" in audit.stderr and "Traceback" not in audit.stderr
    assert not (tmp_path / "nothing-here").exists()  # a query never creates a database


def test_unreachable_postgresql_is_a_clear_error() -> None:
    result = _qcgate("db", "upgrade", "--db-url", f"postgresql://nobody@127.0.0.1:{free_port()}/none")
    assert result.returncode == 2
    assert "cannot reach database" in result.stderr and "Traceback" not in result.stderr


def test_a_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    busy = holder.getsockname()[1]
    try:
        result = _qcgate("serve", "--data-dir", str(tmp_path), "--port", str(busy))
        assert result.returncode == 2
        assert f"cannot listen on 127.0.0.1:{busy}" in result.stderr and "Traceback" not in result.stderr
    finally:
        holder.close()
