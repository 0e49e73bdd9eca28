"""Pipeline benchmark: from the last instance received to the SR delivered, with the stage breakdown.

    .venv/bin/python bench/bench_pipeline.py [--slices 300] [--lesion-slices 100] [--model phantom-full] [--repeats 3]
        [--reference ../wt-ref] [--warmup] [--no-feature-reference]

A SYNTHETIC 300-slice 512x512 CT with a lesion on ~100 slices and two FRACTIONAL ensemble members
is sent by storescu to `qcgate serve` (SQLite, one worker process, a DCMTK storescp destination).
Measured: wall time from storescu's last acknowledgement to the SR's delivery row being 'sent',
minus stable_seconds (the configured quiet time); the job's own stage timings; and the peak
resident memory of the gate and its worker processes together (sampled every 50 ms).
The reference run in the same process is plain feature extraction (`extract_slice_features`) on
the same lesion slices, the dominant stage, so the figure is also reported as a ratio.

``--reference DIR``: a checkout of another version (e.g. ``git worktree add --detach ../wt-ref arch``)
whose ``qcgate serve`` runs the same case in the same invocation, alternating with this checkout
(reference first in each repeat), with that checkout's own ``.venv/bin/python`` when it has one
(else this interpreter); ``PYTHONPATH`` points at the checkout either way.
``--warmup``: before the measured case, a small SYNTHETIC case (8 slices) goes through the same gate,
so the measured job finds a warm worker (model loaded, modules imported), as in steady operation;
without it every run measures a cold worker (the first job after ``serve`` starts).
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support import dcmtk_env, free_port  # noqa: E402

STABLE_SECONDS = 1.0


def make_case(out: Path, slices: int, lesion_slices: int, seed: int = 0, patient_id: str = "BENCHPIPE") -> tuple[list[Path], list[Path], np.ndarray, np.ndarray]:
    """SYNTHETIC CT + two FRACTIONAL members; returns (CT files, SEG files, HU volume, lesion masks)."""
    from scipy import ndimage

    from qcgate.phantom.dicom_export import write_ct_series, write_seg

    rng = np.random.default_rng(seed)
    size = 512
    yy, xx = np.mgrid[0:size, 0:size] / size
    body = ((yy - 0.5) / 0.42) ** 2 + ((xx - 0.5) / 0.48) ** 2 < 1
    lungs = (((yy - 0.5) / 0.3) ** 2 + ((xx - 0.3) / 0.14) ** 2 < 1) | (((yy - 0.5) / 0.3) ** 2 + ((xx - 0.7) / 0.14) ** 2 < 1)
    plane = np.where(body, 40.0, -1000.0)
    plane[lungs] = -850.0
    volume = np.repeat(plane[np.newaxis].astype(np.float32), slices, axis=0)
    for k in range(slices):  # float32, slice by slice: a 1,000-slice case stays within the bench's memory
        volume[k] += rng.normal(0, 20, (size, size)).astype(np.float32)
    masks = np.zeros(volume.shape, bool)
    first = (slices - lesion_slices) // 2
    for k in range(first, first + lesion_slices):
        radius = 0.02 + 0.04 * np.sin(np.pi * (k - first + 0.5) / lesion_slices)
        lesion = ((yy - 0.45) ** 2 + (xx - 0.3) ** 2) < radius**2
        masks[k] = lesion
        volume[k][lesion] = -350.0 + rng.normal(0, 60, int(lesion.sum()))
    datasets = write_ct_series(volume, (0.7, 0.7), 1.0, out / "ct", patient_id=patient_id)
    members = []
    for number, dilation in enumerate((0, 2), start=1):
        grown = np.stack([ndimage.binary_dilation(m, iterations=dilation) if dilation else m for m in masks])
        probabilities = np.stack([ndimage.gaussian_filter(m.astype(np.float32), 1.5) for m in grown]).clip(0, 1)
        path = out / f"member{number}.dcm"
        write_seg(datasets, probabilities, path, fractional=True, algorithm_name=f"BenchMember{number}",
                  manufacturer="qcgate bench", series_number=200 + number)
        members.append(path)
    return sorted((out / "ct").glob("*.dcm")), members, volume, masks


def descendants(pid: int) -> list[int]:
    found, frontier = [pid], [pid]
    while frontier:
        current = frontier.pop()
        children: list[str] = []
        try:  # a child belongs to the thread that started it: look at every thread
            for task in Path(f"/proc/{current}/task").iterdir():
                children += (task / "children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            found.append(child)
            frontier.append(child)
    return found


def rss_mb(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            pass
    return total


def _sr_sent(database: Path) -> int:
    with sqlite3.connect(database) as connection:
        return connection.execute(
            "SELECT count(*) FROM deliveries d JOIN outputs o ON o.id = d.output_id WHERE o.kind = 'sr' AND d.state = 'sent'"
        ).fetchone()[0]


def interpreter(repo: Path) -> Path:
    """The checkout's own virtual environment (``repo/.venv``: its packages, as installed there), else
    this interpreter."""
    own = repo / ".venv" / "bin" / "python"
    return own if own.exists() else Path(sys.executable)


def run_once(work: Path, files: list[Path], model: str, repo: Path = REPO, warmup: list[Path] | None = None,
             memory_limit_mb: int | None = None) -> dict[str, object]:
    pacs_dir = work / "pacs"
    pacs_dir.mkdir(parents=True, exist_ok=True)
    pacs_port, gate_port = free_port(), free_port()
    pacs = subprocess.Popen(["storescp", "-od", str(pacs_dir), str(pacs_port)], env=dcmtk_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    data_dir = work / "gate"
    config = work / "gate.toml"
    config.write_text(f'[node]\nport = {gate_port}\n[storage]\ndata_dir = "{data_dir}"\n'
                      f'[assembly]\nstable_seconds = {STABLE_SECONDS}\npoll_interval_seconds = 0.2\n'
                      f'[pipeline]\nworkers = 1\nmodel = "{model}"\n'
                      + (f'job_memory_limit_mb = {memory_limit_mb}\n' if memory_limit_mb is not None else '') +
                      f'[delivery]\ndestinations = ["PACS@127.0.0.1:{pacs_port}"]\npoll_interval_seconds = 0.2\n'
                      f'[observability]\nenabled = false\n')
    log = open(work / "gate.log", "wb")
    env = {**os.environ, "PYTHONPATH": str(repo)}  # the checkout under test, whatever is installed
    gate = subprocess.Popen([str(interpreter(repo)), "-m", "qcgate.cli", "serve", "--config", str(config)], stdout=log,
                            stderr=subprocess.STDOUT, cwd=repo, env=env)
    peak = [0.0, 0.0, 0.0]  # gate + workers together; the gate process alone; its descendants alone
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            pids = descendants(gate.pid)
            own, others = rss_mb(pids[:1]), rss_mb(pids[1:])
            peak[0], peak[1], peak[2] = max(peak[0], own + others), max(peak[1], own), max(peak[2], others)
            time.sleep(0.05)

    try:
        deadline = time.monotonic() + 60
        while b"listening on" not in (work / "gate.log").read_bytes():
            if time.monotonic() > deadline:
                raise RuntimeError((work / "gate.log").read_text())
            time.sleep(0.1)
        database = data_dir / "qcgate.db"
        if warmup:
            subprocess.run(["storescu", "-R", "-aec", "QCGATE", "127.0.0.1", str(gate_port), *map(str, warmup)],
                           env=dcmtk_env(), check=True, capture_output=True)
            while not (database.exists() and _sr_sent(database)):
                if time.monotonic() > deadline + 600:
                    raise RuntimeError("the warm-up case's SR was not delivered")
                time.sleep(0.1)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        subprocess.run(["storescu", "-R", "-aec", "QCGATE", "127.0.0.1", str(gate_port), *map(str, files)],
                       env=dcmtk_env(), check=True, capture_output=True)
        last_ack = time.monotonic()
        expected = 2 if warmup else 1
        while True:
            with sqlite3.connect(database) as connection:
                failed = connection.execute("SELECT reason FROM cases WHERE state = 'failed'").fetchone()
            if failed:
                raise RuntimeError(f"job failed: {failed[0]}")
            if _sr_sent(database) >= expected:
                break
            if time.monotonic() - last_ack > 600:
                raise RuntimeError("no SR delivered within 600 s")
            time.sleep(0.1)
        delivered = time.monotonic()
        with sqlite3.connect(database) as connection:
            job_id, case_id, timings = connection.execute("SELECT id, case_id, timings FROM jobs ORDER BY id DESC").fetchone()
            timings = json.loads(timings)
            lesion_slices = connection.execute("SELECT count(*) FROM slice_results WHERE case_id = ?", (case_id,)).fetchone()[0]
        stop.set()
        sampler.join()
        return {"seconds": delivered - last_ack - STABLE_SECONDS, "timings": timings, "peak_rss_mb": peak[0], "peak_gate_mb": peak[1], "peak_workers_mb": peak[2],
                "lesion_slices": lesion_slices}
    finally:
        stop.set()
        gate.terminate()
        gate.wait(timeout=30)
        pacs.terminate()


def reference_features_seconds(volume: np.ndarray, masks: np.ndarray) -> float:
    """Plain extract_slice_features on the lesion slices, mean-probability mask, no model."""
    from qcgate.features import extract_slice_features

    start = time.perf_counter()
    for k in np.flatnonzero(masks.reshape(masks.shape[0], -1).any(axis=1)):
        extract_slice_features(volume[k], masks[k], (0.7, 0.7))
    return time.perf_counter() - start


def summarise(label: str, runs: list[dict[str, object]]) -> None:
    seconds = statistics.median(float(r["seconds"]) for r in runs)
    each = ", ".join(f"{float(r['seconds']):.1f}" for r in runs)
    peaks = ", ".join(f"{float(r['peak_rss_mb']):.0f}" for r in runs)
    print(f"{label}: last instance -> SR delivered (stable_seconds excluded): median {seconds:.1f} s over {len(runs)} runs "
          f"({each}); peak RSS max {max(float(r['peak_rss_mb']) for r in runs):.0f} MB ({peaks}); "
          f"lesion slices {runs[0]['lesion_slices']}; own peaks max: gate {max(float(r['peak_gate_mb']) for r in runs):.0f} MB, "
          f"worker processes {max(float(r['peak_workers_mb']) for r in runs):.0f} MB")
    stages = sorted({stage for r in runs for stage in r["timings"]})
    medians = {stage: statistics.median(float(r["timings"].get(stage, 0)) for r in runs) for stage in stages}
    print(f"{label}: job stages (median s): " + ", ".join(f"{stage} {value:.2f}" for stage, value in medians.items()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--lesion-slices", type=int, default=100)
    parser.add_argument("--model", default="phantom-full")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference", type=Path, help="another checkout to run alternately (e.g. a worktree of arch)")
    parser.add_argument("--warmup", action="store_true", help="send a small case first: measure a warm worker")
    parser.add_argument("--reference-memory-limit-mb", type=int,
                        help="pipeline.job_memory_limit_mb for the reference runs only (0: none); default: the default")
    parser.add_argument("--no-feature-reference", action="store_true", help="skip the plain feature-extraction reference")
    args = parser.parse_args()
    versions = [("this", REPO)] + ([("reference", args.reference.resolve())] if args.reference else [])
    with tempfile.TemporaryDirectory(prefix="qcgate-bench-pipeline-", dir=REPO / "..") as tmp:
        work = Path(tmp)
        ct_files, members, volume, masks = make_case(work / "case", args.slices, args.lesion_slices)
        warmup = None
        if args.warmup:
            warm_ct, warm_members, _, _ = make_case(work / "warm", 8, 4, seed=1, patient_id="BENCHWARM")
            warmup = [*warm_ct, *warm_members]
        print(f"case: {len(ct_files)} SYNTHETIC slices, lesion on {int(masks.reshape(len(masks), -1).any(1).sum())}, "
              f"2 FRACTIONAL members; {'warm' if args.warmup else 'cold'} worker; versions: "
              + ", ".join(f"{name} {path} ({interpreter(path)})" for name, path in versions))
        runs: dict[str, list[dict[str, object]]] = {name: [] for name, _ in versions}
        for r in range(args.repeats):
            for name, repo in reversed(versions):  # the reference first in each repeat
                limit = args.reference_memory_limit_mb if name == "reference" else None
                runs[name].append(run_once(work / f"run{r}-{name}", [*ct_files, *members], args.model, repo, warmup, limit))
        reference = None
        if not args.no_feature_reference:
            reference = statistics.median(reference_features_seconds(volume, masks) for _ in range(args.repeats))
    for name, _ in versions:
        summarise(name, runs[name])
    if reference is not None:
        seconds = statistics.median(float(r["seconds"]) for r in runs["this"])
        print(f"feature reference: plain extract_slice_features on the same lesion slices {reference:.1f} s; ratio {seconds / reference:.2f}")


if __name__ == "__main__":
    main()
