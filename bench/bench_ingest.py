"""Ingest benchmark: storescu -> qcgate serve vs storescu -> DCMTK storescp, in the same run.

    .venv/bin/python bench/bench_ingest.py [--slices 300] [--repeats 5] [--senders 4] [--big-frames 1000]

1. One sender: a 300-slice 512x512 CT series (SYNTHETIC, ~157 MB) to each receiver, alternating,
   each repeat into a fresh data dir; the figure is median(qcgate) / median(storescp).
2. Four concurrent storescu senders, each with its own series: aggregate MB/s and loss
   (instances acknowledged by storescu vs rows in the database).
3. Peak resident memory of the node while it receives one FRACTIONAL SEG of --big-frames
   512x512 frames (SYNTHETIC), against the size of that instance.
Both receivers write to the same filesystem; qcgate runs with durability on (fsync + SQLite FULL).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support import dcmtk_env, free_port, synthetic_ct_volume  # noqa: E402


def write_series(out: Path, slices: int, seed: int, patient: str) -> list[Path]:
    from qcgate.phantom.dicom_export import write_ct_series

    volume = synthetic_ct_volume(slices, 512, seed)
    write_ct_series(volume, (0.7, 0.7), 1.0, out, patient_id=patient)
    return sorted(out.glob("*.dcm"))


def send(port: int, files: list[Path], called: str) -> float:
    start = time.perf_counter()
    result = subprocess.run(["storescu", "-R", "-aec", called, "127.0.0.1", str(port), *map(str, files)],
                            env=dcmtk_env(), capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"storescu failed: {result.stderr[-2000:]}")
    return elapsed


def start_storescp(port: int, out: Path) -> subprocess.Popen[bytes]:
    out.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(["storescp", "-od", str(out), str(port)], env=dcmtk_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    return process


def start_gate(port: int, data_dir: Path, log: Path, fsync: bool = True, tree: Path = REPO) -> subprocess.Popen[bytes]:
    """``qcgate serve`` from the source tree ``tree`` (another checkout: a before/after comparison)."""
    handle = open(log, "wb")
    config = log.with_suffix(".toml")
    config.write_text(f"[storage]\ndata_dir = \"{data_dir}\"\nfsync = {'true' if fsync else 'false'}\n"
                      f"[node]\nport = {port}\n[assembly]\nstable_seconds = 600\n[pipeline]\nworkers = 0\n")
    env = {**os.environ, "PYTHONPATH": str(tree)}
    process = subprocess.Popen([sys.executable, "-m", "qcgate.cli", "serve", "--config", str(config)],
                               stdout=handle, stderr=subprocess.STDOUT, cwd=tree, env=env)
    deadline = time.monotonic() + 60
    while f"listening on 127.0.0.1:{port}".encode() not in log.read_bytes():
        if time.monotonic() > deadline or process.poll() is not None:
            raise RuntimeError(log.read_text())
        time.sleep(0.1)
    return process


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """Until something accepts on ``port`` (a loaded machine starts Python slowly)."""
    import socket

    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"nothing listens on {port}") from None
            time.sleep(0.1)


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def count_rows(data_dir: Path) -> int:
    import sqlite3

    with sqlite3.connect(data_dir / "qcgate.db") as connection:
        return int(connection.execute("SELECT count(*) FROM instances").fetchone()[0])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--big-frames", type=int, default=1000, help="0: skip the large-instance memory check")
    parser.add_argument("--baseline-tree", type=Path, help="also run qcgate from this checkout (e.g. a worktree of the commit before)")
    parser.add_argument("--skip-nofsync", action="store_true", help="do not run qcgate with storage.fsync = false")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="qcgate-bench-", dir=REPO / "..") as tmp:
        work = Path(tmp)
        files = write_series(work / "series", args.slices, 0, "BENCH0")
        size_mb = sum(p.stat().st_size for p in files) / 1e6
        print(f"series: {len(files)} SYNTHETIC slices, {size_mb:.0f} MB")

        # The receivers, interleaved per repeat so machine noise hits them alike: storescp (the
        # reference), pynetdicom with a null handler (the library's floor) as shipped and with
        # qcgate's reactors (the floor qcgate runs on), qcgate without fsync, qcgate as deployed
        # (durable), and optionally qcgate from another checkout.
        gates = [("qcgate", True, REPO)]
        if not args.skip_nofsync:
            gates.insert(0, ("qcgate-nofsync", False, REPO))
        if args.baseline_tree:
            gates.insert(0, ("qcgate-baseline", True, args.baseline_tree.resolve()))
        nulls = [("pynetdicom-null", []), ("pynetdicom-null-tuned", ["--tuned"])]
        times: dict[str, list[float]] = {"storescp": [], **{label: [] for label, _ in nulls}, **{label: [] for label, _, _ in gates}}
        for repeat in range(args.repeats):
            port = free_port()
            scp = start_storescp(port, work / f"scp{repeat}")
            try:
                times["storescp"].append(send(port, files, "ANY-SCP"))
            finally:
                stop(scp)
            for label, flags in nulls:
                port = free_port()
                null = subprocess.Popen([sys.executable, str(REPO / "bench" / "null_scp.py"), str(port), *flags])
                wait_for_port(port, null)
                try:
                    times[label].append(send(port, files, "NULLSCP"))
                finally:
                    stop(null)
            for label, fsync, tree in gates:
                port = free_port()
                gate = start_gate(port, work / f"{label}{repeat}", work / f"{label}{repeat}.log", fsync=fsync, tree=tree)
                try:
                    times[label].append(send(port, files, "QCGATE"))
                finally:
                    stop(gate)
            print("  repeat %d: " % repeat + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()))
        medians = {k: statistics.median(v) for k, v in times.items()}
        reference = medians["storescp"]
        print("single sender, medians: " + ", ".join(f"{k} {m:.2f} s (x{m / reference:.1f})" for k, m in medians.items()))
        print(f"qcgate durable: {size_mb / medians['qcgate']:.0f} MB/s, "
              f"{1000 * medians['qcgate'] / len(files):.1f} ms per instance; library floor "
              f"{1000 * medians['pynetdicom-null'] / len(files):.1f} ms, tuned "
              f"{1000 * medians['pynetdicom-null-tuned'] / len(files):.1f} ms; storescp {1000 * reference / len(files):.1f} ms")
        for label in [g[0] for g in gates]:
            print(f"{label}: x{medians[label] / medians['pynetdicom-null-tuned']:.2f} the tuned floor, "
                  f"x{medians[label] / medians['pynetdicom-null']:.2f} the shipped floor")
        print(f"load average (1, 5, 15 min) at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")

        # Concurrent senders, each with its own series.
        series = [files] + [write_series(work / f"series{i}", max(args.slices // 4, 10), i, f"BENCH{i}") for i in range(1, args.senders)]
        for label, _, tree in [g for g in gates if g[1]]:
          port = free_port()
          data_dir = work / f"{label}-concurrent"
          gate = start_gate(port, data_dir, work / f"{label}-concurrent.log", tree=tree)
          try:
            start = time.perf_counter()
            senders = [subprocess.Popen(["storescu", "-R", "-aec", "QCGATE", "127.0.0.1", str(port), *map(str, s)],
                                        env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for s in series]
            codes = [p.wait() for p in senders]
            elapsed = time.perf_counter() - start
          finally:
            stop(gate)
          sent = sum(len(s) for s in series)
          total_mb = sum(p.stat().st_size for s in series for p in s) / 1e6
          stored = count_rows(data_dir)
          print(f"{label}: {args.senders} concurrent senders: {sent} instances, {total_mb:.0f} MB in {elapsed:.2f} s "
                f"= {total_mb / elapsed:.0f} MB/s; storescu exit codes {codes}; stored {stored}; lost {sent - stored}")
        if args.big_frames <= 0:
            return

        # Peak memory while receiving one large instance.
        from qcgate.phantom.dicom_export import write_seg
        import pydicom

        big_ct = write_series(work / "big-ct", args.big_frames, 7, "BENCHBIG")
        datasets = [pydicom.dcmread(p, stop_before_pixels=False) for p in big_ct]
        rng = np.random.default_rng(7)
        probabilities = rng.random((args.big_frames, 512, 512), dtype=np.float32)
        seg_path = work / "big-seg.dcm"
        write_seg(datasets, probabilities, seg_path, fractional=True, algorithm_name="BenchAI",
                  manufacturer="qcgate bench", omit_empty_frames=False)
        del datasets, probabilities
        seg_mb = seg_path.stat().st_size / 1e6
        port = free_port()
        gate = start_gate(port, work / "gate-big", work / "gate-big.log")
        try:
            before = peak_rss_mb(gate.pid)
            send(port, [seg_path], "QCGATE")
            after = peak_rss_mb(gate.pid)
        finally:
            stop(gate)
        print(f"large instance: FRACTIONAL SEG {args.big_frames} frames, {seg_mb:.0f} MB; node peak RSS "
              f"{before:.0f} MB before, {after:.0f} MB after (growth {after - before:.0f} MB)")


if __name__ == "__main__":
    main()
