"""Webhook destinations against a real HTTP receiver on loopback (http.server in this process): the
payload, the HMAC signature, retries through the outbox when it answers 500, a dead letter on 4xx."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from qcgate.config import DeliverySettings
from qcgate.delivery.outbox import Outbox
from qcgate.delivery.routing import release_held
from tests.delivery.conftest import OutboxDb, wait_until
from tests.delivery.test_routing import FAST, add_case

SECRET = "correct horse battery staple"


class Receiver:
    """Answers each POST with the next status of ``statuses`` (the last one repeats) and records it."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = list(statuses)
        self.requests: list[tuple[int, dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                status = receiver.statuses.pop(0) if len(receiver.statuses) > 1 else receiver.statuses[0]
                receiver.requests.append((status, {k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/qcgate"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _settings(receiver: Receiver, verdicts: list[str], **extra: Any) -> DeliverySettings:
    return DeliverySettings(destination=[{"name": "ward-hook", "address": f"webhook+{receiver.url}", "verdicts": verdicts,
                                          "hmac_secret": SECRET}], console_url="https://qcgate.hospital.example/", **{**FAST, **extra})


def test_a_rejected_case_is_posted_signed_after_500s_and_once(outbox_db: OutboxDb) -> None:
    receiver = Receiver([500, 503, 200])
    uids = add_case(outbox_db, "reject")
    add_case(outbox_db, "accept")  # not on this webhook's verdicts: nothing is posted for it
    outbox = Outbox(_settings(receiver, ["reject", "review"]), outbox_db.session_factory, outbox_db.data_dir, "QCGATE")
    outbox.start()
    try:
        wait_until(lambda: [r["state"] for r in outbox_db.deliveries()] == ["sent"], timeout=10)
        time.sleep(0.3)
    finally:
        outbox.stop()
        receiver.stop()
    assert [status for status, _, _ in receiver.requests] == [500, 503, 200]
    (row,) = outbox_db.deliveries()
    assert row["attempts"] == 3 and row["kind"] == "sr" and row["destination"] == "ward-hook"
    status, headers, body = receiver.requests[-1]
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert headers["x-qcgate-signature"] == expected
    assert headers["content-type"] == "application/json" and abs(int(headers["x-qcgate-timestamp"]) - time.time()) < 60
    payload = json.loads(body)
    assert payload["series_verdict"] == "reject" and payload["case_id"] == int(uids["case_id"])
    assert payload["seg_sop_instance_uids"] == [uids["ai-seg"]]
    assert {o["sop_instance_uid"] for o in payload["outputs"] if o["sop_instance_uid"]} == {uids["seg"], uids["sr"]}
    assert payload["link"] == f"https://qcgate.hospital.example/cases/{uids['case_id']}"
    assert payload["released_after_review"] is False and payload["delivery_id"] == row["delivery_id"]
    assert set(payload) >= {"study_instance_uid", "series_instance_uid", "slice_verdicts", "model", "q_source", "sent_at"}
    assert SECRET not in json.dumps(outbox_db.deliveries())


def test_a_4xx_is_a_dead_letter_at_once_but_429_is_retried(outbox_db: OutboxDb) -> None:
    receiver = Receiver([429, 404])
    add_case(outbox_db, "review")
    outbox = Outbox(_settings(receiver, ["review"]), outbox_db.session_factory, outbox_db.data_dir, "QCGATE")
    outbox.start()
    try:
        wait_until(lambda: [r["state"] for r in outbox_db.deliveries()] == ["dead"], timeout=10)
    finally:
        outbox.stop()
        receiver.stop()
    assert [status for status, _, _ in receiver.requests] == [429, 404]
    (row,) = outbox_db.deliveries()
    assert row["attempts"] == 2 and row["last_error"] == "webhook answered HTTP 404"


def test_a_held_notification_goes_out_when_the_reviewer_accepts(outbox_db: OutboxDb) -> None:
    receiver = Receiver([204])
    case_id = int(add_case(outbox_db, "review")["case_id"])
    outbox = Outbox(_settings(receiver, ["accept"]), outbox_db.session_factory, outbox_db.data_dir, "QCGATE")
    outbox.start()
    try:
        wait_until(lambda: [r["state"] for r in outbox_db.deliveries()] == ["held"], timeout=10)
        time.sleep(0.2)
        assert receiver.requests == []
        with outbox_db.session_factory() as session, session.begin():
            assert release_held(session, case_id, user="dr.who", reason="looks right") == 1
        wait_until(lambda: [r["state"] for r in outbox_db.deliveries()] == ["sent"], timeout=10)
    finally:
        outbox.stop()
        receiver.stop()
    assert json.loads(receiver.requests[0][2])["released_after_review"] is True
