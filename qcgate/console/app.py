"""The web console and its JSON API: a Starlette app, server-rendered Jinja2 pages, no JavaScript.

Every handler runs in Starlette's thread pool with its own database session (SQLAlchemy is
synchronous); ``_dispatch`` authenticates (bearer token or session cookie), checks the role and,
for a session's POST, the CSRF token, then commits what the handler did or rolls it back.
People's actions go through ``qcgate.store`` (``decide_review``, ``requeue_failed_job``, the outbox's
re-queue) so that the CLI and the console share one rule each, and each writes its ``actions`` row.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from qcgate.config import Settings
from qcgate.console import data
from qcgate.console.security import (
    CSRF_FIELD,
    CSRF_HEADER,
    LOGIN_CSRF_COOKIE,
    REPORT_CSP,
    SESSION_COOKIE,
    LoginLimiter,
    SecurityHeaders,
    cross_site,
    safe_next,
    same_token,
)
from qcgate.store import queries, users
from qcgate.store.actions import record_action
from qcgate.store.jobs import requeue_failed_job
from qcgate.store.models import Action, Output
from qcgate.store.review import ActionRefused, decide_review, decision_for, held_deliveries
from qcgate.store.users import Principal

LOG = logging.getLogger("qcgate.console")
HERE = Path(__file__).resolve().parent
VIEWER, REVIEWER, ADMIN = "viewer", "reviewer", "admin"
NOTICES = {
    "accepted": "Review decision recorded: accepted.",
    "rejected": "Review decision recorded: rejected.",
    "resent": "The dead letter is back in the outbox: the next attempt starts now.",
    "requeued": "The job is pending again; the case is ready.",
    "signed-out": "You are signed out.",
}
VERDICTS = ("accept", "review", "reject")
CASE_STATES = ("collecting", "ready", "incomplete", "done", "failed")
FILTER_KEYS = ("verdict", "state", "since", "until", "calling_ae", "vendor", "algorithm", "model_version", "series")


class Console:
    """The console's routes over one session factory and the settings."""

    def __init__(self, settings: Settings, session_factory: sessionmaker[Session], *,
                 health: Callable[[], dict[str, bool]] | None = None,
                 details: Callable[[], dict[str, Any]] | None = None) -> None:
        from jinja2 import Environment, FileSystemLoader, select_autoescape

        self.settings = settings
        self.session_factory = session_factory
        self.health = health
        self.details = details
        self.limiter = LoginLimiter(settings.http.login_attempts_per_minute)
        self.secure_cookies = settings.http.tls or settings.http.secure_cookies
        self.page_size = settings.http.page_size
        self.instance_numbers = data.InstanceNumbers(settings.storage.spool_dir)
        self.templates = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]),
                                     trim_blocks=True, lstrip_blocks=True)
        self.templates.filters["fmt"] = _fmt
        self.templates.filters["when"] = _when

    # --- plumbing -------------------------------------------------------------------------

    def routes(self) -> list[Any]:
        from starlette.routing import Mount, Route
        from starlette.staticfiles import StaticFiles

        page, api = self._page_route, self._api_route
        return [
            Route("/login", self._endpoint(self.login_form, public=True), methods=["GET"]),
            Route("/login", self._endpoint(self.login, public=True), methods=["POST"]),
            Route("/logout", self._endpoint(self.logout), methods=["POST"]),
            page("/", self.dashboard),
            page("/cases", self.cases),
            page("/cases.csv", self.cases_csv),
            page("/cases/{case_id:int}", self.case),
            page("/cases/{case_id:int}/report", self.report),
            page("/cases/{case_id:int}/review", self.review_post, REVIEWER, "POST"),
            page("/review", self.review_queue),
            page("/outbox", self.outbox),
            page("/deliveries/{delivery_id:int}/resend", self.resend_post, ADMIN, "POST"),
            page("/jobs", self.jobs),
            page("/jobs/{job_id:int}/requeue", self.requeue_post, ADMIN, "POST"),
            page("/trends", self.trends),
            page("/trends.png", self.trends_png),
            page("/actions", self.actions),
            api("/api/me", self.api_me),
            api("/api/cases", self.api_cases),
            api("/api/cases/{case_id:int}", self.api_case),
            api("/api/cases/{case_id:int}/review", self.api_review, REVIEWER, "POST"),
            api("/api/review-queue", self.api_review_queue),
            api("/api/dead-letters", self.api_dead_letters),
            api("/api/deliveries/{delivery_id:int}/resend", self.api_resend, ADMIN, "POST"),
            api("/api/failed-jobs", self.api_failed_jobs),
            api("/api/jobs/{job_id:int}/requeue", self.api_requeue, ADMIN, "POST"),
            api("/api/actions", self.api_actions),
            Mount("/static", app=StaticFiles(directory=HERE / "static"), name="static"),
        ]

    def _page_route(self, path: str, handler: Callable[..., Any], role: str = VIEWER, method: str = "GET") -> Any:
        from starlette.routing import Route

        return Route(path, self._endpoint(handler, role=role), methods=[method])

    def _api_route(self, path: str, handler: Callable[..., Any], role: str = VIEWER, method: str = "GET") -> Any:
        from starlette.routing import Route

        return Route(path, self._endpoint(handler, role=role, api=True), methods=[method])

    def _endpoint(self, handler: Callable[..., Any], *, role: str = VIEWER, api: bool = False, public: bool = False) -> Any:
        from starlette.concurrency import run_in_threadpool

        async def endpoint(request: Any) -> Any:
            form: dict[str, str] = {}
            if request.method == "POST":
                if request.headers.get("content-type", "").startswith("application/json"):
                    try:
                        body = await request.json()
                    except ValueError:
                        return self._error(request, None, 400, "the body is not valid JSON", api)
                    if not isinstance(body, dict):
                        return self._error(request, None, 400, "the body must be a JSON object", api)
                    form = {str(k): "" if v is None else str(v) for k, v in body.items()}
                else:
                    received = await request.form()
                    form = {k: v for k, v in received.items() if isinstance(v, str)}
            return await run_in_threadpool(self._dispatch, handler, request, form, role, api, public)

        return endpoint

    def _principal(self, db: Session, request: Any) -> Principal | None:
        authorization = request.headers.get("authorization", "")
        if authorization:
            scheme, _, token = authorization.partition(" ")
            return users.principal_for_token(db, token.strip()) if scheme.lower() == "bearer" and token.strip() else None
        secret = request.cookies.get(SESSION_COOKIE)
        return users.principal_for_session(db, secret) if secret else None

    def _dispatch(self, handler: Callable[..., Any], request: Any, form: dict[str, str], role: str, api: bool,
                  public: bool) -> Any:
        from starlette.responses import RedirectResponse

        with self.session_factory() as db:
            principal = None
            if not public:
                principal = self._principal(db, request)
                if principal is None:
                    if api:
                        return self._json({"error": "authentication required: a bearer token or a console session"}, 401,
                                          headers={"www-authenticate": 'Bearer realm="qcgate"'})
                    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                    return RedirectResponse(f"/login?next={quote(target)}", status_code=303)
                if request.method == "POST" and principal.via == "session":
                    given = form.get(CSRF_FIELD) or request.headers.get(CSRF_HEADER)
                    if cross_site(request.headers) or not same_token(principal.csrf_token, given):
                        return self._error(request, principal, 403, "CSRF check failed: the form's token is missing or wrong "
                                           "(reload the page and try again)", api)
                if not principal.may(role):
                    return self._error(request, principal, 403, f"this needs the role {role}; you are a {principal.role}", api)
            try:
                response = handler(request, db, principal, form)
                db.commit()
                return response
            except ActionRefused as refused:
                db.rollback()
                return self._error(request, principal, refused.status, str(refused), api)

    def _json(self, payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Any:
        from starlette.responses import Response

        return Response(json.dumps(payload, default=str), status_code=status, media_type="application/json", headers=headers)

    def _render(self, request: Any, principal: Principal | None, template: str, status: int = 200,
                headers: dict[str, str] | None = None, **context: Any) -> Any:
        from starlette.responses import HTMLResponse

        notice = NOTICES.get(request.query_params.get("notice", ""))
        body = self.templates.get_template(template).render(
            principal=principal, csrf_token=principal.csrf_token if principal else None, notice=notice,
            path=request.url.path, page_title=context.pop("page_title", "qcgate"), **context)
        return HTMLResponse(body, status_code=status, headers=headers)

    def _error(self, request: Any, principal: Principal | None, status: int, message: str, api: bool) -> Any:
        if api:
            return self._json({"error": message}, status)
        return self._render(request, principal, "error.html", status=status, page_title=f"{status}", code=status, message=message)

    def _redirect(self, url: str) -> Any:
        from starlette.responses import RedirectResponse

        return RedirectResponse(url, status_code=303)

    def _paging(self, request: Any) -> tuple[int, int]:
        try:
            page = max(1, int(request.query_params.get("page", "1")))
        except ValueError:
            page = 1
        return page, (page - 1) * self.page_size

    # --- sign in and out --------------------------------------------------------------------

    def login_form(self, request: Any, db: Session, principal: Principal | None, form: dict[str, str],
                   status: int = 200, message: str | None = None, headers: dict[str, str] | None = None) -> Any:
        import secrets

        token = secrets.token_urlsafe(32)
        response = self._render(request, None, "login.html", status=status, headers=headers, page_title="Sign in",
                                login_csrf=token, next=safe_next(form.get("next") or request.query_params.get("next")),
                                message=message, user_name=form.get("user", ""))
        response.set_cookie(LOGIN_CSRF_COOKIE, token, max_age=3600, path="/login", httponly=True, samesite="strict",
                            secure=self.secure_cookies)
        return response

    def login(self, request: Any, db: Session, principal: Principal | None, form: dict[str, str]) -> Any:
        name = form.get("user", "").strip()[:64]
        address = request.client.host if request.client else "unknown"
        if cross_site(request.headers) or not same_token(request.cookies.get(LOGIN_CSRF_COOKIE), form.get(CSRF_FIELD)):
            return self.login_form(request, db, None, form, 403, "The sign-in form expired or came from elsewhere: try again.")
        wait = self.limiter.retry_after(name, address)
        if wait:
            record_action(db, user=name or "(none)", action="login.failed", object_type="user", object_id=name or None,
                          reason="rate limited", details={"address": address, "retry_after_seconds": wait})
            LOG.warning("sign-in for %r from %s refused: too many failed attempts", name, address)
            return self.login_form(request, db, None, form, 429, f"Too many failed sign-ins: wait {wait} s.",
                                   headers={"retry-after": str(wait)})
        user = users.verify_password(db, name, form.get("password", "")) if name else None
        if user is None:
            self.limiter.failed(name, address)
            record_action(db, user=name or "(none)", action="login.failed", object_type="user", object_id=name or None,
                          reason="wrong user name or password, or user disabled", details={"address": address})
            LOG.warning("failed sign-in for %r from %s", name, address)
            return self.login_form(request, db, None, form, 401, "Wrong user name or password.")
        self.limiter.succeeded(name)
        secret, _ = users.open_session(db, user, self.settings.http.session_hours)
        record_action(db, user=user.name, action="login", object_type="user", object_id=user.name,
                      details={"address": address, "role": user.role})
        response = self._redirect(safe_next(form.get("next")))
        response.set_cookie(SESSION_COOKIE, secret, max_age=int(self.settings.http.session_hours * 3600), path="/",
                            httponly=True, samesite="strict", secure=self.secure_cookies)
        response.delete_cookie(LOGIN_CSRF_COOKIE, path="/login")
        return response

    def logout(self, request: Any, db: Session, principal: Principal, form: dict[str, str]) -> Any:
        secret = request.cookies.get(SESSION_COOKIE)
        if secret:
            users.close_session(db, secret)
        record_action(db, user=principal.name, action="logout", object_type="user", object_id=principal.name)
        response = self._redirect("/login?notice=signed-out")
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict", secure=self.secure_cookies)
        return response

    # --- pages ------------------------------------------------------------------------------

    def dashboard(self, request: Any, db: Session, principal: Principal, form: dict[str, str]) -> Any:
        summary = data.dashboard(db)
        checks = self.health() if self.health is not None else None
        details = self.details() if self.details is not None else None
        data_dir = self.settings.storage.data_dir
        try:
            usage = shutil.disk_usage(data_dir if data_dir.exists() else data_dir.parent)
            disk = {"free_mb": usage.free / 2**20, "total_mb": usage.total / 2**20, "used_fraction": 1 - usage.free / usage.total}
        except OSError:
            disk = None
        return self._render(request, principal, "dashboard.html", page_title="Dashboard", summary=summary, checks=checks,
                            healthy=checks is not None and all(checks.values()), details=details, disk=disk,
                            min_free_mb=self.settings.storage.min_free_mb)

    def _filters(self, request: Any) -> tuple[dict[str, str], queries.AuditFilters, list[str]]:
        params = {key: request.query_params.get(key, "").strip() for key in FILTER_KEYS}
        problems: list[str] = []
        if params["verdict"] and params["verdict"] not in VERDICTS:
            problems.append(f"verdict {params['verdict']!r} ignored")
            params["verdict"] = ""
        if params["state"] and params["state"] not in CASE_STATES:
            problems.append(f"state {params['state']!r} ignored")
            params["state"] = ""
        when: dict[str, dt.datetime | None] = {}
        for key in ("since", "until"):
            when[key] = None
            if params[key]:
                try:
                    value = dt.datetime.fromisoformat(params[key])
                    when[key] = value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)
                except ValueError:
                    problems.append(f"{key} {params[key]!r} is not a date (YYYY-MM-DD): ignored")
                    params[key] = ""
        filters = queries.AuditFilters(
            state=params["state"] or None, verdict=params["verdict"] or None, since=when["since"], until=when["until"],
            calling_ae=params["calling_ae"] or None, vendor=params["vendor"] or None, algorithm=params["algorithm"] or None,
            model_version=params["model_version"] or None, series_uid=params["series"] or None)
        return params, filters, problems

    def cases(self, request: Any, db: Session, principal: Principal, form: dict[str, str]) -> Any:
        params, filters, problems = self._filters(request)
        page, offset = self._paging(request)
        rows = queries.list_cases(db, filters=_page_of(filters, offset, self.page_size + 1))
        has_next = len(rows) > self.page_size
        query = urlencode({k: v for k, v in params.items() if v})
        return self._render(request, principal, "cases.html", page_title="Cases", rows=rows[:self.page_size], params=params,
                            problems=problems, page=page, has_next=has_next, query=query, verdicts=VERDICTS,
                            states=CASE_STATES)

    def cases_csv(self, request: Any, db: Session, principal: Principal, form: dict[str, str]) -> Any:
        from starlette.responses import Response

        _, filters, _ = self._filters(request)
        rows = queries.list_cases(db, filters=filters)
        out = io.StringIO()
        columns = list(rows[0]) if rows else ["case_id", "state", "series_verdict", "ct_series_uid"]
        writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        return Response(out.getvalue(), media_type="text/csv",
                        headers={"content-disposition": f'attachment; filename="qcgate-cases-{stamp}.csv"'})

    def _case(self, db: Session, case_id: int) -> dict[str, Any]:
        detail = queries.case_detail(db, case_id)
        if detail is None:
            raise ActionRefused(f"no case with id {case_id}", 404)
        numbers = self.instance_numbers.lookup(db, [s["sop_instance_uid"] for s in detail["slices"]])
        for item in detail["slices"]:
            item["instance_number"] = numbers.get(item["sop_instance_uid"])
        detail["review_decision"] = decision_for(db, case_id)
        detail["held_deliveries"] = held_deliveries(db, case_id)
        detail["awaiting_review"] = detail["review_decision"] is None and (detail["series_verdict"] == "review" or detail["held_deliveries"] > 0)
        return detail

    def case(self, request: Any, db: Session, principal: Principal, form: dict[str, str]) -> Any:
        case_id = request.path_params["case_id"]
        detail = self._case(db, case_id)
        has_report = any(o["kind"] == "report" for o in detail["outputs"])
        return self._render(request, principal, "case.html", page_title=f"Case {case_id}", case=detail,
                            trail=data.case_trail(db, case_id), has_report=has_report,
                            may_review=principal.may(REVIEWER), may_admin=principal.may(ADMIN))

    def report(self, request: Any, db: Session, principal: Principal, form: dict[str, str]) -> Any:
        from starlette.responses import HTMLResponse

        case_id = request.path_params["case_id"]
        path = db.scalar(select(Output.path).where(Output.case_id == case_id, Output.kind == "report").order_by(Output.id.desc()))
        root = self.settings.storage.data_dir.resolve()
        if path is None:
            raise ActionRefused(f"case {case_id} has no HTML report", 404)
        full = (root / path).resolve()
        if not full.is_relative_to(root) or not full.is_file():
            raise ActionRefused(f"the report of case {case_id} is no longer on disk (retention?)", 404)
        return HTMLResponse(full.read_text(encoding="utf-8", errors="replace"), headers={"content-security-policy": REPORT_CSP})

    def review_post(self, request: Any, db: Session, principal: Principal, form: dict[str, str]) -> Any:
        case_id = request.path_params["case_id"]
        outcome = decide_review(db, case_id, form.get("decision", ""), principal.name, form.get("reason", ""))
        return self._redirect(f"/cases/{case_id}?notice={'accepted' if outcome.decision == 'accept' else 'rejected'}")

    def review_queue(self, request: Any, db: Session, principal: Principal, form: dict[str, str]) -> Any:
        page, offset = self._paging(request)
        rows = data.review_queue(db, offset, self.page_size + 1)
        return self._render(request, principal, "review.html", page_title="Review queue", rows=rows[:self.page_size],
                            page=page, has_next=len(rows) > self.page_size, decisions=data.recent_decisions(db),
                            may_review=principal.may(REVIEWER))

    def outbox(self, request: Any, db: Session, principal: Principal, form: dict[str, str]) -> Any:
        page, offset = self._paging(request)
        rows = data.deliveries_in_state(db, "dead", offset, self.page_size + 1)
        return self._render(request, principal, "outbox.html", page_title="Outbox", rows=rows[:self.page_size], page=page,
                            has_next=len(rows) > self.page_size, counts=data.counts_by_state(db, _delivery_state()),
                            pending=data.deliveries_in_state(db, "pending", 0, 20), may_admin=principal.may(ADMIN))

    def resend_post(self, request: Any, db: Session, principal: Principal, form: dict[str, str]) -> Any:
        self._resend_delivery(db, request.path_params["delivery_id"], principal, form.get("reason", ""))
        return self._redirect("/outbox?notice=resent")

    def jobs(self, request: Any, db: Session, principal: Principal, form: dict[str, str]) -> Any:
        page, offset = self._paging(request)
        rows = data.failed_jobs(db, offset, self.page_size + 1)
        return self._render(request, principal, "jobs.html", page_title="Jobs", rows=rows[:self.page_size], page=page,
                            has_next=len(rows) > self.page_size, counts=data.counts_by_state(db, _job_state()),
                            may_admin=principal.may(ADMIN))

    def requeue_post(self, request: Any, db: Session, principal: Principal, form: dict[str, str]) -> Any:
        requeue_failed_job(db, request.path_params["job_id"], user=principal.name, reason=form.get("reason"))
        return self._redirect("/jobs?notice=requeued")

    def _trend_args(self, request: Any) -> tuple[str, int]:
        dimension = request.query_params.get("dimension", "vendor")
        if dimension not in data.DIMENSIONS:
            dimension = "vendor"
        try:
            weeks = min(max(int(request.query_params.get("weeks", "12")), 1), 104)
        except ValueError:
            weeks = 12
        return dimension, weeks

    def _trend_data(self, db: Session, request: Any) -> dict[str, Any]:
        dimension, weeks = self._trend_args(request)
        since = dt.datetime.now(dt.timezone.utc) - dt.timedelta(weeks=weeks)
        found = data.trends(db, dimension, since)
        found["weeks_back"] = weeks
        return found

    def trends(self, request: Any, db: Session, principal: Principal, form: dict[str, str]) -> Any:
        found = self._trend_data(db, request)
        return self._render(request, principal, "trends.html", page_title="Trends", trends=found, dimensions=data.DIMENSIONS,
                            query=urlencode({"dimension": found["dimension"], "weeks": found["weeks_back"]}))

    def trends_png(self, request: Any, db: Session, principal: Principal, form: dict[str, str]) -> Any:
        from starlette.responses import Response

        return Response(data.trend_png(self._trend_data(db, request)), media_type="image/png")

    def actions(self, request: Any, db: Session, principal: Principal, form: dict[str, str]) -> Any:
        page, offset = self._paging(request)
        params = {key: request.query_params.get(key, "").strip() for key in ("user", "action", "object_type", "object_id")}
        rows = self._actions(db, params, offset, self.page_size + 1)
        return self._render(request, principal, "actions.html", page_title="Actions", rows=rows[:self.page_size], page=page,
                            has_next=len(rows) > self.page_size, params=params,
                            query=urlencode({k: v for k, v in params.items() if v}))

    def _actions(self, db: Session, params: dict[str, str], offset: int, limit: int) -> list[dict[str, Any]]:
        query = select(Action).order_by(Action.at.desc(), Action.id.desc())
        for key in ("user", "action", "object_type", "object_id"):
            if params.get(key):
                query = query.where(getattr(Action, key) == params[key])
        return [{"action_id": a.id, "at": data.iso(a.at), "user": a.user, "action": a.action, "object_type": a.object_type,
                 "object_id": a.object_id, "reason": a.reason, "details": json.loads(a.details) if a.details else None}
                for a in db.scalars(query.offset(offset).limit(limit))]

    # --- people's actions shared by pages and API -------------------------------------------

    def _resend_delivery(self, db: Session, delivery_id: int, principal: Principal, reason: str) -> None:
        """A dead letter back to pending, attempts kept: the outbox makes a new attempt now (audited)."""
        from qcgate.delivery.requeue import RequeueError, requeue_dead_letters

        reason = (reason or "").strip() or f"re-sent from the console by {principal.name}"
        try:  # the same code as `qcgate deliveries retry --id N`: one actions row, delivery.retry
            requeue_dead_letters(db, user=principal.name, reason=reason, delivery_id=delivery_id)
        except RequeueError as exc:
            raise ActionRefused(str(exc), 404 if "no delivery" in str(exc) else 409) from None

    # --- API --------------------------------------------------------------------------------

    def api_me(self, request: Any, db: Session, principal: Principal, form: dict[str, str]) -> Any:
        return self._json({"user": principal.name, "role": principal.role, "auth": principal.via})

    def api_cases(self, request: Any, db: Session, principal: Principal, form: dict[str, str]) -> Any:
        _, filters, problems = self._filters(request)
        if problems:
            raise ActionRefused("; ".join(problems), 400)
        try:
            limit = min(max(int(request.query_params.get("limit", str(self.page_size))), 1), 1000)
            offset = max(int(request.query_params.get("offset", "0")), 0)
        except ValueError:
            raise ActionRefused("limit and offset are integers", 400) from None
        rows = queries.list_cases(db, filters=_page_of(filters, offset, limit + 1))
        return self._json({"cases": rows[:limit], "offset": offset, "limit": limit,
                           "next_offset": offset + limit if len(rows) > limit else None})

    def api_case(self, request: Any, db: Session, principal: Principal, form: dict[str, str]) -> Any:
        case_id = request.path_params["case_id"]
        detail = self._case(db, case_id)
        detail["trail"] = data.case_trail(db, case_id)
        return self._json(detail)

    def api_review(self, request: Any, db: Session, principal: Principal, form: dict[str, str]) -> Any:
        outcome = decide_review(db, request.path_params["case_id"], form.get("decision", ""), principal.name, form.get("reason", ""))
        return self._json(outcome.__dict__)

    def api_review_queue(self, request: Any, db: Session, principal: Principal, form: dict[str, str]) -> Any:
        _, offset = self._paging(request)
        return self._json({"cases": data.review_queue(db, offset, self.page_size)})

    def api_dead_letters(self, request: Any, db: Session, principal: Principal, form: dict[str, str]) -> Any:
        _, offset = self._paging(request)
        return self._json({"deliveries": data.deliveries_in_state(db, "dead", offset, self.page_size)})

    def api_resend(self, request: Any, db: Session, principal: Principal, form: dict[str, str]) -> Any:
        delivery_id = request.path_params["delivery_id"]
        self._resend_delivery(db, delivery_id, principal, form.get("reason", ""))
        return self._json({"delivery_id": delivery_id, "state": "pending"})

    def api_failed_jobs(self, request: Any, db: Session, principal: Principal, form: dict[str, str]) -> Any:
        _, offset = self._paging(request)
        return self._json({"jobs": data.failed_jobs(db, offset, self.page_size)})

    def api_requeue(self, request: Any, db: Session, principal: Principal, form: dict[str, str]) -> Any:
        job = requeue_failed_job(db, request.path_params["job_id"], user=principal.name, reason=form.get("reason"))
        return self._json({"job_id": job.id, "state": job.state, "attempts": job.attempts, "case_id": job.case_id})

    def api_actions(self, request: Any, db: Session, principal: Principal, form: dict[str, str]) -> Any:
        _, offset = self._paging(request)
        params = {key: request.query_params.get(key, "").strip() for key in ("user", "action", "object_type", "object_id")}
        return self._json({"actions": self._actions(db, params, offset, self.page_size)})


def _page_of(filters: queries.AuditFilters, offset: int, limit: int) -> queries.AuditFilters:
    return queries.AuditFilters(**{**filters.__dict__, "offset": offset, "limit": limit, "newest_first": True})


def _delivery_state() -> Any:
    from qcgate.store.models import Delivery

    return Delivery.state


def _job_state() -> Any:
    from qcgate.store.models import Job

    return Job.state


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _when(value: str | None) -> str:
    """ISO time as 'YYYY-MM-DD HH:MM:SS' (UTC)."""
    if not value:
        return "–"
    return value.replace("T", " ").replace("+00:00", "")


def create_app(settings: Settings, session_factory: sessionmaker[Session], *, extra_routes: list[Any] | None = None,
               health: Callable[[], dict[str, bool]] | None = None, details: Callable[[], dict[str, Any]] | None = None,
               ingestor: Any = None, metrics: Any = None) -> Any:
    """The console app: its pages and /api, plus ``extra_routes`` (/metrics and /healthz) and, given the
    node's ``ingestor``, STOW-RS in (``/dicomweb/studies``, qcgate.console.dicomweb)."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.responses import HTMLResponse, PlainTextResponse

    console = Console(settings, session_factory, health=health, details=details)

    async def http_error(request: Any, exc: Exception) -> Any:
        status = getattr(exc, "status_code", 500)
        if request.url.path.startswith(("/api/", "/dicomweb/")):
            return console._json({"error": getattr(exc, "detail", "error")}, status)
        if request.url.path in ("/metrics", "/healthz", "/health"):
            return PlainTextResponse("not found\n", status)
        body = console.templates.get_template("error.html").render(principal=None, code=status, message=getattr(exc, "detail", ""),
                                                                   page_title=str(status), path=request.url.path, notice=None)
        return HTMLResponse(body, status_code=status)

    stow: list[Any] = []
    if ingestor is not None:
        from qcgate.console.dicomweb import stow_routes

        stow = stow_routes(settings, session_factory, ingestor, metrics)
    return Starlette(routes=[*(extra_routes or []), *stow, *console.routes()], exception_handlers={HTTPException: http_error},
                     middleware=[Middleware(SecurityHeaders, tls=settings.http.tls)])
