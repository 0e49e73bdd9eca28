"""The data directory's layout: the one place that names every folder and file under ``data_dir``.

::

    spool/<study>/<series>/<sop>.dcm     accepted instances, exactly as received
    spool/.incoming/                      partial receives (same filesystem, so rename is atomic)
    quarantine/<stamp>-<id>.dcm + .json   refused payloads with the reason
    conflicts/<stamp>-<id>.dcm + .json    conflicting re-sends, set aside
    outputs/case-<N>/                     what the QC job of case N wrote (SEG, SR, report, ...)
    qcgate.db                             the embedded audit database (SQLite), when no URL is set
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DataLayout:
    """Paths under one data directory; nothing is created here (the owners create their folders)."""

    root: Path

    @property
    def spool(self) -> Path:
        return self.root / "spool"

    @property
    def incoming(self) -> Path:
        return self.spool / ".incoming"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine"

    @property
    def conflicts(self) -> Path:
        return self.root / "conflicts"

    @property
    def outputs(self) -> Path:
        return self.root / "outputs"

    def case_outputs(self, case_id: int) -> Path:
        return self.outputs / f"case-{case_id}"

    @property
    def sqlite_database(self) -> Path:
        return self.root / "qcgate.db"

    @property
    def side_folders(self) -> tuple[Path, Path]:
        """Where refused and conflicting payloads are set aside."""
        return self.quarantine, self.conflicts
