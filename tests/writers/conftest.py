"""CaseResults for the writer tests: a SYNTHETIC CT series, the real dcmqi liver CT, no lesion, q unknown.

Verdicts are computed with the pipeline's own rule (``slice_verdict``) from chosen tau/q pairs, so the
tests exercise the same contract the worker produces.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from qcgate.phantom.dicom_export import write_ct_series
from qcgate.core.results import CaseResult, SliceResult, Verdict, slice_verdict
from tests.support import DCMQI_LIVER, synthetic_ct_volume

MARGIN = 0.05
#: (slice index, tau, q): accept, review, reject, accept, review on the synthetic series.
SYNTHETIC_LESION_SLICES: tuple[tuple[int, float, float | None], ...] = (
    (2, 0.60, 0.80), (3, 0.70, 0.72), (4, 0.75, 0.40), (5, 0.55, 0.90), (6, 0.65, 0.62),
)


@dataclass
class WriterCase:
    """A CaseResult plus what the tests compare the outputs against."""

    result: CaseResult
    expected_verdicts: dict[str, Verdict]  # source SOP Instance UID -> verdict
    expected_masks: dict[str, np.ndarray]  # source SOP Instance UID -> 2-D bool mask


def _lesion_mask(shape: tuple[int, int], index: int) -> np.ndarray:
    """A blob that differs from slice to slice (so a mask on the wrong slice is detected)."""
    rows, cols = shape
    yy, xx = np.mgrid[0:rows, 0:cols]
    centre_y, centre_x = rows * 0.4 + index, cols * 0.35 + 2 * index
    radius = 3 + index
    mask = (yy - centre_y) ** 2 + (xx - centre_x) ** 2 <= radius**2
    mask[int(centre_y), :2 + index] = True  # an asymmetric tail: a flipped mask would not match
    return mask


def build_case(
    datasets: Sequence[Dataset],
    lesion_slices: Sequence[tuple[int, float, float | None]],
    *,
    n_members: int = 3,
    with_uncertainty: bool = True,
    model_name: str = "phantom-full",
    model_version: str = "1.2.0",
) -> WriterCase:
    """A CaseResult over ``datasets`` (sorted here) with a lesion on each listed slice."""
    sorted_datasets = hd.spatial.sort_datasets(list(datasets))
    spacing = [float(v) for v in sorted_datasets[0].PixelSpacing]
    slices: list[SliceResult] = []
    rng = np.random.default_rng(7)
    for index, tau, q in lesion_slices:
        ds = sorted_datasets[index]
        mask = _lesion_mask((int(ds.Rows), int(ds.Columns)), index)
        uncertainty_map = rng.uniform(0.0, 0.4, mask.shape).astype(np.float32) if with_uncertainty else None
        metrics = {"um_mean": float(uncertainty_map[mask].mean()), "um_p90": float(np.percentile(uncertainty_map[mask], 90)),
                   "um_frac_gt_0p1": float(np.mean(uncertainty_map[mask] > 0.1))} if with_uncertainty else None
        slices.append(SliceResult(
            source_image=ds, slice_index=index, ai_mask=mask, tau=tau, q=q, margin=MARGIN,
            verdict=slice_verdict(tau, q, MARGIN), lesion_area_mm2=float(mask.sum() * spacing[0] * spacing[1]),
            uncertainty=metrics, uncertainty_map=uncertainty_map,
        ))
    verdicts = [item.verdict for item in slices]
    series = Verdict.REJECT if Verdict.REJECT in verdicts else Verdict.REVIEW if Verdict.REVIEW in verdicts else Verdict.ACCEPT
    notes = [] if n_members > 1 else ["one member: no uncertainty map, without-UM model"]
    result = CaseResult(
        ct_datasets=sorted_datasets, slices=slices, series_verdict=series,
        series_policy="reject if any slice is rejected, review if any is for review, else accept",
        model_name=model_name, model_version=model_version,
        q_source="ensemble-agreement" if n_members > 1 else "none", n_members=n_members,
        uses_uncertainty=with_uncertainty, notes=notes,
    )
    return WriterCase(
        result=result,
        expected_verdicts={str(s.source_image.SOPInstanceUID): s.verdict for s in slices},
        expected_masks={str(s.source_image.SOPInstanceUID): s.ai_mask for s in slices},
    )


@pytest.fixture(scope="session")
def synthetic_ct(tmp_path_factory: pytest.TempPathFactory) -> list[Dataset]:
    """A SYNTHETIC 9-slice CT series (qcgate phantom export), with pixel data."""
    out_dir = tmp_path_factory.mktemp("synthetic-ct")
    volume = synthetic_ct_volume(9, 64, seed=5)
    return write_ct_series(volume, (0.8, 0.8), 2.0, out_dir, patient_id="SYNTH-WRITERS", deterministic_key="writers")


@pytest.fixture(scope="session")
def real_liver_ct() -> list[Dataset]:
    """The real (anonymised) dcmqi liver CT, three slices, as read from disk."""
    files = sorted((DCMQI_LIVER / "ct-3slice").glob("*.dcm"))
    assert len(files) == 3, f"expected the 3-slice dcmqi liver CT in {DCMQI_LIVER}"
    return [pydicom.dcmread(path) for path in files]


@pytest.fixture
def synthetic_case(synthetic_ct: list[Dataset]) -> WriterCase:
    return build_case(synthetic_ct, SYNTHETIC_LESION_SLICES)


@pytest.fixture
def real_case(real_liver_ct: list[Dataset]) -> WriterCase:
    # one member, no reference: q unknown on every slice, like the worker's dcmqi liver case
    return build_case(real_liver_ct, [(0, 0.7, None), (2, 0.6, None)], n_members=1, with_uncertainty=False,
                      model_name="lidc-geometry", model_version="0.3.1")


@pytest.fixture
def no_lesion_case(synthetic_ct: list[Dataset]) -> WriterCase:
    return build_case(synthetic_ct, [])


@pytest.fixture
def q_unknown_case(synthetic_ct: list[Dataset]) -> WriterCase:
    return build_case(synthetic_ct, [(1, 0.8, None), (4, 0.5, None)], n_members=1, with_uncertainty=False)


def verdict_by_label() -> dict[str, Verdict]:
    from qcgate.writers.seg import VERDICT_SEGMENT_STYLES

    return {style.label: verdict for verdict, style in VERDICT_SEGMENT_STYLES.items()}


def output_dir(tmp_path: Path) -> Path:
    path = tmp_path / "out"
    path.mkdir()
    return path
