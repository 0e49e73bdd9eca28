"""The API and the console's defences (fast tier: Starlette's TestClient, SQLite)."""

from __future__ import annotations

import json

from tests.console.conftest import PASSWORD, ConsoleFixture, make_test_client_class


def test_unauthenticated_requests_get_401_and_pages_redirect_to_sign_in(console: ConsoleFixture) -> None:
    for method, path in (("GET", "/api/cases"), ("GET", "/api/cases/1"), ("POST", "/api/cases/1/review"),
                         ("POST", "/api/jobs/2/requeue"), ("POST", "/api/deliveries/1/resend")):
        response = console.client.request(method, path)
        assert response.status_code == 401, path
        assert response.headers["www-authenticate"].startswith("Bearer")
    assert console.client.get("/api/cases", headers={"Authorization": "Bearer qcg_not-a-token"}).status_code == 401
    page = console.client.get("/cases?verdict=review", follow_redirects=False)
    assert page.status_code == 303 and page.headers["location"] == "/login?next=/cases%3Fverdict%3Dreview"


def test_a_bearer_token_reads_the_api(console: ConsoleFixture) -> None:
    me = console.client.get("/api/me", headers=console.bearer("viewer")).json()
    assert me == {"user": "viewer", "role": "viewer", "auth": "token"}
    cases = console.client.get("/api/cases?verdict=review", headers=console.bearer("viewer")).json()
    assert [c["case_id"] for c in cases["cases"]] == [1] and cases["next_offset"] is None
    page = console.client.get("/api/cases?limit=2", headers=console.bearer("viewer")).json()
    assert [c["case_id"] for c in page["cases"]] == [3, 2] and page["next_offset"] == 2  # newest first
    detail = console.client.get("/api/cases/1", headers=console.bearer("viewer")).json()
    assert [s["slice_index"] for s in detail["slices"]] == [0, 1] and detail["awaiting_review"] is True
    assert console.client.get("/api/cases/99", headers=console.bearer("viewer")).status_code == 404
    stored = console.sql("SELECT token_sha256 FROM api_tokens")
    assert all(len(row[0]) == 64 and console.tokens["viewer"] not in row[0] for row in stored)  # only the hash


def test_the_wrong_role_gets_403(console: ConsoleFixture) -> None:
    body = {"decision": "accept", "reason": "looks right"}
    assert console.client.post("/api/cases/1/review", json=body, headers=console.bearer("viewer")).status_code == 403
    assert console.client.post("/api/jobs/2/requeue", json={}, headers=console.bearer("reviewer")).status_code == 403
    assert console.client.post("/api/deliveries/1/resend", json={}, headers=console.bearer("reviewer")).status_code == 403
    assert console.sql("SELECT count(*) FROM review_decisions") == [(0,)]
    assert console.sql("SELECT state FROM jobs WHERE id = 2") == [("failed",)]


def test_review_decisions_need_a_reason_and_happen_once(console: ConsoleFixture) -> None:
    headers = console.bearer("reviewer")
    assert console.client.post("/api/cases/1/review", json={"decision": "accept", "reason": "  "}, headers=headers).status_code == 400
    assert console.client.post("/api/cases/1/review", json={"decision": "maybe", "reason": "x"}, headers=headers).status_code == 400
    assert console.client.post("/api/cases/3/review", json={"decision": "accept", "reason": "x"}, headers=headers).status_code == 409
    ok = console.client.post("/api/cases/1/review", json={"decision": "accept", "reason": "nodule outline fine"}, headers=headers)
    assert ok.status_code == 200 and ok.json()["decision"] == "accept" and ok.json()["held_released"] == 0
    again = console.client.post("/api/cases/1/review", json={"decision": "reject", "reason": "second thoughts"}, headers=headers)
    assert again.status_code == 409 and "already decided" in again.json()["error"]
    assert console.sql("SELECT decision, user_name, reason FROM review_decisions") == [("accept", "reviewer", "nodule outline fine")]
    assert console.sql("SELECT user, action, object_type, object_id, reason FROM actions WHERE action LIKE 'review.%'") == [
        ("reviewer", "review.accept", "case", "1", "nodule outline fine")]


def test_admins_requeue_failed_jobs_and_resend_dead_letters(console: ConsoleFixture) -> None:
    headers = console.bearer("admin")
    requeued = console.client.post("/api/jobs/2/requeue", json={"reason": "SEG fixed upstream"}, headers=headers)
    assert requeued.status_code == 200 and requeued.json() == {"job_id": 2, "state": "pending", "attempts": 0, "case_id": 2}
    assert console.sql("SELECT state, attempts, error FROM jobs WHERE id = 2") == [("pending", 0, None)]
    assert console.sql("SELECT state, reason FROM cases WHERE id = 2") == [("ready", None)]
    assert console.client.post("/api/jobs/2/requeue", json={}, headers=headers).status_code == 409  # not failed any more
    resent = console.client.post("/api/deliveries/1/resend", json={"reason": "PACS reconfigured"}, headers=headers)
    assert resent.status_code == 200
    assert console.sql("SELECT state, attempts FROM deliveries WHERE id = 1") == [("pending", 1)]
    assert console.client.post("/api/deliveries/1/resend", json={}, headers=headers).status_code == 409
    rows = console.sql("SELECT user, action, object_type, object_id, reason, details FROM actions WHERE action IN ('job.requeue', 'delivery.retry') ORDER BY id")
    assert [r[:5] for r in rows] == [("admin", "job.requeue", "job", "2", "SEG fixed upstream"),
                                     ("admin", "delivery.retry", "delivery", "1", "PACS reconfigured")]
    assert json.loads(rows[0][5])["previous_error"] == "no SEG of the case has a lesion segment"


def test_session_posts_without_the_csrf_token_are_refused(console: ConsoleFixture) -> None:
    assert console.login("reviewer").status_code == 303
    form = {"decision": "accept", "reason": "fine"}
    assert console.client.post("/cases/1/review", data=form, follow_redirects=False).status_code == 403
    assert console.client.post("/cases/1/review", data={**form, "csrf_token": "forged"}, follow_redirects=False).status_code == 403
    assert console.client.post("/api/cases/1/review", json=form).status_code == 403  # the API with a session cookie too
    token = console.csrf()
    cross = console.client.post("/cases/1/review", data={**form, "csrf_token": token}, headers={"Origin": "http://evil.example"},
                                follow_redirects=False)
    assert cross.status_code == 403
    assert console.sql("SELECT count(*) FROM review_decisions") == [(0,)]
    done = console.client.post("/cases/1/review", data={**form, "csrf_token": token}, follow_redirects=False)
    assert done.status_code == 303 and done.headers["location"] == "/cases/1?notice=accepted"
    assert console.client.post("/api/cases/1/review", json=form, headers={"X-CSRF-Token": token}).status_code == 409  # header accepted
    assert console.client.post("/logout", data={}, follow_redirects=False).status_code == 403  # sign-out needs it too


def test_sign_in_needs_its_form_cookie(console: ConsoleFixture) -> None:
    console.client.get("/login")
    console.client.cookies.clear()
    response = console.client.post("/login", data={"user": "admin", "password": PASSWORD, "csrf_token": "x"}, follow_redirects=False)
    assert response.status_code == 403 and "qcgate_session" not in response.headers.get("set-cookie", "")


def test_sign_in_attempts_are_rate_limited_and_audited(console: ConsoleFixture) -> None:
    for _ in range(5):
        assert console.login("admin", "wrong password!").status_code == 401
    limited = console.login("admin")  # the right password, but too many failures this minute
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    other = console.login("viewer")  # same address: refused as well
    assert other.status_code == 429
    failures = console.sql("SELECT user, action, reason FROM actions WHERE action = 'login.failed' ORDER BY id")
    assert len(failures) == 7 and failures[0] == ("admin", "login.failed", "wrong user name or password, or user disabled")
    assert failures[-1][2] == "rate limited"


def test_cookies_and_security_headers(console: ConsoleFixture) -> None:
    response = console.login("viewer")
    cookie = response.headers["set-cookie"]
    assert "qcgate_session=" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie and "Secure" not in cookie
    assert console.sql("SELECT user, action FROM actions WHERE action = 'login'") == [("viewer", "login")]
    page = console.client.get("/cases")
    assert page.status_code == 200
    headers = page.headers
    assert headers["content-security-policy"].startswith("default-src 'self'")
    assert headers["x-frame-options"] == "DENY" and headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "same-origin" and headers["cache-control"] == "no-store"
    assert "<script" not in page.text and "cdn" not in page.text.lower()


def test_secure_cookies_behind_tls(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from qcgate.config import load_settings
    from qcgate.console.app import create_app
    from qcgate.store import users
    from qcgate.store.database import create_db_engine, make_session_factory, upgrade_database

    TestClient = make_test_client_class()
    settings = load_settings(None, {"storage": {"data_dir": str(tmp_path / "d")}, "http": {"secure_cookies": True}})
    engine = create_db_engine(settings.database_url)
    upgrade_database(engine)
    factory = make_session_factory(engine)
    with factory() as session, session.begin():
        users.add_user(session, "ops", "admin", PASSWORD)
    with TestClient(create_app(settings, factory), base_url="https://127.0.0.1") as client:
        assert "Secure" in client.get("/login").headers["set-cookie"]
        fixture = ConsoleFixture(client, factory, settings, {})
        assert "Secure" in fixture.login("ops").headers["set-cookie"]
    engine.dispose()


def test_a_viewer_reads_every_page_and_sees_no_action(console: ConsoleFixture) -> None:
    console.login("viewer")
    for path in ("/", "/cases", "/cases?verdict=review&vendor=x", "/cases/1", "/cases/3", "/review", "/outbox", "/jobs",
                 "/trends", "/trends?dimension=model_version", "/actions"):
        page = console.client.get(path)
        assert page.status_code == 200, path
        assert "Re-send</button>" not in page.text and "Re-queue</button>" not in page.text and 'value="accept"' not in page.text
    assert console.client.get("/trends.png").headers["content-type"] == "image/png"
    csv_text = console.client.get("/cases.csv?state=failed").text
    assert csv_text.splitlines()[0].startswith("case_id,") and len(csv_text.splitlines()) == 2
    token = console.csrf()
    assert console.client.post("/jobs/2/requeue", data={"csrf_token": token}, follow_redirects=False).status_code == 403


def test_disabled_users_lose_sessions_and_tokens(console: ConsoleFixture) -> None:
    from qcgate.store import users

    console.login("admin")
    assert console.client.get("/cases").status_code == 200
    with console.session_factory() as session, session.begin():
        users.disable_user(session, "admin")
    assert console.client.get("/cases", follow_redirects=False).status_code == 303
    assert console.client.get("/api/me", headers=console.bearer("admin")).status_code == 401
    assert console.login("admin").status_code == 401
