"""Benchmark: `qcgate analyze` on the real LIDC set, wall time at 1 and 2 worker processes.

Run from the repository root:

    .venv/bin/python bench/bench_analyze.py            # print the figures
    .venv/bin/python bench/bench_analyze.py --write    # and replace the "## Analyze" section of BENCHMARKS.md

Each configuration runs the real command line (`qcgate analyze ../shared/data/lidc --out TMP
--workers N --quiet`) in a fresh process, ``--repeats`` times; the table shows the median and the
range. Only the "## Analyze" section of BENCHMARKS.md is touched; other sections are kept as they are.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.sections import write_section  # noqa: E402
LIDC = Path("..") / "shared" / "data" / "lidc"  # relative to the repository root
SECTION = "## Analyze"


PHASES = re.compile(r"features (?P<features>[0-9.]+) s, models (?P<models>[0-9.]+) s")


def run_once(workers: int, extra: list[str]) -> tuple[float, str, float]:
    """(wall seconds, stdout, CPU seconds user+sys of the command and its worker processes)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with tempfile.TemporaryDirectory(prefix="bench_analyze_") as out:
        command = [str(REPO / ".venv" / "bin" / "qcgate"), "analyze", str(LIDC), "--out", out,
                   "--workers", str(workers), "--quiet", *extra]
        started = time.perf_counter()
        completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
        elapsed = time.perf_counter() - started
        if completed.returncode != 0:
            sys.exit(f"analyze failed ({completed.returncode}):\n{completed.stderr}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return elapsed, completed.stdout, cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--write", action="store_true", help="update the Analyze section of BENCHMARKS.md")
    parser.add_argument("--max-patients", type=int, default=None, help="subset, for a quick check")
    args = parser.parse_args()
    extra = [] if args.max_patients is None else ["--max-patients", str(args.max_patients)]
    results: dict[int, list[float]] = {}
    phases: dict[int, list[tuple[float, float]]] = {}
    cpu_times: dict[int, list[float]] = {}
    loads: list[float] = []
    summary_line = ""
    # Interleave the configurations so that load from other jobs on a shared machine hits both alike.
    for _ in range(args.repeats):
        for workers in args.workers:
            loads.append(os.getloadavg()[0])
            elapsed, stdout, cpu = run_once(workers, extra)
            results.setdefault(workers, []).append(elapsed)
            cpu_times.setdefault(workers, []).append(cpu)
            summary_line = stdout.splitlines()[0] if stdout else summary_line
            match = PHASES.search(stdout)
            if match:
                phases.setdefault(workers, []).append((float(match["features"]), float(match["models"])))
            print(f"workers={workers}: {elapsed:.1f} s wall, {cpu:.1f} s CPU (load {loads[-1]:.1f})", flush=True)
    base = statistics.median(results[args.workers[0]])
    subset = "" if args.max_patients is None else f" --max-patients {args.max_patients}"
    rows = [
        "| workers | wall time (median) | range | speed-up vs 1 | CPU time (median) | feature extraction (median) | Ridge CV (median) |",
        "|---|---|---|---|---|---|---|",
    ]
    for workers, times in results.items():
        median = statistics.median(times)
        features = statistics.median(p[0] for p in phases.get(workers, [(math.nan, math.nan)]))
        models = statistics.median(p[1] for p in phases.get(workers, [(math.nan, math.nan)]))
        rows.append(f"| {workers} | {median:.1f} s | {min(times):.1f}–{max(times):.1f} s | {base / median:.2f}× | "
                    f"{statistics.median(cpu_times[workers]):.1f} s | {features:.1f} s | {models:.1f} s |")
    body = "\n".join([
        "`qcgate analyze` on the real LIDC masks (geometry group, 10-fold patient-grouped CV), "
        "whole command wall time including start-up, feature extraction, Ridge CV and writing outputs.",
        "",
        f"Command (from the repository root): `.venv/bin/python bench/bench_analyze.py{' --repeats ' + str(args.repeats) if args.repeats != 1 else ''}{subset}`, "
        f"which runs `qcgate analyze ../shared/data/lidc --out TMP --workers N --quiet{subset}` for N in "
        f"{', '.join(map(str, args.workers))}.",
        "",
        f"Machine: {os.cpu_count()} cores ({platform.processor() or platform.machine()}), Python {platform.python_version()}; "
        f"shared with other engineers' jobs: 1-minute load average before the runs "
        f"{min(loads):.1f}–{max(loads):.1f}, so wall times are noisy: with other jobs holding about a core, "
        "a second worker has little idle CPU to use. CPU time (user + sys of the command and its workers) "
        "shows the work itself. Feature extraction and Ridge CV are the command's own phase timings. "
        f"Last run: {summary_line}",
        "",
        *rows,
    ])
    print()
    print(body)
    if args.write:
        write_section(SECTION, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
