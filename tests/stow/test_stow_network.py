"""STOW-RS over a real socket (fast tier): the app served by the gate's HttpServer (uvicorn), a real
client (dicomweb-client), and a sender that hangs up in the middle of its body."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.stow.conftest import CONTENT_TYPE, Instances, StowFixture, make_stow, multipart


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[StowFixture, int]]:
    from qcgate.observability.http import HttpServer

    with make_stow(tmp_path) as stow:
        server = HttpServer("127.0.0.1", 0, stow.client.app)
        server.start()
        try:
            yield stow, server.port
        finally:
            server.stop()
        assert stow.incoming() == []


def test_dicomweb_client_stores_a_case(served: tuple[StowFixture, int], instances: Instances) -> None:
    import io

    import pydicom
    from dicomweb_client.api import DICOMwebClient

    stow, port = served
    client = DICOMwebClient(f"http://127.0.0.1:{port}/dicomweb", headers=stow.bearer("sender"))
    datasets = [pydicom.dcmread(io.BytesIO(p)) for p in [*instances.ct, instances.seg]]
    answer = client.store_instances(datasets)
    assert [str(i.ReferencedSOPInstanceUID) for i in answer.ReferencedSOPSequence] == [str(d.SOPInstanceUID) for d in datasets]
    assert "FailedSOPSequence" not in answer
    assert stow.sql("SELECT count(*), count(DISTINCT case_id) FROM instances") == [(5, 1)]
    # A mixed request through the same client: 202, the failure parsed by the client with its reason.
    study = str(datasets[0].StudyInstanceUID)
    other = pydicom.dcmread(io.BytesIO(instances.other_ct[0]))
    mixed = client.store_instances([other, datasets[0]], study_instance_uid=study)
    assert [int(i.FailureReason) for i in mixed.FailedSOPSequence] == [0xA900]
    assert str(mixed.FailedSOPSequence[0].ReferencedSOPInstanceUID) == str(other.SOPInstanceUID)
    assert [str(i.ReferencedSOPInstanceUID) for i in mixed.ReferencedSOPSequence] == [str(datasets[0].SOPInstanceUID)]


def test_a_sender_that_hangs_up_mid_body_leaves_only_complete_instances(served: tuple[StowFixture, int],
                                                                        instances: Instances) -> None:
    stow, port = served
    body = multipart(instances.ct[:3])
    cut = body[: body.index(instances.ct[2]) + 1000]
    head = (f"POST /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {CONTENT_TYPE}\r\n"
            f"Authorization: Bearer {stow.tokens['sender']}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(head + cut)
        time.sleep(0.5)
    deadline = time.monotonic() + 10
    expected = {Instances.uid(p) for p in instances.ct[:2]}
    while (stow.stored_uids() != expected or stow.incoming()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stow.stored_uids() == expected  # the two complete ones: durable; the cut one: gone
    assert stow.incoming() == []
    assert stow.sql("SELECT count(*) FROM refused_instances") == [(0,)]


def test_an_unauthenticated_upload_is_refused_before_its_body_is_read(served: tuple[StowFixture, int],
                                                                      instances: Instances) -> None:
    import httpx

    stow, port = served
    response = httpx.post(f"http://127.0.0.1:{port}/dicomweb/studies", content=multipart(instances.ct),
                          headers={"Content-Type": CONTENT_TYPE, "Expect": "100-continue"}, timeout=10)
    assert response.status_code == 401
    assert stow.stored_uids() == set()
