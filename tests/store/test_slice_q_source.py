"""slice_results name their q source, their reject margin and why review was forced (migration 0009):
the migration up and down (SQLite and PostgreSQL), what the worker records, and `qcgate audit case`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from sqlalchemy import inspect, text

from qcgate.config import PipelineSettings
from qcgate.core.results import Verdict
from qcgate.pipeline.loading import CtSeries, SegMember
from qcgate.pipeline.worker import (
    StageTimer,
    _record_success,
    judge_case,
    load_threshold_model,
)
from qcgate.store.database import (
    create_db_engine,
    downgrade_database,
    make_session_factory,
    upgrade_database,
)
from qcgate.store.models import Case, Job, SliceResultRecord



def test_migration_0009_up_and_down(db_url: str, tmp_path: Path) -> None:
    url = db_url or f"sqlite:///{tmp_path / 'migrate.db'}"
    engine = create_db_engine(url)
    try:
        upgrade_database(engine, "0007")
        with engine.begin() as connection:  # a slice judged before 0009
            connection.execute(text("INSERT INTO cases (id, study_instance_uid, ct_series_uid, state, created_at, last_instance_at, q_source) "
                                    "VALUES (1, '1.2', '1.2.3', 'done', '2026-11-01 08:00:00', '2026-11-01 08:00:00', 'learned-um')"))
            connection.execute(text("INSERT INTO jobs (id, case_id, kind, state, attempts, created_at) VALUES (1, 1, 'qc', 'done', 1, '2026-11-01 08:00:00')"))
            connection.execute(text("INSERT INTO slice_results (id, case_id, job_id, sop_instance_uid, slice_index, tau, q, margin, verdict, "
                                    "lesion_area_mm2, created_at) VALUES (1, 1, 1, '1.2.3.4', 0, 0.6, 0.7, 0.05, 'accept', 12.0, '2026-11-01 09:00:00')"))
        upgrade_database(engine, "0009")
        columns = {c["name"] for c in inspect(engine).get_columns("slice_results")}
        assert {"q_source", "margin_reject", "review_reason"} <= columns
        with engine.connect() as connection:
            row = connection.execute(text("SELECT q_source, margin_reject, review_reason FROM slice_results")).one()
        assert tuple(row) == ("learned-um", None, None)  # the case's q source; the symmetric rule's NULL
        downgrade_database(engine, "0007")
        columns = {c["name"] for c in inspect(engine).get_columns("slice_results")}
        assert not {"q_source", "margin_reject", "review_reason"} & columns
        with engine.connect() as connection:  # the row survives the round trip
            assert connection.execute(text("SELECT verdict, q FROM slice_results")).all() == [("accept", 0.7)]
    finally:
        engine.dispose()


def _ct(hu: np.ndarray, modality: str = "CT") -> CtSeries:
    datasets = []
    for k in range(hu.shape[0]):
        ds = Dataset()
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.{k + 1}"
        ds.Modality = modality
        ds.InstanceNumber = k + 1
        datasets.append(ds)
    return CtSeries(datasets=datasets, hu=hu.astype(np.float32), pixel_spacing=(0.7, 0.7), frame_of_reference_uid="1.2.3",
                    positions_mm=np.array([[0, 0, 2.5 * k] for k in range(hu.shape[0])], float))


def _lung_case(n: int = 2, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:size, :size]
    hu = np.full((n, size, size), 40.0)
    hu[:, 10:118, 10:118] = -850.0  # a lung field
    disc = (yy - 64) ** 2 + (xx - 64) ** 2 <= 14 ** 2
    hu[:, disc] = 20.0
    probability = np.stack([1.0 / (1.0 + np.exp(-(14 - np.hypot(yy - 64, xx - 64)) / 0.8))] * n)
    return hu, probability


def _member(probability: np.ndarray) -> SegMember:
    ds = Dataset()
    ds.SegmentationType = "FRACTIONAL"
    return SegMember(dataset=ds, probability=probability.astype(np.float32), is_reference_reader=False, label="lesion")


def test_the_worker_records_q_source_band_and_forced_reason_and_audit_case_shows_them(tmp_path: Path) -> None:
    model = load_threshold_model("lidc-geometry")
    hu, probability = _lung_case()
    judged = judge_case(_ct(hu), [_member(probability), _member(probability ** 1.2)], PipelineSettings(), model,
                        StageTimer())
    forced = judge_case(_ct(hu, "MR"), [_member(probability), _member(probability ** 1.2)], PipelineSettings(), model,
                        StageTimer())
    assert judged.q_source == forced.q_source and judged.q_source not in ("none", "reference")
    assert all(s.q_source == judged.q_source and not s.reason for s in judged.slices)
    assert all(s.verdict is Verdict.REVIEW and "modality MR" in s.reason for s in forced.slices)

    data_dir = tmp_path / "data"
    engine = create_db_engine(f"sqlite:///{data_dir / 'qcgate.db'}")
    upgrade_database(engine)
    factory = make_session_factory(engine)
    for number, result in enumerate((judged, forced), start=1):
        with factory() as session, session.begin():
            case = Case(study_instance_uid=f"1.2.{number}", ct_series_uid=f"1.2.{number}.1", state="ready")
            session.add(case)
            session.flush()
            job = Job(case_id=case.id, state="running")
            session.add(job)
            session.flush()
            _record_success(session, job, case, result, {}, data_dir, [], StageTimer())
    with factory() as session:
        rows = {r.case_id: r for r in session.query(SliceResultRecord).all()}
    engine.dispose()
    first, second = rows[1], rows[2]
    assert first.q_source == judged.q_source and second.q_source == forced.q_source
    assert first.review_reason is None and second.review_reason is not None and "modality MR" in second.review_reason
    expected_reject = judged.slices[0].margin_reject
    assert first.margin_reject == pytest.approx(expected_reject if np.isfinite(expected_reject) else 1.0)
    assert first.margin == pytest.approx(judged.slices[0].margin)

    def audit(*args: str) -> str:
        done = subprocess.run([str(Path(sys.executable).with_name("qcgate")), "audit", "case", *args, "--data-dir", str(data_dir)],
                              capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        return done.stdout

    detail = json.loads(audit("2", "--format", "json"))
    assert {s["q_source"] for s in detail["slices"]} == {forced.q_source}
    assert all("modality MR" in s["review_reason"] for s in detail["slices"])
    assert all(s["margin_reject"] is not None for s in detail["slices"])
    shown = audit("2")
    assert "review forced: out of the model's domain: modality MR" in shown and forced.q_source in shown
    assert "review forced" not in audit("1")
