"""Warm workers and memory that follows the lesion: the model is kept across jobs (and reloaded when
its manifest changes), a SEG decodes only its lesion frames, and what is held grows with the occupied
slices, not with the series."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from qcgate.config import Settings
from qcgate.pipeline import worker
from qcgate.pipeline.dispatcher import claim_next_job
from qcgate.pipeline.loading import SparseSlices, load_ct_series, load_seg_member
from qcgate.predictors import models_dir
from qcgate.store.database import create_db_engine, make_session_factory, upgrade_database
from qcgate.store.models import Case, Instance, Job, JobState
from tests.support import synthetic_ct_volume


def _slices_of(ct: Any, ct_files: list[Path], volume_indices: range) -> list[int]:
    """The sorted CT's slice indices of the volume's slices (files are written in volume order)."""
    uids = ct.sop_instance_uids
    return sorted(uids.index(str(pydicom.dcmread(ct_files[k], stop_before_pixels=True).SOPInstanceUID)) for k in volume_indices)


def _case_files(out: Path, n_slices: int, lesion: range, *, size: int = 64, fractional: bool = False,
                omit_empty_frames: bool = True, seed: int = 0) -> tuple[list[Path], Path]:
    """A SYNTHETIC CT with a disc-shaped lesion on the ``lesion`` slices and one SEG of it."""
    from qcgate.phantom.dicom_export import write_ct_series, write_seg

    volume = synthetic_ct_volume(n_slices, size, seed)
    yy, xx = np.mgrid[:size, :size]
    masks = np.zeros(volume.shape, bool)
    for k in lesion:
        masks[k] = (yy - size * 0.4) ** 2 + (xx - size * 0.35) ** 2 <= (size * 0.08 + k % 3) ** 2
        volume[k][masks[k]] = -300.0
    datasets = write_ct_series(volume, (0.7, 0.7), 2.5, out / "ct", patient_id="SYNTHWARM")
    seg = out / "seg.dcm"
    write_seg(datasets, masks.astype(np.float32) * 0.9 if fractional else masks, seg, fractional=fractional,
              algorithm_name="TestAI", manufacturer="qcgate tests", omit_empty_frames=omit_empty_frames)
    return sorted((out / "ct").glob("*.dcm")), seg


@pytest.mark.parametrize("fractional", [False, True])
def test_a_seg_member_decodes_only_its_lesion_frames(tmp_path: Path, fractional: bool) -> None:
    ct_files, seg_file = _case_files(tmp_path, 12, range(4, 7), fractional=fractional, omit_empty_frames=False)
    assert int(pydicom.dcmread(seg_file, stop_before_pixels=True).NumberOfFrames) == 12  # empty frames kept
    ct = load_ct_series(ct_files)
    member = load_seg_member(seg_file, ct, ["lesion"])
    assert member is not None
    assert member.decoded_frames == 3  # the 9 empty frames were told empty from their bytes, not decoded
    assert isinstance(member.probability, SparseSlices)
    assert member.probability.occupied() == _slices_of(ct, ct_files, range(4, 7))
    assert "PixelData" not in member.dataset  # the header is what the writers need
    expected = 0.9 if fractional else 1.0
    assert float(np.asarray(member.probability).max()) == pytest.approx(expected, abs=1 / 255)
    assert ct.hu.decoded == 0  # no CT pixels decoded for loading the SEG


def test_held_probability_grows_with_the_lesion_not_the_series(tmp_path: Path) -> None:
    held = {}
    for n_slices in (10, 40):
        ct_files, seg_file = _case_files(tmp_path / str(n_slices), n_slices, range(3, 6))
        ct = load_ct_series(ct_files)
        member = load_seg_member(seg_file, ct, ["lesion"])
        assert member is not None and member.probability.shape == (n_slices, 64, 64)
        probability = member.probability
        lesion = _slices_of(ct, ct_files, range(3, 6))
        assert sorted(probability.crops) == lesion
        assert probability.nbytes <= 3 * 64 * 64 * 2  # at most the occupied slices, float16
        assert all(crop.dtype == np.float16 for _, _, crop in probability.crops.values())
        held[n_slices] = probability.nbytes
        # what judge_case decodes of the CT: the lesion slices only
        result = worker.judge_case(ct, [member, member], worker.PipelineSettings(), worker.load_threshold_model("lidc-geometry"),
                                   worker.StageTimer())
        assert [s.slice_index for s in result.slices] == lesion
        assert ct.hu.decoded == 3
    assert held[10] == held[40]


def _add_case(session_factory: Any, spool: Path, ct_files: list[Path], seg_file: Path, name: str) -> None:
    with session_factory() as session, session.begin():
        first = pydicom.dcmread(ct_files[0], stop_before_pixels=True)
        case = Case(study_instance_uid=str(first.StudyInstanceUID), ct_series_uid=str(first.SeriesInstanceUID), state="ready")
        session.add(case)
        session.flush()
        for path in [*ct_files, seg_file]:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            target = spool / name / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            session.add(Instance(
                sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
                study_instance_uid=str(ds.StudyInstanceUID), series_instance_uid=str(ds.SeriesInstanceUID),
                modality=str(ds.Modality), transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                spool_path=f"{name}/{path.name}", size_bytes=target.stat().st_size,
                sha256=hashlib.sha256(target.read_bytes()).hexdigest(), case_id=case.id,
            ))
        session.add(Job(case_id=case.id, kind="qc", state=JobState.PENDING.value))


def test_the_model_is_loaded_once_across_jobs_and_again_after_its_manifest_changes(tmp_path: Path) -> None:
    model_dir = tmp_path / "models" / "lidc-copy"
    shutil.copytree(models_dir() / "lidc-geometry", model_dir)
    data_dir = tmp_path / "data"
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    engine = create_db_engine(url)
    upgrade_database(engine)
    session_factory = make_session_factory(engine)
    settings = Settings.model_validate({"database": {"url": url}, "storage": {"data_dir": str(data_dir)},
                                        "pipeline": {"model": str(model_dir)}})
    key = str(model_dir)
    versions = []
    try:
        for number in range(3):
            if number == 2:  # a new model in place: its manifest changes (here its version)
                manifest = json.loads((model_dir / "manifest.json").read_text())
                manifest["version"] = "retrained"
                (model_dir / "manifest.json").write_text(json.dumps(manifest))
            ct_files, seg_file = _case_files(tmp_path / f"case{number}", 6, range(2, 4), seed=number)
            _add_case(session_factory, data_dir / "spool", ct_files, seg_file, f"case{number}")
            job_id, token = claim_next_job(session_factory)
            summary = worker._run(job_id, settings, session_factory, data_dir, worker.StageTimer(), token)
            assert summary["state"] == "done", summary
            with session_factory() as session:
                versions.append(session.get(Case, session.get(Job, job_id).case_id).model_version)
            assert worker.MODEL_LOADS[key] == (1 if number < 2 else 2)  # one load for the first two jobs
    finally:
        engine.dispose()
        worker._MODEL_CACHE.pop(key, None)
        worker.MODEL_LOADS.pop(key, None)
    assert versions[0] == versions[1] != "retrained" and versions[2] == "retrained"
