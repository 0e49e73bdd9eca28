"""Pipeline benchmark: from the last instance received to the SR delivered, with the stage breakdown.

    .venv/bin/python bench/bench_pipeline.py [--slices 300] [--lesion-slices 100] [--model phantom-full] [--repeats 3]

A SYNTHETIC 300-slice 512x512 CT with a lesion on ~100 slices and two FRACTIONAL ensemble members
is sent by storescu to `qcgate serve` (SQLite, one worker process, a DCMTK storescp destination).
Measured: wall time from storescu's last acknowledgement to the SR's delivery row being 'sent',
minus stable_seconds (the configured quiet time); the job's own stage timings; and the peak
resident memory of the gate and its worker processes together (sampled every 50 ms).
The reference run in the same process is plain feature extraction (`extract_slice_features`) on
the same lesion slices, the dominant stage, so the figure is also reported as a ratio.
"""

from __future__ import annotations

import argparse
import json
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


def make_case(out: Path, slices: int, lesion_slices: int, seed: int = 0) -> tuple[list[Path], list[Path], np.ndarray, np.ndarray]:
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
    volume = np.repeat(plane[np.newaxis], slices, axis=0) + rng.normal(0, 20, (slices, size, size))
    masks = np.zeros(volume.shape, bool)
    first = (slices - lesion_slices) // 2
    for k in range(first, first + lesion_slices):
        radius = 0.02 + 0.04 * np.sin(np.pi * (k - first + 0.5) / lesion_slices)
        lesion = ((yy - 0.45) ** 2 + (xx - 0.3) ** 2) < radius**2
        masks[k] = lesion
        volume[k][lesion] = -350.0 + rng.normal(0, 60, int(lesion.sum()))
    datasets = write_ct_series(volume, (0.7, 0.7), 1.0, out / "ct", patient_id="BENCHPIPE")
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


def run_once(work: Path, files: list[Path], model: str) -> dict[str, object]:
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
                      f'[delivery]\ndestinations = ["PACS@127.0.0.1:{pacs_port}"]\npoll_interval_seconds = 0.2\n'
                      f'[observability]\nenabled = false\n')
    log = open(work / "gate.log", "wb")
    gate = subprocess.Popen([sys.executable, "-m", "qcgate.cli", "serve", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    peak = [0.0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_mb(descendants(gate.pid)))
            time.sleep(0.05)

    try:
        deadline = time.monotonic() + 60
        while b"listening on" not in (work / "gate.log").read_bytes():
            if time.monotonic() > deadline:
                raise RuntimeError((work / "gate.log").read_text())
            time.sleep(0.1)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        subprocess.run(["storescu", "-R", "-aec", "QCGATE", "127.0.0.1", str(gate_port), *map(str, files)],
                       env=dcmtk_env(), check=True, capture_output=True)
        last_ack = time.monotonic()
        database = data_dir / "qcgate.db"
        while True:
            with sqlite3.connect(database) as connection:
                state = connection.execute("SELECT state, reason FROM cases").fetchone()
                sent = connection.execute(
                    "SELECT count(*) FROM deliveries d JOIN outputs o ON o.id = d.output_id WHERE o.kind = 'sr' AND d.state = 'sent'"
                ).fetchone()[0]
            if state and state[0] == "failed":
                raise RuntimeError(f"job failed: {state[1]}")
            if sent:
                break
            if time.monotonic() - last_ack > 600:
                raise RuntimeError("no SR delivered within 600 s")
            time.sleep(0.1)
        delivered = time.monotonic()
        with sqlite3.connect(database) as connection:
            timings = json.loads(connection.execute("SELECT timings FROM jobs").fetchone()[0])
            lesion_slices = connection.execute("SELECT count(*) FROM slice_results").fetchone()[0]
        stop.set()
        sampler.join()
        return {"seconds": delivered - last_ack - STABLE_SECONDS, "timings": timings, "peak_rss_mb": peak[0],
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--lesion-slices", type=int, default=100)
    parser.add_argument("--model", default="phantom-full")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qcgate-bench-pipeline-", dir=REPO / "..") as tmp:
        work = Path(tmp)
        ct_files, members, volume, masks = make_case(work / "case", args.slices, args.lesion_slices)
        print(f"case: {len(ct_files)} SYNTHETIC slices, lesion on {int(masks.reshape(len(masks), -1).any(1).sum())}, 2 FRACTIONAL members")
        runs = [run_once(work / f"run{r}", [*ct_files, *members], args.model) for r in range(args.repeats)]
        reference = statistics.median(reference_features_seconds(volume, masks) for _ in range(args.repeats))
    seconds = statistics.median(float(r["seconds"]) for r in runs)
    peak = max(float(r["peak_rss_mb"]) for r in runs)
    each = ", ".join(f"{float(r['seconds']):.1f}" for r in runs)
    print(f"last instance -> SR delivered (stable_seconds excluded): median {seconds:.1f} s over {args.repeats} runs "
          f"({each}); peak RSS {peak:.0f} MB; lesion slices {runs[0]['lesion_slices']}")
    stages = sorted({stage for r in runs for stage in r["timings"]})
    medians = {stage: statistics.median(float(r["timings"].get(stage, 0)) for r in runs) for stage in stages}
    print("job stages (median s): " + ", ".join(f"{stage} {value:.2f}" for stage, value in medians.items()))
    print(f"reference: plain extract_slice_features on the same lesion slices {reference:.1f} s; ratio {seconds / reference:.2f}")


if __name__ == "__main__":
    main()
