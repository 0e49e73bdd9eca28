"""Threshold predictors: the image-specific QC threshold tau = the predicted DSC Lesion of a slice.

Run-time contract (what the pipeline codes against)::

    model = load_named_model("lidc-geometry")          # or load_model(Path("models/phantom-full"))
    tau = model.predict(slices, use_uncertainty=True)   # one value in [0, 1] per SliceInput
    model.describe(use_uncertainty=True)                # which sub-model answered
    model.key_features(slices)                          # the audit's "why"
    model.assess(slices, use_uncertainty=True)          # both at once: one feature extraction per slice
    model.validation_mae_for(use_uncertainty=True)      # the default margin of the answering sub-model

The pipeline is typed against :class:`ThresholdPredictor` (a ``typing.Protocol``), which
:class:`ThresholdModel` implements.

Features at run time are ``qcgate.features.extract_slice_features`` of the AI mask
(``ai_probability >= 0.5``), the paper's deployment setting. A slice whose AI mask is empty gets the
model's training mean (the global threshold): there is no lesion to describe.

Modules: ``ridge`` (JSON Ridge), ``resnet`` (Mish bottleneck ResNet, safetensors), ``ensemble``
(which sub-model answers), ``artifacts`` (the model directory: manifest, hashes, loading),
``dataset`` (training rows from a cohort), ``evaluation`` (Table 3 and the simulated clinical
setting), ``commands`` (``qcgate train`` / ``qcgate evaluate``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

import qcgate
from qcgate.errors import InputError

__all__ = ["SliceAssessment", "SliceInput", "ThresholdModel", "ThresholdPredictor", "load_model", "load_named_model",
           "models_dir"]


@dataclass
class SliceInput:
    """One lesion slice as the gate sees it."""

    image_hu: np.ndarray | None  # 2-D HU slice (None for mask-only models)
    ai_probability: np.ndarray  # 2-D ensemble-mean probability; AI mask = ai_probability >= 0.5
    uncertainty_map: np.ndarray | None  # 2-D pixel-wise std across members; None with one member
    pixel_spacing: tuple[float, float]  # (row, col) mm
    lung_mask: np.ndarray | None = None

    def validate(self, position: int = 0) -> None:
        """InputError naming the slice's position when shapes or values are inconsistent."""
        probability = np.asarray(self.ai_probability)
        where = f"slice {position}"
        if probability.ndim != 2:
            raise InputError(f"{where}: ai_probability must be 2-D, got shape {probability.shape}")
        for label, array in (("image_hu", self.image_hu), ("uncertainty_map", self.uncertainty_map),
                             ("lung_mask", self.lung_mask)):
            if array is not None and np.shape(array) != probability.shape:
                raise InputError(f"{where}: {label} shape {np.shape(array)} differs from ai_probability {probability.shape}")
        if not np.all(np.isfinite(probability)):
            raise InputError(f"{where}: ai_probability holds NaN or infinite values")
        spacing = tuple(float(s) for s in self.pixel_spacing)
        if len(spacing) != 2 or min(spacing) <= 0:
            raise InputError(f"{where}: pixel spacing must be two positive numbers, got {self.pixel_spacing}")

    @property
    def ai_mask(self) -> np.ndarray:
        return np.asarray(self.ai_probability) >= 0.5


@dataclass(frozen=True)
class SliceAssessment:
    """What the model says about one slice: tau and the key features behind it (the audit's "why")."""

    tau: float  # in [0, 1]; the training mean where the AI mask is empty
    key_features: dict[str, float]  # {} for a ResNet-only model or an empty AI mask
    features: dict[str, float] = field(default_factory=dict)  # every value extracted for tau (shared with q)


@runtime_checkable
class ThresholdPredictor(Protocol):
    """What the QC worker needs from a threshold model."""

    name: str
    version: str

    @property
    def has_uncertainty_variant(self) -> bool:
        """Whether some sub-model uses the uncertainty map."""
        ...

    def validation_mae_for(self, use_uncertainty: bool) -> float:
        """Validation MAE of the sub-models that answer with/without the uncertainty map."""
        ...

    def assess(self, slices: Sequence[SliceInput], *, use_uncertainty: bool, top: int = 5) -> list[SliceAssessment]:
        """tau and key features per slice, extracting each slice's features once."""
        ...

    def predict(self, slices: Sequence[SliceInput], *, use_uncertainty: bool) -> np.ndarray:
        """tau per slice."""
        ...

    def key_features(self, slices: Sequence[SliceInput], *, top: int = 5) -> list[dict[str, float]]:
        """The top Ridge inputs per slice."""
        ...


class ThresholdModel:
    """A loaded model directory (see ``qcgate.predictors.artifacts``): Ridge and/or ResNet sub-models
    without and with the uncertainty map, combined by ``kind`` ("ridge", "resnet" or "ensemble")."""

    def __init__(self, *, name: str, version: str, kind: str, validation_mae: float,
                 validation_mae_without_uncertainty: float, training_mean_dsc: float,
                 feature_groups: Sequence[str], uses_image: bool, position_map=None,
                 ridge=None, ridge_uncertainty=None, resnet=None, resnet_uncertainty=None,
                 synthetic: bool = False, directory: Path | None = None, manifest: dict | None = None) -> None:
        self.name, self.version, self.kind = name, version, kind
        self.validation_mae = float(validation_mae)
        self.validation_mae_without_uncertainty = float(validation_mae_without_uncertainty)
        self.training_mean_dsc = float(training_mean_dsc)
        self.feature_groups = tuple(g for g in feature_groups if g != "uncertainty")
        self.uses_image = uses_image
        self.position_map = position_map
        self.ridge, self.ridge_uncertainty = ridge, ridge_uncertainty
        self.resnet, self.resnet_uncertainty = resnet, resnet_uncertainty
        self.synthetic = synthetic
        self.directory = directory
        self.manifest = manifest or {}
        from qcgate.predictors.ensemble import check_components

        check_components(self)

    @property
    def has_uncertainty_variant(self) -> bool:
        from qcgate.predictors.ensemble import components_for

        return components_for(self, use_uncertainty=True) != components_for(self, use_uncertainty=False)

    def validation_mae_for(self, use_uncertainty: bool) -> float:
        """The validation MAE of the with-UM sub-models when they answer, else of the without-UM ones."""
        return self.validation_mae if use_uncertainty else self.validation_mae_without_uncertainty

    def describe(self, *, use_uncertainty: bool) -> str:
        """Which sub-model answers, e.g. "ensemble(ridge+resnet, with UM)"."""
        from qcgate.predictors.ensemble import describe

        return describe(self, use_uncertainty=use_uncertainty)

    def predict(self, slices: Sequence[SliceInput], *, use_uncertainty: bool) -> np.ndarray:
        """tau in [0, 1], one per slice. Without-UM sub-models answer when ``use_uncertainty`` is False,
        when the model has no UM variant, or for a slice whose ``uncertainty_map`` is None."""
        from qcgate.predictors.ensemble import predict

        return predict(self, list(slices), use_uncertainty=use_uncertainty)

    def assess(self, slices: Sequence[SliceInput], *, use_uncertainty: bool, top: int = 5) -> list[SliceAssessment]:
        """``predict`` and the key features in one pass: each slice's features are extracted once and
        feed both the answering Ridge and its explanation (``top`` values by |w_j · z_j|)."""
        from qcgate.predictors.ensemble import assess

        taus, explained, extracted = assess(self, list(slices), use_uncertainty=use_uncertainty, top=top)
        return [SliceAssessment(tau=float(t), key_features=k, features=f) for t, k, f in zip(taus, explained, extracted)]

    def key_features(self, slices: Sequence[SliceInput], *, top: int = 5) -> list[dict[str, float]]:
        """Per slice, the ``top`` feature values with the largest |w_j · z_j| in the Ridge (the UM
        Ridge where the slice has a UM and the model one); empty dicts for a ResNet-only model."""
        from qcgate.predictors.ensemble import key_features

        return key_features(self, list(slices), top=top)

    def __repr__(self) -> str:
        return f"ThresholdModel({self.name!r}, version={self.version!r}, kind={self.kind!r})"


def models_dir() -> Path:
    """$QCGATE_MODELS_DIR, else <repository root>/models."""
    configured = os.environ.get("QCGATE_MODELS_DIR")
    if configured:
        return Path(configured)
    return Path(qcgate.__file__).resolve().parents[1] / "models"


def load_model(directory: Path) -> ThresholdModel:
    """Load and verify a model directory (hashes, feature list, weights); InputError if anything is off."""
    from qcgate.predictors.artifacts import load_model_directory

    return load_model_directory(Path(directory))


def load_named_model(name: str) -> ThresholdModel:
    """``load_model(models_dir() / name)``; a name must be a plain directory name."""
    if not name or Path(name).name != name or name in (".", ".."):
        raise InputError(f"model name {name!r} must be a plain directory name under {models_dir()}")
    return load_model(models_dir() / name)
