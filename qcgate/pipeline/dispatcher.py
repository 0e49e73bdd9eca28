"""The dispatcher: claims pending jobs from the jobs table and runs them on an Executor.

The jobs table is the durable queue. A job interrupted by a crash (state ``running`` at start-up)
runs again, up to ``max_job_attempts``; a job past ``job_timeout_seconds`` is failed with that
reason, and since a process pool cannot cancel a running task, the whole pool is replaced (its workers
killed) and the other running jobs go back to pending. The executor is a local process pool
(:class:`LocalProcessPool`) by default; any ``concurrent.futures.Executor`` (a Dask ``distributed``
client's executor, say) can be passed in, and is then only shut down, never killed.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from qcgate.config import Settings
from qcgate.pipeline.worker import run_qc_job, worker_identity
from qcgate.store.models import Case, CaseState, Job, JobState, utcnow

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess
    from multiprocessing.queues import SimpleQueue

LOG = logging.getLogger("qcgate.dispatcher")


def _die_with_parent() -> None:
    """Pool initializer: on Linux, SIGKILL this worker when the process that started it dies, so a
    `kill -9` of the gate leaves no orphan finishing a job that the restarted gate runs again."""
    try:
        import ctypes
        import signal as signals

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signals.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass  # elsewhere the ownership token still keeps a stale worker from recording anything


def _init_worker(started: SimpleQueue[int]) -> None:
    """Pool initializer: report this worker's PID to the pool (before it can run any job), then
    arrange to die with the parent."""
    started.put(os.getpid())
    _die_with_parent()


class LocalProcessPool(ProcessPoolExecutor):
    """A spawn-context process pool that can name its worker processes, through public APIs only.

    Each worker puts its PID on a queue from the pool initializer; :meth:`worker_processes` matches
    those PIDs against ``multiprocessing.active_children()`` (children not yet reaped, so a PID cannot
    have been reused). A worker that has not run its initializer yet has run no job either.
    """

    def __init__(self, max_workers: int) -> None:
        # spawn, not fork: the parent runs threads (the DICOM node) that fork would copy mid-flight.
        context = multiprocessing.get_context("spawn")
        self._reported_pids = context.SimpleQueue()
        self._worker_pids: set[int] = set()
        self._worker_pids_lock = threading.Lock()
        super().__init__(max_workers=max_workers, mp_context=context,
                         initializer=_init_worker, initargs=(self._reported_pids,))

    def worker_processes(self) -> list[BaseProcess]:
        """The pool's worker processes still running."""
        with self._worker_pids_lock:
            while not self._reported_pids.empty():
                self._worker_pids.add(self._reported_pids.get())
            pids = set(self._worker_pids)
        return [process for process in multiprocessing.active_children() if process.pid in pids]


def local_process_pool(workers: int) -> LocalProcessPool:
    return LocalProcessPool(workers)


def _worker_processes(executor: Executor) -> list[BaseProcess]:
    """The processes to kill when ``executor`` is dropped: a local pool's workers; none for others."""
    return executor.worker_processes() if isinstance(executor, LocalProcessPool) else []


def recover_interrupted_jobs(session_factory: sessionmaker[Session], max_attempts: int) -> int:
    """Put jobs left ``running`` by a dead process back to pending, or fail them after too many tries."""
    with session_factory() as session, session.begin():
        stuck = session.scalars(select(Job).where(Job.state == JobState.RUNNING.value)).all()
        for job in stuck:
            if job.attempts >= max_attempts:
                reason = f"interrupted {job.attempts} times (crash or restart while running)"
                job.state, job.error, job.finished_at = JobState.FAILED.value, reason, utcnow()
                session.execute(update(Case).where(Case.id == job.case_id).values(state=CaseState.FAILED.value, reason=reason))
            else:
                job.state = JobState.PENDING.value
        return len(stuck)


def claim_next_job(session_factory: sessionmaker[Session]) -> tuple[int, str] | None:
    """Atomically move the oldest pending job to running; (its id, the claim token), or None.

    The token is stored in jobs.worker; a worker records its result only while it still holds it."""
    with session_factory() as session, session.begin():
        candidate = session.scalar(select(Job.id).where(Job.state == JobState.PENDING.value).order_by(Job.id).limit(1))
        if candidate is None:
            return None
        token = worker_identity()
        claimed = session.execute(
            update(Job).where(Job.id == candidate, Job.state == JobState.PENDING.value).values(
                state=JobState.RUNNING.value, attempts=Job.attempts + 1, started_at=utcnow(), worker=token)
        ).rowcount
        return (int(candidate), token) if claimed == 1 else None


class Dispatcher(threading.Thread):
    """Feeds pending jobs to the executor and watches time limits."""

    def __init__(self, settings: Settings, session_factory: sessionmaker[Session],
                 executor_factory: Callable[[int], Executor] = local_process_pool) -> None:
        super().__init__(name="qcgate-dispatcher", daemon=True)
        self.settings = settings
        self.session_factory = session_factory
        self.executor_factory = executor_factory
        self.executor = executor_factory(settings.pipeline.workers)
        self.running: dict[int, tuple[Future[dict], float]] = {}
        self._stop_event = threading.Event()
        self._settings_json = settings.model_dump_json()

    def run(self) -> None:
        recovered = recover_interrupted_jobs(self.session_factory, self.settings.pipeline.max_job_attempts)
        if recovered:
            LOG.info("%d job(s) interrupted by the last stop were re-queued or failed", recovered)
        while not self._stop_event.is_set():
            try:
                self._harvest()
                self._enforce_time_limits()
                while len(self.running) < self.settings.pipeline.workers:
                    claim = claim_next_job(self.session_factory)
                    if claim is None:
                        break
                    job_id, token = claim
                    LOG.info("job %s started", job_id)
                    self.running[job_id] = (self.executor.submit(run_qc_job, job_id, self._settings_json, token), time.monotonic())
            except Exception:  # a database hiccup must not stop dispatching
                LOG.exception("dispatcher pass failed; retrying")
            self._stop_event.wait(self.settings.assembly.poll_interval_seconds)

    def _harvest(self) -> None:
        for job_id, (future, _) in list(self.running.items()):
            if not future.done():
                continue
            del self.running[job_id]
            try:
                summary = future.result()
                LOG.info("job %s finished: %s", job_id, summary.get("state"))
            except BrokenProcessPool:
                LOG.error("job %s: its worker process died; the job will run again", job_id)
                self._requeue(job_id)
                self._replace_executor()

    def _enforce_time_limits(self) -> None:
        limit = self.settings.pipeline.job_timeout_seconds
        overdue = [job_id for job_id, (_, started) in self.running.items() if time.monotonic() - started > limit]
        if not overdue:
            return
        for job_id in overdue:
            reason = f"time limit of {limit:.0f} s exceeded"
            LOG.error("job %s failed: %s", job_id, reason)
            with self.session_factory() as session, session.begin():
                session.execute(update(Job).where(Job.id == job_id).values(state=JobState.FAILED.value, error=reason, finished_at=utcnow()))
                case_id = session.scalar(select(Job.case_id).where(Job.id == job_id))
                session.execute(update(Case).where(Case.id == case_id).values(state=CaseState.FAILED.value, reason=reason))
            del self.running[job_id]
        # A process pool cannot cancel a running task: replace the pool; other jobs run again.
        for job_id in list(self.running):
            self._requeue(job_id)
        self.running.clear()
        self._replace_executor()

    def _requeue(self, job_id: int) -> None:
        with self.session_factory() as session, session.begin():
            session.execute(update(Job).where(Job.id == job_id, Job.state == JobState.RUNNING.value).values(state=JobState.PENDING.value))

    def _replace_executor(self) -> None:
        old = self.executor
        for process in _worker_processes(old):
            process.kill()
        old.shutdown(wait=False, cancel_futures=True)
        self.executor = self.executor_factory(self.settings.pipeline.workers)

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout=10)
        # A deliberate stop is not the job's fault: hand running jobs back without using up an attempt.
        for job_id in list(self.running):
            with self.session_factory() as session, session.begin():
                session.execute(update(Job).where(Job.id == job_id, Job.state == JobState.RUNNING.value)
                                .values(state=JobState.PENDING.value, attempts=Job.attempts - 1))
        self.running.clear()
        processes = _worker_processes(self.executor)
        self.executor.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.kill()
