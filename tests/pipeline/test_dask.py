"""A Dask distributed cluster as the executor of `qcgate serve` (``pipeline.executor = "dask://…"``).

The test starts a real cluster of separate processes (`dask scheduler` and two `dask worker`s, one
thread each, no nanny) and a gate on PostgreSQL whose dispatcher submits to it. Several cases are
processed; one Dask worker is killed (SIGKILL by PID) mid-job: Dask would re-run that task on the
other worker, the task refuses (one run per claim), the dispatcher counts the death in SQL and
re-queues the job, which then runs once more; every output reaches the PACS exactly once. The warm
model cache of a Dask worker is checked in that worker. No process of the test remains.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from qcgate.config import PipelineSettings
from tests.pipeline.test_orphans import _alive
from tests.pipeline.test_pipeline_e2e import StoreSCP, pacs, pipeline_gate, wait_until  # noqa: F401 (fixture)
from tests.pipeline.test_scale_out import LEASES, Processes, check_each_output_delivered_once, send_cases
from tests.support import free_port


def _distributed() -> Any:
    try:
        import distributed
    except ImportError:
        if os.environ.get("QCGATE_REQUIRE_POSTGRES"):  # CI (.ci/run) installs .[test,dask]
            pytest.fail("the distributed package is required here: pip install -e '.[test,dask]'")
        pytest.skip("distributed not installed (pip install -e '.[dask]')")
    return distributed


def _model_in_cache(name: str) -> tuple[int, bool, int]:
    """In a Dask worker: (pid, whether a job already loaded ``name`` here, id of the model object)."""
    from qcgate.pipeline import worker

    cached = name in worker._MODEL_CACHE
    return os.getpid(), cached, id(worker.load_threshold_model(name))


@pytest.mark.parametrize("value", ["dask://sched:8786", "dask://10.0.0.5:8786", "local"])
def test_the_executor_setting_accepts_local_and_a_dask_scheduler(value: str) -> None:
    assert PipelineSettings(executor=value).executor == value


@pytest.mark.parametrize("value", ["dask", "dask://sched", "tcp://sched:8786", "dask://sched:99999", "dask:///x:1", "pool"])
def test_a_bad_executor_is_named(value: str) -> None:
    with pytest.raises(ValueError, match="dask://HOST:PORT"):
        PipelineSettings(executor=value)


def test_a_task_whose_claim_is_lost_ends_its_dask_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The claim watch: quiet while the job runs under its token or just recorded its own ending;
    ends the process once the job was re-queued (lease expired, timed out, dispatcher stopped)."""
    import threading

    from sqlalchemy import update

    from qcgate.pipeline import dask_executor
    from qcgate.store.database import create_db_engine, make_session_factory, upgrade_database
    from qcgate.store.models import Case, Job

    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    engine = create_db_engine(url)
    upgrade_database(engine)
    sessions = make_session_factory(engine)
    with sessions() as session, session.begin():
        case = Case(study_instance_uid="1.2", ct_series_uid="1.2.3", state="ready")
        session.add(case)
        session.flush()
        session.add(Job(case_id=case.id, state="running", worker="me", attempts=1))
    exits: list[int] = []

    def fake_exit(code: int) -> None:
        exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(dask_executor.os, "_exit", fake_exit)

    def watch(finished: threading.Event) -> threading.Thread:
        thread = threading.Thread(target=dask_executor._watch_claim, args=(1, "me", url, 0.2, finished), daemon=True)
        thread.start()
        return thread

    finished = threading.Event()
    thread = watch(finished)
    time.sleep(0.5)
    with sessions() as session, session.begin():  # the run records its own ending, then returns
        session.execute(update(Job).values(state="done"))
    time.sleep(0.05)
    finished.set()
    thread.join(5)
    assert exits == []
    with sessions() as session, session.begin():  # re-queued under the run's feet
        session.execute(update(Job).values(state="pending"))
    thread = watch(threading.Event())
    thread.join(5)
    assert exits == [dask_executor.CLAIM_LOST_EXIT_CODE]
    engine.dispose()


def test_dask_endings_reach_the_dispatcher_as_deaths_and_losses(monkeypatch: pytest.MonkeyPatch) -> None:
    """KilledWorker (the scheduler gave up) and a refused re-run are deaths; a dropped task is a loss."""
    from concurrent.futures import CancelledError, Future
    from types import SimpleNamespace

    _distributed()
    from distributed import KilledWorker

    from qcgate.pipeline.dask_executor import DaskExecutor, DaskJobLost, DaskWorkerDied

    class Done:
        def __init__(self, exc: BaseException) -> None:
            self.exc = exc

        def result(self) -> Any:
            raise self.exc

    from qcgate.pipeline import dask_executor

    monkeypatch.setattr(dask_executor, "_CONNECT_TIMEOUT_SECONDS", 1.0)
    executor = DaskExecutor("dask://127.0.0.1:1")
    for raised, expected in [(KilledWorker("k", SimpleNamespace(address="tcp://10.0.0.9:4000"), 0), DaskWorkerDied), (DaskWorkerDied("x"), DaskWorkerDied),
                             (CancelledError(), DaskJobLost), (OSError("x"), OSError)]:
        future: Future[Any] = Future()
        executor._settle("k", Done(raised), future)
        with pytest.raises(expected):
            future.result()
    assert executor.capacity() == 0  # no scheduler there: nothing is claimed, jobs wait in SQL
    executor.shutdown()


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(240)
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_dask_cluster_runs_the_jobs_and_a_killed_workers_job_runs_once_more(make_gate: Any, pacs: StoreSCP, tmp_path: Path) -> None:  # noqa: F811
    distributed = _distributed()
    started = time.monotonic()
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    dask = str(Path(sys.executable).with_name("dask"))
    processes = Processes(tmp_path)
    # The scheduler unpickles each task's function by reference: qcgate (and, for the cache check
    # below, this test module) must be importable by the scheduler and the workers.
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    client = None
    gate = None
    n_cases = 3
    try:
        processes.start("scheduler", [dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"], env)
        for index in range(2):
            processes.start(f"dask-worker{index}", [dask, "worker", address, "--nthreads", "1", "--no-nanny", "--no-dashboard",
                                                     "--name", f"w{index}", "--host", "127.0.0.1"], env)
        client = distributed.Client(address, timeout=30, set_as_default=False)
        client.wait_for_workers(2, timeout=60)
        workers = client.run(os.getpid)  # {address: pid}
        print(f"cluster up in {time.monotonic() - started:.1f} s: scheduler pid {processes.started['scheduler'].pid}, workers {workers}")
        ours = {p.pid for n, p in processes.started.items() if n.startswith("dask-worker")}
        assert set(workers.values()) == ours, (workers, ours)

        gate = pipeline_gate(make_gate, pacs, "phantom-full",
                             pipeline={"executor": f"dask://127.0.0.1:{port}", "workers": 1, **LEASES})
        send_cases(gate.port, tmp_path / "input", n_cases)

        def victim() -> tuple[str, int] | None:
            # A qcgate job that a Dask worker has been processing for over a second, still running in SQL.
            for addr, keys in client.processing().items():
                for key in keys:
                    job_id = int(str(key).split("-")[2])
                    age = gate.sql(f"SELECT extract(epoch FROM now() - started_at) FROM jobs WHERE id = {job_id} AND state = 'running'")
                    if age and float(age[0][0]) >= 1.0:
                        return addr, job_id
            return None

        addr, killed_job = wait_until(victim, timeout=90, interval=0.2)
        killed_pid = workers[addr]
        name = next(n for n, p in processes.started.items() if p.pid == killed_pid)
        processes.kill9(name)
        print(f"killed Dask worker {addr} (pid {killed_pid}) mid-job {killed_job}")

        wait_until(lambda: gate.sql("SELECT count(*) FROM cases WHERE state = 'done'") == [(n_cases,)], timeout=120)
        check_each_output_delivered_once(gate, pacs, n_cases)
        attempts = dict(gate.sql("SELECT id, attempts FROM jobs"))
        assert attempts[killed_job] == 2, attempts
        assert all(attempts[job_id] == 1 for job_id in attempts if job_id != killed_job), attempts
        log = gate.log_text()
        # Dask re-ran the task on the survivor; the task refused (one run per claim) and SQL counted the death.
        assert f"job {killed_job} re-queued after attempt 1: the worker died (its Dask worker {addr} died mid-job" in log, log[-3000:]
        assert "refused: one run per claim" in log

        # Warm models: the surviving worker ran jobs and kept the model they loaded.
        survivor = next(a for a in workers if a != addr)
        first = client.submit(_model_in_cache, "phantom-full", workers=[survivor], pure=False).result(timeout=60)
        second = client.submit(_model_in_cache, "phantom-full", workers=[survivor], pure=False).result(timeout=60)
        assert first[0] == second[0] == workers[survivor]
        assert first[1] and first[2] == second[2], (first, second)
        timings = [t for (t,) in gate.sql("SELECT timings FROM jobs ORDER BY finished_at")]
        print(f"attempts {attempts}; job timings {timings}; {time.monotonic() - started:.1f} s")
    finally:
        if client is not None:
            client.close()
        if gate is not None:
            gate.stop()
            processes.seen[gate.process.pid] = "qcgate serve"
        stopping = time.monotonic()
        survivors = processes.stop_all()
        print(f"stopped in {time.monotonic() - stopping:.1f} s")
    assert not survivors, f"still running after the test: {survivors}"
    assert not any(_alive(pid) for pid in processes.seen), processes.seen
    print(f"{len(processes.seen)} processes started or seen, none left: {sorted(processes.seen)}")
