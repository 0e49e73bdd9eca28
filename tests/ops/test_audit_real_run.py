"""The three operator questions answered by `qcgate audit` on a database filled by a real run:
storescu -> qcgate serve (QC worker, lidc-geometry model) -> SEG + SR delivered to a storescp PACS.
The input case is SYNTHETIC (tests.support.write_synthetic_case)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest

from tests.support import dcmtk_env, free_port, storescu, write_synthetic_case

pytestmark = pytest.mark.slow  # slow tier: a real storescu -> qcgate serve -> storescp run


def _json(gate: Any, *args: str) -> Any:
    result = gate.cli(*args, "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_real_run_answers_the_three_questions(make_gate, tmp_path: Path) -> None:
    pacs_dir = tmp_path / "pacs"
    pacs_dir.mkdir()
    pacs_port = free_port()
    pacs = subprocess.Popen(["storescp", "-aet", "PACS", "-od", str(pacs_dir), str(pacs_port)], env=dcmtk_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        gate = make_gate(pipeline={"workers": 1, "model": "lidc-geometry"},
                         delivery={"destinations": [f"PACS@127.0.0.1:{pacs_port}"], "backoff_base_seconds": 0.5, "backoff_max_seconds": 2})
        ct_files, seg_file = write_synthetic_case(tmp_path / "case", n_slices=8, size=96)
        series_uid = str(pydicom.dcmread(ct_files[0], stop_before_pixels=True).SeriesInstanceUID)
        assert storescu(gate.port, [*ct_files, seg_file], calling="AIROUTER").returncode == 0
        deadline = time.monotonic() + 240
        while True:
            cases = gate.audit_cases()
            if cases and cases[0]["state"] in ("done", "failed"):
                sent = gate.audit_deliveries(series_uid=series_uid, kind="sr")  # polled in-process
                if cases[0]["state"] == "failed" or (sent and sent[0]["state"] == "sent"):
                    break
            assert time.monotonic() < deadline, f"no verdict in time: {cases}\n{gate.log_text()[-3000:]}"
            time.sleep(0.2)
        case = cases[0]
        assert case["state"] == "done", case["reason"]
        verdict = case["series_verdict"]
        assert verdict in ("accept", "review", "reject")

        # 1. the series of vendor X with this verdict, in the last hour, from this calling AE
        found = _json(gate, "audit", "cases", "--vendor", "qcgate tests", "--verdict", verdict, "--since", "1h",
                      "--calling-ae", "AIROUTER", "--algorithm", "TestAI")
        assert [c["case_id"] for c in found] == [case["case_id"]]
        assert found[0]["vendors"] == "qcgate tests" and found[0]["calling_aes"] == "AIROUTER"
        other = "accept" if verdict != "accept" else "reject"
        assert _json(gate, "audit", "cases", "--vendor", "qcgate tests", "--verdict", other) == []
        assert _json(gate, "audit", "cases", "--vendor", "another vendor") == []
        assert _json(gate, "audit", "cases", "--calling-ae", "SOMEONE") == []
        assert _json(gate, "audit", "cases", "--since", "2000-01-01", "--until", "2000-01-02") == []

        # 2. why: the case by its series, slice by slice, with tau, q, margin and the verdict rule
        detail = _json(gate, "audit", "case", "--series", series_uid)
        assert detail["case_id"] == case["case_id"] and detail["slices"]
        for s in detail["slices"]:
            if s["q"] is not None and s["verdict"] == "reject":
                assert s["q"] < s["tau"] - s["margin"]
            if s["q"] is not None and s["verdict"] == "accept":
                assert s["q"] >= s["tau"] + s["margin"]
        slices = _json(gate, "audit", "slices", "--series", series_uid)
        assert len(slices) == len(detail["slices"])

        # 3. was the SR delivered: sent, and the PACS has an SR with that SOP Instance UID
        sr = _json(gate, "audit", "deliveries", "--series", series_uid, "--kind", "sr")
        assert len(sr) == 1 and sr[0]["state"] == "sent" and sr[0]["delivered_at"]
        received = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in pacs_dir.iterdir() if p.is_file()}
        assert sr[0]["sop_instance_uid"] in received

        vendors = _json(gate, "audit", "vendors")
        assert vendors == [{**vendors[0], "vendor": "qcgate tests", "algorithm": "TestAI", "cases": 1, verdict: 1}]
    finally:
        pacs.terminate()
        pacs.wait(timeout=10)
