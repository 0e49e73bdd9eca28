"""The dispatcher's local process pool: it names its workers through public APIs and kills them when replaced."""

from __future__ import annotations

import os
import time

from qcgate.config import Settings
from qcgate.pipeline.dispatcher import Dispatcher, LocalProcessPool


def _wait_for_workers(pool: LocalProcessPool, count: int, timeout: float = 60.0) -> list:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = pool.worker_processes()
        if len(workers) >= count:
            return workers
        time.sleep(0.05)
    raise AssertionError(f"fewer than {count} worker(s) reported within {timeout} s")


def test_the_local_pool_knows_its_worker_processes() -> None:
    pool = LocalProcessPool(1)
    try:
        pid = pool.submit(os.getpid).result(timeout=120)
        assert [process.pid for process in pool.worker_processes()] == [pid]
    finally:
        pool.shutdown(wait=True)
    assert pool.worker_processes() == []  # exited and reaped: nothing left to kill


def test_replacing_the_executor_kills_the_old_pools_workers() -> None:
    dispatcher = Dispatcher(Settings.model_validate({"pipeline": {"workers": 1}}), session_factory=None)  # type: ignore[arg-type]
    old = dispatcher.executor
    assert isinstance(old, LocalProcessPool)
    old.submit(time.sleep, 120)  # a job that overran its limit: a process pool cannot cancel it
    workers = _wait_for_workers(old, 1)
    dispatcher._replace_executor()
    try:
        # The pool's own manager thread may reap a killed worker at the same moment: poll, not one join.
        deadline = time.monotonic() + 30
        while any(process.is_alive() for process in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(process.is_alive() for process in workers)
        assert dispatcher.executor is not old and isinstance(dispatcher.executor, LocalProcessPool)
    finally:
        dispatcher.stop()
