"""`qcgate train` and `qcgate evaluate` from the command line (tiny SYNTHETIC cohort)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qcgate.cli import main
from qcgate.cohort.store import write_cohort

from tests.predictors.conftest import make_tiny_cohort


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("cohort") / "tiny"
    write_cohort(make_tiny_cohort(patients=6, slices=2, seed=9, with_image=False), directory,
                 description="SYNTHETIC tiny cohort for CLI tests")
    return directory


def test_train_then_evaluate_json(cohort_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "models" / "tiny-ridge"
    assert main(["train", str(cohort_dir), "--model", "ridge", "--out", str(out), "--folds", "3",
                 "--repeats", "2", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "Global thresholding" in printed and "Ridge w. UM" in printed and "SYNTHETIC" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["synthetic"] is True and manifest["kind"] == "ridge"
    assert "qcgate train" in manifest["training"]["command"]
    assert "SYNTHETIC" in (out / "MODEL_CARD.md").read_text()

    report = tmp_path / "report"
    assert main(["evaluate", str(cohort_dir), "--model", str(out), "--format", "json", "--repeats", "2",
                 "--out", str(report)]) == 0
    payload = json.loads(capsys.readouterr().out)
    methods = [row["method"] for row in payload["rows"]]
    assert methods == ["Global thresholding", "Global thresholding (median)", "Ridge w/o UM", "Ridge w. UM"]
    assert payload["rows"][0]["mae"] > 0 and payload["synthetic"] is True
    assert all(0 <= row["good_included_pct"] <= 100 for row in payload["rows"])
    for name in ("table3.csv", "table3.md", "table3.html", "predicted_vs_true.png", "error_distributions.png"):
        assert (report / name).stat().st_size > 0


def test_cross_validated_evaluate_text(cohort_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # --kind auto on a cohort without CT: the Ridge rows only (no mask ResNet)
    assert main(["evaluate", str(cohort_dir), "--folds", "2", "--repeats", "2", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "cross-validation, 2 folds" in printed and "| Ridge w/o UM |" in printed and "| Ridge w. UM |" in printed
    assert "ResNet" not in printed


def test_broken_model_dir_is_one_line_and_exit_2(cohort_dir: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", str(cohort_dir), "--model", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "qcgate evaluate: error:" in error and "no manifest.json" in error and "Traceback" not in error


def test_train_refuses_a_non_empty_output(cohort_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "x").write_text("keep me")
    assert main(["train", str(cohort_dir), "--model", "ridge", "--out", str(tmp_path), "--quiet"]) == 2
    assert "not empty" in capsys.readouterr().err
