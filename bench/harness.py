"""Fault and load harness: drives a real `qcgate serve` on loopback and checks that nothing
acknowledged is lost and that the node never crashes.

    .venv/bin/python bench/harness.py [--seed 1] [--senders 4] [--instances 20] [--kill-rounds 3]
        [--size 64] [--fuzz 40] [--pydicom-files 12] [--outputs 12] [--backend sqlite|postgresql]
        [--workers 0] [--time-limit 600] [--json REPORT.json]

Phases, in order, against one data directory and database (every number is seeded by --seed):

1. load: --senders concurrent storescu associations, each sending one SYNTHETIC case (a CT series
   and its SEG, --instances instances in all); throughput, and loss = acknowledged minus stored.
2. kill -9: --kill-rounds times, senders start, `qcgate serve` is killed with SIGKILL after a
   seeded random delay, restarted, and every instance acknowledged before the kill must be in the
   database with its spool file (same SHA-256). The senders then re-send everything.
3. disk watermark: the node restarts with storage.min_free_mb far above the free space; every
   instance must be refused (0xA700) and nothing acknowledged; the node must stay up. Restart
   with the normal settings.
4. PostgreSQL connection drop (postgresql backend only): while senders run, every connection of
   the gate's database is terminated (pg_terminate_backend) several times; acknowledged ⊆ stored.
5. flapping destination: --outputs SYNTHETIC outbox rows (a CT copy per row, labelled synthetic:
   the QC pipeline is not run here) to a destination SCP that is killed and restarted every
   ~0.5-1.5 s; each output must reach it, and how many arrived more than once is counted.
6. bad input: pydicom's malformed test files, a seeded sample of its other test files, and
   --fuzz mutations of a valid SYNTHETIC CT (truncation, wrong VRs, wrong lengths, missing UIDs,
   huge values, byte flips), each sent raw with pynetdicom; every Success must be stored.

The node runs with pipeline.workers = 0 by default (it assembles cases and queues their QC jobs
but does not run them): the jobs' CPU time would dominate a 2-core machine and the harness is
about ingest, restarts and delivery. --workers N runs them too.

Only 127.0.0.1 is used. Exit status 0 when loss and crashes are both zero.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pydicom  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from tests.support import (  # noqa: E402
    EXPLICIT_VR_LE,
    IMPLICIT_VR_LE,
    PYDICOM_TEST_FILES,
    dataset_bytes_without_meta,
    dcmtk_env,
    free_port,
    send_raw_c_store,
    write_synthetic_case,
)

POSTGRES_ADMIN_URL = os.environ.get("QCGATE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
MALFORMED_PYDICOM = [
    ("MR_truncated.dcm", EXPLICIT_VR_LE), ("rtplan_truncated.dcm", IMPLICIT_VR_LE), ("badVR.dcm", EXPLICIT_VR_LE),
    ("no_meta.dcm", IMPLICIT_VR_LE), ("ExplVR_BigEndNoMeta.dcm", EXPLICIT_VR_LE), ("meta_missing_tsyntax.dcm", IMPLICIT_VR_LE),
    ("no_meta_group_length.dcm", IMPLICIT_VR_LE), ("UN_sequence.dcm", EXPLICIT_VR_LE), ("empty_charset_LEI.dcm", IMPLICIT_VR_LE),
]
_LONG_LENGTH_VRS = {b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL", b"OV", b"SV", b"UV"}


# --------------------------------------------------------------------------- the gate under test

@dataclass
class GateProcess:
    """One data directory and database, and the `qcgate serve` process currently running on it."""

    workdir: Path
    database_url: str
    workers: int
    destination: str | None
    port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    crashes: int = 0
    crash_logs: list[str] = field(default_factory=list)
    starts: int = 0

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def log_path(self) -> Path:
        return self.workdir / "gate.log"

    def write_config(self, min_free_mb: float = 1.0) -> Path:
        config = self.workdir / "gate.toml"
        destinations = f'["{self.destination}"]' if self.destination else "[]"
        config.write_text(
            "# qcgate harness configuration (loopback only)\n"
            f'[node]\nhost = "127.0.0.1"\nport = {self.port}\nae_title = "QCGATE"\nmax_associations = 32\nnetwork_timeout_seconds = 20\n'
            f'[storage]\ndata_dir = "{self.data_dir}"\nmin_free_mb = {min_free_mb!r}\n'
            f'[database]\nurl = "{self.database_url}"\n'
            "[assembly]\nstable_seconds = 1.0\npoll_interval_seconds = 0.2\nincomplete_timeout_seconds = 60\n"
            f"[pipeline]\nworkers = {self.workers}\n"
            f"[delivery]\ndestinations = {destinations}\nmax_attempts = 1000\nbackoff_base_seconds = 0.2\n"
            "backoff_max_seconds = 1.0\nconnect_timeout_seconds = 3\npoll_interval_seconds = 0.2\n"
            f'[observability]\nhost = "127.0.0.1"\nport = {self.http_port}\n'
            '[logging]\nlevel = "INFO"\n', encoding="utf-8")
        return config

    def start(self, min_free_mb: float = 1.0, timeout: float = 90) -> None:
        config = self.write_config(min_free_mb)
        marker = f"listening on 127.0.0.1:{self.port}"
        already = self._log().count(marker)
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen([sys.executable, "-m", "qcgate.cli", "serve", "--config", str(config)],
                                        stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        log.close()
        self.starts += 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._record_crash("exited during start")
                raise RuntimeError(f"qcgate serve exited during start:\n{self._log()[-3000:]}")
            if self._log().count(marker) > already:
                return
            time.sleep(0.1)
        raise RuntimeError(f"qcgate serve did not listen within {timeout}s")

    def _log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _record_crash(self, what: str) -> None:
        self.crashes += 1
        self.crash_logs.append(f"{what} (exit {self.process.returncode if self.process else '?'}):\n{self._log()[-2000:]}")

    def check_alive(self) -> bool:
        """True when the process runs; an exit we did not cause counts as a crash (and restarts it)."""
        if self.process is not None and self.process.poll() is not None:
            self._record_crash("node exited on its own")
            self.start()
            return False
        return True

    def kill9(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            if self.process.returncode not in (0, -signal.SIGTERM):
                self._record_crash("bad exit status on SIGTERM")

    def echo(self) -> bool:
        result = subprocess.run(["echoscu", "-to", "10", "-aec", "QCGATE", "127.0.0.1", str(self.port)],
                                capture_output=True, text=True, timeout=30, env=dcmtk_env())
        return result.returncode == 0

    def stored(self) -> dict[str, tuple[str, str]]:
        """SOP Instance UID -> (spool path, sha256) of every instance row."""
        from sqlalchemy import text

        from qcgate.store.database import create_db_engine

        engine = create_db_engine(self.database_url)
        try:
            with engine.connect() as connection:
                return {uid: (path, digest) for uid, path, digest in
                        connection.execute(text("SELECT sop_instance_uid, spool_path, sha256 FROM instances"))}
        finally:
            engine.dispose()

    def sql(self, query: str) -> list[tuple[Any, ...]]:
        from sqlalchemy import text

        from qcgate.store.database import create_db_engine

        engine = create_db_engine(self.database_url)
        try:
            with engine.begin() as connection:
                result = connection.execute(text(query))
                return [tuple(row) for row in result] if result.returns_rows else []
        finally:
            engine.dispose()


# --------------------------------------------------------------------------- senders

@dataclass
class SentCase:
    """One SYNTHETIC case on disk: its files and their SOP Instance UIDs and hashes."""

    files: list[Path]
    uids: dict[Path, str]


def make_cases(folder: Path, count: int, instances: int, seed: int, size: int = 64) -> list[SentCase]:
    """``count`` SYNTHETIC cases of ``instances`` instances each (instances-1 CT slices of size x size + 1 SEG)."""
    cases = []
    for index in range(count):
        ct_files, seg_file = write_synthetic_case(folder / f"case{index}", n_slices=max(1, instances - 1), size=size,
                                                  seed=seed * 1000 + index, patient_id=f"SYNTH{seed}-{index}")
        files = [*ct_files, seg_file]
        uids = {path: str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in files}
        cases.append(SentCase(files, uids))
    return cases


_SENDING = re.compile(r"Sending file: (?P<path>.+)$")
_RESPONSE = re.compile(r"Received Store Response \((?P<status>[^)]*)\)")


def storescu_send(port: int, files: list[Path], timeout: float = 120) -> tuple[set[Path], Counter[str]]:
    """Send files with storescu -v; returns (files acknowledged with Success, response counts)."""
    command = ["storescu", "-v", "-R", "-to", "20", "-aet", "HARNESS", "-aec", "QCGATE", "127.0.0.1", str(port), *map(str, files)]
    try:
        output = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=dcmtk_env())
        text = output.stdout + output.stderr
    except subprocess.TimeoutExpired as exc:
        text = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
    acknowledged: set[Path] = set()
    statuses: Counter[str] = Counter()
    current: Path | None = None
    for line in text.splitlines():
        if (match := _SENDING.search(line)):
            current = Path(match["path"].strip())
        elif (match := _RESPONSE.search(line)):
            statuses[match["status"]] += 1
            if match["status"] == "Success" and current is not None:
                acknowledged.add(current)
            current = None
    return acknowledged, statuses


def send_concurrently(port: int, cases: list[SentCase]) -> tuple[set[str], Counter[str], float]:
    """One storescu association per case, all at once; returns (acknowledged UIDs, statuses, seconds)."""
    results: list[tuple[set[Path], Counter[str]]] = [(set(), Counter())] * len(cases)

    def run(index: int) -> None:
        results[index] = storescu_send(port, cases[index].files)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(cases))]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    acknowledged = {cases[i].uids[path] for i, (paths, _) in enumerate(results) for path in paths}
    statuses: Counter[str] = Counter()
    for _, counts in results:
        statuses.update(counts)
    return acknowledged, statuses, seconds


def check_stored(gate: GateProcess, acknowledged: set[str]) -> tuple[int, list[str]]:
    """(how many acknowledged are stored intact, the lost ones): a row, and its spool file with that hash."""
    rows = gate.stored()
    lost = []
    for uid in acknowledged:
        row = rows.get(uid)
        path = gate.data_dir / "spool" / row[0] if row else None
        if row is None or path is None or not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != row[1]:
            lost.append(uid)
    return len(acknowledged) - len(lost), lost


# --------------------------------------------------------------------------- destination that flaps

def destination_scp_main(port: int, log_path: Path) -> None:
    """A C-STORE SCP that appends each received SOP Instance UID to ``log_path`` (fsynced) before
    answering Success: what a PACS that stores first and answers second looks like."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    def on_store(event: Any) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        with open(log_path, "a", encoding="utf-8") as handle:
            handle.write(uid + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        return 0x0000

    ae = AE(ae_title="HARNESSDST")
    ae.supported_contexts = AllStoragePresentationContexts
    ae.start_server(("127.0.0.1", port), block=True, evt_handlers=[(evt.EVT_C_STORE, on_store)])


class FlappingDestination:
    """Runs the destination SCP in a subprocess and kills/restarts it on a seeded schedule."""

    def __init__(self, port: int, log_path: Path, rng: random.Random) -> None:
        self.port, self.log_path, self.rng = port, log_path, rng
        self.process: subprocess.Popen[bytes] | None = None
        self.flaps = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _up(self) -> None:
        self.process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--destination-scp", str(self.port), str(self.log_path)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)

    def _down(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._up()
            if self._stop.wait(self.rng.uniform(0.8, 1.5)):
                break
            self._down()
            self.flaps += 1
            self._stop.wait(self.rng.uniform(0.3, 1.0))

    def start(self) -> None:
        self._thread.start()

    def stop_flapping(self) -> None:
        """Stop flapping and leave the destination up."""
        self._stop.set()
        self._thread.join()
        if self.process is None or self.process.poll() is not None:
            self._up()

    def shutdown(self) -> None:
        self._stop.set()
        self._down()

    def received(self) -> Counter[str]:
        return Counter(self.log_path.read_text().split()) if self.log_path.exists() else Counter()


def add_synthetic_outbox_rows(gate: GateProcess, source: Path, count: int, destination: str) -> list[str]:
    """``count`` SYNTHETIC outputs (copies of a SYNTHETIC CT with new SOP Instance UIDs), each with a
    done case and job and a pending delivery to ``destination``. Returns their SOP Instance UIDs."""
    from sqlalchemy import insert

    from qcgate.store.database import create_db_engine
    from qcgate.store.models import Case, Delivery, Job, Output, utcnow

    engine = create_db_engine(gate.database_url)
    uids = []
    try:
        with engine.begin() as connection:
            for index in range(count):
                dataset = pydicom.dcmread(source)
                dataset.SOPInstanceUID = generate_uid()
                dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
                dataset.SeriesDescription = "SYNTHETIC harness output"
                relative = f"outputs/harness-synthetic/{index}.dcm"
                (gate.data_dir / relative).parent.mkdir(parents=True, exist_ok=True)
                dataset.save_as(gate.data_dir / relative)
                now = utcnow()
                case_id = connection.execute(insert(Case).values(
                    study_instance_uid=str(dataset.StudyInstanceUID), ct_series_uid=generate_uid(), state="done",
                    created_at=now, last_instance_at=now, notes="SYNTHETIC harness outbox row")).inserted_primary_key[0]
                job_id = connection.execute(insert(Job).values(case_id=case_id, kind="qc", state="done", created_at=now)).inserted_primary_key[0]
                output_id = connection.execute(insert(Output).values(
                    case_id=case_id, job_id=job_id, kind="seg", sop_class_uid=str(dataset.SOPClassUID),
                    sop_instance_uid=str(dataset.SOPInstanceUID), path=relative, created_at=now)).inserted_primary_key[0]
                connection.execute(insert(Delivery).values(output_id=output_id, destination=destination, state="pending",
                                                           attempts=0, next_attempt_at=now))
                uids.append(str(dataset.SOPInstanceUID))
    finally:
        engine.dispose()
    return uids


# --------------------------------------------------------------------------- fuzzer

def _top_level_elements(data: bytes) -> list[tuple[int, int, int]]:
    """(offset, header length, value length) of the top-level elements of an explicit VR LE data set."""
    elements = []
    offset = 0
    while offset + 8 <= len(data):
        vr = data[offset + 4:offset + 6]
        if vr in _LONG_LENGTH_VRS:
            if offset + 12 > len(data):
                break
            header, length = 12, int.from_bytes(data[offset + 8:offset + 12], "little")
        else:
            header, length = 8, int.from_bytes(data[offset + 6:offset + 8], "little")
        if length == 0xFFFFFFFF:
            elements.append((offset, header, -1))
            break  # undefined length: stop walking here
        elements.append((offset, header, length))
        offset += header + length
    return elements


def fuzz_payload(valid: pydicom.Dataset, rng: random.Random) -> tuple[str, bytes, str]:
    """One mutated data set: (mutation, bytes without meta, the SOP Instance UID to request)."""
    dataset = copy.deepcopy(valid)  # Dataset.copy() is shallow: deletions would leak into the next payload
    uid = generate_uid()
    dataset.SOPInstanceUID = uid
    kind = rng.choice(["truncate", "wrong-vr", "wrong-length", "missing-uid", "huge-value", "flip-bytes"])
    if kind == "missing-uid":
        for keyword in rng.sample(["SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "SOPClassUID"], rng.randint(1, 3)):
            delattr(dataset, keyword)
    elif kind == "huge-value":
        choice = rng.choice(["description", "rows", "frames", "window"])
        if choice == "description":
            dataset.SeriesDescription = "X" * 64_000
        elif choice == "rows":
            dataset.Rows = 65535
        elif choice == "frames":
            dataset.NumberOfFrames = 2**31 - 1
        else:
            dataset.add_new(0x00280030, "DS", ["1e308", "-1e308"])  # pixel spacing, absurd
    if hasattr(dataset, "file_meta"):
        del dataset.file_meta  # the raw sender adds its own meta header: serialise the data set only
    dataset.preamble = None
    buffer = io.BytesIO()
    dataset.save_as(buffer, implicit_vr=False, little_endian=True, enforce_file_format=False)
    data = bytearray(buffer.getvalue())
    elements = _top_level_elements(bytes(data))
    if kind == "truncate":
        data = data[:rng.randint(0, max(1, len(data) - 1))]
    elif kind == "wrong-vr" and elements:
        offset, _, _ = rng.choice(elements)
        data[offset + 4:offset + 6] = rng.choice([b"UN", b"SQ", b"OB", b"US", b"FD", b"XX", b"\x00\x00"])
    elif kind == "wrong-length" and elements:
        offset, header, _ = rng.choice(elements)
        value = rng.choice([0, 1, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, rng.randint(0, 1 << 20)])
        if header == 12:
            data[offset + 8:offset + 12] = (value & 0xFFFFFFFF).to_bytes(4, "little")
        else:
            data[offset + 6:offset + 8] = (value & 0xFFFF).to_bytes(2, "little")
    elif kind == "flip-bytes":
        for _ in range(rng.randint(1, 16)):
            position = rng.randrange(len(data))
            data[position] = rng.randrange(256)
    return kind, bytes(data), uid


# --------------------------------------------------------------------------- phases

def phase_load(gate: GateProcess, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    cases = make_cases(workdir / "load", args.senders, args.instances, args.seed, args.size)
    acknowledged, statuses, seconds = send_concurrently(gate.port, cases)
    args.send_seconds = seconds
    stored, lost = check_stored(gate, acknowledged)
    sent = sum(len(c.files) for c in cases)
    megabytes = sum(p.stat().st_size for c in cases for p in c.files) / 1_048_576
    gate.check_alive()
    return {"senders": args.senders, "instances_per_sender": args.instances, "sent": sent, "acknowledged": len(acknowledged),
            "stored_of_acknowledged": stored, "lost": len(lost), "lost_uids": lost[:10], "statuses": dict(statuses),
            "seconds": round(seconds, 2), "instances_per_second": round(sent / seconds, 1), "mb_per_second": round(megabytes / seconds, 2)}


def phase_kill9(gate: GateProcess, args: argparse.Namespace, workdir: Path, rng: random.Random) -> dict[str, Any]:
    rounds = []
    all_cases: list[SentCase] = []
    for round_index in range(args.kill_rounds):
        cases = make_cases(workdir / f"kill{round_index}", args.senders, args.instances, args.seed + 100 + round_index, args.size)
        all_cases += cases
        outcome: dict[str, Any] = {}

        def send() -> None:
            outcome["acknowledged"], outcome["statuses"], _ = send_concurrently(gate.port, cases)

        sender = threading.Thread(target=send)
        sender.start()
        # A kill inside the sending window: the load phase measured how long such a send takes.
        delay = rng.uniform(0.05, max(0.1, args.send_seconds))
        time.sleep(delay)
        gate.kill9()
        sender.join(timeout=120)
        stored, lost = check_stored(gate, outcome.get("acknowledged", set()))  # before the restart: what survived
        gate.start()
        rounds.append({"kill_after_seconds": round(delay, 2), "acknowledged_before_kill": len(outcome.get("acknowledged", ())),
                       "stored_of_acknowledged": stored, "lost": len(lost)})
    # The senders re-send everything after the restart: all of it must end up stored.
    resent_ack: set[str] = set()
    for cases in [all_cases[i:i + args.senders] for i in range(0, len(all_cases), args.senders)]:
        acknowledged, _, _ = send_concurrently(gate.port, cases)
        resent_ack |= acknowledged
    everything = {uid for c in all_cases for uid in c.uids.values()}
    stored_after, lost_after = check_stored(gate, resent_ack)
    gate.check_alive()
    return {"rounds": rounds, "resent": len(everything), "acknowledged_after_resend": len(resent_ack),
            "stored_after_resend": stored_after, "lost_after_resend": len(lost_after),
            "lost": sum(r["lost"] for r in rounds) + len(lost_after),
            "acknowledged": sum(r["acknowledged_before_kill"] for r in rounds) + len(resent_ack)}


def phase_disk_watermark(gate: GateProcess, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    gate.stop()
    gate.start(min_free_mb=1e12)  # far above any disk: every C-STORE must be refused with A700
    cases = make_cases(workdir / "disk", 1, args.instances, args.seed + 200, args.size)
    acknowledged, statuses, _ = send_concurrently(gate.port, cases)
    alive = gate.check_alive() and gate.echo()
    health = _http_status(gate.http_port, "/healthz")
    gate.stop()
    gate.start()
    after, _, _ = send_concurrently(gate.port, cases)  # space is back: the sender's retry is stored
    stored, lost = check_stored(gate, after)
    return {"sent": len(cases[0].files), "acknowledged_while_full": len(acknowledged), "statuses_while_full": dict(statuses),
            "healthz_while_full": health, "node_alive_while_full": alive, "acknowledged_after": len(after),
            "stored_after": stored, "lost": len(lost), "acknowledged": len(acknowledged) + len(after)}


def _http_status(port: int, path: str) -> int | None:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except OSError:
        return None


def phase_postgres_drop(gate: GateProcess, args: argparse.Namespace, workdir: Path, rng: random.Random, database: str) -> dict[str, Any]:
    import psycopg

    cases = make_cases(workdir / "pgdrop", args.senders, args.instances, args.seed + 300, args.size)
    outcome: dict[str, Any] = {}

    def send() -> None:
        outcome["acknowledged"], outcome["statuses"], _ = send_concurrently(gate.port, cases)

    sender = threading.Thread(target=send)
    sender.start()
    terminated = 0
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=5) as admin:
        while sender.is_alive():
            time.sleep(rng.uniform(0.2, 0.8))
            terminated += len(admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                                            (database,)).fetchall())
    sender.join()
    stored, lost = check_stored(gate, outcome["acknowledged"])
    retry_ack, _, _ = send_concurrently(gate.port, cases)  # the senders' retry of what was refused
    stored_retry, lost_retry = check_stored(gate, retry_ack)
    alive = gate.check_alive() and gate.echo()
    return {"connections_terminated": terminated, "acknowledged_during_drops": len(outcome["acknowledged"]),
            "statuses_during_drops": dict(outcome["statuses"]), "stored_of_acknowledged": stored,
            "acknowledged_after_retry": len(retry_ack), "stored_after_retry": stored_retry,
            "lost": len(lost) + len(lost_retry), "node_alive": alive, "acknowledged": len(outcome["acknowledged"]) + len(retry_ack)}


def phase_flapping_destination(gate: GateProcess, args: argparse.Namespace, workdir: Path, rng: random.Random,
                               destination: FlappingDestination, deadline: float) -> dict[str, Any]:
    source = next((workdir / "load").rglob("CT*.dcm"))
    uids = add_synthetic_outbox_rows(gate, source, args.outputs, gate.destination or "")
    destination.start()
    started = time.monotonic()
    flap_until = started + min(args.flap_seconds, max(1.0, deadline - time.monotonic() - 30))
    while time.monotonic() < flap_until:
        time.sleep(0.5)
        gate.check_alive()
    destination.stop_flapping()
    pending = args.outputs
    wait_until = time.monotonic() + 60
    while time.monotonic() < wait_until:
        pending = int(gate.sql("SELECT count(*) FROM deliveries WHERE state = 'pending'")[0][0])
        if pending == 0:
            break
        time.sleep(0.5)
    received = destination.received()
    states = Counter(state for (state,) in gate.sql("SELECT state FROM deliveries"))
    attempts = Counter(outcome for (outcome,) in gate.sql("SELECT outcome FROM delivery_attempts"))
    return {"outputs": len(uids), "flaps": destination.flaps, "seconds": round(time.monotonic() - started, 1),
            "delivered_once": sum(1 for u in uids if received[u] == 1), "delivered_more_than_once": sum(1 for u in uids if received[u] > 1),
            "never_delivered": sum(1 for u in uids if received[u] == 0), "delivery_states": dict(states),
            "attempt_outcomes": dict(attempts)}


def phase_bad_input(gate: GateProcess, args: argparse.Namespace, workdir: Path, rng: random.Random) -> dict[str, Any]:
    statuses: Counter[str] = Counter()
    by_mutation: dict[str, Counter[str]] = {}
    acknowledged: set[str] = set()
    payloads: list[tuple[str, bytes, str, str]] = []
    for name, syntax in MALFORMED_PYDICOM:
        payloads.append((f"pydicom-malformed:{name}", dataset_bytes_without_meta(PYDICOM_TEST_FILES / name), generate_uid(), syntax))
    others = sorted(p for p in PYDICOM_TEST_FILES.glob("*.dcm") if p.stat().st_size < 2_000_000 and p.name not in dict(MALFORMED_PYDICOM))
    for path in rng.sample(others, min(args.pydicom_files, len(others))):
        # requested with the file's own SOP Instance UID and transfer syntax where it has them, so a
        # well-formed CT can be accepted; anything else (other classes, odd encodings) must be refused
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            uid = str(header.get("SOPInstanceUID", "")) or generate_uid()
            syntax = str(header.file_meta.TransferSyntaxUID) if "TransferSyntaxUID" in getattr(header, "file_meta", {}) else EXPLICIT_VR_LE
        except Exception:
            uid, syntax = generate_uid(), EXPLICIT_VR_LE
        payloads.append((f"pydicom:{path.name}", dataset_bytes_without_meta(path), uid, syntax))
    valid = pydicom.dcmread(next((workdir / "load").rglob("CT*.dcm")))
    for _ in range(args.fuzz):
        kind, data, uid = fuzz_payload(valid, rng)
        payloads.append((f"fuzz:{kind}", data, uid, EXPLICIT_VR_LE))
    for label, data, uid, syntax in payloads:
        try:
            status = send_raw_c_store(gate.port, data, sop_instance=uid, transfer_syntax=syntax)
        except Exception as exc:  # association refused or dropped: record, then check the node
            status = None
            label = f"{label} ({type(exc).__name__})"
        text = "none" if status is None else f"0x{status:04X}"
        statuses[text] += 1
        by_mutation.setdefault(label.split(":")[0] + ":" + label.split(":")[1].split(" ")[0] if label.startswith("fuzz") else label.split(":")[0],
                               Counter())[text] += 1
        if status == 0x0000:
            acknowledged.add(uid)
        if not gate.check_alive():
            statuses["node-restarted"] += 1
    stored, lost = check_stored(gate, acknowledged)
    return {"payloads": len(payloads), "statuses": dict(statuses), "by_source": {k: dict(v) for k, v in sorted(by_mutation.items())},
            "acknowledged": len(acknowledged), "stored_of_acknowledged": stored, "lost": len(lost), "node_answers_echo": gate.echo()}


def settle_qc_outputs(gate: GateProcess, destination: FlappingDestination, deadline: float) -> dict[str, Any]:
    """With workers: wait until no QC job and no delivery is pending, then count how often each QC
    output (SEG, SR, ...) with a delivery reached the destination."""
    while time.monotonic() < deadline:
        busy = gate.sql("SELECT (SELECT count(*) FROM jobs WHERE state IN ('pending', 'running')) + "
                        "(SELECT count(*) FROM deliveries WHERE state = 'pending')")[0][0]
        if busy == 0:
            break
        gate.check_alive()
        time.sleep(1.0)
    outputs = [uid for (uid,) in gate.sql("SELECT o.sop_instance_uid FROM outputs o JOIN deliveries d ON d.output_id = o.id "
                                          "JOIN cases c ON c.id = o.case_id WHERE c.notes IS NULL OR c.notes NOT LIKE 'SYNTHETIC harness%'")]
    received = destination.received()
    jobs = Counter(state for (state,) in gate.sql("SELECT j.state FROM jobs j JOIN cases c ON c.id = j.case_id "
                                                 "WHERE c.notes IS NULL OR c.notes NOT LIKE 'SYNTHETIC harness%'"))
    failed = [reason for (reason,) in gate.sql("SELECT reason FROM cases WHERE state = 'failed'")]
    return {"jobs_by_state": dict(jobs), "failed_case_reasons": [str(r)[:200] for r in failed[:5]], "outputs_with_delivery": len(outputs),
            "delivered_once": sum(1 for u in outputs if received[u] == 1),
            "delivered_more_than_once": sum(1 for u in outputs if received[u] > 1),
            "never_delivered": sum(1 for u in outputs if received[u] == 0)}


# --------------------------------------------------------------------------- main

def _create_postgres_database() -> tuple[str, str]:
    import psycopg

    name = f"qcgate_harness_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    return name, f"{base}/{name}"


def _drop_postgres_database(name: str) -> None:
    import psycopg

    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run_harness(args: argparse.Namespace) -> dict[str, Any]:
    """Run every phase (bounded by --time-limit: later phases are skipped when time runs out)."""
    warnings.simplefilter("ignore")  # the fuzzer writes values pydicom warns about, on purpose
    args.send_seconds = getattr(args, "send_seconds", 1.0)
    rng = random.Random(args.seed)
    deadline = time.monotonic() + args.time_limit
    report: dict[str, Any] = {"seed": args.seed, "backend": args.backend, "workers": args.workers, "phases": {}, "skipped": [],
                              "command": "bench/harness.py " + " ".join(sys.argv[1:])}
    with tempfile.TemporaryDirectory(prefix="qcgate-harness-") as tmp:
        workdir = Path(tmp)
        pg_name = None
        if args.backend == "postgresql":
            pg_name, url = _create_postgres_database()
        else:
            url = f"sqlite:///{workdir / 'data' / 'qcgate.db'}"
        destination_port = free_port()
        gate = GateProcess(workdir, url, args.workers, f"HARNESSDST@127.0.0.1:{destination_port}")
        destination = FlappingDestination(destination_port, workdir / "destination-received.txt", random.Random(args.seed + 1))
        started = time.perf_counter()
        try:
            gate.start()
            phases: list[tuple[str, Any]] = [
                ("load", lambda: phase_load(gate, args, workdir)),
                ("kill9_during_ingest", lambda: phase_kill9(gate, args, workdir, rng)),
                ("disk_watermark", lambda: phase_disk_watermark(gate, args, workdir)),
            ]
            if pg_name:
                phases.append(("postgres_connections_dropped", lambda: phase_postgres_drop(gate, args, workdir, rng, pg_name)))
            phases += [
                ("flapping_destination", lambda: phase_flapping_destination(gate, args, workdir, rng, destination, deadline)),
                ("bad_input", lambda: phase_bad_input(gate, args, workdir, rng)),
            ]
            for name, phase in phases:
                if time.monotonic() > deadline:
                    report["skipped"].append(name)
                    continue
                phase_started = time.perf_counter()
                print(f"harness: {name} ...", flush=True)
                report["phases"][name] = phase()
                report["phases"][name]["phase_seconds"] = round(time.perf_counter() - phase_started, 1)
            time.sleep(2.5)  # let the assembler see the last cases quiet (stable_seconds = 1)
            if args.workers > 0:
                report["qc_outputs"] = settle_qc_outputs(gate, destination, deadline + 120)
            cases = Counter(state for (state,) in gate.sql("SELECT state FROM cases WHERE notes IS NULL OR notes NOT LIKE 'SYNTHETIC harness%'"))
            gate.check_alive()
            gate.stop()
        finally:
            destination.shutdown()
            if gate.process is not None and gate.process.poll() is None:
                gate.process.kill()
            if pg_name:
                _drop_postgres_database(pg_name)
        phases_done = report["phases"].values()
        report["totals"] = {
            "acknowledged": sum(p.get("acknowledged", 0) for p in phases_done),
            "lost": sum(p.get("lost", 0) for p in phases_done),
            "node_crashes": gate.crashes,
            "node_starts": gate.starts,
            "cases_by_state": dict(cases),
            "outputs_delivered_once": report["phases"].get("flapping_destination", {}).get("delivered_once"),
            "seconds": round(time.perf_counter() - started, 1),
        }
        report["crash_logs"] = gate.crash_logs
    return report


def print_summary(report: dict[str, Any]) -> None:
    totals = report["totals"]
    print(f"\nqcgate harness, seed {report['seed']}, {report['backend']}, pipeline.workers = {report['workers']}: "
          f"{totals['acknowledged']} instances acknowledged, {totals['lost']} lost, {totals['node_crashes']} node crashes, "
          f"{totals['node_starts']} starts, {totals['seconds']} s")
    for name, phase in report["phases"].items():
        brief = {k: v for k, v in phase.items() if k not in ("lost_uids", "by_source")}
        print(f"  {name}: {json.dumps(brief)}")
    print(f"  cases by state: {totals['cases_by_state']}")
    if "qc_outputs" in report:
        print(f"  QC outputs (workers > 0): {json.dumps(report['qc_outputs'])}")
    if report["skipped"]:
        print(f"  skipped (time limit): {report['skipped']}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--destination-scp"]:
        destination_scp_main(int(argv[1]), Path(argv[2]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--senders", type=int, default=4, help="concurrent associations")
    parser.add_argument("--instances", type=int, default=20, help="instances per association (CT slices + 1 SEG)")
    parser.add_argument("--size", type=int, default=64, help="CT slice rows and columns (SYNTHETIC images)")
    parser.add_argument("--kill-rounds", type=int, default=3)
    parser.add_argument("--outputs", type=int, default=12, help="synthetic outbox rows for the flapping destination")
    parser.add_argument("--flap-seconds", type=float, default=10.0)
    parser.add_argument("--fuzz", type=int, default=40)
    parser.add_argument("--pydicom-files", type=int, default=12)
    parser.add_argument("--backend", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--workers", type=int, default=0, help="pipeline.workers of the node (0: queue jobs only)")
    parser.add_argument("--time-limit", type=float, default=600.0, help="seconds; phases not started by then are skipped")
    parser.add_argument("--json", type=Path, help="also write the full report here")
    args = parser.parse_args(argv)
    report = run_harness(args)
    print_summary(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0 if report["totals"]["lost"] == 0 and report["totals"]["node_crashes"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
