"""Where one instance's time goes inside qcgate's C-STORE handler (companion to bench_ingest.py).

    .venv/bin/python bench/ingest_stages.py [--slices 300]

Runs the gate in this process, wraps the ingest stages with timers, sends a SYNTHETIC series with
storescu and prints the mean milliseconds per instance of each stage, next to the whole send.
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sqlalchemy.orm import Session  # noqa: E402

import qcgate.node.ingest as ingest  # noqa: E402
from bench.bench_ingest import write_series  # noqa: E402
from qcgate.config import load_settings  # noqa: E402
from qcgate.service import GateService  # noqa: E402
from tests.support import dcmtk_env, free_port  # noqa: E402

SECONDS: dict[str, float] = collections.defaultdict(float)


def timed(owner: object, name: str, label: str) -> None:
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            SECONDS[label] += time.perf_counter() - start

    setattr(owner, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slices", type=int, default=300)
    args = parser.parse_args()
    timed(ingest, "read_header", "header parse")
    timed(ingest, "sha256_of_file", "sha256 (read back; 0 when hashed while streaming)")
    timed(ingest, "_fsync_and_close", "file fsync (fsync thread: overlaps parse, SQL, rename, directory fsync)")
    timed(ingest, "fsync_directory", "directory fsync (once per batch and folder)")
    timed(ingest.Ingestor, "_insert_batch", "  SQL inserts and case touch (before the commit)")
    timed(Session, "commit", "  database commits (WAL fsync), every session")
    timed(ingest.Ingestor, "_store_batch", "group commit: SQL + rename + directory fsync + commit")
    timed(ingest.Ingestor, "ingest", "handler total (ingest)")
    with tempfile.TemporaryDirectory(prefix="qcgate-stages-", dir=REPO / "..") as tmp:
        files = write_series(Path(tmp) / "series", args.slices, 0, "STAGES")
        port = free_port()
        settings = load_settings(None, {"storage": {"data_dir": str(Path(tmp) / "gate")}, "node": {"port": port},
                                        "pipeline": {"workers": 0}, "observability": {"enabled": False}})
        service = GateService(settings)
        service.start()
        start = time.perf_counter()
        subprocess.run(["storescu", "-R", "-aec", "QCGATE", "127.0.0.1", str(port), *map(str, files)],
                       env=dcmtk_env(), check=True, capture_output=True)
        elapsed = time.perf_counter() - start
        service.stop()
    print(f"whole send: {1000 * elapsed / len(files):.2f} ms per instance ({len(files)} instances)")
    print(f"  pynetdicom receive and respond (whole send - handler): "
          f"{1000 * (elapsed - SECONDS['handler total (ingest)']) / len(files):.2f} ms per instance")
    for label, seconds in sorted(SECONDS.items()):
        print(f"  {label}: {1000 * seconds / len(files):.2f} ms per instance")


if __name__ == "__main__":
    main()
