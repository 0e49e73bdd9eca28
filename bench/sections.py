"""Writing one section of BENCHMARKS.md from a benchmark script, leaving the others as they are."""

from __future__ import annotations

import re
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def replace_section(text: str, heading: str, body: str) -> str:
    """Replace (or append) the block that starts at ``heading`` and runs to the next "## " heading."""
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    block = f"{heading}\n\n{body.rstrip()}\n\n"
    if pattern.search(text):
        return pattern.sub(lambda _: block, text, count=1)
    if text and not text.endswith("\n"):
        text += "\n"
    return text + ("\n" if text else "# Benchmarks\n\n") + block


def write_section(heading: str, body: str, path: Path = BENCHMARKS) -> Path:
    """Write ``body`` as the ``heading`` section of BENCHMARKS.md; returns the file's path."""
    text = path.read_text() if path.exists() else ""
    path.write_text(replace_section(text, heading, body))
    print(f"\nwrote the {heading} section of {path}")
    return path
