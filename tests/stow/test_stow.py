"""STOW-RS in (fast tier): POST /dicomweb/studies through the node's Ingestor, with Starlette's TestClient.

Every test ends with the spool's incoming folder empty (the ``stow`` fixture checks it)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.stow.conftest import BOUNDARY, CONTENT_TYPE, Instances, StowFixture, make_stow, multipart

FAILED, REFERENCED, REASON = "00081198", "00081199", "00081197"
CLASS, INSTANCE, COMMENT = "00081150", "00081155", "00000902"
CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


def referenced(response) -> list[str]:  # type: ignore[no-untyped-def]
    return [item[INSTANCE]["Value"][0] for item in response.json().get(REFERENCED, {}).get("Value", [])]


def failures(response) -> list[dict]:  # type: ignore[no-untyped-def]
    return response.json().get(FAILED, {}).get("Value", [])


def test_a_case_is_stored_and_answered_in_dicom_json(stow: StowFixture, instances: Instances) -> None:
    response = stow.post(multipart([*instances.ct, instances.seg]))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/dicom+json"
    body = response.json()
    assert set(body) == {REFERENCED}  # no FailedSOPSequence when nothing failed
    items = body[REFERENCED]["Value"]
    assert [i[CLASS] for i in items] == [{"vr": "UI", "Value": [CT_CLASS]}] * 4 + [{"vr": "UI", "Value": [SEG_CLASS]}]
    uids = [Instances.uid(p) for p in [*instances.ct, instances.seg]]
    assert [i[INSTANCE]["Value"][0] for i in items] == uids
    assert stow.stored_uids() == set(uids)
    # The same case as C-STORE makes: one case of the CT series, the SEG linked to it, files in the spool.
    assert stow.sql("SELECT count(DISTINCT case_id), count(*) FROM instances") == [(1, 5)]
    assert stow.sql("SELECT count(*) FROM cases") == [(1,)]
    paths = [row[0] for row in stow.sql("SELECT spool_path FROM instances")]
    assert all((stow.spool.root / p).is_file() for p in paths)
    assert stow.sql("SELECT count(*) FROM refused_instances") == [(0,)]


def test_type_without_quotes_and_the_study_in_the_path_are_accepted(stow: StowFixture, instances: Instances) -> None:
    study = Instances.uid(instances.ct[0], "StudyInstanceUID")
    response = stow.post(multipart(instances.ct[:2]), path=f"/dicomweb/studies/{study}",
                         content_type=f"multipart/related; boundary={BOUNDARY}; type=application/dicom")
    assert response.status_code == 200 and len(referenced(response)) == 2
    # a quoted boundary, and parts without a Content-Type of their own
    again = stow.post(multipart(instances.ct[2:], boundary="a:b=c", content_type=None),
                      content_type='multipart/related; type="application/dicom"; boundary="a:b=c"')
    assert again.status_code == 200 and len(referenced(again)) == 2


def test_an_identical_resend_is_success_without_a_new_row(stow: StowFixture, instances: Instances) -> None:
    assert stow.post(multipart(instances.ct[:1])).status_code == 200
    again = stow.post(multipart(instances.ct[:1]))
    assert again.status_code == 200 and referenced(again) == [Instances.uid(instances.ct[0])]
    assert stow.sql("SELECT count(*) FROM instances") == [(1,)]


@pytest.mark.parametrize("content_type", [
    "application/dicom",
    'multipart/related; type="application/dicom+json"; boundary=' + BOUNDARY,
    'multipart/related; type="application/dicom+xml"; boundary=' + BOUNDARY,
    "multipart/form-data; boundary=" + BOUNDARY,
    "",
])
def test_a_wrong_media_type_is_415_and_nothing_is_stored(stow: StowFixture, instances: Instances, content_type: str) -> None:
    response = stow.post(multipart(instances.ct[:1]), content_type=content_type)
    assert response.status_code == 415
    assert "not supported" in response.json()["error"]
    assert stow.stored_uids() == set()


@pytest.mark.parametrize("content_type, body, expected", [
    ('multipart/related; type="application/dicom"', None, "boundary"),
    (CONTENT_TYPE, b"", "no part"),
    (CONTENT_TYPE, b"no delimiter anywhere in this body", "no part"),
    (CONTENT_TYPE, f"--{BOUNDARY}--\r\n".encode(), "holds no instance"),
    (CONTENT_TYPE, f"--{BOUNDARY}garbage\r\n\r\nx\r\n--{BOUNDARY}--".encode(), "holds no instance"),  # not a delimiter
    (CONTENT_TYPE, f"--{BOUNDARY}\r\nbad header line\r\n\r\nx\r\n--{BOUNDARY}--".encode(), "malformed part header"),
    (CONTENT_TYPE, f"--{BOUNDARY}\r\nX-Big: {'y' * 20000}\r\n\r\nx\r\n--{BOUNDARY}--".encode(), "headers exceed"),
    (CONTENT_TYPE, f"--{BOUNDARY}  junk\r\n\r\nx\r\n--{BOUNDARY}--".encode(), "transport padding"),
])
def test_a_malformed_request_is_400(stow: StowFixture, instances: Instances, content_type: str, body: bytes | None,
                                    expected: str) -> None:
    response = stow.post(multipart(instances.ct[:1]) if body is None else body, content_type=content_type)
    assert response.status_code == 400, response.text
    text = response.text if response.headers["content-type"] == "application/json" else response.headers["warning"]
    assert expected in text
    assert stow.stored_uids() == set()


def test_a_truncated_body_stores_the_complete_parts_and_reports_the_cut_one(stow: StowFixture, instances: Instances) -> None:
    whole = multipart(instances.ct[:3])
    cut = whole[: whole.index(instances.ct[2]) + len(instances.ct[2]) // 2]  # inside the third instance
    response = stow.post(cut)
    assert response.status_code == 400
    assert referenced(response) == [Instances.uid(p) for p in instances.ct[:2]]
    [failed] = failures(response)
    assert failed[REASON]["Value"] == [0xC000] and "part 3 incomplete" in failed[COMMENT]["Value"][0]
    assert "truncated" in response.headers["warning"]
    assert stow.stored_uids() == {Instances.uid(p) for p in instances.ct[:2]}
    # Cut right after a delimiter, in the next part's headers: the complete parts are stored, 400 all the same.
    response = stow.post(multipart(instances.ct[2:], close=False) + f"--{BOUNDARY}\r\nContent-Ty".encode())
    assert response.status_code == 400 and "truncated" in response.headers["warning"]
    assert referenced(response) == [Instances.uid(p) for p in instances.ct[2:]] and failures(response) == []


def test_a_non_dicom_part_fails_with_c000_and_the_good_parts_are_stored(stow: StowFixture, instances: Instances) -> None:
    response = stow.post(multipart([instances.ct[0], b"this is not DICOM at all" * 10, instances.ct[1]]))
    assert response.status_code == 202, response.text
    assert referenced(response) == [Instances.uid(p) for p in instances.ct[:2]]
    [failed] = failures(response)
    assert failed[REASON] == {"vr": "US", "Value": [0xC000]}
    assert failed[COMMENT]["Value"][0].startswith("unparseable")
    assert INSTANCE not in failed  # its UID could not be read
    # As for C-STORE: the payload is quarantined with a refusal row.
    assert stow.sql("SELECT reason_code, dimse_status FROM refused_instances") == [("unparseable", 0xC000)]
    assert len(list(stow.spool.quarantine_dir.glob("*.dcm"))) == 1


def test_a_part_of_another_media_type_fails_and_the_rest_is_stored(stow: StowFixture, instances: Instances) -> None:
    body = multipart(instances.ct[:1]).replace(f"--{BOUNDARY}--".encode(),
        f"--{BOUNDARY}\r\nContent-Type: application/dicom+json\r\n\r\n{{}}\r\n--{BOUNDARY}--".encode())
    response = stow.post(body)
    assert response.status_code == 202
    [failed] = failures(response)
    assert failed[REASON]["Value"] == [0xC000] and "application/dicom+json" in failed[COMMENT]["Value"][0]


def test_when_every_instance_fails_the_answer_is_409(stow: StowFixture, instances: Instances) -> None:
    response = stow.post(multipart([b"junk", b"\x00" * 300]))
    assert response.status_code == 409
    assert [f[REASON]["Value"] for f in failures(response)] == [[0xC000], [0xC000]]
    assert REFERENCED not in response.json()


def test_a_study_in_the_path_that_differs_fails_that_instance_with_a900(stow: StowFixture, instances: Instances) -> None:
    study = Instances.uid(instances.ct[0], "StudyInstanceUID")
    response = stow.post(multipart([instances.ct[0], instances.other_ct[0]]), path=f"/dicomweb/studies/{study}")
    assert response.status_code == 202
    assert referenced(response) == [Instances.uid(instances.ct[0])]
    [failed] = failures(response)
    assert failed[REASON]["Value"] == [0xA900]
    assert failed[INSTANCE]["Value"] == [Instances.uid(instances.other_ct[0])]  # named, though not stored
    assert failed[CLASS]["Value"] == [CT_CLASS]
    assert failed[COMMENT]["Value"][0].startswith("uid-mismatch: StudyInstanceUID")
    assert stow.stored_uids() == {Instances.uid(instances.ct[0])}
    assert stow.sql("SELECT reason_code FROM refused_instances") == [("uid-mismatch",)]
    only_other = stow.post(multipart(instances.other_ct), path=f"/dicomweb/studies/{study}")
    assert only_other.status_code == 409
    assert stow.post(multipart(instances.ct[:1]), path="/dicomweb/studies/1.2.x").status_code == 400


def test_a_part_over_the_part_limit_fails_with_a700_the_others_are_stored(tmp_path: Path, instances: Instances) -> None:
    limit = (len(instances.ct[0]) + len(instances.big_ct)) // 2
    with make_stow(tmp_path, {"stow_max_part_bytes": limit}) as stow:
        response = stow.post(multipart([instances.ct[0], instances.big_ct, instances.ct[1]]))
        assert response.status_code == 202
        assert referenced(response) == [Instances.uid(p) for p in instances.ct[:2]]
        [failed] = failures(response)
        assert failed[REASON]["Value"] == [0xA700] and "stow_max_part_bytes" in failed[COMMENT]["Value"][0]
        assert stow.incoming() == []


def test_a_body_over_the_limit_is_413(tmp_path: Path, instances: Instances) -> None:
    body = multipart([*instances.ct, instances.seg])
    with make_stow(tmp_path, {"stow_max_bytes": body.index(instances.seg) + len(instances.seg) // 2}) as stow:
        declared = stow.post(body)  # Content-Length says so: refused before reading
        assert declared.status_code == 413 and "stow_max_bytes" in declared.json()["error"]
        assert stow.stored_uids() == set()

        def chunked():  # no Content-Length: found while reading; the parts complete by then are kept and listed
            for start in range(0, len(body), 8192):
                yield body[start:start + 8192]

        streamed = stow.post(chunked())
        assert streamed.status_code == 413
        assert referenced(streamed) == [Instances.uid(p) for p in instances.ct]
        assert "incomplete" in failures(streamed)[0][COMMENT]["Value"][0]
        assert stow.incoming() == []


def test_only_senders_and_admins_may_store(stow: StowFixture, instances: Instances) -> None:
    body = multipart(instances.ct[:1])
    missing = stow.client.post("/dicomweb/studies", content=body, headers={"Content-Type": CONTENT_TYPE})
    assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
    wrong = stow.client.post("/dicomweb/studies", content=body,
                             headers={"Content-Type": CONTENT_TYPE, "Authorization": "Bearer qcg_nope"})
    assert wrong.status_code == 401
    for role in ("viewer", "reviewer"):
        refused = stow.post(body, role=role)
        assert refused.status_code == 403 and "sender or admin" in refused.json()["error"]
    assert stow.stored_uids() == set()
    assert stow.post(body, role="sender").status_code == 200
    assert stow.post(multipart(instances.ct[1:2]), role="admin").status_code == 200
    # A sender is a machine: it reads nothing of the console or the API.
    assert stow.client.get("/api/cases", headers=stow.bearer("sender")).status_code == 403
    assert stow.client.get("/dicomweb/studies", headers=stow.bearer("sender")).status_code == 405


def test_content_that_looks_like_a_delimiter_is_content(stow: StowFixture) -> None:
    from qcgate.console.multipart import MultipartParser, PartData, PartEnd, PartHeaders

    rng = random.Random(7)
    for trial in range(200):
        parts = [rng.randbytes(rng.randint(0, 400)) + rng.choice([b"", f"\r\n--{BOUNDARY}x".encode(), b"\r\n--", b"\r"])
                 for _ in range(rng.randint(1, 4))]
        body = multipart(parts)
        for size in (1, rng.randint(2, 97), len(body)):
            parser, got, current = MultipartParser(BOUNDARY), [], bytearray()
            for start in range(0, len(body), size):
                for event in parser.feed(body[start:start + size]):
                    if isinstance(event, PartHeaders):
                        assert event.headers == {"content-type": "application/dicom"}
                        current = bytearray()
                    elif isinstance(event, PartData):
                        current += event.data
                    elif isinstance(event, PartEnd):
                        got.append(bytes(current))
            parser.finish()
            assert got == parts, (trial, size)


def test_no_input_gets_a_traceback(stow: StowFixture, instances: Instances) -> None:
    rng = random.Random(11)
    good = multipart(instances.ct[:2])
    for _ in range(40):
        body = bytearray(good)
        for _ in range(rng.randint(1, 6)):
            position = rng.randrange(len(body))
            body[position:position + rng.randint(1, 40)] = rng.randbytes(rng.randint(0, 40))
        cut = bytes(body[: rng.randint(0, len(body))]) if rng.random() < 0.5 else bytes(body)
        response = stow.post(cut)
        assert response.status_code in (200, 202, 400, 409), response.text
        assert "Traceback" not in response.text
    assert stow.incoming() == []


def test_stow_counts_in_the_metrics(tmp_path: Path, instances: Instances) -> None:
    from qcgate.observability.metrics import MetricsRegistry

    registry = MetricsRegistry()
    with make_stow(tmp_path, metrics=registry) as stow:
        assert stow.post(multipart([instances.ct[0], b"junk"])).status_code == 202
    assert registry.value("qcgate_instances_received_total", sop_class=CT_CLASS, outcome="stored") == 1
    assert registry.value("qcgate_instances_refused_total", reason="unparseable") == 1
