"""Console benchmark: median latency of the case list and a case page on a big SYNTHETIC database.

    .venv/bin/python bench/bench_console.py [--cases 100000] [--slices-per-case 10] [--repeats 15]
                                            [--backend sqlite|postgresql|both] [--seed 1]

The database, at the head revision, is filled by bench/bench_audit.py's generator (SYNTHETIC rows,
labelled so) and served by the real console app (``qcgate.console.app.create_app``) through
Starlette's TestClient: each request goes through authentication (a viewer's bearer token), the
queries, and the Jinja2 rendering, but not a TCP socket. Timed pages:

  1. GET /cases                                   (page 1, newest first, 50 rows)
  2. GET /cases?verdict=reject&vendor=V           (a filter through EXISTS on the SEG rows)
  3. GET /cases?page=200                          (a deep page: OFFSET 9,950)
  4. GET /cases/{id}                              (a different processed case each time: slices,
                                                   outputs, deliveries, the trail)
  5. GET /api/cases/{id}                          (the same as JSON)
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sqlalchemy import select  # noqa: E402

from bench.bench_audit import _postgres_engine, analyze, fill_synthetic_audit_db  # noqa: E402
from qcgate.config import load_settings  # noqa: E402
from qcgate.console.app import create_app  # noqa: E402
from qcgate.store import users  # noqa: E402
from qcgate.store.database import create_db_engine, make_session_factory, upgrade_database  # noqa: E402
from qcgate.store.models import Case  # noqa: E402


def _client(app: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient
    return TestClient(app, base_url="http://127.0.0.1")


def _median_ms(client: Any, paths: list[str], headers: dict[str, str]) -> tuple[float, float]:
    times = []
    for path in paths:
        started = time.perf_counter()
        response = client.get(path, headers=headers)
        times.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200, (path, response.status_code, response.text[:300])
    return statistics.median(times), max(times)


def run_backend(backend: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    if backend == "sqlite":
        url = f"sqlite:///{workdir / 'console-bench.db'}"
        engine = create_db_engine(url)
        cleanup = engine.dispose
    else:
        name = f"qcgate_bench_console_{uuid.uuid4().hex[:8]}"
        engine, cleanup = _postgres_engine(name)
        url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    try:
        # bench_audit's COPY (PostgreSQL) lists only the generated columns: fill at 0003 and let 0004
        # backfill deliveries.queued_at; SQLite's executemany fills the new columns' defaults itself.
        upgrade_database(engine, "0003" if backend == "postgresql" else "head")
        print(f"{backend}: filling {args.cases:,} SYNTHETIC cases x {args.slices_per_case} slices (seed {args.seed})", flush=True)
        started = time.perf_counter()
        probe = fill_synthetic_audit_db(engine, n_cases=args.cases, slices_per_case=args.slices_per_case, seed=args.seed,
                                        progress=lambda m: print(m, flush=True))
        fill = time.perf_counter() - started
        upgrade_database(engine)
        analyze(engine)
        settings = load_settings(None, {"storage": {"data_dir": str(workdir / f"data-{backend}")}, "database": {"url": url}})
        factory = make_session_factory(engine)
        with factory() as session, session.begin():
            users.add_user(session, "bench", "viewer", "bench password")
            token = users.issue_token(session, "bench")
            processed = session.scalars(select(Case.id).where(Case.series_verdict.is_not(None))
                                        .order_by(Case.id.desc()).limit(5000)).all()
        headers = {"Authorization": f"Bearer {token}"}
        rng = random.Random(args.seed)
        ids = rng.sample(list(processed), 2 * args.repeats + 2)
        client = _client(create_app(settings, factory))
        client.get("/cases", headers=headers)  # warm: templates compiled, pool connected
        vendor = probe["vendor"]
        results = {
            "GET /cases": _median_ms(client, ["/cases"] * args.repeats, headers),
            f"GET /cases?verdict=reject&vendor={vendor}": _median_ms(
                client, [f"/cases?verdict=reject&vendor={vendor.replace(' ', '+')}"] * args.repeats, headers),
            "GET /cases?page=200": _median_ms(client, ["/cases?page=200"] * args.repeats, headers),
            "GET /cases/{id}": _median_ms(client, [f"/cases/{i}" for i in ids[:args.repeats]], headers),
            "GET /api/cases/{id}": _median_ms(client, [f"/api/cases/{i}" for i in ids[args.repeats:2 * args.repeats]], headers),
        }
        client.close()
        return {"backend": backend, "fill_seconds": fill, "counts": probe["counts"], "results": results}
    finally:
        cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=100_000)
    parser.add_argument("--slices-per-case", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    reports = []
    with tempfile.TemporaryDirectory(prefix="qcgate-bench-console-") as folder:
        for backend in backends:
            reports.append(run_backend(backend, args, Path(folder)))
    for report in reports:
        counts = ", ".join(f"{k} {v:,}" for k, v in report["counts"].items())
        print(f"\n{report['backend']}: {counts}; fill {report['fill_seconds']:.0f} s")
        print(f"  {'request':<58} {'median ms':>10} {'max ms':>8}")
        for name, (median, worst) in report["results"].items():
            print(f"  {name:<58} {median:>10.1f} {worst:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
