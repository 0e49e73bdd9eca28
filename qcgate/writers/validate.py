"""Validate written DICOM objects with dicom3tools' ``dciodvfy``.

dciodvfy exits 0 even when it reports errors, so its output is parsed: every line that starts with
"Error" is an error. Warning lines are ignored: they never fail a check.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from qcgate.errors import QcgateError


class ValidatorMissingError(QcgateError):
    """dciodvfy is not installed (dicom3tools)."""


def _run_dciodvfy(path: Path, timeout_s: float) -> list[str]:
    executable = shutil.which("dciodvfy")
    if executable is None:
        raise ValidatorMissingError(
            "dciodvfy (dicom3tools) is not on PATH; install dicom3tools (e.g. `apt-get install dicom3tools`) "
            "to validate DICOM outputs"
        )
    if not Path(path).is_file():
        raise FileNotFoundError(f"dciodvfy: no such file {path}")
    completed = subprocess.run(
        [executable, str(path)], capture_output=True, text=True, errors="replace", timeout=timeout_s,
    )
    return (completed.stdout + "\n" + completed.stderr).splitlines()


def dciodvfy_errors(path: Path, timeout_s: float = 120.0) -> list[str]:
    """The "Error" lines dciodvfy reports for the file at ``path`` (empty list: valid).

    Raises ValidatorMissingError when dciodvfy is not installed and FileNotFoundError for a missing file.
    """
    return [line.strip() for line in _run_dciodvfy(Path(path), timeout_s) if line.lstrip().startswith("Error")]
