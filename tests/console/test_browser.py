"""The console in a real browser (Debian's chromium, driven by pytest-playwright) over a real run:
storescu sends two cases to `qcgate serve`, which judges one (review) and fails the other (its SEG
has no lesion segment), delivers to a storescp PACS and to a peer that refuses every output (dead
letters). Then: sign in, filter cases, open a case, accept a review with a reason and see the audit
row, re-send a dead letter, re-queue the failed job; a viewer cannot act.

Screenshots go to the test's tmp dir and are copied to /tmp/qcgate-screenshots/.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.console.conftest import PASSWORD, SCREENSHOTS
from tests.pipeline.test_pipeline_e2e import StoreSCP, wait_until
from tests.support import DCMQI_LIVER, HIGHDICOM_FILES, free_port, storescu

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)]


class Shots:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        self.count = 0

    def __call__(self, page: Any, name: str) -> None:
        self.count += 1
        path = self.folder / f"{self.count:02d}-{name}.png"
        page.screenshot(path=str(path), full_page=True)
        shutil.copy(path, SCREENSHOTS / path.name)


def _add_user(gate: Any, name: str, role: str) -> None:
    result = subprocess.run([sys.executable, "-m", "qcgate.cli", "users", "add", name, "--role", role, "--password-stdin",
                             "--config", str(gate.config_path)], input=PASSWORD + "\n", capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def _sign_in(browser: Any, base: str, name: str) -> Any:
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    page = context.new_page()
    page.goto(f"{base}/cases")
    assert page.url.startswith(f"{base}/login?next=")
    page.fill("#user", name)
    page.fill("#password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{base}/cases")
    return page


def test_operators_and_reviewers_work_the_console(make_gate, browser, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    shots = Shots(tmp_path / "screenshots")
    pacs = StoreSCP(tmp_path / "pacs").start()
    picky = AE(ae_title="PICKY")  # accepts CT only: the QC SEG and SR are refused for good
    picky.add_supported_context(CTImageStorage)
    picky_port = free_port()
    picky_server = picky.start_server(("127.0.0.1", picky_port), block=False)
    try:
        gate = make_gate(pipeline={"workers": 1, "model": "lidc-geometry", "lesion_segment_labels": ["liver"]},
                         delivery={"destinations": [pacs.address, f"PICKY@127.0.0.1:{picky_port}"], "backoff_base_seconds": 0.5})
        for name, role in (("rita", "reviewer"), ("adam", "admin"), ("vera", "viewer")):
            _add_user(gate, name, role)
        liver = sorted((DCMQI_LIVER / "ct-3slice").glob("*")) + [DCMQI_LIVER / "liver.dcm"]
        assert storescu(gate.port, liver).returncode == 0
        no_lesion = sorted((HIGHDICOM_FILES / "pydicom_dicomdirtests_77654033_CT2").glob("*")) + [HIGHDICOM_FILES / "seg_image_ct_binary_overlap.dcm"]
        assert storescu(gate.port, no_lesion).returncode == 0
        cases = wait_until(lambda: (lambda cs: cs if len(cs) == 2 and all(c["state"] in ("done", "failed") for c in cs) else None)(gate.audit_cases()))
        review = next(c for c in cases if c["state"] == "done")
        failed = next(c for c in cases if c["state"] == "failed")
        assert review["series_verdict"] == "review" and "lesion segment" in failed["reason"]
        wait_until(lambda: len(gate.sql("SELECT id FROM deliveries WHERE state = 'dead'")) == 2
                   and len(gate.sql("SELECT id FROM deliveries WHERE state = 'sent'")) == 2)
        base = f"http://127.0.0.1:{gate.http_port}"

        # --- a reviewer: sign in, filter, open the case, accept it with a reason, see the audit row
        page = _sign_in(browser, base, "rita")
        page.goto(f"{base}/")
        shots(page, "dashboard")
        assert page.locator("h3", has_text="Queue depth").is_visible()
        page.goto(f"{base}/cases")
        page.select_option("select[name=verdict]", "review")
        page.click("text=Filter")
        page.wait_for_url(re.compile(r".*verdict=review.*"))
        rows = page.locator("tbody tr")
        assert rows.count() == 1
        shots(page, "cases-filtered")
        page.click(f"tbody tr >> text={review['case_id']}")
        page.wait_for_url(f"{base}/cases/{review['case_id']}")
        assert page.locator("h2", has_text="Slices").is_visible()
        slice_rows = page.locator("h2:has-text('Slices') + table tbody tr")
        assert slice_rows.count() == 3 and "review" in slice_rows.first.inner_text()
        body = page.content()
        assert "Patient" not in body and "^" not in body  # no patient names anywhere
        shots(page, "case-in-review")
        page.click("button[value=accept]")  # the reason is required: the browser refuses the empty form
        assert page.url == f"{base}/cases/{review['case_id']}"
        page.fill("#reason", "liver outline checked on all three slices")
        page.click("button[value=accept]")
        page.wait_for_url(re.compile(r".*notice=accepted"))
        assert page.locator(".notice").inner_text().startswith("Review decision recorded: accepted")
        trail = page.locator("h2:has-text('Audit trail') + table").inner_text()
        assert "review.accept" in trail and "liver outline checked on all three slices" in trail and "rita" in trail
        shots(page, "case-accepted")
        page.goto(f"{base}/actions?user=rita")
        assert "review.accept" in page.locator("tbody").inner_text()
        shots(page, "actions")
        page.context.close()

        # --- an admin: re-send a dead letter, re-queue the failed job
        page = _sign_in(browser, base, "adam")
        page.goto(f"{base}/outbox")
        dead = page.locator("h2:has-text('Dead letters') + p + table tbody tr")
        assert dead.count() == 2 and "presentation context" in dead.first.inner_text()
        shots(page, "outbox-dead-letters")
        dead.first.locator("input[name=reason]").fill("PICKY now accepts SR (checked with their admin)")
        dead.first.locator("button").click()
        page.wait_for_url(re.compile(r".*notice=resent"))
        wait_until(lambda: gate.sql("SELECT count(*) FROM delivery_attempts") == [(5,)] and
                   len(gate.sql("SELECT id FROM deliveries WHERE state = 'dead'")) == 2)  # one new attempt, refused again
        shots(page, "outbox-resent")
        page.goto(f"{base}/jobs")
        job_row = page.locator("tbody tr", has_text="lesion segment")
        job_row.locator("input[name=reason]").fill("SEG labels fixed upstream")
        job_row.locator("button").click()
        page.wait_for_url(re.compile(r".*notice=requeued"))
        shots(page, "jobs-requeued")
        wait_until(lambda: gate.sql(f"SELECT state, attempts FROM jobs WHERE case_id = {failed['case_id']}") == [("failed", 1)])
        page.goto(f"{base}/actions")
        log = page.locator("tbody").inner_text()
        assert "delivery.retry" in log and "job.requeue" in log and "SEG labels fixed upstream" in log and "login" in log
        shots(page, "actions-admin")
        page.goto(f"{base}/trends?dimension=vendor")
        assert page.locator("img.plot").evaluate("img => img.naturalWidth") > 100
        shots(page, "trends")
        page.goto(f"{base}/cases/{review['case_id']}/report")
        shots(page, "report")
        page.context.close()

        # --- a viewer reads but cannot act
        page = _sign_in(browser, base, "vera")
        page.goto(f"{base}/outbox")
        assert page.locator("button", has_text="Re-send").count() == 0
        shots(page, "viewer-outbox")
        page.goto(f"{base}/jobs")
        assert page.locator("button", has_text="Re-queue").count() == 0
        token = page.locator("input[name=csrf_token]").first.get_attribute("value")
        dead_id = gate.sql("SELECT id FROM deliveries WHERE state = 'dead' ORDER BY id")[0][0]
        forced = page.request.post(f"{base}/deliveries/{dead_id}/resend", form={"csrf_token": token}, max_redirects=0)
        assert forced.status == 403
        job_id = gate.sql(f"SELECT id FROM jobs WHERE case_id = {failed['case_id']}")[0][0]
        assert page.request.post(f"{base}/jobs/{job_id}/requeue", form={"csrf_token": token}, max_redirects=0).status == 403
        page.set_content(forced.text())  # what the refusal says (the stylesheet loads from this origin)
        page.wait_for_load_state()
        shots(page, "viewer-refused")
        page.context.close()
        assert gate.sql("SELECT count(*) FROM actions WHERE user = 'vera' AND action NOT IN ('login')") == [(0,)]
    finally:
        picky_server.shutdown()
        pacs.stop()
    time.sleep(0)
