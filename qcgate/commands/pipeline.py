"""Sub-command: `worker` — run QC jobs without a DICOM listener (scale-out).

Deliveries stay with `qcgate serve`: one outbox per database, so no output is sent twice."""

from __future__ import annotations

import argparse
import signal
import threading

from qcgate.commands.common import add_settings_arguments, settings_from_args


def _worker(args: argparse.Namespace) -> int:
    from qcgate.logs import configure_logging
    from qcgate.pipeline.dispatcher import Dispatcher
    from qcgate.predictors.artifacts import verify_configured_model
    from qcgate.store.database import (
        create_db_engine,
        make_session_factory,
        upgrade_database,
    )

    settings = settings_from_args(args, pipeline={"workers": args.workers, "model": args.model})
    configure_logging(settings.logging)
    verify_configured_model(settings)
    engine = create_db_engine(settings.database_url)
    upgrade_database(engine)
    session_factory = make_session_factory(engine)
    dispatcher = Dispatcher(settings, session_factory)
    stopped = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopped.set())
    dispatcher.start()
    stopped.wait()
    dispatcher.stop()
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    worker = subparsers.add_parser("worker", help="run QC jobs from the shared database (no listener; `serve` delivers)")
    add_settings_arguments(worker)
    worker.add_argument("--workers", type=int, help="worker processes (default: pipeline.workers)")
    worker.add_argument("--model", help="threshold model: a name under models/ or a directory")
    worker.set_defaults(handler=_worker)
