"""Sub-commands: `serve` and `check-config`."""

from __future__ import annotations

import argparse
from pathlib import Path

from qcgate.commands.common import add_settings_arguments, settings_from_args
from qcgate.config import Settings, load_settings


def _serve(args: argparse.Namespace) -> int:
    from qcgate.logs import configure_logging
    from qcgate.service import GateService

    settings = settings_from_args(
        args,
        node={"port": args.port, "ae_title": args.ae_title, "host": args.host},
        assembly={"stable_seconds": args.stable_seconds},
        pipeline={"model": args.model, "workers": args.workers},
        delivery={"destinations": args.destination or None},
        http={"port": args.http_port},
    )
    configure_logging(settings.logging)
    GateService(settings).run_forever()
    return 0


def _check_config(args: argparse.Namespace) -> int:
    from qcgate.predictors.artifacts import verify_configured_model

    settings = load_settings(args.file)
    model = verify_configured_model(settings)
    print(f"{args.file}: OK")
    print(f"  threshold model {model} ({settings.pipeline.model}) verified")
    print(f"  listens on {settings.node.host}:{settings.node.port} as {settings.node.ae_title}")
    print(f"  data dir {settings.storage.data_dir}; database {settings.database_url.split('@')[-1]}")
    if args.database is not None:
        _check_against_database(settings, args.database or settings.database_url)
    return 0


def _check_against_database(settings: Settings, url: str) -> None:
    """The file's destinations and rules against those `qcgate serve` recorded in the database."""
    from qcgate.delivery.fingerprint import compare_with_recorded
    from qcgate.errors import ConfigError
    from qcgate.store.database import create_db_engine, make_session_factory

    engine = create_db_engine(url, must_exist=True)
    try:
        recorded, differences = compare_with_recorded(make_session_factory(engine), settings.delivery)
    finally:
        engine.dispose()
    if recorded is None:
        print("  no delivery settings recorded in that database yet (`qcgate serve` records them at start)")
    elif differences:
        raise ConfigError("delivery settings differ from those `qcgate serve` recorded "
                          f"({recorded.recorded_by}, {recorded.recorded_at:%Y-%m-%d %H:%M:%S}); a worker with "
                          "worker.deliver would refuse to start:\n  " + "\n  ".join(differences))
    else:
        print(f"  delivery settings match those serve recorded ({recorded.fingerprint[:12]}, {recorded.recorded_by})")


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser("serve", help="run the DICOM node and the case assembler")
    add_settings_arguments(serve)
    serve.add_argument("--port", type=int, help="DICOM port (default 11112)")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--ae-title", help="our AE title (default QCGATE)")
    serve.add_argument("--stable-seconds", type=float, help="quiet time before a complete case is ready")
    serve.add_argument("--destination", action="append", metavar="AE@HOST:PORT",
                       help="send the QC SEG and SR here (repeatable; replaces the file's list)")
    serve.add_argument("--model", help="threshold model: a name under models/ or a directory")
    serve.add_argument("--workers", type=int, help="QC worker processes")
    serve.add_argument("--http-port", type=int, metavar="N",
                       help="port of the web console, /api, /metrics and /healthz (default 9464; 0: any free port)")
    serve.set_defaults(handler=_serve)

    check = subparsers.add_parser("check-config", help="validate a TOML settings file")
    check.add_argument("file", type=Path)
    check.add_argument("--database", nargs="?", const="", metavar="URL",
                       help="also compare the delivery settings with those `qcgate serve` recorded in this database "
                            "(no URL: the file's own database)")
    check.set_defaults(handler=_check_config)
