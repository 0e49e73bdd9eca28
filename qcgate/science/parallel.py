"""Process-pool plumbing shared by feature extraction and the Ridge cross-validation of ``qcgate analyze``:
one BLAS/OpenMP thread per worker process, and a progress meter on stderr."""

from __future__ import annotations

import sys
import time


def single_threaded() -> None:
    """One BLAS/OpenMP thread per worker process: the pool already uses every core."""
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        pass


class AnalysisProgress:
    """Prints "label: done/total (pct) elapsed" to stderr at most every ``interval`` seconds."""

    def __init__(self, label: str, total: int, *, interval: float = 2.0, enabled: bool = True) -> None:
        self.label, self.total, self.interval, self.enabled = label, total, interval, enabled
        self.done = 0
        self.start = self.last = time.monotonic()

    def advance(self, n: int = 1) -> None:
        """Count ``n`` more done; print when ``interval`` has passed or everything is done."""
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self.last >= self.interval or self.done >= self.total):
            self.last = now
            pct = 100.0 * self.done / max(self.total, 1)
            print(f"{self.label}: {self.done}/{self.total} ({pct:.0f}%) {now - self.start:.1f} s",
                  file=sys.stderr, flush=True)
