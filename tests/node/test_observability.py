"""The metrics endpoint is scraped; counters move as instances arrive and are refused."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.support import PYDICOM_TEST_FILES, dataset_bytes_without_meta, echoscu, send_raw_c_store, storescu, write_synthetic_case

pytestmark = pytest.mark.slow  # slow tier: real DCMTK clients and HTTP against a qcgate serve process


def metric(text: str, name: str, **labels: str) -> float:
    label_text = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = re.escape(f"{name}{{{label_text}}}" if labels else name) + r" ([0-9.e+-]+)$"
    match = re.search(pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_counters_move_as_instances_arrive_and_are_refused(gate, tmp_path: Path) -> None:
    status, before = gate.http_get("/metrics")
    assert status == 200 and metric(before, "qcgate_instances_received_total", outcome="stored", sop_class="1.2.840.10008.5.1.4.1.1.2") == 0
    assert metric(before, "qcgate_up") == 1.0
    ct_files, seg = write_synthetic_case(tmp_path / "case", n_slices=3)
    assert storescu(gate.port, [*ct_files, seg]).returncode == 0
    assert send_raw_c_store(gate.port, dataset_bytes_without_meta(PYDICOM_TEST_FILES / "MR_truncated.dcm")) != 0
    assert echoscu(gate.port, calling="X").returncode == 0
    gate.wait_for_cases(lambda cs: cs and cs[0]["state"] == "ready")
    _, after = gate.http_get("/metrics")
    ct_class = "1.2.840.10008.5.1.4.1.1.2"
    assert metric(after, "qcgate_instances_received_total", outcome="stored", sop_class=ct_class) == 3
    assert metric(after, "qcgate_instances_received_total", outcome="stored", sop_class="1.2.840.10008.5.1.4.1.1.66.4") == 1
    refused = [line for line in after.splitlines() if line.startswith("qcgate_instances_refused_total{")]
    assert len(refused) == 1 and refused[0].endswith(" 1")
    assert metric(after, "qcgate_associations_total", outcome="accepted") == 3
    assert metric(after, "qcgate_cases", state="ready") == 1
    assert metric(after, "qcgate_jobs", state="pending") == 1


def test_health_reflects_the_disk_watermark(make_gate) -> None:
    healthy = make_gate()
    status, body = healthy.http_get("/healthz")
    assert status == 200 and json.loads(body)["healthy"] is True
    full = make_gate(storage={"min_free_mb": 1e12})
    status, body = full.http_get("/healthz")
    report = json.loads(body)
    assert status == 503 and report["checks"]["disk_above_watermark"] is False and report["checks"]["database"] is True
