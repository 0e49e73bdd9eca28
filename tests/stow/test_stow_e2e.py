"""STOW-RS end to end (slow tier): a SYNTHETIC phantom case (CT + two AI SEGs) sent with dicomweb-client's
store_instances into `qcgate serve`: it becomes ready and is processed like a C-STORE case."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from tests.pipeline.test_pipeline_e2e import case_done, wait_until
from tests.support import write_phantom_case

pytestmark = pytest.mark.slow


def _token(gate, name: str) -> str:  # type: ignore[no-untyped-def]
    command = [sys.executable, "-m", "qcgate.cli", "users"]
    added = subprocess.run([*command, "add", name, "--role", "sender", "--password-stdin", "--config", str(gate.config_path)],
                           input="a long machine passphrase\n", capture_output=True, text=True, timeout=120)
    assert added.returncode == 0, added.stderr
    issued = subprocess.run([*command, "token", name, "--config", str(gate.config_path)], capture_output=True, text=True, timeout=120)
    assert issued.returncode == 0, issued.stderr
    return next(word for word in issued.stdout.split() if word.startswith("qcg_"))


def test_a_phantom_case_sent_by_stow_rs_is_processed(make_gate, tmp_path: Path) -> None:
    from dicomweb_client.api import DICOMwebClient

    gate = make_gate(pipeline={"workers": 1, "model": "phantom-full"})
    token = _token(gate, "ai-service")
    ct_files, members = write_phantom_case(tmp_path / "input")
    datasets = [pydicom.dcmread(p) for p in [*ct_files, *members]]
    client = DICOMwebClient(f"http://127.0.0.1:{gate.http_port}/dicomweb", headers={"Authorization": f"Bearer {token}"})
    answer = client.store_instances(datasets[:len(ct_files)])  # the CT first, the SEGs in a second request
    assert len(answer.ReferencedSOPSequence) == len(ct_files)
    answer = client.store_instances(datasets[len(ct_files):], study_instance_uid=str(datasets[0].StudyInstanceUID))
    assert len(answer.ReferencedSOPSequence) == len(members) and "FailedSOPSequence" not in answer
    case = wait_until(lambda: case_done(gate), timeout=300)
    detail = gate.audit_case(case["case_id"])
    assert detail["n_members"] == 2 and detail["q_source"] not in ("ensemble-agreement", "none") and len(detail["slices"]) >= 1  # q from the model's estimator
    assert gate.sql("SELECT count(*), count(DISTINCT case_id), count(association_id) FROM instances") == [
        (len(datasets), 1, 0)]  # one case; STOW-RS instances come without a DIMSE association
    assert "STOW-RS 200 from ai-service@127.0.0.1" in gate.log_text()
    from qcgate.core.layout import DataLayout

    assert list(DataLayout(gate.data_dir).incoming.iterdir()) == []
