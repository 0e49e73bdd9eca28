"""Migration 0004 up and down, over SQLite and PostgreSQL: the actions table, deliveries.queued_at
(filled from the output's creation time for rows that existed before) and the outbox index."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import inspect, text

from qcgate.store.database import create_db_engine, downgrade_database, upgrade_database



def test_migration_0004_up_and_down(db_url: str, tmp_path: Path) -> None:
    url = db_url or f"sqlite:///{tmp_path / 'migrate.db'}"
    engine = create_db_engine(url)
    try:
        upgrade_database(engine, "0003")
        with engine.begin() as connection:  # a delivery made before 0004
            connection.execute(text("INSERT INTO cases (id, study_instance_uid, ct_series_uid, state, created_at, last_instance_at) "
                                    "VALUES (1, '1.2', '1.2.3', 'done', '2026-11-01 08:00:00', '2026-11-01 08:00:00')"))
            connection.execute(text("INSERT INTO jobs (id, case_id, kind, state, attempts, created_at) VALUES (1, 1, 'qc', 'done', 1, '2026-11-01 08:00:00')"))
            connection.execute(text("INSERT INTO outputs (id, case_id, job_id, kind, path, created_at) "
                                    "VALUES (1, 1, 1, 'sr', 'x.dcm', '2026-11-01 09:00:00')"))
            connection.execute(text("INSERT INTO deliveries (id, output_id, destination, state, attempts, next_attempt_at) "
                                    "VALUES (1, 1, 'PACS@h:104', 'dead', 8, '2026-11-01 09:00:00')"))
        tables_before = set(inspect(engine).get_table_names())
        upgrade_database(engine, "0004")
        inspector = inspect(engine)
        assert set(inspector.get_table_names()) - tables_before == {"actions"}
        assert {c["name"] for c in inspector.get_columns("actions")} == {"id", "at", "user", "action", "object_type", "object_id", "reason", "details"}
        columns = {c["name"]: c for c in inspector.get_columns("deliveries")}
        assert "queued_at" in columns and not columns["queued_at"]["nullable"]
        assert "ix_deliveries_destination_state" in {ix["name"] for ix in inspector.get_indexes("deliveries")}
        with engine.connect() as connection:
            queued = connection.execute(text("SELECT queued_at FROM deliveries WHERE id = 1")).scalar()
        assert str(queued).startswith("2026-11-01 09:00:00")
        downgrade_database(engine, "0003")
        inspector = inspect(engine)
        assert set(inspector.get_table_names()) == tables_before
        assert "queued_at" not in {c["name"] for c in inspector.get_columns("deliveries")}
        with engine.connect() as connection:  # the row survives the round trip
            assert connection.execute(text("SELECT state, attempts FROM deliveries")).all() == [("dead", 8)]
    finally:
        engine.dispose()
