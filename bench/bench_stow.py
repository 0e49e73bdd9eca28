"""STOW-RS ingest vs C-STORE ingest of the same series, side by side in one run.

    .venv/bin/python bench/bench_stow.py [--slices 300] [--repeats 5] [--per-request 30]

A 300-slice 512x512 CT series (SYNTHETIC, ~157 MB, written like bench/bench_ingest.py does) is sent to
a fresh `qcgate serve` (durable: fsync + SQLite FULL, workers = 0) each time, alternating per repeat:

- c-store:   storescu (DCMTK, one association) -> the gate's DICOM port
- stow-N:    httpx, one keep-alive connection, requests of N instances each, bodies streamed from the
             files (multipart/related; type="application/dicom"), bearer token of a `sender` user
- stow-all:  httpx, the whole series in one request

Each time is the sender's wall time until its last response (every instance durable and committed).
The order of the three rotates per repeat. The figure is median(stow) / median(c-store).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_ingest import count_rows, send, stop, write_series  # noqa: E402
from tests.support import free_port  # noqa: E402

CHUNK = 1 << 20


def start_gate(work: Path, label: str) -> tuple[subprocess.Popen[bytes], int, int, Path, str]:
    data_dir, port, http_port = work / label, free_port(), free_port()
    log, config = work / f"{label}.log", work / f"{label}.toml"
    config.write_text(f"[storage]\ndata_dir = \"{data_dir}\"\n[node]\nport = {port}\n[http]\nport = {http_port}\n"
                      f"[assembly]\nstable_seconds = 600\n[pipeline]\nworkers = 0\n")
    cli = [sys.executable, "-m", "qcgate.cli", "users"]
    subprocess.run([*cli, "add", "bench", "--role", "sender", "--password-stdin", "--config", str(config)],
                   input=b"a long bench passphrase\n", check=True, capture_output=True, cwd=REPO)
    issued = subprocess.run([*cli, "token", "bench", "--config", str(config)], check=True, capture_output=True, text=True, cwd=REPO)
    token = next(word for word in issued.stdout.split() if word.startswith("qcg_"))
    process = subprocess.Popen([sys.executable, "-m", "qcgate.cli", "serve", "--config", str(config)],
                               stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.monotonic() + 60
    while f"listening on 127.0.0.1:{port}".encode() not in log.read_bytes() or b"console, API" not in log.read_bytes():
        if time.monotonic() > deadline or process.poll() is not None:
            raise RuntimeError(log.read_text())
        time.sleep(0.1)
    return process, port, http_port, data_dir, token


def body(files: list[Path], boundary: str) -> Iterator[bytes]:
    for path in files:
        yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        with open(path, "rb") as handle:
            while block := handle.read(CHUNK):
                yield block
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


def stow(http_port: int, token: str, files: list[Path], per_request: int) -> float:
    import httpx

    boundary = uuid.uuid4().hex
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/dicom+json",
               "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}
    with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=600) as client:
        start = time.perf_counter()
        for first in range(0, len(files), per_request):
            batch = files[first:first + per_request]
            size = sum(p.stat().st_size for p in batch)  # a Content-Length, as most senders send
            length = size + sum(len(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n\r\n") for _ in batch) + len(boundary) + 6
            response = client.post("/dicomweb/studies", content=body(batch, boundary),
                                   headers={**headers, "Content-Length": str(length)})
            if response.status_code != 200:
                raise RuntimeError(f"STOW-RS answered {response.status_code}: {response.text[:500]}")
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--per-request", type=int, default=30)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="qcgate-bench-stow-", dir=REPO / "..") as tmp:
        work = Path(tmp)
        files = write_series(work / "series", args.slices, 0, "BENCHSTOW")
        size_mb = sum(p.stat().st_size for p in files) / 1e6
        print(f"series: {len(files)} SYNTHETIC slices, {size_mb:.0f} MB")
        labels = ["c-store", f"stow-{args.per_request}", "stow-all"]
        times: dict[str, list[float]] = {label: [] for label in labels}
        for repeat in range(args.repeats):
            for label in labels[repeat % 3:] + labels[:repeat % 3]:  # the order rotates: no sender always goes first
                gate, port, http_port, data_dir, token = start_gate(work, f"{label}-{repeat}")
                try:
                    if label == "c-store":
                        elapsed = send(port, files, "QCGATE")
                    else:
                        elapsed = stow(http_port, token, files, args.per_request if label != "stow-all" else len(files))
                finally:
                    stop(gate)
                rows = count_rows(data_dir)
                if rows != len(files):
                    raise RuntimeError(f"{label}: {rows} rows for {len(files)} instances")
                times[label].append(elapsed)
            print(f"  repeat {repeat}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
        medians = {k: statistics.median(v) for k, v in times.items()}
        reference = medians["c-store"]
        print("medians: " + ", ".join(f"{k} {m:.2f} s ({size_mb / m:.0f} MB/s, x{m / reference:.2f})" for k, m in medians.items()))


if __name__ == "__main__":
    main()
