"""The QC SR's slice groups encoded straight to bytes (``build_qc_sr(encode_groups=True)``, the
default) give the same file, byte for byte, as the highdicom-built groups; on a SYNTHETIC case
with every kind of slice item: q unknown, an asymmetric band, accept impossible, UM statistics
with a NaN, an empty mask (no outline) and QC SEG segment references."""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from qcgate.core.results import CaseResult, Verdict
from qcgate.writers import sr as sr_module
from qcgate.writers.common import save_dataset
from qcgate.writers.seg import build_qc_seg
from qcgate.writers.sr import build_qc_sr, read_qc_sr
from qcgate.writers.validate import dciodvfy_errors
from tests.writers.conftest import WriterCase

_FIXED_TIMES = {"ContentDate": "20260101", "ContentTime": "120000", "InstanceCreationDate": "20260101",
                "InstanceCreationTime": "120000"}


def _varied(case: WriterCase) -> CaseResult:
    """The case with one slice of each special kind (the first slices of the fixture's 5)."""
    slices = sorted(case.result.slices, key=lambda s: s.slice_index)
    slices[0] = replace(slices[0], q=None, verdict=Verdict.REVIEW)
    slices[1] = replace(slices[1], margin_reject=0.08)
    slices[2] = replace(slices[2], margin=float("inf"), uncertainty={**(slices[2].uncertainty or {}), "um_std": float("nan")})
    slices[3] = replace(slices[3], ai_mask=np.zeros_like(slices[3].ai_mask), uncertainty=None)
    return replace(case.result, slices=slices, notes=["SYNTHETIC test case"])


def _saved(result: CaseResult, qc_seg: pydicom.Dataset | None, path: Path, *, encode_groups: bool,
           monkeypatch: pytest.MonkeyPatch) -> tuple[hd.sr.Comprehensive3DSR, bytes]:
    """Build and save with the same UIDs and times for both paths (the tracking UIDs are generated)."""
    counter = itertools.count(1)
    monkeypatch.setattr(sr_module, "generate_uid", lambda *args, **kwargs: f"1.2.826.0.1.3680043.10.999.{next(counter)}")
    sr = build_qc_sr(result, qc_seg, series_instance_uid="1.2.3.1", sop_instance_uid="1.2.3.2", encode_groups=encode_groups)
    for keyword, value in _FIXED_TIMES.items():
        if keyword in sr:
            setattr(sr, keyword, value)
    for equipment in sr.get("ContributingEquipmentSequence", []):  # highdicom stamps the build time
        equipment.ContributionDateTime = "20260101120000"
    save_dataset(sr, path)
    return sr, path.read_bytes()


def test_encoded_groups_write_the_same_file_as_highdicom(synthetic_case: WriterCase, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    result = _varied(synthetic_case)
    qc_seg = build_qc_seg(result)
    fast, fast_bytes = _saved(result, qc_seg, tmp_path / "fast.dcm", encode_groups=True, monkeypatch=monkeypatch)
    slow, slow_bytes = _saved(result, qc_seg, tmp_path / "slow.dcm", encode_groups=False, monkeypatch=monkeypatch)
    measurements = sr_module._imaging_measurements_container(fast)
    assert measurements.get_item(0x0040A730).is_raw  # the byte path was taken, and saving did not re-encode it
    first_difference = next((i for i, (a, b) in enumerate(zip(fast_bytes, slow_bytes)) if a != b), None)
    assert fast_bytes == slow_bytes, f"files differ from byte {first_difference} (lengths {len(fast_bytes)}, {len(slow_bytes)})"
    # the in-memory dataset holds the same tree (the raw element parses back)
    assert len(measurements.ContentSequence) == len(sr_module._imaging_measurements_container(slow).ContentSequence)
    assert fast.content is not None
    assert dciodvfy_errors(tmp_path / "fast.dcm") == []
    read = read_qc_sr(tmp_path / "fast.dcm")
    assert read.slices[0].q is None and read.slices[1].margin_reject == pytest.approx(0.08)
    assert read.slices[3].outline is None and read.slices[4].outline is not None
    assert {s.qc_seg_segment for s in read.slices} - {None}


def test_a_case_without_lesion_slices_is_the_same(synthetic_case: WriterCase, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    result = replace(synthetic_case.result, slices=[], series_verdict=Verdict.ACCEPT)
    _, fast = _saved(result, None, tmp_path / "fast.dcm", encode_groups=True, monkeypatch=monkeypatch)
    _, slow = _saved(result, None, tmp_path / "slow.dcm", encode_groups=False, monkeypatch=monkeypatch)
    assert fast == slow


def test_non_ascii_model_name_falls_back_to_highdicom(synthetic_case: WriterCase, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    result = replace(synthetic_case.result, model_name="phantom-größe")
    sr, _ = _saved(result, None, tmp_path / "fast.dcm", encode_groups=True, monkeypatch=monkeypatch)
    assert not sr_module._imaging_measurements_container(sr).get_item(0x0040A730).is_raw
    assert read_qc_sr(tmp_path / "fast.dcm").observer_model_name.startswith("phantom-größe")
