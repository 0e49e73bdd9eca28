"""Sub-commands: `db upgrade` and `audit cases`."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from typing import Any

from qcgate.errors import QcgateError
from qcgate.node.commands import add_settings_arguments, settings_from_args
from qcgate.store.database import create_db_engine, is_current, make_session_factory, upgrade_database
from qcgate.store.queries import list_cases


def _db_upgrade(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    engine = create_db_engine(settings.database_url)
    upgrade_database(engine, args.revision)
    print(f"database at {engine.url.render_as_string(hide_password=True)} is at revision {args.revision}")
    return 0


def print_rows(rows: list[dict[str, Any]], columns: list[str], output_format: str) -> None:
    """Print rows as an aligned table, JSON (a list of objects) or CSV."""
    if output_format == "json":
        json.dump(rows, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    if output_format == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        return
    cells = [[("" if row.get(col) is None else str(row.get(col))) for col in columns] for row in rows]
    widths = [max([len(col)] + [len(line[i]) for line in cells]) for i, col in enumerate(columns)]
    print("  ".join(col.ljust(widths[i]) for i, col in enumerate(columns)))
    for line in cells:
        print("  ".join(value.ljust(widths[i]) for i, value in enumerate(line)))
    if not rows:
        print("(no rows)")


def _audit_cases(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    engine = create_db_engine(settings.database_url, must_exist=True)
    if not is_current(engine):
        raise QcgateError(f"no qcgate database at {engine.url.render_as_string(hide_password=True)}: run `qcgate db upgrade` or `qcgate serve` first")
    with make_session_factory(engine)() as session:
        rows = list_cases(session, state=args.state, limit=args.limit)
    columns = ["case_id", "state", "ct_series_uid", "ct_instances", "seg_instances", "job_state", "last_instance_at", "reason"]
    print_rows(rows, columns if args.format == "table" else list(rows[0]) if rows else columns, args.format)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    db = subparsers.add_parser("db", help="audit database maintenance")
    db_commands = db.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    upgrade = db_commands.add_parser("upgrade", help="apply schema migrations")
    add_settings_arguments(upgrade)
    upgrade.add_argument("--revision", default="head")
    upgrade.set_defaults(handler=_db_upgrade)

    audit = subparsers.add_parser("audit", help="query the audit database")
    audit_commands = audit.add_subparsers(dest="audit_command", metavar="QUERY", required=True)
    cases = audit_commands.add_parser("cases", help="list cases with their state and job")
    add_settings_arguments(cases)
    cases.add_argument("--state", choices=["collecting", "ready", "incomplete"])
    cases.add_argument("--limit", type=int)
    cases.add_argument("--format", choices=["table", "json", "csv"], default="table")
    cases.set_defaults(handler=_audit_cases)
