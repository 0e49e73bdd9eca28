"""TLS and STOW-RS destinations against real peers: DCMTK `storescp +tls` (server and client
certificates made with openssl) and Orthanc's DICOMweb plugin (basic auth), through the outbox."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from qcgate.config import DeliverySettings
from qcgate.delivery.outbox import Outbox
from tests.delivery.conftest import OutboxDb, add_outputs, wait_until
from tests.orthanc_support import make_orthanc  # noqa: F401  (pytest fixture)
from tests.support import dcmtk_env, free_port

pytestmark = pytest.mark.slow  # DCMTK storescp over TLS, Orthanc processes

FAST = {"backoff_base_seconds": 0.2, "backoff_max_seconds": 0.5, "poll_interval_seconds": 0.05, "connect_timeout_seconds": 5}


def _certificate(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", f"/CN={name}", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return key, cert


def _tls_storescp(folder: Path, port: int, key: Path, cert: Path, client_cert: Path) -> subprocess.Popen[bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(["storescp", "+tls", str(key), str(cert), "+cf", str(client_cert), "-rc",
                                "-aet", "PACS", "-od", str(folder), str(port)],
                               env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    return process


def test_a_tls_storescp_receives_with_client_certificates_and_a_wrong_ca_never_connects(outbox_db: OutboxDb, tmp_path: Path) -> None:
    server_key, server_cert = _certificate(tmp_path, "server")
    client_key, client_cert = _certificate(tmp_path, "client")
    _, stranger = _certificate(tmp_path, "stranger")
    port = free_port()
    address = f"PACS@127.0.0.1:{port}"
    settings = DeliverySettings(destination=[
        {"name": "tls-pacs", "address": address, "tls": True, "tls_ca_file": str(server_cert),
         "tls_cert_file": str(client_cert), "tls_key_file": str(client_key)},
        {"name": "wrong-ca", "address": address, "tls": True, "tls_ca_file": str(stranger),
         "tls_cert_file": str(client_cert), "tls_key_file": str(client_key)},
    ], **FAST)
    uids = add_outputs(outbox_db.session_factory, outbox_db.data_dir, "tls-pacs", 3)
    add_outputs(outbox_db.session_factory, outbox_db.data_dir, "wrong-ca", 1)
    scp = _tls_storescp(tmp_path / "pacs", port, server_key, server_cert, client_cert)
    outbox = Outbox(settings, outbox_db.session_factory, outbox_db.data_dir, "QCGATE")
    outbox.start()
    try:
        wait_until(lambda: [r["state"] for r in outbox_db.deliveries(destination="tls-pacs")] == ["sent"] * 3, timeout=30)
        wait_until(lambda: outbox_db.deliveries(destination="wrong-ca")[0]["attempts"] >= 2, timeout=30)
    finally:
        outbox.stop()
        scp.terminate()
        scp.wait(timeout=10)
    import pydicom

    received = sorted(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in (tmp_path / "pacs").iterdir())
    assert received == sorted(uids)
    (wrong,) = outbox_db.deliveries(destination="wrong-ca")
    assert wrong["state"] == "pending" and "TLS" in wrong["last_error"]


def test_stow_rs_to_orthanc_with_basic_auth_retries_until_it_is_up(outbox_db: OutboxDb, make_orthanc: Any) -> None:  # noqa: F811
    orthanc = make_orthanc({"AuthenticationEnabled": True, "RegisteredUsers": {"qcgate": "stow-secret"}}, start=False)
    base = f"http://127.0.0.1:{orthanc.http_port}/dicom-web"
    settings = DeliverySettings(destination=[
        {"name": "orthanc-web", "address": base, "username": "qcgate", "password": "stow-secret"},
        {"name": "orthanc-bad-password", "address": base, "username": "qcgate", "password": "wrong"},
    ], **FAST)
    uids = add_outputs(outbox_db.session_factory, outbox_db.data_dir, "orthanc-web", 3)
    add_outputs(outbox_db.session_factory, outbox_db.data_dir, "orthanc-bad-password", 1)
    outbox = Outbox(settings, outbox_db.session_factory, outbox_db.data_dir, "QCGATE")
    outbox.start()
    try:
        # Orthanc is not up yet: connection refused is transient, the destination backs off.
        wait_until(lambda: outbox_db.deliveries(destination="orthanc-web")[0]["attempts"] >= 2, timeout=20)
        assert all(r["state"] == "pending" for r in outbox_db.deliveries())
        orthanc.start()
        wait_until(lambda: [r["state"] for r in outbox_db.deliveries(destination="orthanc-web")] == ["sent"] * 3, timeout=60)
        wait_until(lambda: outbox_db.deliveries(destination="orthanc-bad-password")[0]["state"] == "dead", timeout=30)
        stored = {orthanc.get(f"/instances/{i}/simplified-tags")["SOPInstanceUID"] for i in orthanc.get("/instances")}
    finally:
        outbox.stop()
    assert stored == set(uids)
    (bad,) = outbox_db.deliveries(destination="orthanc-bad-password")
    assert "HTTP 401" in bad["last_error"] and "stow-secret" not in bad["last_error"]
