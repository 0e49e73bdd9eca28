"""Abuse of the node (issue 15): idle and slow sockets, silent TLS peers, oversized PDUs, bad UIDs,
unusable pixel data, aborted transfers, a full disk. Each test is bounded in time.

Network tests run on SQLite only; data tests on SQLite and (slow) PostgreSQL.
"""

from __future__ import annotations

import io
import json
import os
import resource
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification

from tests.conftest import _postgres_database
from tests.node.test_node_policy import _make_certificate
from tests.support import (
    CT_IMAGE_STORAGE,
    EXPLICIT_VR_LE,
    IMPLICIT_VR_LE,
    PYDICOM_TEST_FILES,
    SEGMENTATION_STORAGE,
    dataset_bytes_without_meta,
    send_raw_c_store,
    write_synthetic_case,
)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=[pytest.mark.postgres, pytest.mark.slow])])
def db_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """As conftest's, with the PostgreSQL run marked slow; ``indirect`` parametrisation picks one."""
    if request.param == "sqlite":
        yield ""
    else:
        yield from _postgres_database()


sqlite_only = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


def proc_status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def timed_echo(port: int, tls_args: tuple[ssl.SSLContext, str] | None = None) -> float:
    """Seconds for associate + C-ECHO + release; raises when the echo is not answered."""
    ae = AE(ae_title="GOODPEER")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 10
    started = time.monotonic()
    assoc = ae.associate("127.0.0.1", port, ae_title="QCGATE", tls_args=tls_args)
    assert assoc.is_established, "the legitimate peer's association was not accepted"
    status = assoc.send_c_echo()
    elapsed = time.monotonic() - started
    assoc.release()
    assert status is not None and status.Status == 0
    return elapsed


def open_idle(port: int, count: int, source: str = "127.0.0.1") -> list[socket.socket]:
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
        sockets.append(sock)
    return sockets


class SlowDrip(threading.Thread):
    """Peers sending an A-ASSOCIATE-RQ one byte per interval."""

    def __init__(self, port: int, count: int, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.sockets = open_idle(port, count)
        self.interval = interval
        self.stop = threading.Event()
        self.closed_by_peer = 0

    def run(self) -> None:
        payload = b"\x01\x00" + struct.pack(">L", 200) + b"\x00" * 200
        index = 0
        while not self.stop.wait(self.interval) and self.sockets:
            for sock in list(self.sockets):
                try:
                    sock.send(payload[index % len(payload): index % len(payload) + 1])
                except OSError:
                    self.sockets.remove(sock)
                    self.closed_by_peer += 1
            index += 1


def close_all(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


def closed_by_server(sock: socket.socket, timeout: float) -> bool:
    sock.settimeout(timeout)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except (TimeoutError, socket.timeout):
        return False


NODE_LIMITS = {"max_associations": 4, "max_pending_connections": 16, "association_request_timeout_seconds": 2.0}


# --- connections ---------------------------------------------------------------------------------

@pytest.mark.slow  # ~40 s on 2 cores: each connection costs pynetdicom two polling threads until closed
@sqlite_only
def test_idle_and_slow_drip_sockets_do_not_lock_out_a_legitimate_echo(make_gate) -> None:
    gate = make_gate(node=NODE_LIMITS)
    threads_before = proc_status(gate.process.pid, "Threads")
    idle = open_idle(gate.port, 200)
    drip = SlowDrip(gate.port, 20)
    drip.start()
    try:
        time.sleep(0.5)
        timings = [timed_echo(gate.port) for _ in range(5)]
        assert max(timings) < 1.0, timings
        threads = proc_status(gate.process.pid, "Threads")
        # Bounded by the caps: ≤ 3 threads per connection the node keeps, whatever the peers do.
        assert threads - threads_before <= 3 * (4 + 16) + 8, (threads_before, threads)
        # Past the request deadline every pending connection is closed, slow drips included.
        time.sleep(2.0 + 1.0)
        assert timed_echo(gate.port) < 1.0
        assert all(closed_by_server(sock, 0.5) for sock in idle[-16:])
    finally:
        drip.stop.set()
        close_all(idle)
        close_all(drip.sockets)
    assert "Traceback" not in gate.log_text()
    assert "closed: no complete A-ASSOCIATE-RQ within 2 s" in gate.log_text() or "evicted" in gate.log_text()


@sqlite_only
def test_a_host_at_its_connection_cap_with_negotiated_associations_is_refused_at_accept(make_gate) -> None:
    gate = make_gate(node={"max_connections_per_host": 2, "max_associations": 4})
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(Verification)
    held = [ae.associate("127.0.0.1", gate.port, ae_title="QCGATE") for _ in range(2)]
    try:
        assert all(a.is_established for a in held)
        third = ae.associate("127.0.0.1", gate.port, ae_title="QCGATE")
        assert not third.is_established
        # Another address (loopback 127.0.0.2) is not held back by this host's cap.
        other = socket.create_connection(("127.0.0.1", gate.port), source_address=("127.0.0.2", 0))
        assert not closed_by_server(other, 0.3)
        other.close()
    finally:
        for assoc in held:
            assoc.release()
    assert "max_connections_per_host" in gate.log_text()


@pytest.mark.slow
@sqlite_only
def test_tls_silent_peers_and_a_partial_client_hello_do_not_block_a_good_tls_peer(make_gate, tmp_path: Path) -> None:
    key, cert = _make_certificate(tmp_path, "server")
    gate = make_gate(start=False, node=NODE_LIMITS)
    gate.config_path.write_text(gate.config_path.read_text() + (
        f'\n[node.tls]\nenabled = true\ncert_file = "{cert}"\nkey_file = "{key}"\n'))
    gate.start()
    silent = open_idle(gate.port, 20)
    partial = socket.create_connection(("127.0.0.1", gate.port))
    partial.send(bytes.fromhex("160301"))  # the start of a TLS record header, then nothing
    try:
        time.sleep(0.3)
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
        timings = [timed_echo(gate.port, (context, "127.0.0.1")) for _ in range(3)]
        assert max(timings) < 1.0, timings
        assert closed_by_server(partial, 2.0 + 2.0)  # the handshake deadline
    finally:
        close_all([*silent, partial])
    assert "Traceback" not in gate.log_text()


@sqlite_only
def test_an_oversized_pdu_before_association_is_refused_without_reading_it(make_gate) -> None:
    gate = make_gate(node={"allowed_hosts": ["127.0.0.1"]})
    pid = gate.process.pid
    rss_before = proc_status(pid, "VmRSS")
    chunk = b"\x00" * (1 << 20)
    for _ in range(4):
        sock = socket.create_connection(("127.0.0.1", gate.port))
        sock.sendall(b"\x01\x00" + struct.pack(">L", 400 << 20))  # a 400 MiB A-ASSOCIATE-RQ
        sent = 0
        try:
            for _ in range(64):
                sock.sendall(chunk)
                sent += 1
        except OSError:
            pass
        assert closed_by_server(sock, 5)
        assert sent < 64, "the node kept reading a 400 MiB PDU"
        sock.close()
    rss_after = proc_status(pid, "VmRSS")
    assert (rss_after - rss_before) < 50 * 1024, (rss_before, rss_after)  # kB
    assert "a PDU of 419430400 bytes before association" in gate.log_text()
    assert timed_echo(gate.port) < 1.0


@sqlite_only
def test_a_host_outside_the_allow_list_is_closed_before_its_pdu_is_read(make_gate) -> None:
    gate = make_gate(node={"allowed_hosts": ["10.0.0.0/8"]})
    rss_before = proc_status(gate.process.pid, "VmRSS")
    sock = socket.create_connection(("127.0.0.1", gate.port))
    try:
        sock.sendall(b"\x01\x00" + struct.pack(">L", 400 << 20) + b"\x00" * (8 << 20))
    except OSError:
        pass
    assert closed_by_server(sock, 5)
    sock.close()
    assert proc_status(gate.process.pid, "VmRSS") - rss_before < 20 * 1024


@sqlite_only
def test_a_p_data_pdu_larger_than_the_negotiated_maximum_is_aborted(make_gate) -> None:
    gate = make_gate(node={"max_pdu_bytes": 65536})
    ae = AE(ae_title="BIGPDU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", gate.port, ae_title="QCGATE")
    assert assoc.is_established
    raw = assoc.dul.socket.socket
    try:
        raw.sendall(b"\x04\x00" + struct.pack(">L", 64 << 20) + b"\x00" * (1 << 20))
    except OSError:
        pass
    deadline = time.monotonic() + 5
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not assoc.is_established and assoc.is_aborted
    assert "a P-DATA PDU of 67108864 bytes (negotiated maximum 65536)" in gate.log_text()


# --- data sets -----------------------------------------------------------------------------------

def _ct(tmp_path: Path, name: str, **changes: object) -> tuple[bytes, str]:
    ds = pydicom.dcmread(PYDICOM_TEST_FILES / "CT_small.dcm")
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    path = tmp_path / f"{name}.dcm"
    ds.save_as(path)
    return dataset_bytes_without_meta(path), str(changes.get("SOPInstanceUID", ds.SOPInstanceUID))


def _non_numeric_position(tmp_path: Path) -> tuple[bytes, str]:
    payload, uid = _ct(tmp_path, "ipp", ImagePositionPatient=["-158", "179", "75"])
    assert payload.count(b"-158\\179\\75") == 1
    return payload.replace(b"-158\\179\\75", b"-158\\abc\\75"), uid


def _refusals(gate) -> list[tuple[str, int]]:  # type: ignore[no-untyped-def]
    return gate.sql("SELECT reason_code, dimse_status FROM refused_instances ORDER BY id")


def test_nul_bytes_and_over_long_uids_get_permanent_statuses(make_gate, tmp_path: Path) -> None:
    gate = make_gate()
    nul_uid = "1.2.3.4\x005"
    long_uid = "1.2." + "3" * 70
    cases = [
        ("nul-sop-uid", {"SOPInstanceUID": nul_uid}, nul_uid, 0xA900),
        ("nul-manufacturer", {"Manufacturer": "ACME\x00\x01 scanners"}, None, 0x0000),
        ("long-study-uid", {"StudyInstanceUID": long_uid}, None, 0xA900),
        ("bad-series-uid", {"SeriesInstanceUID": "1.2..3"}, None, 0xA900),
    ]
    for name, changes, request_uid, expected in cases:
        payload, uid = _ct(tmp_path, name, **changes)
        status = send_raw_c_store(gate.port, payload, sop_instance=request_uid or uid)
        assert status == expected, f"{name}: {status!r}"
    # A SOP Instance UID over 64 characters in the C-STORE request: a status, not an abort.
    payload, _ = _ct(tmp_path, "long-request-uid", SOPInstanceUID=long_uid)
    validators = dict(_config.VALIDATORS)
    _config.VALIDATORS["UI"] = lambda value: (True, "")  # let this test's sender send it
    try:
        status = send_raw_c_store(gate.port, payload, sop_instance=long_uid)
    finally:
        _config.VALIDATORS.update(validators)
    assert status == 0xA900
    codes = _refusals(gate)
    assert [c for c, _ in codes] == ["invalid-uid"] * 4 and all(s == 0xA900 for _, s in codes), codes
    assert gate.sql("SELECT manufacturer FROM instances") in ([(None,)], [("ACME scanners",)])
    log = gate.log_text()
    assert "Traceback" not in log and "0xA700" not in log


def test_unusable_ct_and_seg_are_refused_for_good_and_quarantined(make_gate, tmp_path: Path) -> None:
    gate = make_gate()
    full, uid = _ct(tmp_path, "whole")
    sent = [
        ("truncated-pixels", _ct(tmp_path, "short", PixelData=b"\x00" * 1000), EXPLICIT_VR_LE, 0xA900, "pixel-data"),
        ("pixel-spacing-0", _ct(tmp_path, "spacing", PixelSpacing=[0, 0.5]), EXPLICIT_VR_LE, 0xA900, "invalid-attribute"),
        ("rows-0", _ct(tmp_path, "rows", Rows=0), EXPLICIT_VR_LE, 0xA900, "invalid-attribute"),
        ("position-text", _non_numeric_position(tmp_path), EXPLICIT_VR_LE, 0xA900, "invalid-attribute"),
        ("explicit-on-implicit", (full, uid), IMPLICIT_VR_LE, 0xC000, "transfer-syntax-mismatch"),
        ("native-on-jpeg2000", _ct(tmp_path, "j2k"), "1.2.840.10008.1.2.4.90", 0xC000, "transfer-syntax-mismatch"),
    ]
    ds = pydicom.dcmread(PYDICOM_TEST_FILES / "CT_small.dcm")
    del ds.PixelData
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(tmp_path / "nopixels.dcm")
    sent.append(("no-pixel-data", (dataset_bytes_without_meta(tmp_path / "nopixels.dcm"), str(ds.SOPInstanceUID)),
                 EXPLICIT_VR_LE, 0xA900, "pixel-data"))
    _, seg_path = write_synthetic_case(tmp_path / "case", n_slices=3, size=64)
    seg = pydicom.dcmread(seg_path)
    seg.NumberOfFrames = 100000
    seg.save_as(tmp_path / "seg100000.dcm")
    sent.append(("seg-100000-frames", (dataset_bytes_without_meta(tmp_path / "seg100000.dcm"), str(seg.SOPInstanceUID)),
                 EXPLICIT_VR_LE, 0xA900, "pixel-data"))
    rng = os.urandom(300)
    sent.append(("random-bytes", (rng, "1.2.3.777"), EXPLICIT_VR_LE, 0xC000, "unparseable"))
    for name, (payload, sop_uid), syntax, expected, _ in sent:
        sop_class = SEGMENTATION_STORAGE if name.startswith("seg") else CT_IMAGE_STORAGE
        status = send_raw_c_store(gate.port, payload, sop_class=sop_class, sop_instance=sop_uid, transfer_syntax=syntax)
        assert status == expected, f"{name}: {status!r}"
    refused = gate.sql("SELECT reason_code, dimse_status, quarantine_path FROM refused_instances ORDER BY id")
    assert [r[0] for r in refused] == [s[4] for s in sent]
    for _, _, kept in refused:
        assert Path(kept).exists() and json.loads(Path(kept).with_suffix(".json").read_text())["reason"]
    assert gate.sql("SELECT count(*) FROM instances") == [(0,)]
    assert "Traceback" not in gate.log_text()


# --- aborted transfers and a full disk ---------------------------------------------------------------

def _start_store_and_abort(port: int, dataset_bytes: bytes, sop_uid: str) -> None:
    """Send the command and the first fragments of a C-STORE, then A-ABORT."""
    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.pdu import P_DATA_TF

    ae = AE(ae_title="ABORTER")
    ae.add_requested_context(CT_IMAGE_STORAGE, EXPLICIT_VR_LE)
    assoc = ae.associate("127.0.0.1", port, ae_title="QCGATE")
    assert assoc.is_established
    context_id = assoc.accepted_contexts[0].context_id
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = CT_IMAGE_STORAGE
    request.AffectedSOPInstanceUID = sop_uid
    request.Priority = 2
    request.DataSet = io.BytesIO(dataset_bytes)
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    primitives = list(message.encode_msg(context_id, 16384))
    for primitive in primitives[: len(primitives) // 2]:
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        assoc.dul.socket.socket.sendall(pdu.encode())
    time.sleep(0.2)
    assoc.abort()


@sqlite_only
def test_aborted_transfers_leave_nothing_in_incoming(make_gate, tmp_path: Path) -> None:
    gate = make_gate()
    ct_files, _ = write_synthetic_case(tmp_path / "case", n_slices=1, size=512)
    payload = dataset_bytes_without_meta(ct_files[0])
    incoming = gate.data_dir / "spool" / ".incoming"
    for index in range(5):
        _start_store_and_abort(gate.port, payload, f"1.2.3.4.{index}")
    deadline = time.monotonic() + 5
    while any(incoming.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not list(incoming.iterdir())
    assert "removed 1 partial receive(s)" in gate.log_text()
    assert timed_echo(gate.port) < 1.0


@sqlite_only
def test_a_full_disk_during_the_transfer_is_a700_with_the_association_kept(make_gate, tmp_path: Path) -> None:
    gate = make_gate()
    ct_files, _ = write_synthetic_case(tmp_path / "case", n_slices=1, size=1600)  # ~5 MB of pixels
    big = ct_files[0]
    # A file-size limit on the gate stands in for a full disk: writes past it fail (EFBIG).
    limit = 2_000_000
    resource.prlimit(gate.process.pid, resource.RLIMIT_FSIZE, (limit, limit))
    ae = AE(ae_title="FILLER")
    ae.add_requested_context(CT_IMAGE_STORAGE, EXPLICIT_VR_LE)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", gate.port, ae_title="QCGATE")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(pydicom.dcmread(big))
        assert status is not None and status.Status == 0xA700
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0  # the association stayed up
    finally:
        assoc.release()
    assert not list((gate.data_dir / "spool" / ".incoming").iterdir())
    code, body = gate.http_get("/healthz")
    report = json.loads(body)
    assert code == 503 and report["checks"]["no_recent_disk_refusals"] is False
    assert gate.sql("SELECT reason_code, dimse_status FROM refused_instances") == [("disk-full", 0xA700)]


# --- allowed_hosts ---------------------------------------------------------------------------------

def test_allowed_hosts_takes_addresses_networks_and_names_and_names_an_invalid_network() -> None:
    from qcgate.config import load_settings
    from qcgate.errors import ConfigError
    from qcgate.node.transport import address_allowed, resolve_allowed_hosts

    networks = resolve_allowed_hosts(["localhost", "10.0.0.0/8", "192.168.1.5"])
    assert address_allowed("127.0.0.1", networks) and address_allowed("10.9.8.7", networks)
    assert address_allowed("::ffff:192.168.1.5", networks) and not address_allowed("192.168.1.6", networks)
    with pytest.raises(ValueError, match="node.allowed_hosts: cannot resolve 'no-such-host.invalid'"):
        resolve_allowed_hosts(["no-such-host.invalid"])
    with pytest.raises(ConfigError, match=r"node\.allowed_hosts.*'127\.0\.0\.1/33' is not a valid IP address or CIDR network"):
        load_settings(None, {"node": {"allowed_hosts": ["127.0.0.1/33"]}})


@sqlite_only
def test_a_name_in_allowed_hosts_admits_its_addresses(make_gate) -> None:
    gate = make_gate(node={"allowed_hosts": ["localhost"]})
    assert timed_echo(gate.port) < 1.0
