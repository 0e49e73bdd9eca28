"""Fixtures for the console: the app over a fresh database (Starlette's TestClient), with one user per
role, and rows made directly: a case in review, a failed job, a dead letter."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

PASSWORD = "correct horse battery"


@dataclass
class ConsoleFixture:
    client: Any
    session_factory: Any
    settings: Any
    tokens: dict[str, str]

    def login(self, name: str, password: str = PASSWORD, client: Any = None) -> Any:
        """Sign in through the form (with its CSRF cookie); returns the response (303 on success)."""
        client = client or self.client
        page = client.get("/login")
        token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
        return client.post("/login", data={"user": name, "password": password, "csrf_token": token, "next": "/"},
                           follow_redirects=False)

    def csrf(self, path: str = "/") -> str:
        """The session's CSRF token, read from a page's sign-out form."""
        return re.search(r'name="csrf_token" value="([^"]+)"', self.client.get(path).text).group(1)

    def bearer(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}

    def sql(self, statement: str) -> list[tuple[Any, ...]]:
        from sqlalchemy import text

        with self.session_factory() as session:
            return [tuple(row) for row in session.execute(text(statement))]


def seed(session_factory: Any) -> dict[str, int]:
    """Case 1: judged review (two slices). Case 2: failed job. Case 3: done/accept with a dead SR delivery."""
    from qcgate.store.models import Case, Delivery, DeliveryAttempt, Job, Output, SliceResultRecord, utcnow

    with session_factory() as session, session.begin():
        review = Case(study_instance_uid="1.2.3", ct_series_uid="1.2.3.1", state="done", series_verdict="review",
                      model_name="lidc-geometry", model_version="1.0", q_source="none", processed_at=utcnow())
        failed = Case(study_instance_uid="1.2.3", ct_series_uid="1.2.3.2", state="failed",
                      reason="no SEG of the case has a lesion segment")
        dead = Case(study_instance_uid="1.2.3", ct_series_uid="1.2.3.3", state="done", series_verdict="accept",
                    model_name="lidc-geometry", model_version="1.0", processed_at=utcnow())
        session.add_all([review, failed, dead])
        session.flush()
        review_job = Job(case_id=review.id, state="done", attempts=1, finished_at=utcnow())
        failed_job = Job(case_id=failed.id, state="failed", attempts=1, finished_at=utcnow(),
                         error="no SEG of the case has a lesion segment")
        dead_job = Job(case_id=dead.id, state="done", attempts=1, finished_at=utcnow())
        session.add_all([review_job, failed_job, dead_job])
        session.flush()
        for index in range(2):
            session.add(SliceResultRecord(case_id=review.id, job_id=review_job.id, sop_instance_uid=f"1.2.3.1.{index}",
                                          slice_index=index, tau=0.7, q=None, margin=0.05, verdict="review",
                                          lesion_area_mm2=12.5, key_features='{"area": 12.5, "eccentricity": 0.4}'))
        output = Output(case_id=dead.id, job_id=dead_job.id, kind="sr", path="outputs/case-3/sr.dcm", sop_instance_uid="1.2.3.9")
        session.add(output)
        session.flush()
        delivery = Delivery(output_id=output.id, destination="PACS@127.0.0.1:1", state="dead", attempts=1,
                            last_error="destination accepts no presentation context")
        session.add(delivery)
        session.flush()
        session.add(DeliveryAttempt(delivery_id=delivery.id, outcome="permanent", message="destination accepts no presentation context"))
        return {"review_case": review.id, "failed_job": failed_job.id, "failed_case": failed.id, "dead_delivery": delivery.id}


def make_test_client_class() -> Any:
    """Starlette's TestClient (its warning that it prefers httpx2 is not ours to fix)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient
    return TestClient


@pytest.fixture
def console(tmp_path: Path) -> Iterator[ConsoleFixture]:
    TestClient = make_test_client_class()

    from qcgate.config import load_settings
    from qcgate.console.app import create_app
    from qcgate.store import users
    from qcgate.store.database import create_db_engine, make_session_factory, upgrade_database

    settings = load_settings(None, {"storage": {"data_dir": str(tmp_path / "data")}})
    engine = create_db_engine(settings.database_url)
    upgrade_database(engine)
    factory = make_session_factory(engine)
    tokens = {}
    with factory() as session, session.begin():
        for role in ("viewer", "reviewer", "admin"):
            users.add_user(session, role, role, PASSWORD)
            tokens[role] = users.issue_token(session, role)
    seed(factory)
    with TestClient(create_app(settings, factory), base_url="http://127.0.0.1") as client:
        yield ConsoleFixture(client, factory, settings, tokens)
    engine.dispose()


CHROMIUM = "/usr/bin/chromium"
SCREENSHOTS = Path("/tmp/qcgate-screenshots")


@pytest.fixture(scope="session")
def browser_type_launch_args() -> dict[str, Any]:
    """pytest-playwright launches Debian's chromium by its path (Playwright cannot download its own here)."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium)")
    return {"executable_path": CHROMIUM, "headless": True,
            "args": ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                     "--no-first-run", "--disable-sync", "--disable-dev-shm-usage"]}
