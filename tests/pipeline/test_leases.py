"""Leases, fair claims and attempt caps: dispatchers on one database never take each other's jobs,
a job whose worker always dies fails after the cap while the jobs behind it run, and each job runs
under its memory limit.

Fault injection lives here, not in the product: the dispatcher takes any executor factory, and these
tests pass executors whose ``submit`` replaces the QC job with a stub (a thread that marks the job
done, or a pool worker process that dies or allocates too much).
"""

from __future__ import annotations

import datetime as dt
import multiprocessing
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from qcgate.config import Settings
from qcgate.pipeline.dispatcher import (
    Dispatcher,
    LocalProcessPool,
    claim_next_job,
    recover_interrupted_jobs,
    renew_leases,
)
from qcgate.store.database import create_db_engine, make_session_factory, upgrade_database
from qcgate.store.models import Case, Job, JobState, utcnow


@pytest.fixture
def database(db_url: str, tmp_path: Path) -> Any:
    url = db_url or f"sqlite:///{tmp_path / 'jobs.db'}"
    engine = create_db_engine(url)
    upgrade_database(engine)
    yield url, make_session_factory(engine)
    engine.dispose()


def _settings(url: str, **pipeline: Any) -> Settings:
    return Settings.model_validate({
        "database": {"url": url},
        "assembly": {"poll_interval_seconds": pipeline.pop("poll", 0.05)},
        "pipeline": {"workers": 1, "heartbeat_seconds": 0.2, "lease_seconds": 1.0, **pipeline},
    })


def _add_jobs(session_factory: Any, n: int, **values: Any) -> list[int]:
    ids = []
    with session_factory() as session, session.begin():
        for _ in range(n):
            case = Case(study_instance_uid="1.2.3", ct_series_uid=f"1.2.3.{os.urandom(4).hex()}", state="ready")
            session.add(case)
            session.flush()
            job = Job(case_id=case.id, kind="qc", **{"state": JobState.PENDING.value, **values})
            session.add(job)
            session.flush()
            ids.append(job.id)
    return ids


def _job(session_factory: Any, job_id: int) -> Job:
    with session_factory() as session:
        return session.get(Job, job_id)


def _wait(predicate: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)
    return value


def _finish(url: str, job_id: int, token: str) -> dict[str, Any]:
    """Stub QC job: mark the job (and its case) done while it still carries ``token``."""
    engine = create_db_engine(url)
    try:
        with make_session_factory(engine)() as session, session.begin():
            job = session.get(Job, job_id)
            if job.state != JobState.RUNNING.value or job.worker != token:
                return {"state": "not-owner"}
            job.state, job.finished_at = JobState.DONE.value, utcnow()
            session.execute(update(Case).where(Case.id == job.case_id).values(state="done"))
        return {"state": "done"}
    finally:
        engine.dispose()


class StubThreads(ThreadPoolExecutor):
    """An executor whose jobs wait for ``release`` (when given), then finish as the stub."""

    def __init__(self, workers: int, url: str, release: threading.Event | None = None) -> None:
        super().__init__(workers)
        self.url, self.release = url, release

    def submit(self, fn: Any, job_id: int, settings_json: str, token: str) -> Any:  # type: ignore[override]
        def job() -> dict[str, Any]:
            if self.release is not None:
                self.release.wait(60)
            return _finish(self.url, job_id, token)
        return super().submit(job)


# -- claims and recovery -----------------------------------------------------------------------


def test_a_claim_takes_a_lease_and_heartbeats_extend_it(database: Any) -> None:
    url, session_factory = database
    [job_id] = _add_jobs(session_factory, 1)
    claimed_id, token = claim_next_job(session_factory, lease_seconds=30)
    job = _job(session_factory, job_id)
    assert claimed_id == job_id and job.state == "running" and job.attempts == 1 and job.worker == token
    assert job.worker_host == socket.gethostname() and job.heartbeat_at is not None
    assert 29 <= (job.lease_until - job.heartbeat_at).total_seconds() <= 31
    time.sleep(0.05)
    assert renew_leases(session_factory, [token], 120) == 1
    assert _job(session_factory, job_id).lease_until > job.lease_until + dt.timedelta(seconds=80)
    assert renew_leases(session_factory, ["someone-else"], 120) == 0


def test_recovery_requeues_only_jobs_whose_owner_is_gone(database: Any) -> None:
    url, session_factory = database
    now = utcnow()
    host = socket.gethostname()
    later, earlier = now + dt.timedelta(seconds=60), now - dt.timedelta(seconds=1)
    finished = multiprocessing.get_context("spawn").Process(target=int)
    finished.start()
    finished.join()  # its PID is now free: a dispatcher that died on this host
    running = {"state": "running", "attempts": 1}
    live_elsewhere, expired, dead_here, alive_here, at_cap = (
        _add_jobs(session_factory, 1, worker="other-host:1:a", worker_host="other-host", lease_until=later, **running)[0],
        _add_jobs(session_factory, 1, worker="other-host:2:b", worker_host="other-host", lease_until=earlier, **running)[0],
        _add_jobs(session_factory, 1, worker=f"{host}:{finished.pid}:c", worker_host=host, lease_until=later, **running)[0],
        _add_jobs(session_factory, 1, worker=f"{host}:{os.getpid()}:d", worker_host=host, lease_until=later, **running)[0],
        _add_jobs(session_factory, 1, worker="other-host:3:e", worker_host="other-host", lease_until=earlier,
                  state="running", attempts=3, error="attempt 1: lost its dispatcher (x); attempt 2: lost its dispatcher (y)")[0],
    )
    assert recover_interrupted_jobs(session_factory, max_attempts=3) == 3
    states = {job_id: (_job(session_factory, job_id).state, _job(session_factory, job_id).attempts)
              for job_id in (live_elsewhere, expired, dead_here, alive_here, at_cap)}
    assert states == {live_elsewhere: ("running", 1), expired: ("pending", 1), dead_here: ("pending", 1),
                      alive_here: ("running", 1), at_cap: ("failed", 3)}
    assert "lease expired" in _job(session_factory, expired).error
    assert f"pid {finished.pid} on this host" in _job(session_factory, dead_here).error
    failed = _job(session_factory, at_cap)
    assert failed.error.startswith("lost its dispatcher 3 times (attempt cap 3)")
    with session_factory() as session:
        assert session.scalar(select(Case.state).where(Case.id == failed.case_id)) == "failed"


def test_claims_take_the_least_tried_job_first(database: Any) -> None:
    url, session_factory = database
    tried_twice = _add_jobs(session_factory, 1, attempts=2)[0]
    fresh = _add_jobs(session_factory, 2)
    order = [claim_next_job(session_factory)[0] for _ in range(3)]
    assert order == [*fresh, tried_twice]
    assert claim_next_job(session_factory) is None


def test_a_restarted_dispatcher_leaves_the_other_dispatchers_job_alone(database: Any) -> None:
    url, session_factory = database
    [job_id] = _add_jobs(session_factory, 1)
    release = threading.Event()
    settings = _settings(url)
    runner = Dispatcher(settings, session_factory, lambda n: StubThreads(n, url, release))
    runner.start()
    try:
        _wait(lambda: _job(session_factory, job_id).state == "running")
        token = _job(session_factory, job_id).worker
        # The other machine: started, stopped, started again, and left running past the lease.
        other = Dispatcher(settings, session_factory, lambda n: StubThreads(n, url))
        other.start()
        time.sleep(0.5)
        other.stop()
        other = Dispatcher(settings, session_factory, lambda n: StubThreads(n, url))
        other.start()
        time.sleep(2 * settings.pipeline.lease_seconds)  # heartbeats keep the lease alive meanwhile
        job = _job(session_factory, job_id)
        assert (job.state, job.attempts, job.worker) == ("running", 1, token)
        release.set()
        _wait(lambda: _job(session_factory, job_id).state == "done")
        assert _job(session_factory, job_id).attempts == 1
        other.stop()
    finally:
        release.set()
        runner.stop()


def test_a_dead_dispatchers_job_moves_to_a_live_one_after_its_lease(database: Any) -> None:
    url, session_factory = database
    [job_id] = _add_jobs(session_factory, 1, state="running", attempts=1, worker="gone-host:7:x", worker_host="gone-host",
                         lease_until=utcnow() + dt.timedelta(seconds=1))
    dispatcher = Dispatcher(_settings(url), session_factory, lambda n: StubThreads(n, url))
    dispatcher.start()
    try:
        assert _job(session_factory, job_id).state == "running"  # lease still current at start
        _wait(lambda: _job(session_factory, job_id).state == "done", timeout=10)
        job = _job(session_factory, job_id)
        assert job.attempts == 2 and "lease expired" in job.error
    finally:
        dispatcher.stop()


@pytest.mark.parametrize("db_url", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True)
def test_postgres_listeners_wake_on_notify_long_before_the_poll(database: Any) -> None:
    from qcgate.pipeline.notify import notify_job_pending

    url, session_factory = database
    dispatcher = Dispatcher(_settings(url, poll=60.0), session_factory, lambda n: StubThreads(n, url))
    dispatcher.start()
    try:
        time.sleep(1.5)  # past the first pass and the listener's first wake-up: idle until the poll
        with session_factory() as session, session.begin():
            case = Case(study_instance_uid="1.2.3", ct_series_uid="1.2.3.4", state="ready")
            session.add(case)
            session.flush()
            session.add(Job(case_id=case.id, kind="qc", state="pending"))
            notify_job_pending(session)
        created = time.monotonic()
        _wait(lambda: _job(session_factory, 1).state == "done", timeout=10)
        assert time.monotonic() - created < 5
    finally:
        dispatcher.stop()


# -- attempt caps and memory limits (real pool processes) -----------------------------------------


def _stub_job(url: str, job_id: int, token: str, poison: int, delay: float) -> dict[str, Any]:
    from qcgate.pipeline import lifeline

    lifeline._reports.put(("job", job_id, os.getpid()))  # as lifeline.run_job does for a real job
    time.sleep(delay)
    if job_id == poison:
        os._exit(1)  # what an out-of-memory kill or a crash in native code looks like to the pool
    return _finish(url, job_id, token)


def _allocate(megabytes: int) -> None:
    bytearray(megabytes * 1024 * 1024)


class FaultyPool(LocalProcessPool):
    """A real local pool (memory limit, parent watch) whose jobs are stubs: the ``poison`` job's
    worker exits abruptly (after ``delay`` s), the ``hog`` job allocates 2 GB, the rest finish."""

    def __init__(self, workers: int, url: str, poison: int = -1, hog: int = -1, delay: float = 0.0, memory_limit_mb: int = 0) -> None:
        super().__init__(workers, memory_limit_mb)
        self.url, self.poison, self.hog, self.delay = url, poison, hog, delay

    def submit(self, fn: Any, job_id: int, settings_json: str, token: str) -> Any:  # type: ignore[override]
        if job_id == self.hog:
            return super().submit(_allocate, 2 * 1024)
        return super().submit(_stub_job, self.url, job_id, token, self.poison, self.delay)


@pytest.mark.slow
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_job_whose_worker_always_dies_fails_at_the_cap_and_the_next_job_runs(database: Any) -> None:
    url, session_factory = database
    poison, behind = _add_jobs(session_factory, 2)
    settings = _settings(url, max_job_attempts=3)
    dispatcher = Dispatcher(settings, session_factory, lambda n: FaultyPool(n, url, poison=poison))
    dispatcher.start()
    try:
        _wait(lambda: _job(session_factory, poison).state == "failed", timeout=120)
        # Claimed by fewest attempts: the job behind ran right after the poison job's first death.
        assert _job(session_factory, behind).state == "done" and _job(session_factory, behind).attempts == 1
        job = _job(session_factory, poison)
        assert job.attempts == 3
        assert job.error.startswith("the worker died 3 times (attempt cap 3); last: its worker process exited with code 1"), job.error
        with session_factory() as session:
            assert session.get(Case, job.case_id).reason == job.error
    finally:
        dispatcher.stop()


@pytest.mark.slow
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_job_caught_in_another_jobs_worker_death_is_not_charged(database: Any) -> None:
    url, session_factory = database
    innocent, poison = _add_jobs(session_factory, 2)
    settings = _settings(url, workers=2, max_job_attempts=3)
    dispatcher = Dispatcher(settings, session_factory, lambda n: FaultyPool(n, url, poison=poison, delay=1.5))
    dispatcher.start()
    try:
        _wait(lambda: _job(session_factory, poison).state == "failed", timeout=120)
        _wait(lambda: _job(session_factory, innocent).state == "done", timeout=60)
        assert _job(session_factory, innocent).attempts == 1  # handed back each time, never charged
        assert _job(session_factory, poison).error.startswith("the worker died 3 times")
    finally:
        dispatcher.stop()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_job_past_the_memory_limit_fails_with_the_reason(database: Any) -> None:
    url, session_factory = database
    hog, behind = _add_jobs(session_factory, 2)
    settings = _settings(url, job_memory_limit_mb=1024)
    dispatcher = Dispatcher(settings, session_factory, lambda n: FaultyPool(n, url, hog=hog, memory_limit_mb=1024))
    dispatcher.start()
    try:
        _wait(lambda: _job(session_factory, behind).state == "done", timeout=60)
        job = _job(session_factory, hog)
        assert (job.state, job.error, job.attempts) == ("failed", "exceeded the memory limit of 1024 MB", 1)
    finally:
        dispatcher.stop()


def test_the_pool_workers_run_under_the_memory_limit() -> None:
    import resource

    pool = LocalProcessPool(1, memory_limit_mb=1536)
    try:
        soft, _ = pool.submit(resource.getrlimit, resource.RLIMIT_AS).result(timeout=60)
        assert soft == 1536 * 1024 * 1024
        with pytest.raises(MemoryError):
            pool.submit(_allocate, 2048).result(timeout=60)
        assert pool.submit(os.getpid).result(timeout=60)  # a MemoryError does not break the pool
    finally:
        pool.shutdown(wait=True)


def test_a_memory_error_in_a_real_job_is_recorded_as_the_limit(database: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from qcgate.pipeline import worker

    url, session_factory = database
    [job_id] = _add_jobs(session_factory, 1)
    _, token = claim_next_job(session_factory)

    def too_big(paths: Any) -> Any:
        raise MemoryError

    monkeypatch.setattr(worker, "load_ct_series", too_big)
    settings = Settings.model_validate({"database": {"url": url}, "storage": {"data_dir": str(tmp_path)},
                                        "pipeline": {"job_memory_limit_mb": 2048}})
    summary = worker._run(job_id, settings, session_factory, tmp_path, worker.StageTimer(), token)
    assert summary["error"] == "exceeded the memory limit of 2048 MB"
    assert _job(session_factory, job_id).state == "failed"


def test_migration_0006_adds_and_removes_only_the_lease_columns(db_url: str, tmp_path: Path) -> None:
    from sqlalchemy import inspect

    from qcgate.store.database import downgrade_database

    url = db_url or f"sqlite:///{tmp_path / 'migrate.db'}"
    engine = create_db_engine(url)
    try:
        upgrade_database(engine, "0005")

        def columns() -> set[str]:
            return {column["name"] for column in inspect(engine).get_columns("jobs")}

        before = columns()
        upgrade_database(engine, "0006")
        assert columns() - before == {"worker_host", "heartbeat_at", "lease_until"}
        downgrade_database(engine, "0005")
        assert columns() == before
    finally:
        engine.dispose()


def test_a_job_that_keeps_timing_out_fails_at_the_cap_with_the_tally(database: Any) -> None:
    url, session_factory = database
    [job_id] = _add_jobs(session_factory, 1)
    never = threading.Event()
    settings = _settings(url, job_timeout_seconds=0.5, max_job_attempts=2)
    dispatcher = Dispatcher(settings, session_factory, lambda n: StubThreads(n, url, never))
    dispatcher.start()
    try:
        _wait(lambda: _job(session_factory, job_id).state == "failed", timeout=20)
        job = _job(session_factory, job_id)
        assert job.attempts == 2
        assert job.error == "timed out 2 times (attempt cap 2); last: time limit of 0.5 s exceeded", job.error
    finally:
        never.set()
        dispatcher.stop()
