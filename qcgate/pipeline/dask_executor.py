"""A Dask distributed cluster as the dispatcher's executor (``pipeline.executor = "dask://HOST:PORT"``).

The jobs table stays the only durable truth; Dask holds nothing we cannot lose. The dispatcher claims
a job in SQL as always (claim token, lease, one attempt), then submits it here; the dispatcher thread
renews the lease of every job it submitted, exactly as for its local pool. Needs the optional
``distributed`` package (``pip install 'qcgate[dask]'``) on the dispatcher's machine and on every
Dask worker, with qcgate itself: the task is :func:`run_claim_once`, pickled by reference.

* **No Dask retries.** Tasks are submitted with ``retries=0`` (a QC job records its own failures, so
  an exception here means the task could not run at all). When a Dask worker dies mid-job the
  scheduler would run the task again elsewhere (``distributed.scheduler.allowed-failures``, default
  3) or give up with ``KilledWorker``. Neither may hide an attempt from the jobs table, so a task
  runs **at most once per claim**: on start it marks its claim in a Dask ``Variable`` (scheduler
  memory, deleted when the dispatcher has the result); a re-run by Dask finds the mark and refuses.
  Either way the dispatcher sees :class:`DaskWorkerDied`, counts "the worker died" for the claim
  and re-queues the job in SQL; the next claim (new token, new task) runs on a live worker. A result
  is recorded only by the holder of the claim token, in one transaction, so nothing is recorded
  twice even if a worker died after committing.
* **A task that lost its claim stops.** Dask cannot interrupt a running task, so each task watches
  its claim in SQL every ``pipeline.heartbeat_seconds``; when the job was re-queued or taken by
  another claim (its dispatcher died and the lease expired, it ran past ``job_timeout_seconds``, or
  its dispatcher stopped), the task ends its Dask worker process (``os._exit``) as a local pool kills
  its worker; the nanny or systemd starts a fresh one. Run Dask workers with ``--nthreads 1``.
* **Capacity.** The dispatcher keeps as many jobs in flight as the cluster has worker threads (none
  while the scheduler is unreachable: jobs wait in SQL, and the connection is retried).
* **Warm models.** Dask workers are long-lived processes: ``load_threshold_model`` keeps its model
  per process across jobs, as in a local pool worker.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Executor, Future
from typing import Any

LOG = logging.getLogger("qcgate.dispatcher")

DASK_SCHEME = "dask://"
_CONNECT_TIMEOUT_SECONDS = 10.0
_RECONNECT_SECONDS = 5.0
_CAPACITY_CACHE_SECONDS = 2.0
CLAIM_LOST_EXIT_CODE = 75  # the Dask worker left because the job it ran was no longer its claim


class DaskWorkerDied(Exception):
    """The Dask worker that ran a claim died mid-job (the message says how the dispatcher learnt it)."""


class DaskJobLost(Exception):
    """Dask dropped a claim's task (scheduler connection lost, or the task was cancelled)."""


def parse_dask_address(value: str) -> str:
    """``dask://HOST:PORT`` (validated by ``PipelineSettings``) -> the scheduler's ``tcp://HOST:PORT``."""
    return "tcp://" + value.strip().removeprefix(DASK_SCHEME)


def _claim_key(job_id: int, token: str) -> str:
    return f"qcgate-job-{job_id}-{token.replace(':', '-')}"


# -- in the Dask worker ---------------------------------------------------------------------------

_WATCH_ENGINES: dict[str, Any] = {}
_WATCH_LOCK = threading.Lock()


def _claim_state(database_url: str, job_id: int) -> tuple[str, str | None] | None:
    from sqlalchemy import text

    from qcgate.store.database import create_db_engine

    with _WATCH_LOCK:
        engine = _WATCH_ENGINES.get(database_url)
        if engine is None:
            engine = _WATCH_ENGINES[database_url] = create_db_engine(database_url)
    with engine.connect() as connection:
        row = connection.execute(text("SELECT state, worker FROM jobs WHERE id = :id"), {"id": job_id}).first()
    return None if row is None else (str(row[0]), row[1])


def _watch_claim(job_id: int, token: str, database_url: str, every: float, finished: threading.Event) -> None:
    """End this Dask worker process once ``token`` no longer holds job ``job_id`` while it still runs."""
    ending_seen = False
    while not finished.wait(every):
        try:
            state = _claim_state(database_url, job_id)
        except Exception as exc:  # the database is away: the lease decides, not this watch
            LOG.warning("job %s: claim watch could not read the job: %s", job_id, exc)
            continue
        if state is not None and state[1] == token and state[0] == "running":
            ending_seen = False
            continue
        if state is not None and state[1] == token and state[0] in ("done", "failed") and not ending_seen:
            ending_seen = True  # our own ending was just recorded: the task returns at once
            continue
        if finished.is_set():
            return
        LOG.error("job %s: claim %s is no longer held (%s); ending this Dask worker so the job stops here",
                  job_id, token, "job gone" if state is None else f"{state[0]}, claim {state[1]}")
        os._exit(CLAIM_LOST_EXIT_CODE)


def run_claim_once(fn: Callable[..., dict[str, Any]], job_id: int, settings_json: str, token: str) -> dict[str, Any]:
    """The Dask task: run ``fn(job_id, settings_json, token)`` unless this claim already started on a
    worker (which then died: Dask re-runs a task only when its worker is gone); watch the claim."""
    from distributed import Variable, get_worker

    from qcgate.config import Settings

    here = get_worker().address
    marker = Variable(_claim_key(job_id, token))
    try:
        earlier = marker.get(timeout=0)
    except TimeoutError:  # not set: the first run of this claim
        earlier = None
    if earlier is not None:
        raise DaskWorkerDied(f"its Dask worker {earlier} died mid-job (Dask re-ran the task on {here}; refused: one run per claim)")
    marker.set(here)
    settings = Settings.model_validate_json(settings_json)
    finished = threading.Event()
    watch = threading.Thread(target=_watch_claim, name=f"qcgate-claim-watch-{job_id}", daemon=True,
                             args=(job_id, token, settings.database_url, settings.pipeline.heartbeat_seconds, finished))
    watch.start()
    try:
        return fn(job_id, settings_json, token)
    finally:
        finished.set()


# -- in the dispatcher ----------------------------------------------------------------------------

class DaskExecutor(Executor):
    """A ``concurrent.futures.Executor`` on a Dask scheduler; connects lazily and reconnects."""

    def __init__(self, address: str) -> None:
        self.address = parse_dask_address(address) if address.startswith(DASK_SCHEME) else address
        self._client: Any = None
        self._next_connect = 0.0
        self._capacity = (0, 0.0)  # (threads, when measured)
        self._futures: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._shutdown = False

    def _connected(self) -> Any:
        if self._client is not None or self._shutdown or time.monotonic() < self._next_connect:
            return self._client
        try:
            from distributed import Client
        except ImportError as exc:
            from qcgate.errors import ConfigError

            raise ConfigError("pipeline.executor names a Dask scheduler, but the distributed package is not installed: "
                              "pip install 'qcgate[dask]'") from exc
        try:
            self._client = Client(self.address, timeout=_CONNECT_TIMEOUT_SECONDS, set_as_default=False)
            LOG.info("connected to the Dask scheduler at %s", self.address)
        except Exception as exc:
            self._next_connect = time.monotonic() + _RECONNECT_SECONDS
            LOG.warning("Dask scheduler %s unreachable (%s); jobs wait in the database, retrying in %.0f s",
                        self.address, exc, _RECONNECT_SECONDS)
        return self._client

    def capacity(self) -> int:
        """Worker threads in the cluster (cached briefly); 0 while the scheduler is unreachable."""
        threads, measured = self._capacity
        if time.monotonic() - measured < _CAPACITY_CACHE_SECONDS:
            return threads
        client = self._connected()
        try:
            threads = sum(client.nthreads().values()) if client is not None else 0
        except Exception as exc:
            LOG.warning("Dask scheduler %s: %s", self.address, exc)
            threads = 0
        self._capacity = (threads, time.monotonic())
        return threads

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        job_id, settings_json, token = args
        client = self._connected()
        if client is None or self._shutdown:
            raise RuntimeError(f"no Dask scheduler at {self.address}")
        key = _claim_key(job_id, token)
        dask_future = client.submit(run_claim_once, fn, job_id, settings_json, token, key=key, pure=False, retries=0)
        result: Future[Any] = Future()
        result.set_running_or_notify_cancel()
        with self._lock:
            self._futures[key] = dask_future
        dask_future.add_done_callback(lambda done: self._settle(key, done, result))
        return result

    def _settle(self, key: str, done: Any, result: Future[Any]) -> None:
        from distributed import KilledWorker, Variable

        try:
            result.set_result(done.result())
        except KilledWorker as exc:
            result.set_exception(DaskWorkerDied(f"its Dask worker died mid-job ({exc})"))
        except DaskWorkerDied as exc:
            result.set_exception(exc)
        except CancelledError as exc:
            result.set_exception(DaskJobLost(f"Dask dropped the task ({type(exc).__name__}: {exc or 'cancelled'})"))
        except BaseException as exc:
            result.set_exception(exc)
        finally:
            with self._lock:
                self._futures.pop(key, None)
            if self._client is not None and not self._shutdown:
                try:
                    Variable(key, client=self._client).delete()
                except Exception:  # noqa: S110 - scheduler memory only, gone with the scheduler
                    pass

    def cancel_job(self, job_id: int, token: str) -> None:
        """Drop the claim's task (a running one stops through its claim watch)."""
        with self._lock:
            dask_future = self._futures.get(_claim_key(job_id, token))
        if dask_future is not None:
            dask_future.cancel()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._shutdown = True
        with self._lock:
            futures = list(self._futures.values())
        if cancel_futures:
            for dask_future in futures:
                dask_future.cancel()
        if self._client is not None:
            try:
                self._client.close(timeout=_CONNECT_TIMEOUT_SECONDS)
            except Exception as exc:
                LOG.warning("closing the Dask client: %s", exc)
            self._client = None
