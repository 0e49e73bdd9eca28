"""Sub-command: `worker` — run QC jobs without a DICOM listener (scale-out), and deliver when
``worker.deliver`` is set.

A delivering worker sends the delivery rows `serve`'s router made, under leases (each output once in
the normal case); it refuses to start unless its destinations and rules are those serve recorded."""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from qcgate.commands.common import add_settings_arguments, settings_from_args

LOG = logging.getLogger("qcgate.worker")


def _worker(args: argparse.Namespace) -> int:
    from qcgate.delivery.fingerprint import compare_with_recorded
    from qcgate.delivery.outbox import Outbox
    from qcgate.errors import ConfigError
    from qcgate.logs import configure_logging
    from qcgate.pipeline.dispatcher import Dispatcher
    from qcgate.predictors.artifacts import verify_configured_model
    from qcgate.store.database import (
        create_db_engine,
        make_session_factory,
        upgrade_database,
    )

    settings = settings_from_args(args, pipeline={"workers": args.workers, "model": args.model}, worker={"deliver": args.deliver})
    configure_logging(settings.logging)
    runs_jobs = settings.pipeline.workers > 0
    if not runs_jobs and not settings.worker.deliver:
        raise ConfigError("pipeline.workers = 0 and worker.deliver = false: this worker would do nothing")
    if runs_jobs:
        verify_configured_model(settings)
    engine = create_db_engine(settings.database_url)
    upgrade_database(engine)
    session_factory = make_session_factory(engine)
    outbox = None
    if settings.worker.deliver:
        recorded, differences = compare_with_recorded(session_factory, settings.delivery)
        if recorded is None:
            raise ConfigError("worker.deliver: no delivery settings recorded in the database yet; start `qcgate serve` "
                              "on it first (it records its destinations and rules)")
        if differences:
            raise ConfigError(f"worker.deliver: this worker's delivery settings differ from those `qcgate serve` recorded "
                              f"({recorded.recorded_by}, {recorded.recorded_at:%Y-%m-%d %H:%M:%S}): " + "; ".join(differences))
        outbox = Outbox(settings.delivery, session_factory, settings.storage.data_dir, settings.node.ae_title,
                        route=False, check_fingerprint=True)
        LOG.info("delivering to %s (settings fingerprint %s, as serve recorded)",
                 ", ".join(t.key for t in settings.delivery.targets()) or "no destination", recorded.fingerprint[:12])
    dispatcher = Dispatcher(settings, session_factory) if runs_jobs else None
    stopped = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopped.set())
    if dispatcher is not None:
        dispatcher.start()
    if outbox is not None:
        outbox.start()
    stopped.wait()
    if outbox is not None:
        outbox.stop()
    if dispatcher is not None:
        dispatcher.stop()
    engine.dispose()
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    worker = subparsers.add_parser("worker", help="run QC jobs from the shared database (no listener); deliver too with worker.deliver")
    add_settings_arguments(worker)
    worker.add_argument("--workers", type=int, help="worker processes (default: pipeline.workers; 0 with --deliver: deliver only)")
    worker.add_argument("--model", help="threshold model: a name under models/ or a directory")
    worker.add_argument("--deliver", action=argparse.BooleanOptionalAction, default=None,
                        help="also run the outbox (default: worker.deliver); needs serve's destinations and rules")
    worker.set_defaults(handler=_worker)
