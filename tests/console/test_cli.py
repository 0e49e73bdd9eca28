"""`qcgate users` and `qcgate review`: the same rules as the console, from a shell."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.console.conftest import PASSWORD, ConsoleFixture


def _qcgate(data_dir: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qcgate.cli", *args, "--data-dir", str(data_dir)], input=stdin,
                          capture_output=True, text=True, timeout=120)


def test_users_and_review_from_the_command_line(console: ConsoleFixture) -> None:
    data_dir = console.settings.storage.data_dir
    added = _qcgate(data_dir, "users", "add", "carol", "--role", "reviewer", "--password-stdin", stdin=PASSWORD + "\n")
    assert added.returncode == 0, added.stderr
    assert _qcgate(data_dir, "users", "add", "dave", "--role", "viewer", "--password-stdin", stdin="short\n").returncode == 2
    token = _qcgate(data_dir, "users", "token", "carol")
    assert token.returncode == 0 and token.stdout.strip().startswith("qcg_")
    me = console.client.get("/api/me", headers={"Authorization": f"Bearer {token.stdout.strip()}"})
    assert me.json()["user"] == "carol"
    refused = _qcgate(data_dir, "review", "accept", "1", "--reason", "ok", "--user", "viewer")
    assert refused.returncode == 2 and "reviewer or admin" in refused.stderr
    decided = _qcgate(data_dir, "review", "reject", "1", "--reason", "outline leaks into the vessel", "--user", "carol")
    assert decided.returncode == 0, decided.stderr
    assert console.sql("SELECT decision, user_name, reason FROM review_decisions") == [("reject", "carol", "outline leaks into the vessel")]
    again = _qcgate(data_dir, "review", "accept", "1", "--reason", "x", "--user", "carol")
    assert again.returncode == 2 and "already decided" in again.stderr
    assert _qcgate(data_dir, "users", "disable", "carol").returncode == 0
    assert console.client.get("/api/me", headers={"Authorization": f"Bearer {token.stdout.strip()}"}).status_code == 401
    listing = _qcgate(data_dir, "users", "list")
    assert "carol" in listing.stdout and "True" in listing.stdout


def test_metrics_and_health_keep_their_content_types(console: ConsoleFixture) -> None:
    from qcgate.console.app import create_app
    from qcgate.observability.http import observability_routes
    from tests.console.conftest import make_test_client_class

    routes = observability_routes(lambda: "qcgate_up 1\n", lambda: {"database": True}, lambda: {"latest_jobs_failed": 0})
    client = make_test_client_class()(create_app(console.settings, console.session_factory, extra_routes=routes))
    metrics = client.get("/metrics")
    assert metrics.headers["content-type"] == "text/plain; version=0.0.4" and metrics.text == "qcgate_up 1\n"
    health = client.get("/healthz")
    assert health.headers["content-type"] == "application/json"
    assert health.text == '{"healthy": true, "checks": {"database": true}, "details": {"latest_jobs_failed": 0}}'
    assert client.get("/metricsx").status_code == 404


def test_the_dashboard_shows_the_health_checks(console: ConsoleFixture) -> None:
    from qcgate.console.app import create_app
    from tests.console.conftest import make_test_client_class

    app = create_app(console.settings, console.session_factory, health=lambda: {"database": True, "model": False},
                     details=lambda: {})
    client = make_test_client_class()(app, base_url="http://127.0.0.1")
    ConsoleFixture(client, console.session_factory, console.settings, {}).login("viewer")
    page = client.get("/")
    assert page.status_code == 200 and "unhealthy" in page.text and "failing" in page.text
