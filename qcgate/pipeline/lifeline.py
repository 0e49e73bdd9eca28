"""The first code a local pool's worker process runs: a parent-death watch and the memory limit.

Standard library only: the pool pickles :func:`init_worker` by reference, so a spawned worker imports
this module (not numpy, SQLAlchemy or the model) before the watch is armed, and the heavy imports
happen afterwards, when the first job arrives. ``PR_SET_PDEATHSIG`` is not used: it fires when the
*thread* that forked the worker exits, and a worker armed after its parent already died never gets
it. Instead a daemon thread waits on the parent's sentinel (a pipe whose other end only the parent
holds: EOF means the parent is gone, however it died and whichever thread started the worker) and
also compares ``os.getppid()`` with the parent's PID once a second; either way the worker exits at
once. A parent that died before the watch was armed is noticed immediately.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import threading
from typing import Any

PARENT_GONE_EXIT_CODE = 75  # EX_TEMPFAIL: the worker left because its dispatcher process died
_PARENT_CHECK_SECONDS = 1.0
_MEGABYTE = 1024 * 1024

_reports: Any = None  # the pool's report queue, in a worker process of a LocalProcessPool


def _watch_parent(parent_pid: int, sentinel: int | None) -> None:
    from multiprocessing.connection import wait

    while True:
        if sentinel is not None and wait([sentinel], timeout=_PARENT_CHECK_SECONDS):
            os._exit(PARENT_GONE_EXIT_CODE)  # no clean-up: its queues lead to a dead process
        if os.getppid() != parent_pid:
            os._exit(PARENT_GONE_EXIT_CODE)
        if sentinel is None:
            threading.Event().wait(_PARENT_CHECK_SECONDS)


def arm_parent_watch() -> None:
    """Exit this process as soon as the process that started it dies."""
    parent = multiprocessing.parent_process()
    parent_pid = parent.pid if parent is not None and parent.pid is not None else os.getppid()
    sentinel = getattr(parent, "sentinel", None) if parent is not None else None
    threading.Thread(target=_watch_parent, args=(parent_pid, sentinel), name="qcgate-parent-watch", daemon=True).start()


def limit_memory(limit_mb: int) -> None:
    """Cap this process's address space (RLIMIT_AS): an allocation past it raises MemoryError."""
    if limit_mb <= 0:
        return
    wanted = limit_mb * _MEGABYTE
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        wanted = min(wanted, hard)
    resource.setrlimit(resource.RLIMIT_AS, (wanted, hard))


def init_worker(reports: Any, memory_limit_mb: int) -> None:
    """Pool initializer: arm the parent watch first, then the memory limit, then report this
    worker's PID to the pool (before it can run any job)."""
    global _reports
    arm_parent_watch()
    limit_memory(memory_limit_mb)
    _reports = reports
    reports.put(("worker", os.getpid()))


def run_job(job_id: int, settings_json: str, token: str | None = None) -> dict[str, Any]:
    """Executor entry point: tell the pool which worker runs ``job_id``, then run it."""
    if _reports is not None:
        _reports.put(("job", job_id, os.getpid()))
    from qcgate.pipeline.worker import run_qc_job

    return run_qc_job(job_id, settings_json, token)
