"""Sub-command: `worker` — run QC jobs and deliveries without a DICOM listener (scale-out)."""

from __future__ import annotations

import argparse
import signal
import threading

from qcgate.node.commands import add_settings_arguments, settings_from_args


def _worker(args: argparse.Namespace) -> int:
    from qcgate.delivery.outbox import Outbox
    from qcgate.logs import configure_logging
    from qcgate.pipeline.dispatcher import Dispatcher
    from qcgate.store.database import create_db_engine, make_session_factory, upgrade_database

    settings = settings_from_args(args, pipeline={"workers": args.workers, "model": args.model})
    configure_logging(settings.logging)
    engine = create_db_engine(settings.database_url)
    upgrade_database(engine)
    session_factory = make_session_factory(engine)
    dispatcher = Dispatcher(settings, session_factory)
    outbox = Outbox(settings.delivery, session_factory, settings.storage.data_dir.resolve(), settings.node.ae_title)
    stopped = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopped.set())
    dispatcher.start()
    outbox.start()
    stopped.wait()
    dispatcher.stop()
    outbox.stop()
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    worker = subparsers.add_parser("worker", help="run QC jobs and deliveries from the shared database (no listener)")
    add_settings_arguments(worker)
    worker.add_argument("--workers", type=int, help="worker processes (default: pipeline.workers)")
    worker.add_argument("--model", help="threshold model: a name under models/ or a directory")
    worker.set_defaults(handler=_worker)
