"""No orphans: after `kill -9` of `qcgate serve`, none of its processes (QC pool workers, the
multiprocessing resource tracker) survives it, whether the pool was still starting or mid-job.
Checked by PID through /proc; anything left is killed by PID so a failure leaks nothing."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.pipeline.test_pipeline_e2e import StoreSCP, pacs, pipeline_gate, wait_until  # noqa: F401 (fixture)
from tests.support import storescu, write_lung2_case

EXIT_WITHIN_SECONDS = 5.0


def _alive(pid: int) -> bool:
    """Running, and not a zombie waiting for whoever adopted it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in {"Z", "X"}


def _descendants(root: int) -> dict[int, str]:
    """{pid: command line} of every live process below ``root``."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found: dict[int, str] = {}
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), []):
            try:
                found[child] = (Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                continue
            stack.append(child)
    return found


def _kill9_and_watch(gate) -> tuple[dict[int, str], float]:  # type: ignore[no-untyped-def]
    """kill -9 the gate; (its descendants just before, seconds until the last of them was gone)."""
    processes = _descendants(gate.process.pid)
    killed = time.monotonic()
    gate.kill9()
    try:
        while any(_alive(pid) for pid in processes) and time.monotonic() - killed < EXIT_WITHIN_SECONDS:
            time.sleep(0.05)
        elapsed = time.monotonic() - killed
        survivors = {pid: command for pid, command in processes.items() if _alive(pid)}
        assert not survivors, f"alive {EXIT_WITHIN_SECONDS} s after kill -9 of serve: {survivors}"
    finally:
        for pid in processes:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    return processes, elapsed


@pytest.mark.slow
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_kill9_of_serve_leaves_no_qc_process_while_starting_or_mid_job(make_gate, pacs: StoreSCP, tmp_path: Path) -> None:  # noqa: F811
    gate = pipeline_gate(make_gate, pacs, "phantom-full")
    ct_files, members = write_lung2_case(tmp_path / "lung2")
    assert storescu(gate.port, [*ct_files, *members]).returncode == 0
    # 1. while the pool is still starting: the job was just claimed, its worker is importing
    wait_until(lambda: gate.sql("SELECT state FROM jobs") == [("running",)], interval=0.05)
    processes, elapsed = _kill9_and_watch(gate)
    assert any("multiprocessing" in command for command in processes.values()), processes  # there was a worker
    print(f"pool starting: {len(processes)} process(es) {sorted(processes)} gone {elapsed:.2f} s after kill -9")
    # 2. mid-job: restarted, the job runs again (its dispatcher is gone on this host: no lease wait)
    gate.start()
    wait_until(lambda: gate.sql("SELECT state, attempts FROM jobs") == [("running", 2)], interval=0.1, timeout=60)
    time.sleep(3)  # the worker has imported and is inside the job
    processes, elapsed = _kill9_and_watch(gate)
    assert len(processes) >= 2, processes  # the resource tracker and the pool's worker
    print(f"mid-job: {len(processes)} process(es) {sorted(processes)} gone {elapsed:.2f} s after kill -9")
