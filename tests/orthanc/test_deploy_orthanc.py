"""deploy/orthanc/ against a real Orthanc: the example config starts as shipped (paths and ports
substituted), its DICOM rights are least-privilege, and a case routed by its Lua script goes
Orthanc -> qcgate -> Orthanc, also when the gate is down at first, and nothing loops."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.orthanc_support import DEPLOY_ORTHANC, OrthancServer, load_orthanc_json
from tests.support import dcmtk_env, echoscu, free_port, read_dataset, storescu, write_phantom_case

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


def deploy_config(gate_port: int, ai_port: int, *, dicom_port: int | None = None, retry_base: float = 1,
                  retry_max: float = 2) -> Callable[[Path], dict[str, Any]]:
    """deploy/orthanc/orthanc.json as shipped, with only the site values (EDIT) substituted."""

    def build(directory: Path) -> dict[str, Any]:
        config = load_orthanc_json(DEPLOY_ORTHANC / "orthanc.json")
        lua = directory / "lua" / "route-to-qcgate.lua"
        lua.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(DEPLOY_ORTHANC / "route-to-qcgate.lua", lua)
        config.update({
            "StorageDirectory": str(directory / "storage"), "IndexDirectory": str(directory / "index"),
            "LuaScripts": [str(lua)], "DicomPort": dicom_port or free_port(), "HttpPort": free_port(),
            "RegisteredUsers": {"test-admin": "test-password"}, "StableAge": 2,
        })
        modalities = config["DicomModalities"]
        for entry in modalities.values():
            entry["Host"] = "127.0.0.1"
        modalities["qcgate"]["Port"] = gate_port
        modalities["ai"]["Port"] = ai_port
        config["QcgateRouting"].update({"StateFile": str(directory / "qcgate-routing.state"),
                                        "RetryBaseSeconds": retry_base, "RetryMaxSeconds": retry_max,
                                        "TickSeconds": 1})
        return config

    return build


class StoreSCP:
    """DCMTK storescp standing in for the AI service (it receives the CT)."""

    def __init__(self, folder: Path, aet: str = "AISEG") -> None:
        self.folder, self.aet, self.port = folder, aet, free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(["storescp", "-aet", aet, "-od", str(folder), str(self.port)],
                                        env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def count(self) -> int:
        return sum(1 for p in self.folder.iterdir() if p.is_file())


@pytest.fixture
def ai_service(tmp_path: Path) -> Iterator[StoreSCP]:
    scp = StoreSCP(tmp_path / "ai")
    yield scp
    scp.stop()


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, server: OrthancServer | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            tail = server.log_text()[-4000:] if server else ""
            raise AssertionError(f"{what}: not reached within {timeout}s\n{tail}")
        time.sleep(0.5)


class HttpTimer:
    """What README.md asks for on a quiet Orthanc 1.10 (no OnHeartBeat): GET /system every second."""

    def __init__(self, server: OrthancServer) -> None:
        import threading

        self.server, self.stopped = server, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stopped.wait(1.0):
            try:
                self.server.get("/system")
            except OSError:
                pass  # Orthanc restarting

    def __enter__(self) -> "HttpTimer":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join(timeout=10)


def routing_log(server: OrthancServer) -> list[str]:
    return [line.split("qcgate routing: ", 1)[1] for line in server.log_text().splitlines() if "qcgate routing: " in line]


def send_case(server: OrthancServer, tmp_path: Path) -> tuple[list[Path], list[Path]]:
    """The scanner (CT01) stores a phantom CT, the AI service (AISEG) its two SEGs, both into Orthanc."""
    ct_files, members = write_phantom_case(tmp_path / "input")
    assert storescu(server.dicom_port, ct_files, calling="CT01", called="ORTHANC").returncode == 0
    assert storescu(server.dicom_port, members, calling="AISEG", called="ORTHANC").returncode == 0
    return ct_files, members


def qc_outputs_in_study(server: OrthancServer, study_uid: str) -> dict[str, str]:
    """SOP class of each series of the study that qcgate stored (calling AE QCGATE)."""
    found = server.post("/tools/lookup", study_uid)
    study_id = next(item["ID"] for item in found if item["Type"] == "Study")
    outputs = {}
    for series in server.series_of_study(study_id):
        first = series["Instances"][0]
        if server.get(f"/instances/{first}/metadata/RemoteAET") == "QCGATE":
            outputs[series["ID"]] = server.get(f"/instances/{first}/metadata/SopClassUid")
    return outputs


def gate_receipts(gate: Any) -> list[tuple[str, int]]:
    """(calling AE, instances stored) of each association the gate accepted."""
    return [(str(a), int(n)) for a, n in gate.sql("SELECT calling_ae, instances_stored FROM associations WHERE outcome != 'rejected' ORDER BY id")]


def gate_for(make_gate: Any, orthanc_address: str, *, start: bool = True) -> Any:
    return make_gate(start=start, node={"allowed_calling_ae_titles": ["ORTHANC"]},
                     pipeline={"workers": 1, "model": "phantom-full"},
                     delivery={"destinations": [orthanc_address], "backoff_base_seconds": 0.5, "backoff_max_seconds": 2})


def assert_routed_once_and_no_loop(server: OrthancServer, gate: Any, ct_files: list[Path], members: list[Path]) -> None:
    study_uid = str(read_dataset(ct_files[0]).StudyInstanceUID)
    outputs = wait_until(lambda: (lambda o: o if len(o) == 2 else None)(qc_outputs_in_study(server, study_uid)),
                         90, "QC SEG + SR in the Orthanc study", server)
    assert sorted(outputs.values()) == sorted([SEG_CLASS, SR_CLASS])
    # The QC outputs become stable in Orthanc too: the loop guard must keep them there.
    wait_until(lambda: sum("came from the gate: not routed" in line for line in routing_log(server)) >= 2,
               30, "the loop guard on both QC outputs", server)
    time.sleep(1)
    receipts = gate_receipts(gate)
    # Each series reached the gate exactly once (one association per store job), and nothing else.
    assert sorted(n for ae, n in receipts if ae == "ORTHANC") == sorted([len(ct_files), *[1] * len(members)]), receipts
    assert all(ae == "ORTHANC" for ae, _ in receipts), receipts
    assert gate.sql("SELECT count(*) FROM instances") == [(len(ct_files) + len(members),)]
    for series_id in outputs:
        assert server.get(f"/series/{series_id}/metadata?expand").get("QcgateGateRouting") is None


# --------------------------------------------------------------------------- the config alone

def test_the_deploy_config_starts_alone_with_least_privilege(make_orthanc: Any, tmp_path: Path) -> None:
    server = make_orthanc(deploy_config(gate_port=free_port(), ai_port=free_port()))
    assert server.get("/system")["Version"]
    assert "dicom-web" in server.get("/plugins")
    assert server.get("/dicom-web/studies") == [] or server.get("/dicom-web/studies") is None
    # Nothing is written outside the configured directories (no OrthancStorage/ in the cwd).
    assert not (server.directory / "OrthancStorage").exists()
    assert (server.directory / "storage").is_dir() and (server.directory / "index").is_dir()
    # REST needs the password, even from this host.
    import urllib.error

    with pytest.raises(urllib.error.HTTPError) as refused:
        server.request("GET", "/system", authenticate=False)
    assert refused.value.code == 401
    # DICOM: the three known peers may echo; an unknown AE may not; none may query or retrieve.
    for aet in ("CT01", "AISEG", "QCGATE"):
        assert echoscu(server.dicom_port, calling=aet, called="ORTHANC").returncode == 0, aet
    assert echoscu(server.dicom_port, calling="STRANGER", called="ORTHANC").returncode != 0
    # Orthanc answers a C-FIND / C-MOVE the peer may not make by aborting the association.
    for tool, extra in (("findscu", []), ("movescu", ["-aem", "CT01"])):
        for aet in ("CT01", "AISEG", "QCGATE"):
            query = subprocess.run([tool, "-S", "-aet", aet, "-aec", "ORTHANC", *extra, "-k", "QueryRetrieveLevel=STUDY",
                                    "-k", "StudyInstanceUID=1.2.3", "127.0.0.1", str(server.dicom_port)],
                                   capture_output=True, text=True, timeout=30, env=dcmtk_env())
            assert "Peer aborted Association" in query.stderr, (tool, aet, query.stderr)
    # An unknown AE cannot store either.
    ct_files, _ = write_phantom_case(tmp_path / "stranger")
    storescu(server.dicom_port, ct_files[:1], calling="STRANGER", called="ORTHANC")
    assert server.get("/instances") == []


def test_a_dns_name_as_host_refuses_that_peer(make_orthanc: Any) -> None:
    """Why README.md insists on IP addresses: DicomCheckModalityHost compares the literal IP."""

    def named_host(directory: Path) -> dict[str, Any]:
        config = deploy_config(gate_port=free_port(), ai_port=free_port())(directory)
        config["DicomModalities"]["ct-scanner"]["Host"] = "localhost"
        return config

    server = make_orthanc(named_host)
    assert echoscu(server.dicom_port, calling="AISEG", called="ORTHANC").returncode == 0
    assert echoscu(server.dicom_port, calling="CT01", called="ORTHANC").returncode != 0


# --------------------------------------------------------------------------- end to end

@pytest.mark.slow
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_case_into_orthanc_comes_back_with_its_qc_outputs(make_orthanc: Any, make_gate: Any, ai_service: StoreSCP,
                                                             tmp_path: Path) -> None:
    orthanc_port = free_port()
    gate = gate_for(make_gate, f"ORTHANC@127.0.0.1:{orthanc_port}")
    server = make_orthanc(deploy_config(gate.port, ai_service.port, dicom_port=orthanc_port))
    ct_files, members = send_case(server, tmp_path)
    assert_routed_once_and_no_loop(server, gate, ct_files, members)
    wait_until(lambda: ai_service.count() == len(ct_files), 30, "the CT at the AI service", server)
    assert ai_service.count() == len(ct_files)  # the CT only; the SEGs and QC outputs never go to the AI
    ct_series = server.post("/tools/lookup", str(read_dataset(ct_files[0]).SeriesInstanceUID))[0]["ID"]
    metadata = server.get(f"/series/{ct_series}/metadata?expand")
    assert metadata["QcgateGateRouting"].startswith("sent ") and metadata["QcgateAiRouting"].startswith("sent ")


@pytest.mark.slow
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_with_the_gate_down_the_case_is_delivered_once_it_is_back(make_orthanc: Any, make_gate: Any,
                                                                   ai_service: StoreSCP, tmp_path: Path) -> None:
    orthanc_port = free_port()
    gate = gate_for(make_gate, f"ORTHANC@127.0.0.1:{orthanc_port}", start=False)
    server = make_orthanc(deploy_config(gate.port, ai_service.port, dicom_port=orthanc_port))
    with HttpTimer(server):
        ct_files, members = send_case(server, tmp_path)
        # Each of the 3 series fails at least twice, with backoff, and the failure is recorded.
        wait_until(lambda: sum("failed (attempt 2)" in line for line in routing_log(server)) >= 3, 60,
                   "two failed attempts per series", server)
        ct_series = server.post("/tools/lookup", str(read_dataset(ct_files[0]).SeriesInstanceUID))[0]["ID"]
        assert server.get(f"/series/{ct_series}/metadata/QcgateGateRouting").startswith("retrying ")
        # The pending sends survive an Orthanc restart (state file).
        server.restart()
        gate.start()
        assert_routed_once_and_no_loop(server, gate, ct_files, members)
    assert server.get(f"/series/{ct_series}/metadata/QcgateGateRouting").startswith("sent ")
    state = (server.directory / "qcgate-routing.state").read_text()
    assert state.strip() == "", state


def test_beside_debians_stock_files_orthanc_refuses_so_it_gets_its_own_directory(tmp_path: Path) -> None:
    """README.md: run the example as its own directory (/etc/qcgate-orthanc/), not inside /etc/orthanc/."""
    from tests.orthanc_support import ORTHANC_BINARY, require_orthanc

    require_orthanc()
    stock = Path("/etc/orthanc")
    if not (stock / "orthanc.json").exists():
        pytest.skip("no Debian stock configuration in /etc/orthanc")
    mixed = tmp_path / "mixed"
    shutil.copytree(stock, mixed, ignore=shutil.ignore_patterns("credentials.json"))
    shutil.copy(DEPLOY_ORTHANC / "orthanc.json", mixed / "qcgate-orthanc.json")
    result = subprocess.run([str(ORTHANC_BINARY), str(mixed)], capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert result.returncode != 0
    assert "is defined in 2 different configuration files" in result.stdout + result.stderr


def test_without_orthanc_the_tests_skip_unless_it_is_required(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import tests.orthanc_support as support

    monkeypatch.setattr(support, "ORTHANC_BINARY", tmp_path / "no-such-Orthanc")
    monkeypatch.delenv("QCGATE_REQUIRE_ORTHANC", raising=False)
    with pytest.raises(pytest.skip.Exception, match="Orthanc not installed"):
        support.require_orthanc()
    monkeypatch.setenv("QCGATE_REQUIRE_ORTHANC", "1")
    with pytest.raises(pytest.fail.Exception, match="QCGATE_REQUIRE_ORTHANC=1"):
        support.require_orthanc()
