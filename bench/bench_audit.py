"""Audit-query benchmark: the three operator questions on a generated database of ~1,000,000
slice rows, with and without the indexes of migration 0003.

    .venv/bin/python bench/bench_audit.py [--cases 50000] [--slices-per-case 20] [--repeats 7]
                                          [--backend sqlite|postgresql|both] [--seed 1]

The database is SYNTHETIC: every row is generated here (vendor names, UIDs and values are made up
and labelled so: manufacturer "SYNTHETIC vendor N", UIDs under the 2.25 root). It is filled with
bulk inserts at schema revision 0002 (no audit indexes), the queries are timed, then the database
is upgraded to 0003 (the indexes are built), statistics refreshed, and the same queries timed again.

Questions, asked through the same functions as `qcgate audit`:
  1. "all rejected series of vendor X last week"  -> list_cases(verdict=reject, vendor=X, since=7d)
  2. "why was this series rejected"               -> case_detail(case of a CT series UID)
  3. "was the SR delivered"                       -> list_deliveries(series=UID, kind=sr)
  plus "rejected slices of vendor X last week"     -> list_slices(verdict=reject, vendor=X, since=7d)
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sqlalchemy import Engine, Table, insert, text  # noqa: E402

from qcgate.store.database import create_db_engine, make_session_factory, upgrade_database  # noqa: E402
from qcgate.store.models import (  # noqa: E402
    AssociationRecord,
    Case,
    Delivery,
    DeliveryAttempt,
    Instance,
    Job,
    Output,
    SliceResultRecord,
)
from qcgate.core.dicom import COMPREHENSIVE_3D_SR_STORAGE as COMPREHENSIVE_3D_SR  # noqa: E402
from qcgate.core.dicom import CT_IMAGE_STORAGE, SEGMENTATION_STORAGE  # noqa: E402
from qcgate.store.queries import AuditFilters, case_detail, case_id_for_series, list_cases, list_deliveries, list_slices  # noqa: E402

SYNTHETIC_VENDORS = [f"SYNTHETIC vendor {n}" for n in range(1, 9)]
SYNTHETIC_ALGORITHMS = [f"SynthSeg{n}" for n in range(1, 6)]
CALLING_AES = ["AIROUTER", "PACS1", "PACS2", "MODALITY1", "RESEARCH"]
POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def synthetic_uid(rng: random.Random) -> str:
    """A made-up UID under the UUID-derived root 2.25 (SYNTHETIC)."""
    return f"2.25.{uuid.UUID(int=rng.getrandbits(128)).int}"


def _bulk_insert(engine: Engine, table: Table, rows: Sequence[dict[str, Any]]) -> None:
    """Insert many rows: COPY on PostgreSQL, executemany on SQLite, in one transaction."""
    if not rows:
        return
    columns = list(rows[0])
    if engine.dialect.name == "postgresql":
        with engine.begin() as connection:
            raw = connection.connection.driver_connection
            with raw.cursor() as cursor:  # type: ignore[union-attr]
                with cursor.copy(f"COPY {table.name} ({', '.join(columns)}) FROM STDIN") as copy:
                    for row in rows:
                        copy.write_row([row[c] for c in columns])
        return
    with engine.begin() as connection:
        for start in range(0, len(rows), 20_000):
            connection.execute(insert(table), list(rows[start:start + 20_000]))


def fill_synthetic_audit_db(engine: Engine, *, n_cases: int, slices_per_case: int, seed: int,
                            now: dt.datetime | None = None, span_days: float = 120.0,
                            progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Fill an empty qcgate database (any revision ≥ 0002) with SYNTHETIC cases.

    Per case: one association (one of five calling AEs), one CT instance row, one to three SEG rows
    (vendor, algorithm, version drawn per SEG), a QC job, ``slices_per_case`` slice results, a SEG
    and an SR output with one delivery each (mostly sent; some pending or dead), one attempt per
    delivery. Creation times are spread over the last ``span_days``. Returns probes for the timed
    questions: a vendor, and the CT series UID of a recent rejected case.
    """
    rng = random.Random(seed)
    now = now or dt.datetime.now(dt.timezone.utc)
    say = progress or (lambda _message: None)
    associations: list[dict[str, Any]] = []
    cases: list[dict[str, Any]] = []
    instances: list[dict[str, Any]] = []
    jobs: list[dict[str, Any]] = []
    slices: list[dict[str, Any]] = []
    outputs: list[dict[str, Any]] = []
    deliveries: list[dict[str, Any]] = []
    attempts: list[dict[str, Any]] = []
    probe: dict[str, Any] = {"vendor": SYNTHETIC_VENDORS[0], "rejected_series_uid": None}
    instance_id = 0
    for case_id in range(1, n_cases + 1):
        created = now - dt.timedelta(seconds=rng.uniform(0, span_days * 86400))
        processed = created + dt.timedelta(seconds=rng.uniform(40, 400))
        study_uid, series_uid = synthetic_uid(rng), synthetic_uid(rng)
        roll = rng.random()
        state = "done" if roll < 0.95 else ("failed" if roll < 0.98 else "collecting")
        verdict = rng.choices(["accept", "review", "reject"], weights=[0.6, 0.25, 0.15])[0] if state == "done" else None
        model_version = rng.choice(["1.0.0", "1.1.0", "2.0.0"])
        associations.append({"id": case_id, "calling_ae": rng.choice(CALLING_AES), "called_ae": "QCGATE", "peer_host": "127.0.0.1",
                             "peer_port": 40000 + case_id % 20000, "started_at": created, "ended_at": created, "outcome": "released",
                             "reason": None, "instances_stored": 3, "instances_refused": 0})
        cases.append({"id": case_id, "study_instance_uid": study_uid, "ct_series_uid": series_uid, "state": state,
                      "reason": "SYNTHETIC failure" if state == "failed" else None, "created_at": created,
                      "last_instance_at": created, "ready_at": created if state != "collecting" else None,
                      "series_verdict": verdict, "model_name": "synthetic-model" if state == "done" else None,
                      "model_version": model_version if state == "done" else None, "q_source": "ensemble" if state == "done" else None,
                      "n_members": 2, "uses_uncertainty": True, "notes": "SYNTHETIC benchmark row",
                      "processed_at": processed if state == "done" else None})
        instance_id += 1
        instances.append({"id": instance_id, "sop_instance_uid": synthetic_uid(rng), "sop_class_uid": CT_IMAGE_STORAGE,
                          "study_instance_uid": study_uid, "series_instance_uid": series_uid, "modality": "CT",
                          "transfer_syntax_uid": "1.2.840.10008.1.2.1", "spool_path": f"synthetic/{case_id}/ct.dcm",
                          "size_bytes": 525_000, "sha256": "0" * 64, "received_at": created, "association_id": case_id,
                          "case_id": case_id, "referenced_series_uid": None, "manufacturer": None, "algorithm_name": None,
                          "algorithm_version": None})
        for _member in range(rng.randint(1, 3)):
            instance_id += 1
            instances.append({"id": instance_id, "sop_instance_uid": synthetic_uid(rng), "sop_class_uid": SEGMENTATION_STORAGE,
                              "study_instance_uid": study_uid, "series_instance_uid": synthetic_uid(rng), "modality": "SEG",
                              "transfer_syntax_uid": "1.2.840.10008.1.2.1", "spool_path": f"synthetic/{case_id}/seg{instance_id}.dcm",
                              "size_bytes": 80_000, "sha256": "0" * 64, "received_at": created, "association_id": case_id,
                              "case_id": case_id, "referenced_series_uid": series_uid, "manufacturer": rng.choice(SYNTHETIC_VENDORS),
                              "algorithm_name": rng.choice(SYNTHETIC_ALGORITHMS), "algorithm_version": rng.choice(["0.9", "1.0", "1.2"])})
        job_state = {"done": "done", "failed": "failed", "collecting": None}[state]
        if job_state is None:
            continue
        jobs.append({"id": case_id, "case_id": case_id, "kind": "qc", "state": job_state, "attempts": 1, "created_at": created,
                     "started_at": created, "finished_at": processed, "worker": "synthetic", "error": cases[-1]["reason"],
                     "timings": '{"load": 1.0, "features": 4.0, "write": 0.5}'})
        if state != "done":
            continue
        if verdict == "reject" and now - created < dt.timedelta(days=3):
            probe["rejected_series_uid"] = series_uid
        for index in range(slices_per_case):
            tau = rng.uniform(0.4, 0.9)
            q = rng.uniform(0.2, 1.0)
            slice_verdict = "accept" if q >= tau + 0.1 else ("reject" if q < tau - 0.1 else "review")
            slices.append({"id": len(slices) + 1, "case_id": case_id, "job_id": case_id, "sop_instance_uid": f"2.25.{case_id}{index:04d}",
                           "slice_index": index, "tau": tau, "q": q, "margin": 0.1, "verdict": slice_verdict,
                           "lesion_area_mm2": rng.uniform(5, 900), "um_mean": rng.uniform(0, 0.2), "um_p90": rng.uniform(0, 0.4),
                           "key_features": '{"perimeter_area_ratio": 0.4, "lesion_area_px": 120}', "created_at": processed})
        for kind, sop_class in (("seg", SEGMENTATION_STORAGE), ("sr", COMPREHENSIVE_3D_SR)):
            output_id = len(outputs) + 1
            outputs.append({"id": output_id, "case_id": case_id, "job_id": case_id, "kind": kind, "sop_class_uid": sop_class,
                            "sop_instance_uid": synthetic_uid(rng), "path": f"outputs/case-{case_id}/{kind}.dcm", "created_at": processed})
            delivery_state = rng.choices(["sent", "pending", "dead"], weights=[0.97, 0.02, 0.01])[0]
            deliveries.append({"id": output_id, "output_id": output_id, "destination": "PACS@127.0.0.1:104", "state": delivery_state,
                               "attempts": 1, "next_attempt_at": processed, "last_error": None if delivery_state == "sent" else "SYNTHETIC refusal",
                               "delivered_at": processed if delivery_state == "sent" else None})
            attempts.append({"id": output_id, "delivery_id": output_id, "attempted_at": processed,
                             "outcome": "sent" if delivery_state == "sent" else "transient", "dimse_status": 0, "message": None})
    for table, rows in ((AssociationRecord.__table__, associations), (Case.__table__, cases), (Instance.__table__, instances),
                        (Job.__table__, jobs), (SliceResultRecord.__table__, slices), (Output.__table__, outputs),
                        (Delivery.__table__, deliveries), (DeliveryAttempt.__table__, attempts)):
        started = time.perf_counter()
        _bulk_insert(engine, table, rows)  # type: ignore[arg-type]
        say(f"  inserted {len(rows):>9,} rows into {table.name} in {time.perf_counter() - started:.1f} s")
    if engine.dialect.name == "postgresql":
        with engine.begin() as connection:  # explicit ids: move the sequences past them
            for table in ("associations", "cases", "instances", "jobs", "slice_results", "outputs", "deliveries", "delivery_attempts"):
                connection.execute(text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), COALESCE((SELECT max(id) FROM {table}), 1))"))
    probe["counts"] = {"cases": len(cases), "instances": len(instances), "slice_results": len(slices), "deliveries": len(deliveries)}
    return probe


def analyze(engine: Engine) -> None:
    """Refresh planner statistics (both engines plan from them). On PostgreSQL, VACUUM too: right
    after a bulk COPY the first reads would otherwise also set hint bits and write pages, which a
    database filled over months has long done."""
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(text("VACUUM ANALYZE"))
        return
    with engine.begin() as connection:
        connection.execute(text("ANALYZE"))


def time_questions(engine: Engine, probe: dict[str, Any], repeats: int, now: dt.datetime) -> dict[str, tuple[float, int]]:
    """Median wall time (ms) and row count of each question, each in a fresh session."""
    factory = make_session_factory(engine)
    week = AuditFilters(verdict="reject", vendor=probe["vendor"], since=now - dt.timedelta(days=7), until=now)
    series = probe["rejected_series_uid"]

    def why_rejected(session: Any) -> list[Any]:
        detail = case_detail(session, case_id_for_series(session, series))  # type: ignore[arg-type]
        return detail["slices"] if detail else []

    questions: dict[str, Callable[[Any], list[Any]]] = {
        "rejected series of vendor X last week": lambda s: list_cases(s, filters=week),
        "why was this series rejected": why_rejected,
        "was the SR delivered": lambda s: list_deliveries(s, series_uid=series, kind="sr"),
        "rejected slices of vendor X last week": lambda s: list_slices(s, week),
    }
    results: dict[str, tuple[float, int]] = {}
    for name, question in questions.items():
        times = []
        count = 0
        for _ in range(repeats):
            with factory() as session:
                started = time.perf_counter()
                count = len(question(session))
                times.append((time.perf_counter() - started) * 1000)
        results[name] = (statistics.median(times), count)
    return results


def _postgres_engine(name: str) -> tuple[Engine, Callable[[], None]]:
    import psycopg

    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    engine = create_db_engine(f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}")

    def drop() -> None:
        engine.dispose()
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return engine, drop


def run_backend(backend: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    if backend == "sqlite":
        engine = create_db_engine(f"sqlite:///{workdir / 'audit-bench.db'}")
        cleanup: Callable[[], None] = engine.dispose
    else:
        engine, cleanup = _postgres_engine(f"qcgate_bench_audit_{uuid.uuid4().hex[:8]}")
    try:
        now = dt.datetime.now(dt.timezone.utc)
        upgrade_database(engine, "0002")
        print(f"{backend}: filling {args.cases:,} SYNTHETIC cases x {args.slices_per_case} slices (seed {args.seed})", flush=True)
        started = time.perf_counter()
        probe = fill_synthetic_audit_db(engine, n_cases=args.cases, slices_per_case=args.slices_per_case, seed=args.seed,
                                        now=now, progress=lambda m: print(m, flush=True))
        fill_seconds = time.perf_counter() - started
        analyze(engine)
        without = time_questions(engine, probe, args.repeats, now)
        started = time.perf_counter()
        upgrade_database(engine, "0003")
        index_seconds = time.perf_counter() - started
        analyze(engine)
        with_indexes = time_questions(engine, probe, args.repeats, now)
        return {"backend": backend, "fill_seconds": fill_seconds, "index_seconds": index_seconds, "counts": probe["counts"],
                "without": without, "with": with_indexes}
    finally:
        cleanup()


def print_report(results: Iterable[dict[str, Any]], args: argparse.Namespace) -> None:
    print()
    for result in results:
        counts = result["counts"]
        print(f"### {result['backend']}: {counts['slice_results']:,} slice rows, {counts['cases']:,} cases, "
              f"{counts['instances']:,} instances, {counts['deliveries']:,} deliveries "
              f"(fill {result['fill_seconds']:.0f} s, building the 0003 indexes {result['index_seconds']:.1f} s)")
        print()
        print("| question | rows | without 0003 indexes (median ms) | with (median ms) | speed-up |")
        print("|---|---|---|---|---|")
        for name, (with_ms, count) in result["with"].items():
            without_ms = result["without"][name][0]
            print(f"| {name} | {count} | {without_ms:.1f} | {with_ms:.1f} | {without_ms / with_ms:.1f}x |")
        print()
    print(f"command: .venv/bin/python bench/bench_audit.py --cases {args.cases} --slices-per-case {args.slices_per_case} "
          f"--repeats {args.repeats} --backend {args.backend} --seed {args.seed}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=50_000)
    parser.add_argument("--slices-per-case", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    with tempfile.TemporaryDirectory(prefix="qcgate-bench-audit-") as tmp:
        results = [run_backend(backend, args, Path(tmp)) for backend in backends]
    print_report(results, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
