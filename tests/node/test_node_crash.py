"""`kill -9` during a storescu send: everything acknowledged survives, the rest can be re-sent."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from tests.support import dcmtk_env, storescu, write_synthetic_case

pytestmark = pytest.mark.slow  # slow tier: kill -9 of a qcgate serve process during real storescu sends


def test_kill9_during_a_send_loses_nothing_that_was_acknowledged(make_gate, tmp_path: Path) -> None:
    gate = make_gate()
    ct_files, seg_file = write_synthetic_case(tmp_path / "case", n_slices=80, size=512)
    files = [*ct_files, seg_file]
    sender = subprocess.Popen(
        ["storescu", "-v", "-R", "-aec", "QCGATE", "127.0.0.1", str(gate.port), *map(str, files)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dcmtk_env(),
    )
    acknowledged: list[Path] = []
    current: Path | None = None
    killed = False
    assert sender.stdout is not None
    for line in sender.stdout:
        if "Sending file:" in line:
            current = Path(line.split("Sending file:", 1)[1].strip())
        elif "Received Store Response (Success)" in line and current is not None:
            acknowledged.append(current)
            if len(acknowledged) == 15 and not killed:
                gate.kill9()
                killed = True
    sender.wait(timeout=60)
    assert killed, "the send finished before the node could be killed"
    assert sender.returncode != 0
    assert 15 <= len(acknowledged) < len(files)

    gate.start()
    rows = {uid: (path, digest) for uid, path, digest in gate.sql("SELECT sop_instance_uid, spool_path, sha256 FROM instances")}
    for source in acknowledged:
        original = pydicom.dcmread(source)
        uid = str(original.SOPInstanceUID)
        assert uid in rows, f"{source.name} was acknowledged but is not in the database"
        spool_file = gate.data_dir / "spool" / rows[uid][0]
        assert hashlib.sha256(spool_file.read_bytes()).hexdigest() == rows[uid][1]
        assert np.array_equal(pydicom.dcmread(spool_file).pixel_array, original.pixel_array)
    assert not any((gate.data_dir / "spool" / ".incoming").iterdir())

    # The sender re-sends everything; the case completes with no duplicate rows.
    assert storescu(gate.port, files).returncode == 0
    cases = gate.wait_for_cases(lambda cs: cs and cs[0]["state"] == "ready" and cs[0]["job_state"] == "pending")
    assert (cases[0]["ct_instances"], cases[0]["seg_instances"]) == (80, 1)
    assert gate.sql("SELECT count(*) FROM instances") == [(81,)]
