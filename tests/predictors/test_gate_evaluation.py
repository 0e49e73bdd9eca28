"""`qcgate evaluate-gate` and `qcgate train-gate` on a small SYNTHETIC phantom cohort."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qcgate.cli import main
from qcgate.cohort.store import write_cohort

ROW_KEYS = {"method": str, "q_source": str, "bad_caught_pct": float, "good_accepted_pct": (float, type(None)),
            "review_pct": float, "q_mae": (float, type(None)), "n_slices": int, "n_bad": int, "n_good": int}


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from qcgate.phantom.generator import PhantomConfig, generate_cohort

    directory = tmp_path_factory.mktemp("phantom") / "small"
    cohort = generate_cohort(PhantomConfig(patients=10, seed=5, slices_min=3, slices_max=4, image_size=128), workers=1)
    write_cohort(cohort, directory, description="SYNTHETIC small phantom for gate tests")
    return directory


def _rows(payload: dict) -> dict[str, dict]:
    return {row["method"]: row for row in payload["rows"]}


def test_evaluate_gate_json_keys_and_the_baselines_are_worse(phantom_dir: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "gate"
    assert main(["evaluate-gate", str(phantom_dir), "--ai", "members", "--folds", "3", "--format", "json",
                 "--out", str(out), "--quiet"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["synthetic"] is True and payload["ai"] == "members"
    rows = _rows(payload)
    for row in rows.values():
        for key, kind in ROW_KEYS.items():
            assert isinstance(row[key], kind), (row["method"], key, row[key])
        assert row["bad_caught_pct_ci"][0] <= row["bad_caught_pct"] <= row["bad_caught_pct_ci"][1]
        assert row["n_bad"] + row["n_good"] == row["n_slices"]
    baselines = [rows["global threshold + raw ensemble agreement"], rows["τ + raw ensemble agreement"]]
    new = [row for row in rows.values() if row["q_source"] not in ("ensemble-agreement",)]
    assert {row["q_source"] for row in new} >= {"probability", "learned", "learned-mask", "learned-margin"}
    for row in rows.values():  # the AUC of the score the band cuts is reported beside every row
        assert row["auc"] is None or 0.0 <= row["auc"] <= 1.0
    for baseline in baselines:
        for row in new:
            # the raw agreement lets far more bad slices through and estimates the real Dice worse
            assert baseline["bad_missed_pct"] > row["bad_missed_pct"], (baseline["method"], row["method"])
            assert baseline["q_mae"] > row["q_mae"]
    assert {p.name for p in out.iterdir()} == {"gate.json", "gate.md", "gate_slices.csv", "gate_tradeoff.png"}
    assert "SYNTHETIC" in (out / "gate.md").read_text()


def test_train_gate_stores_hashed_q_estimators_that_evaluate_gate_scores(phantom_dir: Path, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from qcgate.predictors import load_model

    model_dir = tmp_path / "tiny"
    assert main(["train", str(phantom_dir), "--model", "ridge", "--out", str(model_dir), "--folds", "2",
                 "--repeats", "1", "--quiet"]) == 0
    # the model has a UM variant: its run-time tau is not the plain Ridge, so the band needs the model's own
    # tau, which on its training cohort is in-sample: refused with the reason
    assert main(["train-gate", str(phantom_dir), "--model", str(model_dir), "--ai", "members", "--quiet"]) == 2
    assert "in-sample" in capsys.readouterr().err
    assert main(["train-gate", str(phantom_dir), "--model", str(model_dir), "--ai", "members", "--tau", "cross-fitted",
                 "--quiet"]) == 0
    manifest = json.loads((model_dir / "manifest.json").read_text())
    assert "quality.json" in manifest["files"] and manifest["quality"]["default"] in manifest["quality"]["estimators"]
    model = load_model(model_dir)
    assert model.q_estimators is not None and model.q_estimators.temperature > 0
    capsys.readouterr()
    assert main(["evaluate-gate", str(phantom_dir), "--model", str(model_dir), "--ai", "members", "--format",
                 "json", "--quiet"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert "no refitting" in payload["setting"] and len(payload["rows"]) >= 4
    margin = model.q_estimators.estimators["learned-margin"]
    assert margin.margin is not None and margin.uses_tau and "learned-margin" in {r["q_source"] for r in payload["rows"]}
    assert json.loads((model_dir / "quality.json").read_text())["format_version"] == 2
    assert manifest["quality"]["training"]["tau_source"] == "cross-fitted"
    (model_dir / "quality.json").write_text((model_dir / "quality.json").read_text().replace("0.", "1.", 1))
    from qcgate.errors import InputError

    with pytest.raises(InputError, match="quality.json does not match its sha256"):
        load_model(model_dir)


def test_train_gate_fits_the_band_on_the_models_own_tau_on_a_held_out_cohort(phantom_dir: Path, tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from qcgate.phantom.generator import PhantomConfig, generate_cohort
    from qcgate.predictors import load_model

    model_dir = tmp_path / "tiny"
    assert main(["train", str(phantom_dir), "--model", "ridge", "--out", str(model_dir), "--folds", "2",
                 "--repeats", "1", "--quiet"]) == 0
    held_out = tmp_path / "held-out"
    write_cohort(generate_cohort(PhantomConfig(patients=10, seed=6, slices_min=3, slices_max=4, image_size=128),
                                 workers=1), held_out, description="SYNTHETIC held-out phantom for gate tests")
    assert main(["train-gate", str(held_out), "--model", str(model_dir), "--ai", "members", "--quiet"]) == 0
    training = json.loads((model_dir / "manifest.json").read_text())["quality"]["training"]
    assert training["tau_source"] == "model" and "with UM" in training["tau_for_band"]
    model = load_model(model_dir)
    band = model.q_estimators.estimators["learned-margin"].band
    assert band.n_bad + band.n_good == training["n_samples"]
