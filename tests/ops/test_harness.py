"""The fault and load harness at a small size: zero loss and zero node crashes, on SQLite and
(with the connection-drop phase) on PostgreSQL. Loopback only; each run is bounded in time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow  # slow tier: the fault and load harness

REPO = Path(__file__).resolve().parents[2]


def _run_harness(tmp_path: Path, *extra: str) -> dict[str, Any]:
    report_path = tmp_path / "harness.json"
    command = [sys.executable, str(REPO / "bench" / "harness.py"), "--senders", "2", "--instances", "5", "--kill-rounds", "1",
               "--outputs", "3", "--flap-seconds", "3", "--fuzz", "16", "--pydicom-files", "3", "--mutations", "150", "--check-sample", "150", "--aborts", "5",
               "--idle-sockets", "40", "--slow-drip", "8", "--tls-silent", "16",  # the full 200 + 20: tests/node/test_node_abuse.py
               "--time-limit", "150",
               "--json", str(report_path), *extra]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert report_path.exists(), result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(report_path.read_text())
    totals = report["totals"]
    clean = not (totals["lost"] or totals["node_crashes"] or totals["tracebacks"] or totals["a700_for_data_defects"]
                 or totals["unprocessable_acknowledged"])
    assert result.returncode == (0 if clean else 1)
    return report


def _check_common(report: dict[str, Any]) -> None:
    totals = report["totals"]
    assert totals["lost"] == 0, json.dumps(report["phases"], indent=1)
    assert totals["node_crashes"] == 0, report["crash_logs"]
    assert report["skipped"] == []
    phases = report["phases"]
    load = phases["load"]
    assert load["acknowledged"] == load["sent"] == 10 and load["stored_of_acknowledged"] == 10
    kill = phases["kill9_during_ingest"]
    assert kill["acknowledged_after_resend"] == kill["resent"] == kill["stored_after_resend"]  # the re-send completes
    disk = phases["disk_watermark"]
    assert disk["acknowledged_while_full"] == 0 and disk["healthz_while_full"] == 503 and disk["node_alive_while_full"]
    assert disk["stored_after"] == disk["sent"]
    flap = phases["flapping_destination"]
    assert flap["never_delivered"] == 0 and flap["delivery_states"] == {"sent": flap["outputs"]}
    bad = phases["bad_input"]
    assert bad["node_answers_echo"] and bad["stored_of_acknowledged"] == bad["acknowledged"]
    assert bad["by_source"]["pydicom-malformed"].get("0x0000", 0) == 0  # no malformed file is acknowledged
    assert "0xC211" not in bad["statuses"]  # pynetdicom's "the handler raised": every refusal is the gate's own
    # issue 15's findings as named defects: each gets a permanent refusal, never Success or A700
    defects = phases["defects"]
    assert defects["acknowledged_defects"] == [] and defects["a700_for_defects"] == 0 and defects["no_answer"] == 0
    assert defects["permanent_refusals"] == defects["payloads"], defects["by_defect"]
    assert defects["incoming_leftovers"] == 0 and defects["echo_seconds_after"] is not None  # aborted transfers
    # the mutation fuzzer over a valid CT and SEG: 150 seeded mutations, bounded in time
    fuzz = phases["fuzz"]
    assert fuzz["mutations"] == 150 and fuzz["seconds"] < 60
    assert fuzz["node_crashes"] == 0 and fuzz["tracebacks"] == 0 and fuzz["a700"] == 0 and fuzz["c211_handler_raised"] == 0
    assert fuzz["checked_for_processing"] == fuzz["acknowledged"] == fuzz["stored_of_acknowledged"]
    assert fuzz["unprocessable_acknowledged"] == 0, fuzz["unprocessable_examples"]
    assert fuzz["node_answers_echo"]
    # 40 idle sockets and 8 slow drips, then TLS with 16 silent peers and a partial ClientHello:
    # the legitimate C-ECHO is answered within 1 s throughout
    for mode, echoes in (("plain", 5), ("tls", 3)):
        siege = phases["abuse_sockets"][mode]
        assert siege["echoes_within_1s"] == echoes, siege
        assert siege["echo_after_deadline_seconds"] is not None and siege["idle_closed_by_node_of_last_16"] == 16, siege
    assert phases["abuse_sockets"]["tls"]["partial_hello_closed"] and phases["abuse_sockets"]["node_alive"]
    assert totals["tracebacks"] == 0 and totals["a700_for_data_defects"] == 0
    # the load and kill cases (CT + their SEG) were assembled: every one is ready with a queued job
    assert totals["cases_by_state"].get("ready", 0) >= 2


def test_small_harness_sqlite_has_no_loss_and_no_crash(tmp_path: Path) -> None:
    report = _run_harness(tmp_path, "--seed", "11", "--backend", "sqlite")
    _check_common(report)
    assert "postgres_connections_dropped" not in report["phases"]


@pytest.mark.postgres
def test_small_harness_postgresql_survives_dropped_connections(tmp_path: Path) -> None:
    try:
        import psycopg

        psycopg.connect(os.environ.get("QCGATE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"), connect_timeout=5).close()
    except Exception as exc:  # same policy as conftest: skip unless PostgreSQL is required
        if os.environ.get("QCGATE_REQUIRE_POSTGRES"):
            pytest.fail(f"PostgreSQL required but unreachable: {exc}")
        pytest.skip("PostgreSQL unreachable")
    report = _run_harness(tmp_path, "--seed", "12", "--backend", "postgresql")
    _check_common(report)
    drop = report["phases"]["postgres_connections_dropped"]
    assert drop["connections_terminated"] > 0 and drop["node_alive"]
    assert drop["stored_after_retry"] == drop["acknowledged_after_retry"] == 10
