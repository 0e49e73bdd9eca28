"""Scale-out on one PostgreSQL database and one data directory: `qcgate serve` receives, queues,
routes and delivers; three `qcgate worker` processes run the QC jobs and deliver too
(``worker.deliver``, under leases). One worker is killed (`kill -9`) mid-job and another started:
every case ends done, each output reaches the PACS (DCMTK storescp) exactly once, counted by SOP
Instance UID, the killed worker's job runs once more and no job that ran on a live worker runs twice
(its attempts stay 1). A worker whose destination differs from serve's refuses to start, naming it.

Every process a test starts runs in its own session (process group) and is stopped by PID; the tests
assert that none of them, nor any of their children, remains.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from tests.conftest import write_config
from tests.pipeline.test_orphans import _alive, _descendants
from tests.pipeline.test_pipeline_e2e import (
    SEG_CLASS,
    SR_CLASS,
    StoreSCP,
    pipeline_gate,
    wait_until,
)
from tests.support import dcmtk_env, storescu, write_phantom_case

LEASES = {"heartbeat_seconds": 1.0, "lease_seconds": 5.0}
DELIVERY_LEASES = {"heartbeat_seconds": 0.5, "lease_seconds": 3.0}


def worker_config(gate: Any, path: Path, **delivery: Any) -> Path:
    """serve's settings file for a `qcgate worker` that delivers too; ``delivery`` overrides keys
    (the poll interval is not a shared setting; a destination is)."""
    config = tomllib.loads(gate.config_path.read_text())
    config["delivery"] = {**config["delivery"], **delivery}
    config["worker"] = {"deliver": True}
    write_config(path, config)
    return path


class EveryArrivalSCP(StoreSCP):
    """DCMTK storescp keeping every arrival in its own file (``+uf``): an instance sent twice is two
    files, where the default names would overwrite the first copy and hide the duplicate."""

    def start(self) -> EveryArrivalSCP:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(["storescp", "-aet", "PACS", "+uf", "-od", str(self.folder), str(self.port)],
                                        env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        return self


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[StoreSCP]:
    scp = EveryArrivalSCP(tmp_path / "pacs").start()
    yield scp
    scp.stop()


class Processes:
    """Subprocesses started by a test, each in its own session; remembers every PID below them."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.started: dict[str, subprocess.Popen[bytes]] = {}
        self.seen: dict[int, str] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.folder / f"{name}.log", "ab")  # noqa: SIM115 - the child holds it
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.folder,
                                   env=None if env is None else {**os.environ, **env})
        log.close()
        self.started[name] = process
        self.seen[process.pid] = " ".join(argv)
        return process

    def log(self, name: str) -> str:
        path = self.folder / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def note(self) -> None:
        """Remember every live descendant (a pool worker, a resource tracker) of what we started."""
        for process in self.started.values():
            self.seen.update(_descendants(process.pid))

    def kill9(self, name: str) -> dict[int, str]:
        """``kill -9`` of one process by PID (not its group); its descendants just before."""
        process = self.started[name]
        self.note()
        below = _descendants(process.pid)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        return below

    def stop_all(self, timeout: float = 20.0) -> dict[int, str]:
        """SIGTERM each process group, SIGKILL what is left; {pid: command} of survivors (killed)."""
        self.note()
        for process in self.started.values():
            if process.poll() is None:
                _signal_group(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in self.started.values():
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                print(f"pid {process.pid} ({self.seen[process.pid]}) ignored SIGTERM for {timeout:g} s: SIGKILL")
                _signal_group(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        deadline = time.monotonic() + 5
        while any(_alive(pid) for pid in self.seen) and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = {pid: command for pid, command in self.seen.items() if _alive(pid)}
        for pid in survivors:
            os.kill(pid, signal.SIGKILL)
        return survivors


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


def send_cases(port: int, folder: Path, n: int) -> list[list[Path]]:
    cases = []
    for index in range(n):
        ct_files, members = write_phantom_case(folder / f"case{index}", seed=11 + index)
        assert storescu(port, [*ct_files, *members]).returncode == 0
        cases.append(ct_files)
    return cases


def check_each_output_delivered_once(gate: Any, pacs: StoreSCP, n_cases: int) -> None:
    """n_cases SEG + SR at the PACS, each SOP instance once, each the one the database recorded."""
    wait_until(lambda: len(pacs.received()) >= 2 * n_cases and all(
        d["state"] == "sent" for d in gate.audit_deliveries()), timeout=60)
    time.sleep(1.5)  # nothing more may arrive
    received = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(pacs.folder.iterdir()) if p.is_file()]
    uids = sorted(str(ds.SOPInstanceUID) for ds in received)
    assert len(uids) == len(set(uids)) == 2 * n_cases, uids
    assert sorted(str(ds.SOPClassUID) for ds in received) == sorted([SEG_CLASS, SR_CLASS] * n_cases)
    recorded = sorted(uid for (uid,) in gate.sql("SELECT sop_instance_uid FROM outputs WHERE sop_instance_uid IS NOT NULL"))
    assert recorded == uids
    assert gate.sql("SELECT count(*) FROM deliveries WHERE state = 'sent'") == [(2 * n_cases,)]
    assert gate.sql("SELECT count(*) FROM delivery_attempts WHERE outcome = 'sent'") == [(2 * n_cases,)]
    assert gate.sql("SELECT count(*) FROM jobs WHERE state = 'done'") == [(n_cases,)]


def running_jobs(gate: Any) -> list[tuple[int, str, int]]:
    """(job id, claim token, attempts) of the running jobs."""
    return [(int(i), str(w), int(a)) for i, w, a in gate.sql("SELECT id, worker, attempts FROM jobs WHERE state = 'running' ORDER BY id")]


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(240)
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_three_workers_and_serve_share_one_database_and_a_killed_workers_job_runs_once_more(
        make_gate: Any, pacs: StoreSCP, tmp_path: Path) -> None:
    started = time.monotonic()
    # serve: receive, queue, route, deliver; the workers run jobs and deliver (polling faster, so they
    # send most deliveries: any node delivers).
    gate = pipeline_gate(make_gate, pacs, "phantom-full", pipeline={"workers": 0, **LEASES}, delivery=DELIVERY_LEASES)
    processes = Processes(tmp_path)
    config = worker_config(gate, tmp_path / "worker.toml", poll_interval_seconds=0.05)
    worker = [sys.executable, "-m", "qcgate.cli", "worker", "--config", str(config), "--workers", "1"]
    n_cases = 3
    try:
        for index in range(3):
            processes.start(f"worker{index}", worker)
        elsewhere = worker_config(gate, tmp_path / "elsewhere.toml", destinations=["PACS@127.0.0.1:1"])
        refused = processes.start("refused", [*worker[:4], "--config", str(elsewhere), "--workers", "1"])
        assert refused.wait(timeout=60) == 2
        assert "delivery.destination['PACS@127.0.0.1:1']: only in this node" in processes.log("refused"), processes.log("refused")
        send_cases(gate.port, tmp_path / "input", n_cases)
        pids = {name: process.pid for name, process in processes.started.items()}

        def victim() -> tuple[int, str, str] | None:
            # A job that has been running a second on one of our workers (its token names the pid).
            for job_id, token, _ in running_jobs(gate):
                pid = int(token.split(":")[1])
                age = gate.sql(f"SELECT extract(epoch FROM now() - started_at) FROM jobs WHERE id = {job_id}")[0][0]
                name = next((n for n, p in pids.items() if p == pid), None)
                if name is not None and float(age) >= 1.0:
                    return job_id, token, name
            return None

        killed_job, _, killed_name = wait_until(victim, timeout=90, interval=0.2)
        others = [(job_id, token) for job_id, token, _ in running_jobs(gate) if job_id != killed_job]
        below = processes.kill9(killed_name)
        assert below, "the killed worker had a QC pool process"
        wait_until(lambda: not any(_alive(pid) for pid in below), timeout=5, interval=0.05)  # no orphan
        print(f"killed {killed_name} (pid {pids[killed_name]}) running job {killed_job}; its pool {sorted(below)} gone; "
              f"running on live workers then: {others}")
        processes.start("worker3", worker)

        wait_until(lambda: gate.sql("SELECT count(*) FROM cases WHERE state = 'done'") == [(n_cases,)], timeout=120)
        assert gate.sql("SELECT count(*) FROM cases WHERE state <> 'done'") == [(0,)]
        check_each_output_delivered_once(gate, pacs, n_cases)
        senders = [str(token).split(":")[1] for (token,) in gate.sql("SELECT sender FROM delivery_attempts WHERE outcome = 'sent'")]
        names = {str(p.pid): n for n, p in processes.started.items()} | {str(gate.process.pid): "serve"}
        by_node = {name: sum(names.get(pid) == name for pid in senders) for name in names.values()}
        assert sum(by_node.values()) == 2 * n_cases and by_node["serve"] < 2 * n_cases, by_node  # the workers delivered too
        assert gate.sql("SELECT count(*) FROM deliveries WHERE sender IS NOT NULL OR lease_until IS NOT NULL") == [(0,)]  # no lease left
        print(f"sent by {by_node}")
        attempts = dict(gate.sql("SELECT id, attempts FROM jobs"))
        assert attempts[killed_job] == 2, attempts
        assert all(attempts[job_id] == 1 for job_id in attempts if job_id != killed_job), attempts
        error = gate.sql(f"SELECT error FROM jobs WHERE id = {killed_job}")[0][0]
        assert error is None  # a done job keeps no error; the re-queue is in the live worker's log
        assert any(f"job {killed_job} re-queued after attempt 1: lost its dispatcher" in processes.log(name)
                   for name in processes.started), [processes.log(n)[-2000:] for n in processes.started]
        print(f"attempts {attempts}; {time.monotonic() - started:.1f} s")
    finally:
        gate.stop()
        survivors = processes.stop_all()
        processes.seen[gate.process.pid] = "qcgate serve"
    assert not survivors, f"still running after the test: {survivors}"
    assert not any(_alive(pid) for pid in processes.seen), processes.seen
    print(f"{len(processes.seen)} processes started or seen, none left: {sorted(processes.seen)}")
