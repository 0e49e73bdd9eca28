"""Outbox fixtures: an audit database with outputs waiting for a destination, and real C-STORE peers
(a pynetdicom SCP in this process, DCMTK storescp as a subprocess)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy.orm import Session, sessionmaker

from tests.support import StoreSCP, free_port, wait_until  # noqa: F401  (re-exported for the delivery tests)

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def write_small_dicom(path: Path, number: int) -> str:
    """A tiny Secondary Capture object (no pixels needed by a storage SCP); returns its SOP Instance UID."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.PatientID = "SYNTHETIC"
    ds.InstanceNumber = number
    ds.ConversionType = "WSD"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return str(ds.SOPInstanceUID)


def add_outputs(session_factory: sessionmaker[Session], data_dir: Path, destination: str, count: int) -> list[str]:
    """``count`` outputs (one case and job each) with a pending delivery to ``destination``, in
    creation order; returns their SOP Instance UIDs in that order."""
    from qcgate.store.models import Case, Delivery, Job, Output

    uids = []
    with session_factory() as session, session.begin():
        for _ in range(count):
            case = Case(study_instance_uid=generate_uid(), ct_series_uid=generate_uid(), state="done")
            session.add(case)
            session.flush()
            job = Job(case_id=case.id, state="done")
            session.add(job)
            session.flush()
            relative = f"outputs/{case.id}/sr.dcm"
            uid = write_small_dicom(data_dir / relative, case.id)
            output = Output(case_id=case.id, job_id=job.id, kind="sr", sop_class_uid=SECONDARY_CAPTURE, sop_instance_uid=uid, path=relative)
            session.add(output)
            session.flush()
            session.add(Delivery(output_id=output.id, destination=destination))
            uids.append(uid)
    return uids


@dataclass
class OutboxDb:
    url: str
    data_dir: Path
    session_factory: Any
    engine: Any

    def deliveries(self, **filters: Any) -> list[dict[str, Any]]:
        from qcgate.store.queries import list_deliveries

        with self.session_factory() as session:
            return list_deliveries(session, **filters)


@pytest.fixture
def outbox_db(tmp_path: Path) -> Iterator[OutboxDb]:
    """An empty, migrated SQLite audit database and a data dir."""
    from qcgate.store.database import create_db_engine, make_session_factory, upgrade_database

    url = f"sqlite:///{tmp_path / 'data' / 'qcgate.db'}"
    engine = create_db_engine(url)
    upgrade_database(engine)
    yield OutboxDb(url, tmp_path / "data", make_session_factory(engine), engine)
    engine.dispose()


@dataclass
class RecordingSCP:
    """A pynetdicom storage SCP that records what it received, in order, and answers ``status_for(uid)``."""

    port: int = field(default_factory=free_port)
    ae_title: str = "PACS"
    status_for: Callable[[str], int] = lambda uid: 0x0000
    sop_classes: tuple[str, ...] = (SECONDARY_CAPTURE,)
    received: list[str] = field(default_factory=list)
    _server: Any = None

    @property
    def address(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.port}"

    def start(self) -> "RecordingSCP":
        from pynetdicom import AE, evt
        from pynetdicom.presentation import build_context

        def on_store(event: Any) -> int:
            uid = str(event.request.AffectedSOPInstanceUID)
            status = self.status_for(uid)
            if status == 0:
                self.received.append(uid)
            return status

        ae = AE(ae_title=self.ae_title)
        ae.supported_contexts = [build_context(uid) for uid in self.sop_classes]
        self._server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None


