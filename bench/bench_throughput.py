"""Throughput with 1, 2 and 3 QC worker processes, and what it implies for more cores.

    .venv/bin/python bench/bench_throughput.py [--cases 4] [--slices 100] [--lesion-slices 30]
        [--workers 1 2 3] [--repeats 2] [--model phantom-full] [--no-warmup]

SYNTHETIC cases (`bench_pipeline.make_case`: a CT with a lesion and two FRACTIONAL members, each
case its own study) are all sent by storescu, one association per case, to one `qcgate serve`
(SQLite, `pipeline.workers = N`, a DCMTK storescp as the PACS), after one small warm-up case per
worker (steady operation: models loaded; `--no-warmup` measures cold workers). Measured per run: wall time from
the first instance sent to the last case's SR delivered, cases per minute, and the CPU seconds
(user + system) of the gate process and of its QC worker processes during the measured part, read
from /proc. The reference is the 1-worker run of the same repeat (runs interleaved: 1, 2, 3, 1,
2, 3, ...), so the figure is a ratio: speed-up(N) = median wall(1) / median wall(N).

Scaling beyond this machine is an estimate, not a measurement: with C cores and N ≤ C workers the
QC work (worker CPU per case, w) runs in parallel while the gate's own work per case (ingest,
assembly, delivery: g) stays in one process, so cases/s ≈ min(N / w, 1 / g) when nothing else
competes for the cores (Amdahl's bound with the gate as the serial part).
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_pipeline import descendants, make_case  # noqa: E402
from tests.support import dcmtk_env, free_port  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of one live process, in seconds (/proc/PID/stat fields 14 and 15)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def srs_sent(database: Path) -> int:
    if not database.exists():
        return 0
    with sqlite3.connect(database) as connection:
        return connection.execute("SELECT count(*) FROM deliveries d JOIN outputs o ON o.id = d.output_id "
                                  "WHERE o.kind = 'sr' AND d.state = 'sent'").fetchone()[0]


def send_all(port: int, cases: list[list[Path]]) -> None:
    """One storescu association per case, all at once."""
    senders = [subprocess.Popen(["storescu", "-R", "-aec", "QCGATE", "127.0.0.1", str(port), *map(str, files)],
                                env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for files in cases]
    if any(sender.wait(timeout=600) != 0 for sender in senders):
        raise RuntimeError("a storescu send failed")


def wait_for_srs(database: Path, count: int, since: float) -> None:
    while srs_sent(database) < count:
        with sqlite3.connect(database) as connection:
            failed = connection.execute("SELECT reason FROM cases WHERE state = 'failed'").fetchone()
        if failed:
            raise RuntimeError(f"a job failed: {failed[0]}")
        if time.monotonic() - since > 1800:
            raise RuntimeError("not every SR was delivered within 30 min")
        time.sleep(0.1)


def run_once(work: Path, cases: list[list[Path]], workers: int, model: str, warmup: list[list[Path]]) -> dict[str, float]:
    """One gate with ``workers`` QC processes; after ``workers`` warm-up cases (one per worker, so
    every worker has its model loaded), every measured case sent at once, until every SR is delivered."""
    pacs_dir, data_dir = work / "pacs", work / "gate"
    pacs_dir.mkdir(parents=True)
    pacs_port, gate_port = free_port(), free_port()
    pacs = subprocess.Popen(["storescp", "-od", str(pacs_dir), str(pacs_port)], env=dcmtk_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    config = work / "gate.toml"
    config.write_text(f'[node]\nport = {gate_port}\n[storage]\ndata_dir = "{data_dir}"\n'
                      '[assembly]\nstable_seconds = 1.0\npoll_interval_seconds = 0.2\n'
                      f'[pipeline]\nworkers = {workers}\nmodel = "{model}"\n'
                      f'[delivery]\ndestinations = ["PACS@127.0.0.1:{pacs_port}"]\npoll_interval_seconds = 0.2\n'
                      '[observability]\nenabled = false\n')
    with open(work / "gate.log", "wb") as log:
        gate = subprocess.Popen([sys.executable, "-m", "qcgate.cli", "serve", "--config", str(config)],
                                stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        deadline = time.monotonic() + 90
        while b"listening on" not in (work / "gate.log").read_bytes():
            if gate.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((work / "gate.log").read_text())
            time.sleep(0.1)
        database = data_dir / "qcgate.db"
        if warmup:
            send_all(gate_port, warmup[:workers])
            wait_for_srs(database, workers, time.monotonic())
        before = {pid: cpu_seconds(pid) for pid in descendants(gate.pid)}
        start = time.monotonic()
        send_all(gate_port, cases)
        received = time.monotonic() - start
        wait_for_srs(database, len(cases) + (workers if warmup else 0), start)
        wall = time.monotonic() - start
        processes = descendants(gate.pid)
        used = {pid: cpu_seconds(pid) - before.get(pid, 0.0) for pid in processes}
        return {"wall": wall, "received": received, "cases_per_min": 60 * len(cases) / wall,
                "gate_cpu": used[processes[0]], "worker_cpu": sum(used[pid] for pid in processes[1:])}
    finally:
        gate.terminate()
        gate.wait(timeout=60)
        pacs.terminate()
        pacs.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--lesion-slices", type=int, default=30)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model", default="phantom-full")
    parser.add_argument("--no-warmup", action="store_true", help="measure cold workers (imports and model load included)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qcgate-throughput-") as tmp:
        root = Path(tmp)
        cases = []
        for index in range(args.cases):  # each case its own study and series UIDs
            ct_files, seg_files, _, _ = make_case(root / f"case{index}", args.slices, args.lesion_slices, seed=index,
                                                  patient_id=f"BENCHTP{index}")
            cases.append([*ct_files, *seg_files])
        warmup = []
        for index in range(0 if args.no_warmup else max(args.workers)):  # small SYNTHETIC cases, one per worker
            ct_files, seg_files, _, _ = make_case(root / f"warm{index}", 8, 3, seed=100 + index, patient_id=f"BENCHWARM{index}")
            warmup.append([*ct_files, *seg_files])
        runs: dict[int, list[dict[str, float]]] = {n: [] for n in args.workers}
        for repeat in range(args.repeats):
            for workers in args.workers:
                result = run_once(root / f"run-{repeat}-{workers}", cases, workers, args.model, warmup)
                runs[workers].append(result)
                print(f"repeat {repeat + 1}, {workers} worker(s): {result['wall']:.1f} s, {result['cases_per_min']:.2f} cases/min, "
                      f"CPU gate {result['gate_cpu']:.1f} s, workers {result['worker_cpu']:.1f} s", flush=True)
    base = statistics.median(r["wall"] for r in runs[args.workers[0]])
    print(f"\n{args.cases} SYNTHETIC cases of {args.slices} slices ({args.lesion_slices} lesion slices, 2 members), "
          f"model {args.model}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    print("| workers | wall, median | cases/min | speed-up vs 1 | gate CPU / case | worker CPU / case |")
    print("|---|---|---|---|---|---|")
    for workers, results in runs.items():
        wall = statistics.median(r["wall"] for r in results)
        gate = statistics.median(r["gate_cpu"] for r in results) / args.cases
        work = statistics.median(r["worker_cpu"] for r in results) / args.cases
        print(f"| {workers} | {wall:.1f} s | {60 * args.cases / wall:.2f} | {base / wall:.2f} | {gate:.1f} s | {work:.1f} s |")
    gate = statistics.median(r["gate_cpu"] for rs in runs.values() for r in rs) / args.cases
    work = statistics.median(r["worker_cpu"] for rs in runs.values() for r in rs) / args.cases
    print(f"\nestimate for C free cores and N = C workers: cases/min ≈ min(60·N / {work:.1f}, 60 / {gate:.1f}) "
          f"= {', '.join(f'C={c}: {min(60 * c / work, 60 / gate):.1f}' for c in (4, 8, 16))}")


if __name__ == "__main__":
    main()
