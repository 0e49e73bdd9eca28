"""Sub-commands: `db upgrade`, `audit cases|case|slices|deliveries|vendors|actions`, `deliveries retry`
and `retention run`."""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from qcgate.commands.common import add_settings_arguments, settings_from_args
from qcgate.errors import QcgateError

if TYPE_CHECKING:  # imported in the handlers, so that `qcgate --help` does not load SQLAlchemy
    from sqlalchemy.orm import Session

    from qcgate.store.queries import AuditFilters

_FORMATS = ["table", "json", "csv"]
_RELATIVE = re.compile(r"^(?P<count>\d+)(?P<unit>[mhdw])$")
_UNIT_SECONDS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _db_upgrade(args: argparse.Namespace) -> int:
    from qcgate.store import database

    settings = settings_from_args(args)
    engine = database.create_db_engine(settings.database_url)
    database.upgrade_database(engine, args.revision)
    print(f"database at {engine.url.render_as_string(hide_password=True)} is at revision {args.revision}")
    return 0


def parse_when(text: str, now: dt.datetime | None = None) -> dt.datetime:
    """A date for --since/--until: ISO (``2026-11-22``, ``2026-11-22T08:00``; UTC unless an offset
    is given) or relative to now (``30m``, ``12h``, ``7d``, ``2w`` ago)."""
    now = now or dt.datetime.now(dt.timezone.utc)
    match = _RELATIVE.match(text.strip())
    if match:
        return now - dt.timedelta(seconds=int(match["count"]) * _UNIT_SECONDS[match["unit"]])
    try:
        value = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither an ISO date/time nor a relative age like 7d, 12h, 30m") from None
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def print_rows(rows: list[dict[str, Any]], columns: list[str], output_format: str, stream: TextIO | None = None) -> None:
    """Print rows as an aligned table, JSON (a list of objects) or CSV."""
    out = stream or sys.stdout
    if output_format == "json":
        json.dump(rows, out, indent=2)
        out.write("\n")
        return
    if output_format == "csv":
        writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        return
    cells = [[("" if row.get(col) is None else str(row.get(col))) for col in columns] for row in rows]
    widths = [max([len(col)] + [len(line[i]) for line in cells]) for i, col in enumerate(columns)]
    print("  ".join(col.ljust(widths[i]) for i, col in enumerate(columns)), file=out)
    for line in cells:
        print("  ".join(value.ljust(widths[i]) for i, value in enumerate(line)), file=out)
    if not rows:
        print("(no rows)", file=out)


@contextlib.contextmanager
def _output(args: argparse.Namespace) -> Iterator[TextIO]:
    """stdout, or the --output file (written whole, UTF-8, newline handling left to csv)."""
    path: Path | None = getattr(args, "output", None)
    if path is None:
        yield sys.stdout
        return
    with open(path, "w", encoding="utf-8", newline="") as handle:
        yield handle


def _export_columns(rows: list[dict[str, Any]], table_columns: list[str], output_format: str) -> list[str]:
    # Table: the readable subset; JSON/CSV: every field, in the query's order.
    return table_columns if output_format == "table" or not rows else list(rows[0])


@contextlib.contextmanager
def _open_audit_session(args: argparse.Namespace) -> Iterator[Session]:
    from qcgate.store import database

    settings = settings_from_args(args)
    engine = database.create_db_engine(settings.database_url, must_exist=True)
    try:
        if not database.is_current(engine):
            raise QcgateError(f"no qcgate database at {engine.url.render_as_string(hide_password=True)}: run `qcgate db upgrade` or `qcgate serve` first")
        with database.make_session_factory(engine)() as session:
            yield session
    finally:
        engine.dispose()


def _filters(args: argparse.Namespace) -> AuditFilters:
    from qcgate.store.queries import AuditFilters

    return AuditFilters(
        state=getattr(args, "state", None), verdict=args.verdict, since=args.since, until=args.until,
        calling_ae=args.calling_ae, vendor=args.vendor, algorithm=args.algorithm,
        model_version=args.model_version, series_uid=args.series, limit=args.limit,
    )


def _audit_cases(args: argparse.Namespace) -> int:
    from qcgate.store import queries

    with _open_audit_session(args) as session:
        rows = queries.list_cases(session, filters=_filters(args))
    columns = ["case_id", "state", "series_verdict", "ct_series_uid", "ct_instances", "seg_instances", "job_state", "last_instance_at", "vendors", "reason"]
    with _output(args) as out:
        print_rows(rows, _export_columns(rows, columns, args.format), args.format, out)
    return 0


def _audit_slices(args: argparse.Namespace) -> int:
    from qcgate.store import queries

    with _open_audit_session(args) as session:
        rows = queries.list_slices(session, _filters(args))
    columns = ["case_id", "slice_index", "tau", "q", "margin", "verdict", "lesion_area_mm2", "series_verdict", "ct_series_uid"]
    with _output(args) as out:
        print_rows(rows, _export_columns(rows, columns, args.format), args.format, out)
    return 0


def _audit_vendors(args: argparse.Namespace) -> int:
    from qcgate.store import queries

    with _open_audit_session(args) as session:
        rows = queries.vendor_summary(session, _filters(args))
    columns = ["vendor", "algorithm", "algorithm_version", "cases", "accept", "review", "reject", "failed", "not_processed", "reject_rate"]
    with _output(args) as out:
        print_rows(rows, columns, args.format, out)
    return 0


def _audit_case(args: argparse.Namespace) -> int:
    from qcgate.store import queries

    if (args.case_id is None) == (args.series is None):
        raise QcgateError("give a case id or --series UID (one of them)")
    with _open_audit_session(args) as session:
        case_id = args.case_id if args.case_id is not None else queries.case_id_for_series(session, args.series)
        from qcgate.core.layout import DataLayout

        spool = DataLayout(settings_from_args(args).storage.data_dir).spool
        detail = queries.case_detail(session, case_id, spool_root=spool) if case_id is not None else None
    if detail is None:
        raise QcgateError(f"no case with id {args.case_id}" if args.case_id is not None else f"no case for CT series {args.series}")
    with _output(args) as out:
        if args.format == "json":
            json.dump(detail, out, indent=2)
            out.write("\n")
            return 0
        if args.format == "csv":
            # One row per slice, with the case's identity and verdict repeated: a spreadsheet-ready "why".
            case_columns = {key: detail[key] for key in ("case_id", "ct_series_uid", "state", "series_verdict", "model", "q_source", "reason")}
            rows = [{**case_columns, **{k: v for k, v in s.items() if k != "key_features"},
                     "key_features": json.dumps(s["key_features"])} for s in detail["slices"]]
            # the slice's own q_source (migration 0009) replaces the case's in its row
            columns = list(case_columns) + ["instance_number", "z_mm", "slice_index", "sop_instance_uid", "tau", "q", "margin", "margin_reject", "verdict", "review_reason", "lesion_area_mm2", "um_mean", "key_features"]
            print_rows(rows, columns, "csv", out)
            return 0
        print(f"case {detail['case_id']}: {detail['state']}; series verdict {detail['series_verdict'] or '-'}; model {detail['model'] or '-'}; q from {detail['q_source'] or '-'}", file=out)
        print(f"  CT series {detail['ct_series_uid']}", file=out)
        if detail["reason"]:
            print(f"  reason: {detail['reason']}", file=out)
        if detail["notes"]:
            print(f"  notes: {detail['notes']}", file=out)
        if detail["job"] and detail["job"]["error"]:
            print(f"  job error: {detail['job']['error']}", file=out)
        rows = [{**s, "key_features": ", ".join(f"{k}={v:.3g}" for k, v in list(s["key_features"].items())[:3])} for s in detail["slices"]]
        reasons = sorted({s["review_reason"] for s in detail["slices"] if s["review_reason"]})
        for reason in reasons:
            print(f"  review forced: {reason}", file=out)
        print_rows(rows, ["instance_number", "z_mm", "tau", "q", "q_source", "margin", "margin_reject", "verdict", "lesion_area_mm2", "key_features"], args.format, out)
        print_rows(detail["deliveries"], ["kind", "destination", "state", "attempts", "last_error"], args.format, out)
    return 0


def _destination_arg(text: str) -> str:
    """argparse type: a destination ``AE@HOST:PORT``, written the way the outbox stores it."""
    from qcgate.config import Destination

    try:
        return str(Destination.parse(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _audit_deliveries(args: argparse.Namespace) -> int:
    from qcgate.store import queries

    with _open_audit_session(args) as session:
        rows = queries.list_deliveries(session, state=args.state, series_uid=args.series, kind=args.kind,
                                       sop_instance_uid=args.sop_instance_uid, destination=args.destination, limit=args.limit)
    columns = ["delivery_id", "case_id", "kind", "destination", "state", "attempts", "sender", "next_attempt_at", "last_error",
               "delivered_at"]
    with _output(args) as out:
        print_rows(rows, _export_columns(rows, columns, args.format), args.format, out)
    return 0


def _audit_actions(args: argparse.Namespace) -> int:
    from qcgate.store import queries

    with _open_audit_session(args) as session:
        rows = queries.list_actions(session, user=args.user, action=args.action, since=args.since, until=args.until, limit=args.limit)
    if args.format != "json":  # one cell for CSV and the table
        rows = [{**row, "details": json.dumps(row["details"], sort_keys=True) if row["details"] is not None else None} for row in rows]
    columns = ["action_id", "at", "user", "action", "object_type", "object_id", "reason", "details"]
    with _output(args) as out:
        print_rows(rows, columns, args.format, out)
    return 0


def _deliveries_retry(args: argparse.Namespace) -> int:
    from qcgate.delivery.requeue import RequeueError, requeue_dead_letters
    from qcgate.store import database

    settings = settings_from_args(args)
    engine = database.create_db_engine(settings.database_url, must_exist=True)
    try:
        if not database.is_current(engine):
            raise QcgateError(f"no qcgate database at {engine.url.render_as_string(hide_password=True)}")
        with database.make_session_factory(engine)() as session, session.begin():
            try:
                result = requeue_dead_letters(session, user=args.user, reason=args.reason, destination=args.destination,
                                              delivery_id=args.id, all_dead=args.dead)
            except (RequeueError, ValueError) as exc:
                raise QcgateError(str(exc)) from None
    finally:
        engine.dispose()
    if result.requeued:
        print(f"re-queued {len(result.requeued)} dead letter(s) (ids {', '.join(map(str, result.requeued))}); "
              "each is sent as soon as its destination answers; see `qcgate audit actions`")
    else:
        print("no dead letters matched; nothing re-queued")
    return 0


def _retention_run(args: argparse.Namespace) -> int:
    from qcgate.store import database
    from qcgate.store.retention import run_retention

    settings = settings_from_args(args)
    engine = database.create_db_engine(settings.database_url, must_exist=True)
    try:
        if not database.is_current(engine):
            raise QcgateError(f"no qcgate database at {engine.url.render_as_string(hide_password=True)}")
        report = run_retention(settings, database.make_session_factory(engine), dry_run=args.dry_run)
    finally:
        engine.dispose()
    if args.format == "json":
        json.dump(report.as_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(report.summary())
    return 0


def _add_format_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=_FORMATS, default="table")
    parser.add_argument("--output", type=Path, metavar="FILE", help="write the export here instead of stdout")


def _add_filter_arguments(parser: argparse.ArgumentParser, verdict_help: str) -> None:
    parser.add_argument("--verdict", choices=["accept", "review", "reject"], help=verdict_help)
    parser.add_argument("--since", type=parse_when, metavar="WHEN", help="from this time on: ISO date/time (UTC) or an age like 7d, 12h")
    parser.add_argument("--until", type=parse_when, metavar="WHEN", help="before this time (exclusive); same forms as --since")
    parser.add_argument("--calling-ae", metavar="AE", help="only cases with an instance sent by this calling AE title")
    parser.add_argument("--vendor", metavar="NAME", help="only cases with a SEG whose Manufacturer is exactly NAME")
    parser.add_argument("--algorithm", metavar="NAME", help="only cases with a SEG whose algorithm name is exactly NAME")
    parser.add_argument("--model-version", metavar="VERSION", help="only cases judged by this threshold-model version")
    parser.add_argument("--series", metavar="UID", help="only the case of this CT Series Instance UID")
    parser.add_argument("--limit", type=int)


def register(subparsers: argparse._SubParsersAction) -> None:
    db = subparsers.add_parser("db", help="audit database maintenance")
    db_commands = db.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    upgrade = db_commands.add_parser("upgrade", help="apply schema migrations")
    add_settings_arguments(upgrade)
    upgrade.add_argument("--revision", default="head")
    upgrade.set_defaults(handler=_db_upgrade)

    audit = subparsers.add_parser("audit", help="query the audit database")
    audit_commands = audit.add_subparsers(dest="audit_command", metavar="QUERY", required=True)
    cases = audit_commands.add_parser("cases", help="list cases with their state, verdict, job and SEG vendors")
    add_settings_arguments(cases)
    cases.add_argument("--state", choices=["collecting", "ready", "incomplete", "done", "failed"])
    _add_filter_arguments(cases, "series verdict")
    _add_format_arguments(cases)
    cases.set_defaults(handler=_audit_cases)

    slices = audit_commands.add_parser("slices", help="lesion-slice decisions (tau, q, margin, verdict) with filters")
    add_settings_arguments(slices)
    slices.add_argument("--state", choices=["collecting", "ready", "incomplete", "done", "failed"], help="case state")
    _add_filter_arguments(slices, "slice verdict")
    _add_format_arguments(slices)
    slices.set_defaults(handler=_audit_slices)

    vendors = audit_commands.add_parser("vendors", help="cases per SEG vendor and algorithm by verdict, with the reject rate")
    add_settings_arguments(vendors)
    _add_filter_arguments(vendors, "(ignored: every verdict is a column)")
    _add_format_arguments(vendors)
    vendors.set_defaults(handler=_audit_vendors)

    case = audit_commands.add_parser("case", help="one case slice by slice, with its outputs and deliveries")
    add_settings_arguments(case)
    case.add_argument("case_id", type=int, nargs="?")
    case.add_argument("--series", metavar="UID", help="find the case by its CT Series Instance UID instead")
    _add_format_arguments(case)
    case.set_defaults(handler=_audit_case)

    deliveries = audit_commands.add_parser("deliveries", help="the outbox: delivered, pending and dead letters")
    add_settings_arguments(deliveries)
    deliveries.add_argument("--state", choices=["pending", "held", "sent", "dead", "discarded"])
    deliveries.add_argument("--series", metavar="UID", help="only the outputs of this CT series")
    deliveries.add_argument("--kind", choices=["seg", "sr", "pmap", "report"], help="only this output kind")
    deliveries.add_argument("--sop-instance-uid", metavar="UID", help="only the output with this SOP Instance UID")
    deliveries.add_argument("--destination", type=_destination_arg, metavar="AE@HOST:PORT", help="only this destination")
    deliveries.add_argument("--limit", type=int)
    _add_format_arguments(deliveries)
    deliveries.set_defaults(handler=_audit_deliveries)

    actions = audit_commands.add_parser("actions", help="what people did (re-queued dead letters, ...): who, when, why")
    add_settings_arguments(actions)
    actions.add_argument("--user", metavar="NAME", help="only this user's actions")
    actions.add_argument("--action", metavar="NAME", help="only this action, e.g. delivery.retry")
    actions.add_argument("--since", type=parse_when, metavar="WHEN", help="from this time on: ISO date/time (UTC) or an age like 7d, 12h")
    actions.add_argument("--until", type=parse_when, metavar="WHEN", help="before this time (exclusive); same forms as --since")
    actions.add_argument("--limit", type=int)
    _add_format_arguments(actions)
    actions.set_defaults(handler=_audit_actions)

    outbox = subparsers.add_parser("deliveries", help="act on the outbox (re-queue dead letters)")
    outbox_commands = outbox.add_subparsers(dest="deliveries_command", metavar="ACTION", required=True)
    retry = outbox_commands.add_parser("retry", help="re-queue dead letters: pending again, next attempt now, attempts kept; audited")
    add_settings_arguments(retry)
    retry.add_argument("--dead", action="store_true", help="every dead letter (narrowed by --destination)")
    retry.add_argument("--destination", type=_destination_arg, metavar="AE@HOST:PORT", help="only dead letters for this destination")
    retry.add_argument("--id", type=int, metavar="N", help="only this delivery (it must be a dead letter)")
    retry.add_argument("--user", required=True, metavar="NAME", help="who asks (recorded in the actions table)")
    retry.add_argument("--reason", required=True, metavar="TEXT", help="why (recorded in the actions table)")
    retry.set_defaults(handler=_deliveries_retry)

    retention = subparsers.add_parser("retention", help="delete old cases' spool files and rows (storage.retention_days, disk watermark)")
    retention_commands = retention.add_subparsers(dest="retention_command", metavar="ACTION", required=True)
    run = retention_commands.add_parser("run", help="apply the retention policy once")
    add_settings_arguments(run)
    run.add_argument("--dry-run", action="store_true", help="say what would be deleted; delete nothing")
    run.add_argument("--format", choices=["table", "json"], default="table")
    run.set_defaults(handler=_retention_run)
