"""The dispatcher: claims pending jobs from the jobs table and runs them on an Executor.

The jobs table is the durable queue, shared by every `serve` and `qcgate worker` on one database.

* **Claims and leases.** A claim moves one pending job to ``running`` with a claim token
  (``jobs.worker``: host:pid:random), the claiming host, a heartbeat and ``lease_until``. On
  PostgreSQL the candidate row is read ``FOR UPDATE SKIP LOCKED``, so concurrent dispatchers never
  wait for or take each other's row; SQLite has one writer at a time, which suffices. The dispatcher
  thread renews the lease of every job it runs each ``pipeline.heartbeat_seconds`` (the worker
  processes do not touch the database for this). A worker records its result only while the job
  still carries its token.
* **Recovery** (at start and at every heartbeat): a running job is re-queued only when its lease has
  expired, or when the dispatcher that claimed it ran on this host and its process is gone (a
  restart after ``kill -9`` resumes at once). A job another live machine runs is never touched.
* **Every way a job can end counts an attempt**: its worker process died, it ran past
  ``job_timeout_seconds``, or its lease expired. Each is noted in ``jobs.error``; at
  ``max_job_attempts`` the job and its case fail with the tally ("the worker died 3 times").
  Jobs that were only caught up in another job's trouble (a pool replaced because a sibling died or
  overran) and deliberate stops do not use up an attempt.
* **Fairness**: jobs are claimed by fewest attempts, then oldest; a re-queued job goes behind every
  job that has been tried less often, so a poison case cannot starve the queue.
* **Wake-ups**: on PostgreSQL a listener thread wakes the loop on ``NOTIFY qcgate_jobs`` (sent by the
  assembler in the transaction that creates the job); the poll stays as the safety net.

The executor is a local process pool (:class:`LocalProcessPool`) by default: spawned workers that
exit as soon as the dispatcher's process dies (:mod:`qcgate.pipeline.lifeline`) and run under
``job_memory_limit_mb``. ``pipeline.executor = "dask://HOST:PORT"`` runs the jobs on a Dask
cluster instead (:mod:`qcgate.pipeline.dask_executor`): as many in flight as the cluster has worker
threads, one run per claim, a dead Dask worker counted as a death. Any ``concurrent.futures.Executor``
can be passed in instead, and is then only shut down, never killed. Since a process pool cannot
cancel a running task, an overrun replaces the whole pool; on Dask only the overrun job is dropped.
"""

from __future__ import annotations

import datetime as dt
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Collection
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from qcgate.config import Settings
from qcgate.pipeline import lifeline
from qcgate.pipeline.dask_executor import DaskExecutor, DaskJobLost, DaskWorkerDied
from qcgate.pipeline.notify import JOBS_CHANNEL, notify_job_pending
from qcgate.pipeline.worker import worker_identity
from qcgate.store.models import Case, CaseState, Job, JobState, utcnow

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

LOG = logging.getLogger("qcgate.dispatcher")

ERROR_LENGTH = 4000  # jobs.error and cases.reason are kept to this many characters
_EXIT_WAIT_SECONDS = 5.0  # how long to wait for a broken pool's workers to be reaped
_LISTEN_RETRY_SECONDS = 5.0

# How an attempt ended, as counted in jobs.error and in the final reason.
DIED, TIMED_OUT, LOST = "the worker died", "timed out", "lost its dispatcher"


class LocalProcessPool(ProcessPoolExecutor):
    """A spawn-context process pool that can name its worker processes, through public APIs only.

    Each worker puts its PID on a queue from the pool initializer, and the PID of the worker that
    takes each job when the job starts; :meth:`worker_processes` matches those PIDs against
    ``multiprocessing.active_children()`` (children not yet reaped, so a PID cannot have been
    reused) and keeps the process objects, whose exit codes say later which worker died by itself.
    """

    def __init__(self, max_workers: int, memory_limit_mb: int = 0) -> None:
        # spawn, not fork: the parent runs threads (the DICOM node) that fork would copy mid-flight.
        context = multiprocessing.get_context("spawn")
        self._reports = context.SimpleQueue()
        self._worker_pids: set[int] = set()
        self._job_pids: dict[int, int] = {}
        self._seen: dict[int, BaseProcess] = {}
        self._worker_pids_lock = threading.Lock()
        super().__init__(max_workers=max_workers, mp_context=context,
                         initializer=lifeline.init_worker, initargs=(self._reports, memory_limit_mb))

    def worker_processes(self) -> list[BaseProcess]:
        """The pool's worker processes still running."""
        with self._worker_pids_lock:
            while not self._reports.empty():
                report = self._reports.get()
                if report[0] == "worker":
                    self._worker_pids.add(report[1])
                else:
                    self._job_pids[report[1]] = report[2]
            pids = set(self._worker_pids)
            processes = [process for process in multiprocessing.active_children() if process.pid in pids]
            self._seen.update((process.pid, process) for process in processes if process.pid is not None)
        return processes

    def job_exit_code(self, job_id: int) -> int | None:
        """The exit code of the worker that ran ``job_id`` once it has ended; None when unknown."""
        self.worker_processes()
        with self._worker_pids_lock:
            process = self._seen.get(self._job_pids.get(job_id, -1))
        if process is None:
            return None
        deadline = time.monotonic() + _EXIT_WAIT_SECONDS
        while process.exitcode is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return process.exitcode


def local_process_pool(workers: int, memory_limit_mb: int = 0) -> LocalProcessPool:
    return LocalProcessPool(workers, memory_limit_mb)


def executor_factory_for(settings: Settings) -> Callable[[int], Executor]:
    """The executor ``pipeline.executor`` names: the local process pool, or a Dask scheduler."""
    if settings.pipeline.executor.startswith("dask://"):
        import importlib.util

        if importlib.util.find_spec("distributed") is None:
            from qcgate.errors import ConfigError

            raise ConfigError(f"pipeline.executor = {settings.pipeline.executor!r} needs the distributed package: "
                              "pip install 'qcgate[dask]'")
        address = settings.pipeline.executor
        return lambda workers: DaskExecutor(address)
    limit = settings.pipeline.job_memory_limit_mb
    return lambda workers: local_process_pool(workers, limit)


def _worker_processes(executor: Executor) -> list[BaseProcess]:
    """The processes to kill when ``executor`` is dropped: a local pool's workers; none for others."""
    return executor.worker_processes() if isinstance(executor, LocalProcessPool) else []


def _comparable(moment: dt.datetime, like: dt.datetime) -> dt.datetime:
    # SQLite hands back naive UTC datetimes, PostgreSQL aware ones: compare like with like.
    return moment.replace(tzinfo=None) if like.tzinfo is None else moment


def _process_is_gone(pid: int) -> bool:
    """True when no process ``pid`` runs on this host (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] in {"Z", "X"}
    except (OSError, IndexError):
        return False


def _lost_owner(job: Job, now: dt.datetime, host: str) -> str | None:
    """Why ``job`` (running) no longer has a live owner, or None while its owner may be running it."""
    if job.lease_until is None:
        return "it carried no lease (claimed by a qcgate without leases)"
    if job.lease_until < _comparable(now, job.lease_until):
        return f"its lease expired at {job.lease_until:%Y-%m-%d %H:%M:%S} without a heartbeat from {job.worker}"
    parts = (job.worker or "").rsplit(":", 2)
    if job.worker_host == host and len(parts) == 3 and parts[0] == host and parts[1].isdigit():
        pid = int(parts[1])
        if pid != os.getpid() and _process_is_gone(pid):
            return f"its dispatcher (pid {pid} on this host) is gone"
    return None


def _tally(history: str) -> str:
    counts = [(kind, history.count(f": {kind} (")) for kind in (DIED, TIMED_OUT, LOST)]
    return ", ".join(f"{kind} {n} time{'s' if n != 1 else ''}" for kind, n in counts if n)


def end_attempt(session: Session, job: Job, kind: str, detail: str, max_attempts: int) -> bool:
    """Count the attempt ``job`` just lost (``kind``: DIED, TIMED_OUT or LOST); re-queue it, or fail
    it and its case at the cap. True when it was re-queued."""
    entry = f"attempt {job.attempts}: {kind} ({detail})"
    history = f"{job.error}; {entry}" if job.error else entry
    job.heartbeat_at = job.lease_until = None
    if job.attempts >= max_attempts:
        reason = f"{_tally(history)} (attempt cap {max_attempts}); last: {detail}"[:ERROR_LENGTH]
        job.state, job.error, job.finished_at = JobState.FAILED.value, reason, utcnow()
        session.execute(update(Case).where(Case.id == job.case_id).values(state=CaseState.FAILED.value, reason=reason))
        LOG.error("job %s failed: %s", job.id, reason)
        return False
    job.state, job.error = JobState.PENDING.value, history[-ERROR_LENGTH:]
    notify_job_pending(session)
    LOG.warning("job %s re-queued after %s", job.id, entry)
    return True


def recover_interrupted_jobs(session_factory: sessionmaker[Session], max_attempts: int, *,
                             keep: Collection[str] = (), now: dt.datetime | None = None) -> int:
    """Re-queue (or fail, at the attempt cap) running jobs whose owner is gone: lease expired, or
    claimed on this host by a process that no longer exists. Jobs whose token is in ``keep`` (this
    dispatcher's own) and jobs with a live lease are left alone. Returns how many moved."""
    now = now or utcnow()
    host = socket.gethostname()
    moved = 0
    with session_factory() as session, session.begin():
        running = session.scalars(select(Job).where(Job.state == JobState.RUNNING.value)
                                  .order_by(Job.id).with_for_update(skip_locked=True)).all()
        for job in running:
            if job.worker in keep:
                continue
            why = _lost_owner(job, now, host)
            if why is not None:
                end_attempt(session, job, LOST, why, max_attempts)
                moved += 1
    return moved


def claim_next_job(session_factory: sessionmaker[Session], lease_seconds: float = 60.0) -> tuple[int, str] | None:
    """Atomically move the next pending job (fewest attempts, then oldest) to running under a new
    lease; (its id, the claim token), or None.

    The token is stored in jobs.worker; a worker records its result only while it still holds it."""
    with session_factory() as session, session.begin():
        candidate = session.scalar(
            select(Job.id).where(Job.state == JobState.PENDING.value).order_by(Job.attempts, Job.id).limit(1)
            .with_for_update(skip_locked=True))  # SQLite: no row locks; its single writer suffices
        if candidate is None:
            return None
        token, now = worker_identity(), utcnow()
        claimed = session.execute(
            update(Job).where(Job.id == candidate, Job.state == JobState.PENDING.value).values(
                state=JobState.RUNNING.value, attempts=Job.attempts + 1, started_at=now, worker=token,
                worker_host=socket.gethostname(), heartbeat_at=now, lease_until=now + dt.timedelta(seconds=lease_seconds))
        ).rowcount
        return (int(candidate), token) if claimed == 1 else None


def renew_leases(session_factory: sessionmaker[Session], tokens: Collection[str], lease_seconds: float) -> int:
    """Heartbeat: extend the leases of the running jobs claimed under ``tokens``; how many."""
    if not tokens:
        return 0
    now = utcnow()
    with session_factory() as session, session.begin():
        return session.execute(
            update(Job).where(Job.worker.in_(list(tokens)), Job.state == JobState.RUNNING.value)
            .values(heartbeat_at=now, lease_until=now + dt.timedelta(seconds=lease_seconds))).rowcount


@dataclass
class RunningJob:
    future: Future[dict]
    started: float  # time.monotonic() at submission
    token: str


def _death_detail(exit_code: int | None) -> str:
    if exit_code is None:
        return "its worker process ended abruptly"
    if exit_code < 0:
        name = signal.Signals(-exit_code).name if -exit_code in signal.Signals._value2member_map_ else str(-exit_code)
        hint = ": the kernel's out-of-memory killer or kill -9" if -exit_code == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"its worker process exited with code {exit_code}"


class Dispatcher(threading.Thread):
    """Feeds pending jobs to the executor, renews their leases and watches time limits."""

    def __init__(self, settings: Settings, session_factory: sessionmaker[Session],
                 executor_factory: Callable[[int], Executor] | None = None) -> None:
        super().__init__(name="qcgate-dispatcher", daemon=True)
        self.settings = settings
        self.session_factory = session_factory
        self.executor_factory = executor_factory or executor_factory_for(settings)
        self.executor = self.executor_factory(settings.pipeline.workers)
        self.running: dict[int, RunningJob] = {}
        self._stop_event = threading.Event()
        self._wake = threading.Event()
        self._listener: threading.Thread | None = None
        self._next_heartbeat = 0.0
        self._settings_json = settings.model_dump_json()

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        pipeline = self.settings.pipeline
        try:
            recovered = recover_interrupted_jobs(self.session_factory, pipeline.max_job_attempts)
            if recovered:
                LOG.info("%d job(s) whose dispatcher is gone were re-queued or failed", recovered)
        except Exception:
            LOG.exception("recovery at start failed; retried at the next heartbeat")
        self._start_listener()
        self._next_heartbeat = time.monotonic() + pipeline.heartbeat_seconds
        while not self._stop_event.is_set():
            self._wake.clear()
            try:
                self._harvest()
                self._enforce_time_limits()
                if time.monotonic() >= self._next_heartbeat:
                    self._next_heartbeat = time.monotonic() + pipeline.heartbeat_seconds
                    renew_leases(self.session_factory, [entry.token for entry in self.running.values()], pipeline.lease_seconds)
                    recover_interrupted_jobs(self.session_factory, pipeline.max_job_attempts,
                                             keep={entry.token for entry in self.running.values()})
                while len(self.running) < self._capacity():
                    claim = claim_next_job(self.session_factory, pipeline.lease_seconds)
                    if claim is None:
                        break
                    job_id, token = claim
                    LOG.info("job %s started (claim %s)", job_id, token)
                    future = self.executor.submit(lifeline.run_job, job_id, self._settings_json, token)
                    self.running[job_id] = RunningJob(future, time.monotonic(), token)
                _worker_processes(self.executor)  # note the workers while alive: their exit codes tell deaths apart
            except Exception:  # a database hiccup must not stop dispatching
                LOG.exception("dispatcher pass failed; retrying")
            self._wake.wait(self.settings.assembly.poll_interval_seconds)

    def _harvest(self) -> None:
        broken: list[tuple[int, RunningJob]] = []
        for job_id, entry in list(self.running.items()):
            if not entry.future.done():
                continue
            del self.running[job_id]
            try:
                summary = entry.future.result()
                LOG.info("job %s finished: %s", job_id, summary.get("state"))
            except BrokenProcessPool:
                broken.append((job_id, entry))
            except MemoryError:
                self._fail(job_id, entry.token, f"exceeded the memory limit of {self.settings.pipeline.job_memory_limit_mb} MB")
            except DaskWorkerDied as exc:  # one run per claim: Dask's own re-run was refused
                LOG.error("job %s: %s", job_id, exc)
                self._end(job_id, entry.token, DIED, str(exc))
            except DaskJobLost as exc:
                LOG.error("job %s: %s", job_id, exc)
                self._end(job_id, entry.token, LOST, str(exc))
            except Exception as exc:  # the worker could not even start the job
                self._fail(job_id, entry.token, f"internal error: {type(exc).__name__}: {exc}")
        if not broken:
            return
        exit_codes = {job_id: self._job_exit_code(job_id) for job_id, _ in broken}
        # A broken pool terminates (SIGTERM) its surviving workers: those jobs did nothing wrong.
        culprits = [job_id for job_id, code in exit_codes.items() if code != -signal.SIGTERM] or list(exit_codes)
        for job_id, entry in broken:
            if job_id in culprits:
                LOG.error("job %s: its worker process died (%s)", job_id, _death_detail(exit_codes[job_id]))
                self._end(job_id, entry.token, DIED, _death_detail(exit_codes[job_id]))
            else:
                LOG.warning("job %s: stopped because another job's worker died; it runs again", job_id)
                self._hand_back(job_id, entry.token)
        self._replace_executor()

    def _enforce_time_limits(self) -> None:
        limit = self.settings.pipeline.job_timeout_seconds
        overdue = [job_id for job_id, entry in self.running.items() if time.monotonic() - entry.started > limit]
        if not overdue:
            return
        for job_id in overdue:
            LOG.error("job %s: time limit of %g s exceeded", job_id, limit)
            entry = self.running.pop(job_id)
            self._end(job_id, entry.token, TIMED_OUT, f"time limit of {limit:g} s exceeded")
            if isinstance(self.executor, DaskExecutor):
                self.executor.cancel_job(job_id, entry.token)  # its claim watch ends the Dask worker running it
        if isinstance(self.executor, DaskExecutor):
            return  # the other jobs run on other Dask workers: nothing to replace
        # A process pool cannot cancel a running task: replace the pool; other jobs run again.
        for job_id, entry in list(self.running.items()):
            self._hand_back(job_id, entry.token)
        self.running.clear()
        self._replace_executor()

    # -- recording --------------------------------------------------------------------------

    def _capacity(self) -> int:
        """How many jobs may be in flight: the local pool's size, or the Dask cluster's threads."""
        if isinstance(self.executor, DaskExecutor):
            return self.executor.capacity()
        return self.settings.pipeline.workers

    def _job_exit_code(self, job_id: int) -> int | None:
        return self.executor.job_exit_code(job_id) if isinstance(self.executor, LocalProcessPool) else None

    def _owned(self, session: Session, job_id: int, token: str) -> Job | None:
        job = session.get(Job, job_id, with_for_update=True)
        return job if job is not None and job.state == JobState.RUNNING.value and job.worker == token else None

    def _end(self, job_id: int, token: str, kind: str, detail: str) -> None:
        with self.session_factory() as session, session.begin():
            job = self._owned(session, job_id, token)
            if job is not None:
                end_attempt(session, job, kind, detail, self.settings.pipeline.max_job_attempts)

    def _fail(self, job_id: int, token: str, reason: str) -> None:
        LOG.error("job %s failed: %s", job_id, reason)
        with self.session_factory() as session, session.begin():
            job = self._owned(session, job_id, token)
            if job is not None:
                job.state, job.error, job.finished_at = JobState.FAILED.value, reason[:ERROR_LENGTH], utcnow()
                job.heartbeat_at = job.lease_until = None
                session.execute(update(Case).where(Case.id == job.case_id).values(state=CaseState.FAILED.value, reason=reason[:ERROR_LENGTH]))

    def _hand_back(self, job_id: int, token: str) -> None:
        """Re-queue a job that was stopped through no fault of its own, without using up an attempt."""
        with self.session_factory() as session, session.begin():
            job = self._owned(session, job_id, token)
            if job is not None:
                job.state, job.attempts = JobState.PENDING.value, max(job.attempts - 1, 0)
                job.heartbeat_at = job.lease_until = None
                notify_job_pending(session)

    # -- executor and wake-ups --------------------------------------------------------------

    def _replace_executor(self) -> None:
        old = self.executor
        for process in _worker_processes(old):
            process.kill()
        old.shutdown(wait=False, cancel_futures=True)
        self.executor = self.executor_factory(self.settings.pipeline.workers)

    def _start_listener(self) -> None:
        engine = getattr(self.session_factory, "kw", {}).get("bind")
        if engine is None or engine.dialect.name != "postgresql" or engine.dialect.driver != "psycopg":
            return
        url = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._listener = threading.Thread(target=self._listen, args=(url,), name="qcgate-job-listener", daemon=True)
        self._listener.start()

    def _listen(self, url: str) -> None:
        """PostgreSQL LISTEN: wake the loop as soon as a job becomes pending anywhere."""
        import psycopg

        while not self._stop_event.is_set():
            try:
                with psycopg.connect(url, autocommit=True, connect_timeout=10) as connection:
                    connection.execute(f"LISTEN {JOBS_CHANNEL}")
                    self._wake.set()  # whatever was queued while we were not listening
                    while not self._stop_event.is_set():
                        for _ in connection.notifies(timeout=1.0, stop_after=1):
                            self._wake.set()
            except Exception as exc:  # the poll keeps working meanwhile
                LOG.warning("job listener: %s; retrying in %.0f s", exc, _LISTEN_RETRY_SECONDS)
                self._stop_event.wait(_LISTEN_RETRY_SECONDS)

    def stop(self) -> None:
        self._stop_event.set()
        self._wake.set()
        if self.is_alive():
            self.join(timeout=10)
        # A deliberate stop is not the job's fault: hand running jobs back without using up an attempt.
        for job_id, entry in list(self.running.items()):
            self._hand_back(job_id, entry.token)
        self.running.clear()
        processes = _worker_processes(self.executor)
        self.executor.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.kill()
        if self._listener is not None:
            self._listener.join(timeout=5)
