"""A job's cost follows its lesion slices: features are extracted once per lesion slice (tau and q
share them, with the same q as a fresh extraction), the ensemble statistics are computed on the
members' boxes only (the same maps as on whole slices), and nothing builds a dense series volume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import qcgate.features
from qcgate.pipeline import quality_gate, worker
from qcgate.pipeline.loading import SparseSlices, load_ct_series, load_seg_member
from tests.support import synthetic_ct_volume

N_SLICES, SIZE, LESION = 14, 96, range(5, 10)


def _case(out: Path) -> tuple[object, list[worker.SegMember]]:
    """A SYNTHETIC CT and two FRACTIONAL members that differ (a grown copy), as the benchmark's."""
    from scipy import ndimage

    from qcgate.phantom.dicom_export import write_ct_series, write_seg

    volume = synthetic_ct_volume(N_SLICES, SIZE, seed=3)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    masks = np.zeros(volume.shape, bool)
    for k in LESION:
        masks[k] = (yy - SIZE * 0.45) ** 2 + (xx - SIZE * 0.3) ** 2 <= (SIZE * 0.06 + k % 3) ** 2
        volume[k][masks[k]] = -350.0
    datasets = write_ct_series(volume, (0.7, 0.7), 2.0, out / "ct", patient_id="SYNTHFLAT")
    paths = []
    for number, grow in enumerate((0, 2), start=1):
        grown = np.stack([ndimage.binary_dilation(m, iterations=grow) if grow else m for m in masks])
        probability = np.stack([ndimage.gaussian_filter(m.astype(np.float32), 1.5) for m in grown]).clip(0, 1)
        path = out / f"member{number}.dcm"
        write_seg(datasets, probability, path, fractional=True, algorithm_name=f"FlatMember{number}",
                  manufacturer="qcgate tests", series_number=200 + number)
        paths.append(path)
    ct = load_ct_series(sorted((out / "ct").glob("*.dcm")))
    members = [load_seg_member(path, ct, ["lesion"]) for path in paths]
    assert all(m is not None for m in members)
    return ct, members  # type: ignore[return-value]


def test_features_are_extracted_once_per_lesion_slice_with_the_same_q(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    ct, members = _case(tmp_path)
    model = worker.load_threshold_model("phantom-full")
    calls = []
    extract = qcgate.features.extract_slice_features

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return extract(*args, **kwargs)

    monkeypatch.setattr(qcgate.features, "extract_slice_features", counted)
    result = worker.judge_case(ct, members, worker.PipelineSettings(), model, worker.StageTimer())
    assert result.q_source.startswith("learned")  # an estimator on image features: the case that was extracted twice
    assert len(result.slices) >= 4
    assert len(calls) == len(result.slices)

    # q from the shared features equals q from a fresh extraction on every slice
    monkeypatch.setattr(qcgate.features, "extract_slice_features", extract)
    fresh = quality_gate._features
    monkeypatch.setattr(quality_gate, "_features", lambda *args: fresh(*args[:8], None))
    again = worker.judge_case(ct, members, worker.PipelineSettings(), model, worker.StageTimer())
    assert [s.q for s in again.slices] == [s.q for s in result.slices]
    assert [s.verdict for s in again.slices] == [s.verdict for s in result.slices]


def test_ensemble_maps_on_the_members_boxes_equal_the_whole_slice_maps(tmp_path: Path) -> None:
    ct, members = _case(tmp_path)
    assert all(isinstance(m.probability, SparseSlices) for m in members)
    for k in sorted(set(members[0].probability.occupied()) | set(members[1].probability.occupied())):
        (r0, c0), boxed = worker._members_on_slice(members, k)
        whole = np.stack([m.probability[k].astype(np.float32) for m in members])
        assert boxed.shape[1] * boxed.shape[2] < SIZE * SIZE  # only the box is stacked
        np.testing.assert_array_equal(whole[:, r0:r0 + boxed.shape[1], c0:c0 + boxed.shape[2]], boxed)
        outside = whole.copy()
        outside[:, r0:r0 + boxed.shape[1], c0:c0 + boxed.shape[2]] = 0
        assert not outside.any()
        for statistic in (np.mean, np.std):
            held, reference = SparseSlices(ct.hu.shape), SparseSlices(ct.hu.shape)
            held.put(k, statistic(boxed, axis=0), (r0, c0))
            reference.put(k, statistic(whole, axis=0))
            np.testing.assert_array_equal(held[k], reference[k])
            assert held.box(k) == reference.box(k)


def test_binary_member_check_reads_the_occupied_boxes_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, members = _case(tmp_path)

    def no_dense(self: SparseSlices) -> np.ndarray:
        raise AssertionError("the dense series volume was built")

    monkeypatch.setattr(SparseSlices, "dense", no_dense)
    assert quality_gate.is_binary_member(members[0]) is False  # FRACTIONAL probabilities below 1
    member = members[0]
    binary = SparseSlices(member.probability.shape, {k: (member.probability.region(k, (0, SIZE, 0, SIZE)) > 0.5)
                                                     for k in member.probability.occupied()})
    member.probability = binary
    member.dataset.SegmentationType = "FRACTIONAL"  # a FRACTIONAL SEG that holds 0/1 only
    assert quality_gate.is_binary_member(member) is True
