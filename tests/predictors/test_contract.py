"""The run-time contract the pipeline codes against (qcgate.predictors.__init__)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qcgate.errors import InputError
from qcgate.predictors import SliceInput, ThresholdModel, load_model, load_named_model, models_dir
from qcgate.predictors.dataset import slice_input
from qcgate.predictors.resnet import ResNetConfig, build_network, weighted_layer_count


def _inputs(cohort, limit: int = 6) -> list[SliceInput]:
    items = [slice_input(case, k, "ai") for case in cohort.cases for k in range(case.n_slices)]
    return items[:limit]


def test_predict_shape_range_and_description(tiny_model_dir: Path, tiny_cohort) -> None:
    model = load_model(tiny_model_dir)
    assert isinstance(model, ThresholdModel)
    assert model.kind == "ensemble" and model.has_uncertainty_variant
    assert 0 < model.validation_mae < 1 and 0 < model.training_mean_dsc <= 1
    slices = _inputs(tiny_cohort)
    with_um = model.predict(slices, use_uncertainty=True)
    without_um = model.predict(slices, use_uncertainty=False)
    assert with_um.shape == without_um.shape == (len(slices),)
    assert np.all((with_um >= 0) & (with_um <= 1)) and np.all((without_um >= 0) & (without_um <= 1))
    assert not np.allclose(with_um, without_um)  # the UM sub-models really answer
    assert model.describe(use_uncertainty=True) == "ensemble(ridge+resnet, with UM)"
    assert model.describe(use_uncertainty=False) == "ensemble(ridge+resnet, without UM)"


def test_uncertainty_fallback_per_slice(tiny_model_dir: Path, tiny_cohort) -> None:
    model = load_model(tiny_model_dir)
    slices = _inputs(tiny_cohort)
    without_um = model.predict(slices, use_uncertainty=False)
    # A slice without a UM (a single-member AI) falls back to the without-UM sub-models.
    slices[1].uncertainty_map = None
    mixed = model.predict(slices, use_uncertainty=True)
    assert mixed[1] == pytest.approx(without_um[1])
    assert mixed[0] != pytest.approx(without_um[0])


def test_empty_ai_mask_gets_the_training_mean(tiny_model_dir: Path) -> None:
    model = load_model(tiny_model_dir)
    empty = SliceInput(np.full((40, 40), -850.0), np.zeros((40, 40)), np.zeros((40, 40)), (0.8, 0.8))
    assert model.predict([empty], use_uncertainty=True)[0] == pytest.approx(model.training_mean_dsc)
    assert model.key_features([empty]) == [{}]


def test_key_features_are_the_ridge_inputs(tiny_model_dir: Path, tiny_cohort) -> None:
    model = load_model(tiny_model_dir)
    slices = _inputs(tiny_cohort, 3)
    explained = model.key_features(slices, top=4)
    assert len(explained) == 3
    for features in explained:
        assert len(features) == 4
        assert set(features) <= set(model.ridge_uncertainty.feature_names)
        assert all(np.isfinite(v) for v in features.values())


def test_bad_slice_input_is_an_input_error(tiny_model_dir: Path) -> None:
    model = load_model(tiny_model_dir)
    bad = SliceInput(np.zeros((10, 10)), np.ones((12, 12)), None, (1.0, 1.0))
    with pytest.raises(InputError, match="image_hu shape"):
        model.predict([bad], use_uncertainty=False)
    no_image = SliceInput(None, np.ones((12, 12)), None, (1.0, 1.0))
    with pytest.raises(InputError, match="needs the CT image"):
        model.predict([no_image], use_uncertainty=False)


def test_models_dir_and_named_models(monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path) -> None:
    monkeypatch.setenv("QCGATE_MODELS_DIR", str(tiny_model_dir.parent))
    assert models_dir() == tiny_model_dir.parent
    assert load_named_model(tiny_model_dir.name).name == tiny_model_dir.name
    with pytest.raises(InputError, match="plain directory name"):
        load_named_model("../etc")
    monkeypatch.delenv("QCGATE_MODELS_DIR")
    assert models_dir() == Path(__file__).resolve().parents[2] / "models"


def test_shipped_lidc_geometry_model_loads_and_predicts() -> None:
    model = load_named_model("lidc-geometry")
    assert model.kind == "ridge" and not model.has_uncertainty_variant and not model.synthetic
    mask_small = np.zeros((512, 512))
    mask_small[250:253, 250:253] = 1
    mask_large = np.zeros((512, 512))
    rows, cols = np.indices((512, 512))
    mask_large[(rows - 256) ** 2 + (cols - 256) ** 2 <= 20 ** 2] = 1
    tau = model.predict([SliceInput(None, mask_small, None, (0.7, 0.7)), SliceInput(None, mask_large, None, (0.7, 0.7))],
                        use_uncertainty=True)
    # Experts agree more on a large round nodule than on a 2 mm speck (LIDC; DESIGN §3).
    assert tau[1] > tau[0]
    assert model.describe(use_uncertainty=True) == "ridge(without UM)"


def test_resnet_has_62_layers_and_a_sigmoid_output() -> None:
    import torch

    network = build_network(3, ResNetConfig())
    assert weighted_layer_count(network) == 62
    network.eval()
    with torch.inference_mode():
        out = network(torch.randn(4, 3, 64, 64) * 50)
    assert out.shape == (4,) and torch.all((out >= 0) & (out <= 1))


def _count_extractions(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    import qcgate.features

    calls: list[int] = []
    original = qcgate.features.extract_slice_features

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(qcgate.features, "extract_slice_features", counting)
    return calls


@pytest.mark.parametrize("use_uncertainty", [True, False])
def test_assess_extracts_features_once_per_slice_and_matches_predict(
        tiny_model_dir: Path, tiny_cohort, monkeypatch: pytest.MonkeyPatch, use_uncertainty: bool) -> None:
    from qcgate.predictors import SliceAssessment, ThresholdPredictor

    model = load_model(tiny_model_dir)
    assert isinstance(model, ThresholdPredictor)
    slices = _inputs(tiny_cohort, 4)
    slices[1].uncertainty_map = None  # a mixed batch: both Ridge variants answer
    expected_tau = model.predict(slices, use_uncertainty=use_uncertainty)
    calls = _count_extractions(monkeypatch)
    assessed = model.assess(slices, use_uncertainty=use_uncertainty, top=4)
    lesion = sum(bool(s.ai_mask.any()) for s in slices)
    assert len(calls) == lesion  # once per lesion slice (predict + key_features took two)
    assert all(isinstance(a, SliceAssessment) for a in assessed)
    assert np.allclose([a.tau for a in assessed], expected_tau)
    if use_uncertainty:  # the worker's setting: the Ridge that answers is the one key_features explains
        assert [a.key_features for a in assessed] == model.key_features(slices, top=4)
    assert model.validation_mae_for(use_uncertainty) == (
        model.validation_mae if use_uncertainty else model.validation_mae_without_uncertainty)
