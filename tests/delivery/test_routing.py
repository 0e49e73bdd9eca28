"""Routing by verdict, in process: the rules, held deliveries released or discarded by a reviewer's
decision (each audited), the AI's own SEG sent from the spool, and the settings that name a bad rule.
The peers are real pynetdicom storage SCPs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from qcgate.config import DeliverySettings, load_settings
from qcgate.delivery.outbox import Outbox
from qcgate.delivery.routing import discard_held, object_of, release_held, route_pending_cases
from qcgate.errors import ConfigError
from tests.delivery.conftest import OutboxDb, RecordingSCP, wait_until, write_small_dicom

FAST = {"backoff_base_seconds": 0.1, "backoff_max_seconds": 0.4, "poll_interval_seconds": 0.05, "connect_timeout_seconds": 2}
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


def add_case(db: OutboxDb, verdict: str, *, kinds: tuple[str, ...] = ("seg", "sr", "report")) -> dict[str, str]:
    """A finished case with one AI SEG in the spool and the job's outputs (no delivery rows);
    returns {kind: SOP Instance UID} with ``ai-seg`` for the spooled SEG, and ``case_id``."""
    from qcgate.store.models import Case, Instance, Job, Output

    uids: dict[str, str] = {}
    with db.session_factory() as session, session.begin():
        case = Case(study_instance_uid=generate_uid(), ct_series_uid=generate_uid(), state="done", series_verdict=verdict)
        session.add(case)
        session.flush()
        job = Job(case_id=case.id, state="done")
        session.add(job)
        session.flush()
        spool_relative = f"{case.study_instance_uid}/seg.dcm"
        uids["ai-seg"] = write_small_dicom(db.data_dir / "spool" / spool_relative, 1)
        session.add(Instance(sop_instance_uid=uids["ai-seg"], sop_class_uid=SEG_CLASS, study_instance_uid=case.study_instance_uid,
                             series_instance_uid=generate_uid(), modality="SEG", transfer_syntax_uid="1.2.840.10008.1.2.1",
                             spool_path=spool_relative, size_bytes=1, sha256="0" * 64, case_id=case.id))
        for number, kind in enumerate(kinds, start=2):
            relative = f"outputs/{case.id}/{kind}.dcm"
            if kind == "report":
                (db.data_dir / relative).parent.mkdir(parents=True, exist_ok=True)
                (db.data_dir / relative).write_text("<html></html>")
                session.add(Output(case_id=case.id, job_id=job.id, kind=kind, path=relative))
                continue
            uids[kind] = write_small_dicom(db.data_dir / relative, number)
            session.add(Output(case_id=case.id, job_id=job.id, kind=kind, sop_class_uid="1.2.840.10008.5.1.4.1.1.7",
                               sop_instance_uid=uids[kind], path=relative))
        uids["case_id"] = str(case.id)
    return uids


def two_destinations(clinical: RecordingSCP, review: RecordingSCP) -> DeliverySettings:
    return DeliverySettings(destination=[
        {"name": "clinical", "address": clinical.address, "objects": ["ai-seg", "sc", "pdf", "sr"], "verdicts": ["accept"]},
        {"name": "review", "address": review.address, "objects": ["ai-seg", "qc-seg", "sr", "sc", "pdf", "pmap"],
         "verdicts": ["review", "reject"]},
    ], **FAST)


def _states(db: OutboxDb) -> list[tuple[str, str, str]]:
    return sorted((r["destination"], r["kind"], r["state"]) for r in db.deliveries())


def _actions(db: OutboxDb) -> list[dict]:
    from qcgate.store.models import Action

    with db.session_factory() as session:
        return [{"user": a.user, "action": a.action, "object_id": a.object_id, "reason": a.reason, "details": json.loads(a.details or "{}")}
                for a in session.query(Action).order_by(Action.id)]


def test_output_kinds_map_to_rule_objects() -> None:
    assert [object_of(k) for k in ("seg", "sr", "pmap", "report", "ai-seg", "sc", "sc-3", "sc.summary", "pdf")] == \
        ["qc-seg", "sr", "pmap", "report", "ai-seg", "sc", "sc", "sc", "pdf"]


def test_plain_destinations_keep_the_old_rule(outbox_db: OutboxDb) -> None:
    uids = add_case(outbox_db, "reject")
    settings = DeliverySettings(destinations=["PACS@127.0.0.1:104"])
    (result,) = route_pending_cases(outbox_db.session_factory, settings, outbox_db.data_dir)
    assert len(result.pending) == 2 and not result.held
    assert _states(outbox_db) == [("PACS@127.0.0.1:104", "seg", "pending"), ("PACS@127.0.0.1:104", "sr", "pending")]
    assert route_pending_cases(outbox_db.session_factory, settings, outbox_db.data_dir) == []  # routed once
    assert uids


def test_a_review_case_goes_to_review_now_and_is_held_for_the_clinical_pacs_until_released(outbox_db: OutboxDb) -> None:
    clinical, review = RecordingSCP(ae_title="CLIN").start(), RecordingSCP(ae_title="REVIEW").start()
    uids = add_case(outbox_db, "review")
    case_id = int(uids["case_id"])
    outbox = Outbox(two_destinations(clinical, review), outbox_db.session_factory, outbox_db.data_dir, "QCGATE")
    outbox.start()
    try:
        wait_until(lambda: [r["state"] for r in outbox_db.deliveries(destination="review")] == ["sent"] * 3, timeout=10)
        assert sorted(review.received) == sorted([uids["ai-seg"], uids["seg"], uids["sr"]])
        assert _states(outbox_db) == [("clinical", "ai-seg", "held"), ("clinical", "sr", "held"),
                                      ("review", "ai-seg", "sent"), ("review", "seg", "sent"), ("review", "sr", "sent")]
        assert clinical.received == []
        (hold,) = _actions(outbox_db)
        assert hold["action"] == "delivery.hold" and hold["user"] == "qcgate" and hold["object_id"] == str(case_id)
        assert "clinical: ai-seg, sr" in hold["reason"] and len(hold["details"]["delivery_ids"]) == 2

        with outbox_db.session_factory() as session, session.begin():
            assert release_held(session, case_id, user="dr.house", reason="outline checked on slices 3-5") == 2
        wait_until(lambda: [r["state"] for r in outbox_db.deliveries(destination="clinical")] == ["sent"] * 2, timeout=10)
        with outbox_db.session_factory() as session, session.begin():
            assert release_held(session, case_id, user="dr.house", reason="again") == 0  # nothing is held any more
        import time

        time.sleep(0.3)
    finally:
        outbox.stop()
        clinical.stop()
        review.stop()
    assert sorted(clinical.received) == sorted([uids["ai-seg"], uids["sr"]])  # each once
    release = _actions(outbox_db)[1]
    assert (release["action"], release["user"], release["reason"]) == ("delivery.release", "dr.house", "outline checked on slices 3-5")
    assert release["details"]["destinations"] == ["clinical"]


def test_discard_and_a_decision_taken_before_routing(outbox_db: OutboxDb) -> None:
    settings = DeliverySettings(destination=[{"name": "clinical", "address": "CLIN@127.0.0.1:104", "objects": ["qc-seg"], "verdicts": ["accept"]}])
    first, second, accepted = (int(add_case(outbox_db, v)["case_id"]) for v in ("reject", "review", "accept"))
    with outbox_db.session_factory() as session, session.begin():  # the reviewer is quicker than the router
        assert release_held(session, second, user="dr.a", reason="fine") == 0
    route_pending_cases(outbox_db.session_factory, settings, outbox_db.data_dir)
    with outbox_db.session_factory() as session, session.begin():
        assert discard_held(session, first, user="dr.b", reason="wrong lobe") == 1
        with pytest.raises(ValueError):
            discard_held(session, first, user="dr.b", reason=" ")
    by_case = {r["case_id"]: (r["state"], r["last_error"]) for r in outbox_db.deliveries()}
    assert by_case[first] == ("discarded", "discarded: the reviewer rejected the case (wrong lobe)")
    assert by_case[second][0] == "pending" and by_case[accepted][0] == "pending"
    hold = next(a for a in _actions(outbox_db) if a["action"] == "delivery.hold" and a["object_id"] == str(second))
    assert hold["details"]["applied_earlier_decision"] == "delivery.release"


def test_a_destination_without_accept_gets_nothing_held() -> None:
    from qcgate.config import DestinationSettings
    from qcgate.delivery.routing import decide

    review = DestinationSettings(address="R@h:1", verdicts=["review", "reject"])
    clinical = DestinationSettings(address="C@h:1", verdicts=["accept"])
    assert [decide(review, v) for v in ("accept", "review", "reject")] == [None, "pending", "pending"]
    assert [decide(clinical, v) for v in ("accept", "review", "reject")] == ["pending", "held", "held"]


@pytest.mark.parametrize(("table", "message"), [
    ('objects = ["qc-seg", "ai_seg"]', ("delivery.destination.0.objects:", "unknown object 'ai_seg'")),
    ('verdicts = ["accepted"]', ("delivery.destination.0.verdicts:", "unknown verdict 'accepted'")),
    ('colour = "red"', ("delivery.destination.0.colour: unknown key",)),
    ('objects = ["report"]', ("delivery.destination.0:", "'report' is the HTML report")),
])
def test_check_config_names_a_bad_rule(tmp_path: Path, table: str, message: tuple[str, ...]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(f'[[delivery.destination]]\nname = "pacs"\naddress = "PACS@10.0.0.5:104"\n{table}\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert all(part in str(caught.value) for part in message), str(caught.value)


def test_destination_tables_and_plain_entries_load(tmp_path: Path) -> None:
    secret = tmp_path / "hook.secret"
    secret.write_text("s3cret\n")
    path = tmp_path / "ok.toml"
    path.write_text('[delivery]\ndestinations = ["OLD@10.0.0.1:104"]\n'
                    '[[delivery.destination]]\nname = "hook"\naddress = "webhook+https://hooks.example/qc"\n'
                    'verdicts = ["reject"]\nhmac_secret_file = "hook.secret"\n'
                    '[[delivery.destination]]\naddress = "https://pacs.example/dicom-web/"\ntoken = "abc"\n')
    settings = load_settings(path)
    targets = settings.delivery.targets()
    assert [(t.key, t.type) for t in targets] == [("OLD@10.0.0.1:104", "dimse"), ("hook", "webhook"),
                                                  ("https://pacs.example/dicom-web", "stow")]
    assert targets[1].hmac_secret_file == secret.resolve()
    assert "abc" not in repr(settings) and "abc" not in settings.model_dump_json()
    with pytest.raises(ConfigError, match="credentials"):
        path.write_text('[delivery]\ndestinations = ["https://user:pw@pacs.example/dicom-web"]\n')
        load_settings(path)


def test_a_review_decision_releases_or_discards_the_held_outputs(outbox_db: OutboxDb) -> None:
    """`qcgate review` and the console call decide_review: it applies the same held-output rule."""
    from qcgate.store.review import decide_review
    from qcgate.store.users import add_user

    settings = DeliverySettings(destination=[{"name": "clinical", "address": "CLIN@127.0.0.1:104", "objects": ["qc-seg", "sr"], "verdicts": ["accept"]}])
    accepted, rejected = (int(add_case(outbox_db, "review")["case_id"]) for _ in range(2))
    route_pending_cases(outbox_db.session_factory, settings, outbox_db.data_dir)
    with outbox_db.session_factory() as session, session.begin():
        add_user(session, "dr.r", "reviewer", "a long enough password")
    with outbox_db.session_factory() as session, session.begin():
        assert decide_review(session, accepted, "accept", "dr.r", "outline confirmed").held_released == 2
        assert decide_review(session, rejected, "reject", "dr.r", "wrong lobe").held_discarded == 2
    states = {(r["case_id"], r["kind"]): r["state"] for r in outbox_db.deliveries()}
    assert states == {(accepted, "seg"): "pending", (accepted, "sr"): "pending",
                      (rejected, "seg"): "discarded", (rejected, "sr"): "discarded"}
    actions = [(a["action"], a["object_id"]) for a in _actions(outbox_db) if a["user"] == "dr.r"]
    assert ("delivery.release", str(accepted)) in actions and ("review.accept", str(accepted)) in actions
    assert ("delivery.discard", str(rejected)) in actions and ("review.reject", str(rejected)) in actions
