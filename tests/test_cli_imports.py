"""`qcgate --help` stays fast: the command line's modules import their heavy dependencies inside
the handlers. Checked by what is imported, not by timing (timings belong in the benchmarks)."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("sqlalchemy", "pynetdicom", "torch", "highdicom")


def test_building_the_cli_parser_imports_no_heavy_dependency() -> None:
    code = ("import json, sys; import qcgate.cli; qcgate.cli.build_parser(); "
            f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []
