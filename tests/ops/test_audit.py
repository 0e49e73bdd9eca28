"""`qcgate audit` filters and exports on a SYNTHETIC database (bench_audit's generator), over
SQLite and PostgreSQL: every filter is checked against the same question answered in Python."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.bench_audit import fill_synthetic_audit_db
from qcgate.commands.store import parse_when
from qcgate.store.database import create_db_engine, upgrade_database

NOW = dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.timezone.utc)


def _qcgate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qcgate.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture
def audit_db(db_url: str, tmp_path: Path) -> tuple[list[str], Any]:
    """A filled database; returns (the CLI's database arguments, the engine)."""
    url = db_url or f"sqlite:///{tmp_path / 'qcgate.db'}"
    engine = create_db_engine(url)
    upgrade_database(engine)
    fill_synthetic_audit_db(engine, n_cases=120, slices_per_case=4, seed=7, now=NOW, span_days=30)
    yield ["--db-url", url] if db_url else ["--data-dir", str(tmp_path)], engine
    engine.dispose()


def _sql(engine: Any, query: str, **params: Any) -> list[tuple[Any, ...]]:
    from sqlalchemy import text

    with engine.connect() as connection:
        return [tuple(row) for row in connection.execute(text(query), params)]


def _json(*args: str) -> list[dict[str, Any]]:
    result = _qcgate(*args, "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_case_filters_match_the_database(audit_db: tuple[list[str], Any]) -> None:
    db_args, engine = audit_db
    vendor = "SYNTHETIC vendor 2"
    since = NOW - dt.timedelta(days=7)
    rows = _json("audit", "cases", *db_args, "--verdict", "reject", "--vendor", vendor, "--since", since.isoformat(),
                 "--until", NOW.isoformat())
    expected = {r[0] for r in _sql(engine, """
        SELECT DISTINCT c.id FROM cases c JOIN instances i ON i.case_id = c.id
        WHERE c.series_verdict = 'reject' AND i.manufacturer = :vendor""", vendor=vendor)}
    # dates compared in Python: SQLite stores text, PostgreSQL timestamptz
    created = {r[0]: r[1] for r in _sql(engine, "SELECT id, created_at FROM cases")}
    expected = {cid for cid in expected if since <= _aware(created[cid]) < NOW}
    assert {row["case_id"] for row in rows} == expected and expected
    assert all(vendor in row["vendors"].split(";") and row["series_verdict"] == "reject" for row in rows)


def _aware(value: Any) -> dt.datetime:
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def test_calling_ae_algorithm_and_model_version_filters(audit_db: tuple[list[str], Any]) -> None:
    db_args, engine = audit_db
    by_ae = _json("audit", "cases", *db_args, "--calling-ae", "PACS1")
    expected_ae = {r[0] for r in _sql(engine, """SELECT DISTINCT i.case_id FROM instances i
        JOIN associations a ON a.id = i.association_id WHERE a.calling_ae = 'PACS1'""")}
    assert {row["case_id"] for row in by_ae} == expected_ae and expected_ae
    by_algorithm = _json("audit", "cases", *db_args, "--algorithm", "SynthSeg3", "--model-version", "1.1.0")
    expected_algorithm = {r[0] for r in _sql(engine, """SELECT DISTINCT c.id FROM cases c JOIN instances i ON i.case_id = c.id
        WHERE i.algorithm_name = 'SynthSeg3' AND c.model_version = '1.1.0'""")}
    assert {row["case_id"] for row in by_algorithm} == expected_algorithm and expected_algorithm


def test_slices_filter_csv_export_and_output_file(audit_db: tuple[list[str], Any], tmp_path: Path) -> None:
    db_args, engine = audit_db
    target = tmp_path / "rejected-slices.csv"
    result = _qcgate("audit", "slices", *db_args, "--verdict", "reject", "--vendor", "SYNTHETIC vendor 1",
                     "--format", "csv", "--output", str(target))
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(target.read_text())))
    expected = _sql(engine, """SELECT count(*) FROM slice_results s WHERE s.verdict = 'reject' AND EXISTS
        (SELECT 1 FROM instances i WHERE i.case_id = s.case_id AND i.manufacturer = 'SYNTHETIC vendor 1')""")[0][0]
    assert len(rows) == expected > 0
    assert {row["verdict"] for row in rows} == {"reject"}
    assert all(float(row["q"]) < float(row["tau"]) - float(row["margin"]) for row in rows)  # the generator's rule
    json.loads(rows[0]["key_features"])  # one CSV cell of JSON


def test_why_rejected_and_was_the_sr_delivered_by_series(audit_db: tuple[list[str], Any]) -> None:
    db_args, engine = audit_db
    case_id, series_uid = _sql(engine, "SELECT id, ct_series_uid FROM cases WHERE series_verdict = 'reject' ORDER BY id")[0]
    detail = json.loads(_qcgate("audit", "case", *db_args, "--series", series_uid, "--format", "json").stdout)
    assert detail["case_id"] == case_id and detail["series_verdict"] == "reject"
    assert [s["slice_index"] for s in detail["slices"]] == [0, 1, 2, 3]
    case_csv = _qcgate("audit", "case", *db_args, str(case_id), "--format", "csv")
    assert case_csv.returncode == 0 and len(case_csv.stdout.strip().splitlines()) == 1 + 4
    deliveries = _json("audit", "deliveries", *db_args, "--series", series_uid, "--kind", "sr")
    state = _sql(engine, """SELECT d.state FROM deliveries d JOIN outputs o ON o.id = d.output_id
        WHERE o.case_id = :cid AND o.kind = 'sr'""", cid=case_id)
    assert [d["state"] for d in deliveries] == [s for (s,) in state] and deliveries[0]["attempts"] == 1
    missing = _qcgate("audit", "case", *db_args, "--series", "2.25.0")
    assert missing.returncode == 2 and "no case for CT series" in missing.stderr


def test_vendor_summary_counts(audit_db: tuple[list[str], Any]) -> None:
    db_args, engine = audit_db
    rows = _json("audit", "vendors", *db_args)
    for row in rows:
        expected = _sql(engine, """SELECT c.series_verdict, count(DISTINCT c.id) FROM cases c JOIN instances i ON i.case_id = c.id
            WHERE i.manufacturer = :v AND i.algorithm_name = :a AND i.algorithm_version = :ver GROUP BY c.series_verdict""",
                        v=row["vendor"], a=row["algorithm"], ver=row["algorithm_version"])
        counts = {verdict: n for verdict, n in expected}
        assert row["reject"] == counts.get("reject", 0) and row["accept"] == counts.get("accept", 0)
    total_reject = sum(row["reject"] for row in rows)
    assert total_reject >= _sql(engine, "SELECT count(*) FROM cases WHERE series_verdict = 'reject'")[0][0]


def test_parse_when_relative_and_iso() -> None:
    assert parse_when("7d", NOW) == NOW - dt.timedelta(days=7)
    assert parse_when("12h", NOW) == NOW - dt.timedelta(hours=12)
    assert parse_when("2026-11-22") == dt.datetime(2026, 11, 22, tzinfo=dt.timezone.utc)
    import argparse
    with pytest.raises(argparse.ArgumentTypeError):
        parse_when("last week")


def test_migration_0003_adds_and_removes_only_its_indexes(db_url: str, tmp_path: Path) -> None:
    from sqlalchemy import inspect

    url = db_url or f"sqlite:///{tmp_path / 'migrate.db'}"
    engine = create_db_engine(url)
    try:
        upgrade_database(engine, "0002")

        def indexes() -> set[str]:
            inspector = inspect(engine)
            return {ix["name"] for table in inspector.get_table_names() for ix in inspector.get_indexes(table)}

        before = indexes()
        upgrade_database(engine, "0003")
        added = indexes() - before
        assert {"ix_cases_verdict_created", "ix_instances_manufacturer_case", "ix_associations_calling_ae",
                "ix_slice_results_case_verdict_created", "ix_outputs_sop"} <= added
        from qcgate.store.database import downgrade_database

        downgrade_database(engine, "0002")
        assert indexes() == before
    finally:
        engine.dispose()
