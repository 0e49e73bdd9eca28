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
from qcgate.store.queries import case_detail, list_cases, list_deliveries


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


def _open_audit_session(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    settings = settings_from_args(args)
    engine = create_db_engine(settings.database_url, must_exist=True)
    if not is_current(engine):
        raise QcgateError(f"no qcgate database at {engine.url.render_as_string(hide_password=True)}: run `qcgate db upgrade` or `qcgate serve` first")
    return make_session_factory(engine)()


def _audit_cases(args: argparse.Namespace) -> int:
    with _open_audit_session(args) as session:
        rows = list_cases(session, state=args.state, limit=args.limit, verdict=args.verdict)
    columns = ["case_id", "state", "series_verdict", "ct_series_uid", "ct_instances", "seg_instances", "job_state", "last_instance_at", "reason"]
    print_rows(rows, columns if args.format == "table" else list(rows[0]) if rows else columns, args.format)
    return 0


def _audit_case(args: argparse.Namespace) -> int:
    with _open_audit_session(args) as session:
        detail = case_detail(session, args.case_id)
    if detail is None:
        raise QcgateError(f"no case with id {args.case_id}")
    if args.format == "json":
        json.dump(detail, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(f"case {detail['case_id']}: {detail['state']}; series verdict {detail['series_verdict'] or '-'}; model {detail['model'] or '-'}; q from {detail['q_source'] or '-'}")
    if detail["reason"]:
        print(f"  reason: {detail['reason']}")
    if detail["notes"]:
        print(f"  notes: {detail['notes']}")
    rows = [{**s, "key_features": ", ".join(f"{k}={v:.3g}" for k, v in list(s["key_features"].items())[:3])} for s in detail["slices"]]
    print_rows(rows, ["slice_index", "tau", "q", "margin", "verdict", "lesion_area_mm2", "key_features"], args.format)
    print_rows(detail["deliveries"], ["kind", "destination", "state", "attempts", "last_error"], args.format)
    return 0


def _audit_deliveries(args: argparse.Namespace) -> int:
    with _open_audit_session(args) as session:
        rows = list_deliveries(session, state=args.state)
    print_rows(rows, ["delivery_id", "case_id", "kind", "destination", "state", "attempts", "last_error", "delivered_at"], args.format)
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
    cases.add_argument("--state", choices=["collecting", "ready", "incomplete", "done", "failed"])
    cases.add_argument("--verdict", choices=["accept", "review", "reject"])
    cases.add_argument("--limit", type=int)
    cases.add_argument("--format", choices=["table", "json", "csv"], default="table")
    cases.set_defaults(handler=_audit_cases)

    case = audit_commands.add_parser("case", help="one case slice by slice, with its outputs and deliveries")
    add_settings_arguments(case)
    case.add_argument("case_id", type=int)
    case.add_argument("--format", choices=["table", "json", "csv"], default="table")
    case.set_defaults(handler=_audit_case)

    deliveries = audit_commands.add_parser("deliveries", help="the outbox: delivered, pending and dead letters")
    add_settings_arguments(deliveries)
    deliveries.add_argument("--state", choices=["pending", "sent", "dead"])
    deliveries.add_argument("--format", choices=["table", "json", "csv"], default="table")
    deliveries.set_defaults(handler=_audit_deliveries)
