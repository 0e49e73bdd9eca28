"""`qcgate analyze`: statistics with known answers, and the real LIDC geometry row."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from qcgate.cli import main
from qcgate.science.analysis import analyze_table
from qcgate.science.feature_table import FeatureTable
from qcgate.science.ridge_cv import grouped_folds
from qcgate.science.statistics import pearson_r, summarise_errors

LIDC_DIR = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "lidc"


def read_table2(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as handle:
        return {row["group"]: row for row in csv.DictReader(handle)}


def test_pearson_r_known_answers() -> None:
    x = np.arange(10.0)
    assert pearson_r(x, 3 * x + 1) == pytest.approx(1.0)
    assert pearson_r(x, -x) == pytest.approx(-1.0)
    assert pearson_r(np.array([1.0, 2, 3, 4]), np.array([1.0, 3, 2, 4])) == pytest.approx(0.8)
    assert pearson_r(np.ones(5), x[:5]) is None  # constant feature: undefined, not NaN


def test_error_summary_definitions() -> None:
    truth = np.array([0.5, 0.7, 0.9, 0.6])
    predicted = np.array([0.6, 0.6, 0.9, 0.9])
    patients = np.array(["a", "a", "b", "b"])
    summary = summarise_errors(predicted, truth, patients)
    assert summary.mae_slice == pytest.approx((0.1 + 0.1 + 0.0 + 0.3) / 4)
    assert summary.sd_slice == pytest.approx(np.std([0.1, 0.15]))  # per-patient slice MAE: 0.1, 0.15
    # patient means: a: 0.6 vs 0.6 -> 0; b: 0.9 vs 0.75 -> 0.15
    assert summary.mae_patient == pytest.approx(0.075)
    assert summary.sd_patient == pytest.approx(0.075)


def test_folds_never_split_a_patient() -> None:
    patients = np.repeat([f"p{i}" for i in range(12)], 3)
    for n_folds in (None, 4):
        folds = grouped_folds(patients, n_folds)
        assert len(folds) == (12 if n_folds is None else 4)
        seen = np.concatenate([test for _, test in folds])
        assert sorted(seen) == list(range(len(patients)))
        for train, test in folds:
            assert not set(patients[train]) & set(patients[test])


def test_informative_group_beats_global_mean_and_noise_does_not() -> None:
    rng = np.random.default_rng(0)
    n_patients, per_patient = 30, 6
    patients = np.repeat([f"p{i}" for i in range(n_patients)], per_patient)
    signal = rng.normal(0, 1, len(patients))
    target = np.clip(0.7 + 0.1 * signal + rng.normal(0, 0.03, len(patients)), 0, 1)
    informative = np.column_stack([signal + rng.normal(0, 0.2, len(patients)), rng.normal(0, 1, len(patients))])
    noise = rng.normal(0, 1, (len(patients), 5))
    table = FeatureTable(
        patient_ids=list(patients), case_ids=list(patients), slice_indices=list(range(len(patients))),
        dsc_lesion=target, feature_names=["geometry.a", "geometry.b", *(f"imaging.n{i}" for i in range(5))],
        values=np.column_stack([informative, noise]), groups={"geometry": [0, 1], "imaging": list(range(2, 7))},
    )
    result = analyze_table(table, n_folds=5, workers=1, progress=False)
    rows = {row.group: row for row in result.rows}
    assert [row.group for row in result.rows] == ["imaging", "geometry"]  # Table 2 order
    geometry, imaging = rows["geometry"], rows["imaging"]
    assert geometry.top_feature == "geometry.a" and geometry.top_r > 0.9
    assert geometry.model.mae_slice < 0.5 * geometry.baseline.mae_slice
    assert imaging.model.mae_slice > 0.9 * imaging.baseline.mae_slice
    assert abs(imaging.top_r) < 0.3


@pytest.mark.slow
def test_analyze_lidc_prints_geometry_row_and_beats_global_mean(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Real multi-reader data (a patient subset for speed): the geometry Ridge beats the global mean."""
    out = tmp_path / "lidc"
    code = main(["analyze", str(LIDC_DIR), "--out", str(out), "--max-patients", "200", "--workers", "2", "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "geometry" in printed and "200 patients" in printed
    table = read_table2(out / "table2.csv")
    assert set(table) == {"geometry"}
    geometry = table["geometry"]
    assert float(geometry["mae_slice"]) < float(geometry["baseline_mae_slice"]) - 0.02
    assert abs(float(geometry["max_r"])) > 0.35
    for name in ("features.csv", "correlations.csv", "predictions.csv", "dsc_lesion_density.png",
                 "correlations.png", "report.md"):
        assert (out / name).stat().st_size > 0
    report = (out / "report.md").read_text()
    assert "| geometry |" in report and "SYNTHETIC" not in report


def test_individual_reader_scores_follow_the_reference() -> None:
    from qcgate.cohort import Case, Cohort
    from qcgate.science.statistics import individual_reader_scores

    masks = {r: np.zeros((2, 6, 6), bool) for r in ("R1A", "R1B", "R2")}
    masks["R1A"][0, :2, :2] = True
    masks["R1B"][0, :2, :2] = True
    masks["R2"][0, :2, :1] = True
    masks["R2"][1, 4:, 4:] = True  # the reference drew nothing here: R2 scores 0, R1B is left out
    case = Case("C", "P", (1.0, 1.0), masks, reference_reader="R1A", repeat_reader="R1B")
    table = FeatureTable(["P", "P"], ["C", "C"], [0, 1], np.array([0.8, 0.0]), [], np.zeros((2, 0)))
    scores = individual_reader_scores(Cohort("x", [case]), table)
    assert scores["R1B"].tolist() == [1.0]
    assert scores["R2"] == pytest.approx([2 * 2 / 6, 0.0])


def test_every_group_on_a_small_phantom_with_the_ai_mask(tmp_path: Path) -> None:
    """Image groups and UM metrics come out finite and named per group; the AI mask drives features."""
    from qcgate.phantom.generator import PhantomConfig, generate_cohort
    from qcgate.science.feature_table import extract_feature_table

    cohort = generate_cohort(PhantomConfig(patients=3, seed=4, slices_min=2, slices_max=2), workers=1)
    reference = extract_feature_table(cohort, workers=1, progress=False)
    ai = extract_feature_table(cohort, workers=2, progress=False, feature_mask="ai")
    assert list(reference.groups) == ["imaging", "texture", "border", "geometry", "uncertainty"]
    for table in (reference, ai):
        assert np.all(np.isfinite(table.values))
        for group, columns in table.groups.items():
            assert all(table.feature_names[c].startswith(group + ".") for c in columns)
    # same targets, different feature mask -> different geometry (slices the AI missed drop out)
    ai_rows = {(c, k): i for i, (c, k) in enumerate(zip(ai.case_ids, ai.slice_indices))}
    pairs = [(i, ai_rows[key]) for i, key in enumerate(zip(reference.case_ids, reference.slice_indices)) if key in ai_rows]
    assert len(pairs) >= len(reference) // 2
    ref_rows, ai_matched = np.array(pairs).T
    np.testing.assert_array_equal(reference.dsc_lesion[ref_rows], ai.dsc_lesion[ai_matched])
    area = reference.feature_names.index("geometry.area_mm2")
    assert not np.allclose(reference.values[ref_rows, area], ai.values[ai_matched, area])


def test_groups_are_those_every_case_provides(caplog: pytest.LogCaptureFixture) -> None:
    from qcgate.phantom.generator import PhantomConfig, generate_cohort
    from qcgate.science.feature_table import extract_feature_table

    cohort = generate_cohort(PhantomConfig(patients=2, seed=9, slices_min=1, slices_max=1), workers=1)
    cohort.cases[1].image_hu = None  # this case has masks only
    table = extract_feature_table(cohort, workers=1, progress=False)
    assert list(table.groups) == ["geometry", "uncertainty"]
    assert "lack CT pixels" in caplog.text
