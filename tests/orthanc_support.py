"""A real Orthanc PACS for the tests: started on free loopback ports with a generated config, stopped after.

Like the PostgreSQL the tests already use, Orthanc is a Debian package (`orthanc`, `orthanc-dicomweb`).
Without it the tests that need it skip, unless ``QCGATE_REQUIRE_ORTHANC=1`` (set by ``.ci/run``): then
they fail, so a CI machine that lost the package cannot pass silently.

Each `OrthancServer` gets its own directory (config, storage, index, log), its own process group (so
nothing it spawns survives the test), and only loopback access.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support import free_port

ORTHANC_BINARY = Path(os.environ.get("QCGATE_TEST_ORTHANC", "/usr/sbin/Orthanc"))
DICOMWEB_PLUGIN = Path(os.environ.get("QCGATE_TEST_ORTHANC_DICOMWEB", "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"))
DEPLOY_ORTHANC = Path(__file__).resolve().parents[1] / "deploy" / "orthanc"


def require_orthanc(dicomweb: bool = False) -> None:
    """Skip (or, with QCGATE_REQUIRE_ORTHANC=1, fail) when Orthanc or its DICOMweb plugin is missing."""
    missing = [str(p) for p in ([ORTHANC_BINARY] + ([DICOMWEB_PLUGIN] if dicomweb else [])) if not p.exists()]
    if not missing:
        return
    reason = f"Orthanc not installed ({', '.join(missing)} missing; Debian packages orthanc, orthanc-dicomweb)"
    if os.environ.get("QCGATE_REQUIRE_ORTHANC") == "1":
        pytest.fail(f"QCGATE_REQUIRE_ORTHANC=1 but {reason}")
    pytest.skip(reason)


def strip_json_comments(text: str) -> str:
    """Orthanc's configuration is JSON with // and /* */ comments; drop them (not inside strings)."""
    pattern = re.compile(r'"(?:\\.|[^"\\])*"|//[^\n]*|/\*.*?\*/', re.S)
    return pattern.sub(lambda m: m.group(0) if m.group(0).startswith('"') else "", text)


def load_orthanc_json(path: Path) -> dict[str, Any]:
    return json.loads(strip_json_comments(path.read_text(encoding="utf-8")))


def base_config(directory: Path, *, aet: str = "ORTHANC", dicomweb: bool = True) -> dict[str, Any]:
    """A minimal, loopback-only configuration whose every path lies under ``directory``."""
    config: dict[str, Any] = {
        "Name": f"qcgate-test-{directory.name}",
        "StorageDirectory": str(directory / "storage"),
        "IndexDirectory": str(directory / "index"),
        "HttpPort": free_port(),
        "DicomPort": free_port(),
        "DicomAet": aet,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "HttpServerEnabled": True,
        "DicomServerEnabled": True,
        "StableAge": 2,
        "TcpNoDelay": True,
        "LuaScripts": [],
        "Plugins": [str(DICOMWEB_PLUGIN)] if dicomweb else [],
    }
    if dicomweb:
        config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "EnableWado": False}
    return config


@dataclass
class OrthancServer:
    """One Orthanc process with its config directory; ``start``/``stop``/``restart`` and a REST client."""

    directory: Path
    config: dict[str, Any]
    process: subprocess.Popen[bytes] | None = None
    _log_handles: list[Any] = field(default_factory=list)

    @property
    def http_port(self) -> int:
        return int(self.config["HttpPort"])

    @property
    def dicom_port(self) -> int:
        return int(self.config["DicomPort"])

    @property
    def aet(self) -> str:
        return str(self.config.get("DicomAet", "ORTHANC"))

    @property
    def config_dir(self) -> Path:
        return self.directory / "config"

    @property
    def log_path(self) -> Path:
        return self.directory / "orthanc.log"

    @property
    def address(self) -> str:
        """The gate's way of writing it as a destination: AE@host:port."""
        return f"{self.aet}@127.0.0.1:{self.dicom_port}"

    def write_config(self) -> Path:
        self.config_dir.mkdir(parents=True, exist_ok=True)
        path = self.config_dir / "orthanc.json"
        path.write_text(json.dumps(self.config, indent=2), encoding="utf-8")
        return path

    def start(self, timeout: float = 30) -> "OrthancServer":
        self.write_config()
        log = open(self.log_path, "ab")
        self._log_handles.append(log)
        # Orthanc reads every *.json of the directory it is given; start_new_session puts it (and
        # anything a Lua script might spawn) in its own process group for a clean stop.
        self.process = subprocess.Popen([str(ORTHANC_BINARY), "--verbose", str(self.config_dir)],
                                        stdout=log, stderr=subprocess.STDOUT, cwd=self.directory,
                                        start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"Orthanc exited with {self.process.returncode}:\n{self.log_text()[-4000:]}")
            try:
                self.get("/system")
                return self
            except (OSError, urllib.error.URLError):
                time.sleep(0.1)
        self.stop()
        raise AssertionError(f"Orthanc did not answer GET /system within {timeout}s:\n{self.log_text()[-4000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
            except ProcessLookupError:
                pass
        for handle in self._log_handles:
            handle.close()
        self._log_handles.clear()

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # --- REST
    def request(self, method: str, path: str, body: Any = None, *, authenticate: bool = True) -> Any:
        # bytes and str go as they are (Orthanc takes a bare UID or Lua code), anything else as JSON.
        if body is None or isinstance(body, bytes):
            data = body
        else:
            data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data, method=method)
        users = self.config.get("RegisteredUsers") or {}
        if authenticate and users:
            import base64

            user, password = next(iter(users.items()))
            request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
        with urllib.request.urlopen(request, timeout=30) as response:
            payload = response.read()
        if not payload:
            return None
        try:
            return json.loads(payload)
        except ValueError:
            return payload.decode(errors="replace")

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: Any) -> Any:
        return self.request("POST", path, body)

    def studies(self) -> list[dict[str, Any]]:
        return list(self.get("/studies?expand"))

    def series_of_study(self, study_id: str) -> list[dict[str, Any]]:
        return list(self.get(f"/studies/{study_id}/series"))


def make_orthanc_factory(tmp_path: Path) -> Iterator[Any]:
    servers: list[OrthancServer] = []

    def _make(config: dict[str, Any] | Callable[[Path], dict[str, Any]] | None = None, *, start: bool = True,
              dicomweb: bool = True, name: str | None = None) -> OrthancServer:
        """``config``: overrides of `base_config`, or a function of the server's directory that
        returns the whole configuration (e.g. the deploy example with its paths substituted)."""
        require_orthanc(dicomweb=dicomweb)
        directory = tmp_path / (name or f"orthanc{len(servers)}")
        directory.mkdir(parents=True, exist_ok=True)
        if callable(config):
            merged = config(directory)
        else:
            merged = base_config(directory, dicomweb=dicomweb)
            merged.update(config or {})
        server = OrthancServer(directory=directory, config=merged)
        servers.append(server)
        if start:
            server.start()
        return server

    try:
        yield _make
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
def make_orthanc(tmp_path: Path) -> Iterator[Any]:
    """Factory: ``make_orthanc({...config overrides...})`` starts an Orthanc; all are stopped at teardown."""
    yield from make_orthanc_factory(tmp_path)


@pytest.fixture
def orthanc(make_orthanc: Any) -> OrthancServer:
    """A running Orthanc with the DICOMweb plugin, loopback only, no Lua."""
    return make_orthanc()
