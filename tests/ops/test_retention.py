"""Retention by age and by the disk watermark on a SYNTHETIC database with real files, over SQLite
and PostgreSQL: old finished cases go (rows and files), unfinished cases and undelivered outputs stay."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from bench.bench_audit import fill_synthetic_audit_db
from qcgate.config import load_settings
from qcgate.store.database import create_db_engine, make_session_factory, upgrade_database
from qcgate.store.retention import run_retention

NOW = dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.timezone.utc)
N_CASES = 40


@pytest.fixture
def filled(db_url: str, tmp_path: Path) -> Any:
    """A data dir whose database names real spool and output files; four old cases made unfinished
    or undelivered on purpose. Returns (settings overrides, engine, protected case ids)."""
    data_dir = tmp_path / "data"
    url = db_url or f"sqlite:///{data_dir / 'qcgate.db'}"
    engine = create_db_engine(url)
    upgrade_database(engine)
    fill_synthetic_audit_db(engine, n_cases=N_CASES, slices_per_case=2, seed=11, now=NOW, span_days=40)
    with engine.begin() as connection:
        rows = connection.execute(text("SELECT id FROM cases WHERE state = 'done' ORDER BY created_at")).scalars().all()
        ready, collecting, undelivered, running = rows[:4]  # the four oldest finished cases, made "busy"
        connection.execute(text("UPDATE cases SET state = 'ready' WHERE id = :c"), {"c": ready})
        connection.execute(text("UPDATE jobs SET state = 'pending' WHERE case_id = :c"), {"c": ready})
        connection.execute(text("UPDATE cases SET state = 'collecting' WHERE id = :c"), {"c": collecting})
        connection.execute(text("""UPDATE deliveries SET state = 'pending' WHERE output_id IN
            (SELECT id FROM outputs WHERE case_id = :c AND kind = 'sr')"""), {"c": undelivered})
        connection.execute(text("UPDATE jobs SET state = 'running' WHERE case_id = :c"), {"c": running})
        # every other delivery is settled, so the only undelivered output is the one above
        connection.execute(text("UPDATE deliveries SET state = 'sent' WHERE state = 'pending' AND output_id NOT IN "
                                "(SELECT id FROM outputs WHERE case_id = :c)"), {"c": undelivered})
        spool_paths = connection.execute(text("SELECT spool_path FROM instances")).scalars().all()
        output_paths = connection.execute(text("SELECT path FROM outputs")).scalars().all()
    for relative in spool_paths:
        path = data_dir / "spool" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"SYNTHETIC " * 10)
    for relative in output_paths:
        path = data_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"SYNTHETIC output")
    yield {"storage": {"data_dir": str(data_dir)}, "database": {"url": url}}, engine, {ready, collecting, undelivered, running}
    engine.dispose()


def _ages(engine: Any) -> dict[int, dt.datetime]:
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT id, created_at FROM cases")).all()
    out = {}
    for case_id, created in rows:
        created = dt.datetime.fromisoformat(created) if isinstance(created, str) else created
        out[case_id] = created if created.tzinfo else created.replace(tzinfo=dt.timezone.utc)
    return out


def _files_of(engine: Any, data_dir: Path, case_id: int) -> list[Path]:
    with engine.connect() as connection:
        spool = connection.execute(text("SELECT spool_path FROM instances WHERE case_id = :c"), {"c": case_id}).scalars().all()
        outputs = connection.execute(text("SELECT path FROM outputs WHERE case_id = :c"), {"c": case_id}).scalars().all()
    return [data_dir / "spool" / p for p in spool] + [data_dir / p for p in outputs]


def test_age_retention_deletes_old_finished_cases_only(filled: Any) -> None:
    overrides, engine, protected = filled
    settings = load_settings(None, {**overrides, "storage": {**overrides["storage"], "retention_days": 20}})
    data_dir = settings.storage.data_dir
    ages = _ages(engine)
    with engine.connect() as connection:
        states = dict(connection.execute(text("SELECT id, state FROM cases")).all())
    old = {cid for cid, created in ages.items() if created < NOW - dt.timedelta(days=20)}
    expected = {cid for cid in old if cid not in protected and states[cid] in ("done", "failed", "incomplete")}
    assert protected <= old and expected
    files_before = {cid: _files_of(engine, data_dir, cid) for cid in ages}

    dry = run_retention(settings, make_session_factory(engine), dry_run=True, now=NOW, free_mb=lambda: 1e6)
    assert set(dry.cases_by_age) == expected and len(_ages(engine)) == N_CASES
    assert all(path.exists() for paths in files_before.values() for path in paths)

    report = run_retention(settings, make_session_factory(engine), now=NOW, free_mb=lambda: 1e6)
    assert set(report.cases_by_age) == expected
    assert report.kept_unfinished == 3 and report.kept_undelivered == 1  # ready, collecting, running; the pending SR
    remaining = set(_ages(engine))
    assert remaining == set(ages) - expected
    for cid in expected:
        assert not any(path.exists() for path in files_before[cid])
        assert not (data_dir / "outputs" / f"case-{cid}").exists()  # emptied directories go too
    for cid in remaining:
        assert all(path.exists() for path in files_before[cid])
    with engine.connect() as connection:  # no orphan rows
        for table, column in (("slice_results", "case_id"), ("outputs", "case_id"), ("jobs", "case_id"), ("instances", "case_id")):
            orphans = connection.execute(text(f"SELECT count(*) FROM {table} WHERE {column} NOT IN (SELECT id FROM cases)")).scalar()
            assert orphans == 0, table
        assert connection.execute(text("SELECT count(*) FROM deliveries WHERE output_id NOT IN (SELECT id FROM outputs)")).scalar() == 0
    assert report.files_deleted == sum(len(files_before[cid]) for cid in expected)


def test_disk_watermark_deletes_oldest_eligible_until_above(filled: Any) -> None:
    overrides, engine, protected = filled
    settings = load_settings(None, {**overrides, "storage": {**overrides["storage"], "retention_free_mb": 1000}})
    spool = settings.storage.spool_dir

    def free_mb() -> float:  # a pretend disk: each spool file takes 10 MB of a 1,500 MB budget
        return 1500.0 - 10.0 * sum(1 for _ in spool.rglob("*.dcm"))

    ages_before = _ages(engine)
    with engine.connect() as connection:
        states = dict(connection.execute(text("SELECT id, state FROM cases")).all())
    assert free_mb() < 1000
    report = run_retention(settings, make_session_factory(engine), now=NOW, free_mb=free_mb)
    assert report.cases_by_age == [] and report.cases_by_disk
    assert free_mb() >= 1000 and report.free_mb_after == free_mb()
    deleted = report.cases_by_disk
    remaining = set(_ages(engine))
    assert not set(deleted) & protected and not set(deleted) & remaining
    # oldest first: every surviving eligible case is younger than every deleted one
    eligible_survivors = [c for c in remaining if c not in protected and states[c] in ("done", "failed", "incomplete")]
    assert eligible_survivors
    assert max(ages_before[c] for c in deleted) < min(ages_before[c] for c in eligible_survivors)
    assert [ages_before[c] for c in deleted] == sorted(ages_before[c] for c in deleted)
    # it stops as soon as the watermark is met: without the last case it was still below
    assert free_mb() - 10.0 * 4 < 1000  # a case has at most 4 spool files (1 CT + up to 3 SEGs)


def test_retention_command_dry_run_reports_json(filled: Any, tmp_path: Path) -> None:
    overrides, engine, _protected = filled
    config = tmp_path / "retention.toml"
    config.write_text(f'[storage]\ndata_dir = "{overrides["storage"]["data_dir"]}"\nretention_days = 20\n'
                      f'[database]\nurl = "{overrides["database"]["url"]}"\n')
    result = subprocess.run([sys.executable, "-m", "qcgate.cli", "retention", "run", "--config", str(config), "--dry-run", "--format", "json"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["dry_run"] is True and report["cases_by_age"] and report["files_deleted"] > 0
    assert len(_ages(engine)) == N_CASES  # a dry run deletes nothing


@pytest.mark.slow  # a qcgate serve process and real storescu sends
def test_a_series_resent_after_retention_is_stored_again(make_gate, tmp_path: Path) -> None:
    import time

    from tests.support import storescu, write_synthetic_case

    gate = make_gate()
    ct_files, seg_file = write_synthetic_case(tmp_path / "case", n_slices=3, size=64)
    assert storescu(gate.port, [*ct_files, seg_file]).returncode == 0
    gate.wait_for_cases(lambda cases: cases and cases[0]["state"] == "ready")
    from sqlalchemy import text as sql_text

    from qcgate.config import load_settings as load

    settings = load(gate.config_path, {"storage": {"retention_days": 0.00001}})
    engine = create_db_engine(settings.database_url)
    try:
        with engine.begin() as connection:  # the job finished and nothing is left to deliver
            connection.execute(sql_text("UPDATE cases SET state = 'done'"))
            connection.execute(sql_text("UPDATE jobs SET state = 'done'"))
        time.sleep(1.0)
        report = run_retention(settings, make_session_factory(engine))
        assert len(report.cases_by_age) == 1
    finally:
        engine.dispose()
    resend = storescu(gate.port, [*ct_files, seg_file])
    assert resend.returncode == 0 and "0xa700" not in (resend.stdout + resend.stderr).lower()
    cases = gate.wait_for_cases(lambda cases: cases and cases[0]["state"] == "ready")
    assert cases[0]["ct_instances"] == 3 and cases[0]["seg_instances"] == 1
