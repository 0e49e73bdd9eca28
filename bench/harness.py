"""Fault and load harness: drives a real `qcgate serve` on loopback and checks that nothing
acknowledged is lost and that the node never crashes.

    .venv/bin/python bench/harness.py [--seed 1] [--senders 4] [--instances 20] [--kill-rounds 3]
        [--size 64] [--fuzz 40] [--pydicom-files 12] [--outputs 12] [--backend sqlite|postgresql]
        [--mutations 1000] [--check-sample 300] [--aborts 20] [--idle-sockets 200] [--slow-drip 20]
        [--tls-silent 20] [--workers 0] [--time-limit 600] [--only PHASE,...] [--json REPORT.json]

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
7. defects (issue 15): NUL and over-long UIDs (data set, request, SEG references), truncated,
   missing and over-long pixel data, Rows 0, PixelSpacing 0, a non-numeric position, data sets
   encoded unlike the negotiated transfer syntax: each must get a permanent refusal (0xA900 /
   0xC000), never Success or 0xA700. Then --aborts transfers cut mid-data-set by A-ABORT:
   nothing may stay in spool/.incoming.
8. fuzz: --mutations mutated data sets, alternately from a valid SYNTHETIC CT and SEG (bit flips,
   element deletions at any depth, VR and length corruption, UID mutations: NUL, over-long, bad
   characters, duplicates; pixel-size mismatches, truncation), sent over reused associations.
   Counted: node crashes, `Traceback` lines in the node's log, 0xA700 answers (every payload is a
   data defect or valid: must be 0), and acknowledged instances that cannot be processed (each
   acknowledged one, up to --check-sample, is re-read from the spool: the ingest checks and a full
   pixel decode to Rows x Columns x frames).
9. abuse_sockets: --idle-sockets idle TCP connections and --slow-drip peers sending an
   A-ASSOCIATE-RQ a byte at a time while a legitimate C-ECHO must answer within 1 s; then the node
   restarts with TLS and the same with --tls-silent silent peers and a partial ClientHello.

Exit status 0 when loss, crashes, tracebacks, A700 for data defects and unprocessable
acknowledged instances are all zero.

The node runs with pipeline.workers = 0 by default (it assembles cases and queues their QC jobs
but does not run them): the jobs' CPU time would dominate a 2-core machine and the harness is
about ingest, restarts and delivery. --workers N runs them too.

Only 127.0.0.1 is used.
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
REQUEST_DEADLINE_SECONDS = 2.0  # node.association_request_timeout_seconds in the harness
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
    tls: tuple[Path, Path] | None = None  # (key, certificate) when the node must run with TLS

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
            f"association_request_timeout_seconds = {REQUEST_DEADLINE_SECONDS}\nmax_pending_connections = 16\n"
            f'[storage]\ndata_dir = "{self.data_dir}"\nmin_free_mb = {min_free_mb!r}\n'
            f'[database]\nurl = "{self.database_url}"\n'
            "[assembly]\nstable_seconds = 1.0\npoll_interval_seconds = 0.2\nincomplete_timeout_seconds = 60\n"
            f"[pipeline]\nworkers = {self.workers}\n"
            f"[delivery]\ndestinations = {destinations}\nmax_attempts = 1000\nbackoff_base_seconds = 0.2\n"
            "backoff_max_seconds = 1.0\nconnect_timeout_seconds = 3\npoll_interval_seconds = 0.2\n"
            f'[observability]\nhost = "127.0.0.1"\nport = {self.http_port}\n'
            '[logging]\nlevel = "INFO"\n'
            + (f'[node.tls]\nenabled = true\ncert_file = "{self.tls[1]}"\nkey_file = "{self.tls[0]}"\n' if self.tls else ""),
            encoding="utf-8")
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

    def tracebacks(self) -> int:
        """How many tracebacks the node has logged so far (over every start)."""
        return sum(1 for line in self._log().splitlines() if line.lstrip().startswith("Traceback"))

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


# --------------------------------------------------------------------------- abuse (issue 15)

def _timed_echo(port: int, tls_args: Any = None) -> float | None:
    """Seconds for associate + C-ECHO + release, or None when the echo was not answered."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="GOODPEER")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 10
    started = time.monotonic()
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="QCGATE", tls_args=tls_args)
        if not assoc.is_established:
            return None
        status = assoc.send_c_echo()
        elapsed = time.monotonic() - started
        assoc.release()
    except Exception:
        return None
    return elapsed if status is not None and status.get("Status") == 0 else None


def _open_idle(port: int, count: int) -> list[Any]:
    import socket

    sockets = []
    for _ in range(count):
        try:
            sockets.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        except OSError:
            break
    return sockets


class _SlowDrip(threading.Thread):
    """Peers that send an A-ASSOCIATE-RQ one byte per interval."""

    def __init__(self, port: int, count: int, interval: float = 0.3) -> None:
        super().__init__(daemon=True)
        self.sockets = _open_idle(port, count)
        self.interval = interval
        self.stop = threading.Event()
        self.closed_by_node = 0

    def run(self) -> None:
        import struct

        payload = b"\x01\x00" + struct.pack(">L", 200) + b"\x00" * 200
        index = 0
        while not self.stop.wait(self.interval) and self.sockets:
            for sock in list(self.sockets):
                try:
                    sock.send(payload[index % len(payload): index % len(payload) + 1])
                except OSError:
                    self.sockets.remove(sock)
                    self.closed_by_node += 1
            index += 1


def _closed_by_node(sock: Any, timeout: float) -> bool:
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except OSError:
        return False


def _echo_under_siege(port: int, idle: int, drip: int, echoes: int, tls_args: Any = None, partial_hello: bool = False) -> dict[str, Any]:
    import socket

    threads_before = _threads(port)
    sockets = _open_idle(port, idle)
    dripper = _SlowDrip(port, drip) if drip else None
    partial = None
    if partial_hello:
        partial = socket.create_connection(("127.0.0.1", port))
        partial.send(bytes.fromhex("160301"))  # the start of a TLS record header, then nothing
    if dripper:
        dripper.start()
    try:
        time.sleep(0.5)
        timings = [_timed_echo(port, tls_args) for _ in range(echoes)]
        threads_during = _threads(port)
        time.sleep(REQUEST_DEADLINE_SECONDS + 1.0)  # past the node's deadline every pending connection is closed
        after = _timed_echo(port, tls_args)
        closed = sum(1 for sock in sockets[-16:] if _closed_by_node(sock, 0.5))
        partial_closed = _closed_by_node(partial, 2.0) if partial is not None else None
    finally:
        if dripper:
            dripper.stop.set()
            dripper.join(timeout=5)
        for sock in [*sockets, *(dripper.sockets if dripper else []), *([partial] if partial else [])]:
            sock.close()
    answered = [t for t in timings if t is not None]
    return {"idle_sockets": len(sockets), "slow_drip": drip, "echoes": echoes,
            "echoes_within_1s": sum(1 for t in answered if t < 1.0), "echo_max_seconds": round(max(answered), 3) if answered else None,
            "echo_after_deadline_seconds": round(after, 3) if after is not None else None,
            "idle_closed_by_node_of_last_16": closed, "partial_hello_closed": partial_closed,
            "threads_before": threads_before, "threads_during": threads_during}


_NODE_PID: dict[int, int] = {}  # port -> pid of the node listening there (for thread counts)


def _threads(port: int) -> int | None:
    pid = _NODE_PID.get(port)
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
    except (OSError, TypeError):
        pass
    return None


def phase_abuse_sockets(gate: GateProcess, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """200 idle sockets and 20 slow-drip peers while a legitimate C-ECHO must answer within 1 s;
    then the same with TLS on, with silent peers and a partial ClientHello."""
    import ssl

    assert gate.process is not None
    _NODE_PID[gate.port] = gate.process.pid
    tracebacks_before = gate.tracebacks()
    plain = _echo_under_siege(gate.port, args.idle_sockets, args.slow_drip, 5)
    gate.check_alive()
    key, cert = workdir / "tls" / "server.key", workdir / "tls" / "server.crt"
    key.parent.mkdir(exist_ok=True)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=harness",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    gate.stop()
    gate.tls = (key, cert)
    try:
        gate.start()
        _NODE_PID[gate.port] = gate.process.pid
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
        tls = _echo_under_siege(gate.port, args.tls_silent, 0, 3, (context, "127.0.0.1"), partial_hello=True)
        gate.check_alive()
    finally:
        gate.stop()
        gate.tls = None
        gate.start()
    alive = gate.check_alive() and gate.echo()
    return {"plain": plain, "tls": tls, "node_alive": alive, "tracebacks": gate.tracebacks() - tracebacks_before}


# --------------------------------------------------------------------------- raw C-STORE client

JPEG2000 = "1.2.840.10008.1.2.4.90"


class RawSender:
    """Sends data sets byte for byte over one association (re-associating when the node ends it)."""

    def __init__(self, port: int, workdir: Path) -> None:
        from pynetdicom import _config

        self.port = port
        self.path = workdir / "raw-payload.dcm"
        self.assoc: Any = None
        self.associations = 0
        _config.STORE_SEND_CHUNKED_DATASET = True
        _config.VALIDATORS["UI"] = lambda value: (True, "")  # so over-long and NUL UIDs can be requested

    def _associate(self) -> Any:
        from pynetdicom import AE

        from qcgate.core.dicom import CT_IMAGE_STORAGE, SEGMENTATION_STORAGE

        ae = AE(ae_title="FUZZER")
        ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 30
        for sop_class in (CT_IMAGE_STORAGE, SEGMENTATION_STORAGE):
            for syntax in (EXPLICIT_VR_LE, IMPLICIT_VR_LE, JPEG2000):
                ae.add_requested_context(sop_class, syntax)
        # one context per (class, syntax) pair: pynetdicom picks the one matching the file's meta
        assoc = ae.associate("127.0.0.1", self.port, ae_title="QCGATE")
        self.associations += 1
        return assoc if assoc.is_established else None

    def send(self, payload: bytes, sop_class: str, sop_instance: str, syntax: str) -> int | None:
        from pydicom.dataset import FileMetaDataset
        from pydicom.filewriter import write_file_meta_info

        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop_instance
        meta.TransferSyntaxUID = syntax
        buffer = io.BytesIO()
        buffer.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(buffer, meta, enforce_standard=False)
        self.path.write_bytes(buffer.getvalue() + payload)
        if self.assoc is None or not self.assoc.is_established:
            self.assoc = self._associate()
            if self.assoc is None:
                raise ConnectionError("association refused")
        status = self.assoc.send_c_store(self.path)
        if status is None or "Status" not in status:
            self.close()
            return None
        return int(status.Status)

    def close(self) -> None:
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()
        self.assoc = None


def _send_and_tally(gate: GateProcess, sender: RawSender, payloads: list[tuple[str, bytes, str, str, str]]) -> dict[str, Any]:
    """Send (label, bytes, SOP class, requested UID, syntax) one by one; tally the answers."""
    statuses: Counter[str] = Counter()
    by_kind: dict[str, Counter[str]] = {}
    acknowledged: dict[str, str] = {}
    for label, data, sop_class, uid, syntax in payloads:
        try:
            status = sender.send(data, sop_class, uid, syntax)
        except Exception as exc:  # association refused or dropped: recorded, then the node is checked
            status = None
            sender.close()
            label = f"{label} ({type(exc).__name__})"
        text = "none" if status is None else f"0x{status:04X}"
        statuses[text] += 1
        by_kind.setdefault(label.split(" ")[0], Counter())[text] += 1
        if status == 0x0000:
            acknowledged[uid] = label
        if not gate.check_alive():
            statuses["node-restarted"] += 1
    sender.close()
    return {"statuses": statuses, "by_kind": by_kind, "acknowledged": acknowledged}


def check_processable(gate: GateProcess, uids: list[str]) -> list[str]:
    """The acknowledged instances among ``uids`` that could not be processed: the stored file must
    pass the node's ingest checks again and its pixel data must decode to Rows x Columns (x frames)."""
    from qcgate.node.dicom_header import HeaderError, read_header

    rows = gate.stored()
    bad = []
    for uid in uids:
        row = rows.get(uid)
        if row is None:
            bad.append(f"{uid[:80]}: no row")
            continue
        path = gate.data_dir / "spool" / row[0]
        try:
            read_header(path)
            dataset = pydicom.dcmread(path)
            pixels = dataset.pixel_array
            frames = int(dataset.get("NumberOfFrames", 1) or 1)
            expected = (int(dataset.Rows), int(dataset.Columns)) if frames == 1 else (frames, int(dataset.Rows), int(dataset.Columns))
            if tuple(pixels.shape) != expected:
                bad.append(f"{uid[:80]}: pixels {pixels.shape} != {expected}")
        except HeaderError as exc:
            bad.append(f"{uid[:80]}: ingest check: {exc}")
        except Exception as exc:
            bad.append(f"{uid[:80]}: {type(exc).__name__}: {str(exc)[:200]}")
    return bad


# --------------------------------------------------------------------------- named defects (issue 15)

def _variant(base: pydicom.Dataset, **changes: Any) -> pydicom.Dataset:
    dataset = copy.deepcopy(base)
    dataset.SOPInstanceUID = generate_uid()
    for keyword, value in changes.items():
        if value is None:
            if keyword in dataset:
                delattr(dataset, keyword)
        else:
            setattr(dataset, keyword, value)
    return dataset


def _encode(dataset: pydicom.Dataset, implicit: bool = False) -> bytes:
    dataset = copy.copy(dataset)
    if hasattr(dataset, "file_meta"):
        del dataset.file_meta
    dataset.preamble = None
    buffer = io.BytesIO()
    dataset.save_as(buffer, implicit_vr=implicit, little_endian=True, enforce_file_format=False)
    return buffer.getvalue()


def defect_payloads(ct: pydicom.Dataset, seg: pydicom.Dataset) -> list[tuple[str, bytes, str, str, str]]:
    """The findings of issue 15 as named payloads: (label, bytes, SOP class, requested UID, syntax).
    Each must get a permanent refusal (0xA900 / 0xC000 family), never Success or 0xA700."""
    from qcgate.core.dicom import CT_IMAGE_STORAGE, SEGMENTATION_STORAGE

    nul, long_uid = "1.2.3.4\x005", "1.2." + "3" * 70
    out: list[tuple[str, bytes, str, str, str]] = []

    def add(label: str, dataset: pydicom.Dataset, request_uid: str | None = None, syntax: str = EXPLICIT_VR_LE,
            data: bytes | None = None) -> None:
        sop_class = SEGMENTATION_STORAGE if str(dataset.get("SOPClassUID", "")) == SEGMENTATION_STORAGE else CT_IMAGE_STORAGE
        out.append((label, data if data is not None else _encode(dataset), sop_class, request_uid or str(dataset.SOPInstanceUID), syntax))

    add("nul-sop-uid", (d := _variant(ct, SOPInstanceUID=nul)), nul)
    add("nul-study-uid", _variant(ct, StudyInstanceUID=nul))
    add("nul-series-uid", _variant(ct, SeriesInstanceUID=nul))
    add("long-study-uid", _variant(ct, StudyInstanceUID=long_uid))
    add("long-series-uid", _variant(ct, SeriesInstanceUID=long_uid))
    add("long-request-uid", _variant(ct, SOPInstanceUID=long_uid), long_uid)
    add("bad-chars-uid", _variant(ct, SeriesInstanceUID="1.2.abc.3"))
    seg_long_ref = _variant(seg)
    for item in seg_long_ref.ReferencedSeriesSequence[0].ReferencedInstanceSequence[:1]:
        item.ReferencedSOPInstanceUID = long_uid
    add("seg-long-referenced-uid", seg_long_ref)
    seg_nul_ref = _variant(seg)
    seg_nul_ref.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID = nul
    add("seg-nul-referenced-uid", seg_nul_ref)
    add("ct-truncated-pixels", _variant(ct, PixelData=b"\x00" * 1000))
    add("ct-no-pixel-data", _variant(ct, PixelData=None))
    add("ct-rows-0", _variant(ct, Rows=0))
    add("ct-pixel-spacing-0", _variant(ct, PixelSpacing=[0, 0.5]))
    ipp = _variant(ct, ImagePositionPatient=["-158", "179", "75"])
    encoded = _encode(ipp)
    add("ct-position-text", ipp, data=encoded.replace(b"-158\\179\\75", b"-158\\abc\\75"))
    whole = _variant(ct)
    add("ct-explicit-on-implicit", whole, syntax=IMPLICIT_VR_LE)
    add("ct-native-on-jpeg2000", _variant(ct), syntax=JPEG2000)
    truncated_stream = _variant(ct)
    add("ct-stream-cut-in-pixels", truncated_stream, data=_encode(truncated_stream)[:-1000])
    add("seg-no-pixel-data", _variant(seg, PixelData=None))
    add("seg-100000-frames", _variant(seg, NumberOfFrames=100000))
    add("seg-truncated-pixels", _variant(seg, PixelData=bytes(seg.PixelData)[: max(1, len(seg.PixelData) // 3)]))
    add("seg-explicit-on-implicit", _variant(seg), syntax=IMPLICIT_VR_LE)
    del d
    return out


def _store_and_abort(port: int, payload: bytes, sop_uid: str) -> None:
    """Send the command and the first half of a C-STORE's fragments, then A-ABORT."""
    from pynetdicom import AE
    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.pdu import P_DATA_TF

    from qcgate.core.dicom import CT_IMAGE_STORAGE

    ae = AE(ae_title="ABORTER")
    ae.add_requested_context(CT_IMAGE_STORAGE, EXPLICIT_VR_LE)
    assoc = ae.associate("127.0.0.1", port, ae_title="QCGATE")
    if not assoc.is_established:
        return
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = CT_IMAGE_STORAGE
    request.AffectedSOPInstanceUID = sop_uid
    request.Priority = 2
    request.DataSet = io.BytesIO(payload)
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    primitives = list(message.encode_msg(assoc.accepted_contexts[0].context_id, 16384))
    for primitive in primitives[: len(primitives) // 2]:
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        assoc.dul.socket.socket.sendall(pdu.encode())
    time.sleep(0.1)
    assoc.abort()


def _valid_bases(workdir: Path, size: int) -> tuple[pydicom.Dataset, pydicom.Dataset]:
    """A valid SYNTHETIC CT and its SEG for the defect and fuzz phases (their own study and series)."""
    ct_files, seg_file = write_synthetic_case(workdir / "fuzz-base", n_slices=2, size=size, seed=4242, patient_id="SYNTHFUZZ")
    return pydicom.dcmread(ct_files[0]), pydicom.dcmread(seg_file)


def phase_defects(gate: GateProcess, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    ct, seg = _valid_bases(workdir, 64)
    tracebacks_before = gate.tracebacks()
    payloads = defect_payloads(ct, seg)
    tally = _send_and_tally(gate, RawSender(gate.port, workdir), payloads)
    by_kind = {label: dict(counts) for label, counts in tally["by_kind"].items()}
    permanent = sum(1 for counts in by_kind.values() for status in counts if status[:4] in ("0xA9", "0xC0", "0x01"))
    # aborted transfers: nothing may stay in spool/.incoming once their associations have ended
    big = _encode(_valid_bases(workdir / "big", 512)[0])
    for index in range(args.aborts):
        _store_and_abort(gate.port, big, generate_uid())
    incoming = gate.data_dir / "spool" / ".incoming"
    deadline = time.monotonic() + 10
    while any(incoming.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.1)
    leftovers = len(list(incoming.iterdir()))
    echo = _timed_echo(gate.port)
    return {"payloads": len(payloads), "by_defect": by_kind, "permanent_refusals": permanent,
            "acknowledged_defects": sorted(l for l, c in by_kind.items() if "0x0000" in c),
            "a700_for_defects": sum(c.get("0xA700", 0) for c in by_kind.values()),
            "no_answer": sum(c.get("none", 0) for c in by_kind.values()),
            "aborted_transfers": args.aborts, "incoming_leftovers": leftovers,
            "echo_seconds_after": round(echo, 3) if echo is not None else None,
            "tracebacks": gate.tracebacks() - tracebacks_before, "node_alive": gate.check_alive()}


# --------------------------------------------------------------------------- mutation fuzzer

_UID_MUTATIONS = ["nul", "long", "chars", "empty", "double-dot", "leading-zero", "trailing-space", "exact-64", "duplicate"]


def _all_elements(dataset: pydicom.Dataset) -> list[tuple[pydicom.Dataset, Any]]:
    """(parent data set, element) for every element, nested ones included."""
    found = []
    for element in dataset:
        found.append((dataset, element))
        if element.VR == "SQ":
            for item in element.value:
                found += _all_elements(item)
    return found


def _mutate_uid(value: str, how: str, other: str, rng: random.Random) -> str:
    if how == "nul":
        cut = rng.randrange(len(value) + 1)
        return value[:cut] + "\x00" + value[cut:]
    if how == "long":
        return value + "." + "9" * rng.randint(65 - len(value), 200)
    if how == "chars":
        return value[:-2] + rng.choice(["ab", "x ", "-1", "\xe9", "\\2", "*"])
    if how == "empty":
        return ""
    if how == "double-dot":
        return value.replace(".", "..", 1)
    if how == "leading-zero":
        return value + ".012"
    if how == "trailing-space":
        return value + " "
    if how == "exact-64":
        return (value + "." + "1" * 64)[:64].rstrip(".") if len(value) < 62 else value
    return other  # duplicate: another UID of the data set


def mutate(base: pydicom.Dataset, rng: random.Random) -> tuple[str, bytes, str]:
    """One mutation of ``base``: (kind, bytes without meta, SOP Instance UID to request)."""
    dataset = copy.deepcopy(base)
    uid = generate_uid()
    dataset.SOPInstanceUID = uid
    kind = rng.choice(["bit-flip", "bit-flip", "delete-element", "delete-element", "vr", "length", "uid", "uid",
                       "pixel-size", "truncate"])
    request_uid = uid
    if kind == "delete-element":
        for _ in range(rng.randint(1, 3)):
            parent, element = rng.choice(_all_elements(dataset))
            if element.tag in parent:
                del parent[element.tag]
    elif kind == "uid":
        candidates = [(parent, element) for parent, element in _all_elements(dataset) if element.VR == "UI" and element.value]
        parent, element = rng.choice(candidates)
        how = rng.choice(_UID_MUTATIONS)
        other = str(rng.choice(candidates)[1].value)
        element.value = _mutate_uid(str(element.value), how, other, rng)
        kind = f"uid-{how}"
        if element.keyword == "SOPInstanceUID" and rng.random() < 0.5:
            request_uid = str(element.value)  # the request names the mutated UID too
    elif kind == "pixel-size":
        choice = rng.choice(["rows", "columns", "bits", "frames", "cut", "pad"])
        if choice == "rows":
            dataset.Rows = rng.choice([0, 1, int(dataset.Rows) + 1, 65535])
        elif choice == "columns":
            dataset.Columns = rng.choice([0, int(dataset.Columns) * 2])
        elif choice == "bits":
            dataset.BitsAllocated = rng.choice([0, 1, 8, 32, 64])
        elif choice == "frames":
            dataset.NumberOfFrames = rng.choice([0, 2, 1000, 2**31 - 1])
        elif choice == "cut":
            dataset.PixelData = bytes(dataset.PixelData)[: rng.randrange(max(1, len(dataset.PixelData)))]
        else:
            dataset.PixelData = bytes(dataset.PixelData) + b"\x00" * rng.choice([1, 2, 1024])
        kind = f"pixel-{choice}"
    data = bytearray(_encode(dataset))
    elements = _top_level_elements(bytes(data))
    if kind == "bit-flip":
        # half the flips land in the header (before the pixel data), where they change meaning
        header_end = next((o for o, h, _ in elements if data[o:o + 4] == b"\xe0\x7f\x10\x00"), len(data))
        for _ in range(rng.randint(1, 8)):
            limit = header_end if rng.random() < 0.7 else len(data)
            position = rng.randrange(max(1, limit))
            data[position] ^= 1 << rng.randrange(8)
    elif kind == "vr" and elements:
        offset, _, _ = rng.choice(elements)
        data[offset + 4:offset + 6] = rng.choice([b"UN", b"SQ", b"OB", b"US", b"FD", b"UI", b"XX", b"\x00\x00"])
    elif kind == "length" and elements:
        offset, header, _ = rng.choice(elements)
        value = rng.choice([0, 1, 3, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, rng.randint(0, 1 << 20)])
        if header == 12:
            data[offset + 8:offset + 12] = (value & 0xFFFFFFFF).to_bytes(4, "little")
        else:
            data[offset + 6:offset + 8] = (value & 0xFFFF).to_bytes(2, "little")
    elif kind == "truncate":
        data = data[:rng.randint(0, max(1, len(data) - 1))]
    return kind, bytes(data), request_uid


def phase_fuzz(gate: GateProcess, args: argparse.Namespace, workdir: Path, rng: random.Random) -> dict[str, Any]:
    """--mutations mutated data sets, half from a valid CT and half from a valid SEG."""
    from qcgate.core.dicom import CT_IMAGE_STORAGE, SEGMENTATION_STORAGE

    ct, seg = _valid_bases(workdir, 32)
    tracebacks_before, crashes_before = gate.tracebacks(), gate.crashes
    payloads = []
    for index in range(args.mutations):
        base, sop_class, name = (ct, CT_IMAGE_STORAGE, "ct") if index % 2 == 0 else (seg, SEGMENTATION_STORAGE, "seg")
        kind, data, uid = mutate(base, rng)
        payloads.append((f"{name}:{kind}", data, sop_class, uid, EXPLICIT_VR_LE))
    started = time.perf_counter()
    tally = _send_and_tally(gate, RawSender(gate.port, workdir), payloads)
    seconds = time.perf_counter() - started
    acknowledged = list(tally["acknowledged"])
    sample = sorted(acknowledged) if len(acknowledged) <= args.check_sample else random.Random(args.seed).sample(sorted(acknowledged), args.check_sample)
    unprocessable = check_processable(gate, sample)
    stored, lost = check_stored(gate, set(acknowledged))
    statuses = tally["statuses"]
    by_kind = {label: dict(counts) for label, counts in sorted(tally["by_kind"].items())}
    return {"mutations": len(payloads), "seconds": round(seconds, 1), "statuses": dict(statuses), "by_kind": by_kind,
            "acknowledged": len(acknowledged), "stored_of_acknowledged": stored, "lost": len(lost),
            "a700": statuses.get("0xA700", 0), "c211_handler_raised": statuses.get("0xC211", 0), "no_answer": statuses.get("none", 0),
            "checked_for_processing": len(sample), "unprocessable_acknowledged": len(unprocessable),
            "unprocessable_examples": unprocessable[:10],
            "node_crashes": gate.crashes - crashes_before, "tracebacks": gate.tracebacks() - tracebacks_before,
            "node_answers_echo": gate.echo()}


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


def _traceback_excerpts(log: str, limit: int = 5) -> list[str]:
    """The first lines of up to ``limit`` tracebacks in the node's log, with the line before each."""
    lines = log.splitlines()
    excerpts = []
    for index, line in enumerate(lines):
        if line.lstrip().startswith("Traceback") and len(excerpts) < limit:
            excerpts.append("\n".join(lines[max(0, index - 1):index + 40]))
    return excerpts


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
                ("defects", lambda: phase_defects(gate, args, workdir)),
                ("fuzz", lambda: phase_fuzz(gate, args, workdir, random.Random(args.seed + 500))),
                ("abuse_sockets", lambda: phase_abuse_sockets(gate, args, workdir)),
            ]
            only = set(args.only.split(",")) if getattr(args, "only", None) else None
            for name, phase in phases:
                if only is not None and name not in only:
                    continue
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
            # in the abuse, defect and fuzz phases (what the goal counts); the whole log's count is
            # next: pynetdicom also logs a traceback when the flapping destination resets a delivery
            "tracebacks": sum(report["phases"].get(p, {}).get("tracebacks", 0) for p in ("defects", "fuzz", "abuse_sockets")),
            "tracebacks_whole_log": gate.tracebacks(),
            "a700_for_data_defects": sum(report["phases"].get(p, {}).get(k, 0) for p, k in (("defects", "a700_for_defects"), ("fuzz", "a700"))),
            "unprocessable_acknowledged": report["phases"].get("fuzz", {}).get("unprocessable_acknowledged", 0),
            "cases_by_state": dict(cases),
            "outputs_delivered_once": report["phases"].get("flapping_destination", {}).get("delivered_once"),
            "seconds": round(time.perf_counter() - started, 1),
        }
        report["crash_logs"] = gate.crash_logs
        report["traceback_excerpts"] = _traceback_excerpts(gate._log())
        if args.keep_log:
            args.keep_log.write_text(gate._log())
    return report


def print_summary(report: dict[str, Any]) -> None:
    totals = report["totals"]
    print(f"\nqcgate harness, seed {report['seed']}, {report['backend']}, pipeline.workers = {report['workers']}: "
          f"{totals['acknowledged']} instances acknowledged, {totals['lost']} lost, {totals['node_crashes']} node crashes, "
          f"{totals['node_starts']} starts, {totals['tracebacks']} tracebacks in abuse/defects/fuzz ({totals['tracebacks_whole_log']} in the whole log), {totals['a700_for_data_defects']} A700 for data defects, "
          f"{totals['unprocessable_acknowledged']} unprocessable acknowledged, {totals['seconds']} s")
    for name, phase in report["phases"].items():
        brief = {k: v for k, v in phase.items() if k not in ("lost_uids", "by_source", "by_kind", "by_defect")}
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
    parser.add_argument("--mutations", type=int, default=1000, help="mutated CT and SEG data sets for the fuzz phase")
    parser.add_argument("--check-sample", type=int, default=300, help="acknowledged fuzzed instances re-checked for processing")
    parser.add_argument("--aborts", type=int, default=20, help="transfers aborted mid-data-set")
    parser.add_argument("--idle-sockets", type=int, default=200)
    parser.add_argument("--slow-drip", type=int, default=20)
    parser.add_argument("--tls-silent", type=int, default=20, help="silent TCP peers while TLS is on")
    parser.add_argument("--backend", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--workers", type=int, default=0, help="pipeline.workers of the node (0: queue jobs only)")
    parser.add_argument("--time-limit", type=float, default=600.0, help="seconds; phases not started by then are skipped")
    parser.add_argument("--keep-log", type=Path, help="copy the node's log here at the end")
    parser.add_argument("--only", help="comma-separated phases to run (default: all)")
    parser.add_argument("--json", type=Path, help="also write the full report here")
    args = parser.parse_args(argv)
    report = run_harness(args)
    print_summary(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    totals = report["totals"]
    clean = not (totals["lost"] or totals["node_crashes"] or totals["tracebacks"] or totals["a700_for_data_defects"]
                 or totals["unprocessable_acknowledged"])
    return 0 if clean else 1


if __name__ == "__main__":
    raise SystemExit(main())
