"""The model directory: what ``qcgate train`` writes and what the gate loads.

```
models/NAME/
  manifest.json            name, version, kind, feature groups and names in order, training data,
                           CV metrics (Table 3), and the sha256 of every other file
  ridge.json               Ridge without UM (qcgate.predictors.ridge; JSON)
  ridge_uncertainty.json   Ridge with UM metrics (when trained)
  resnet.safetensors       ResNet without UM (weights only; architecture in the manifest)
  resnet_uncertainty.safetensors
  position_map.json        the positional-orthodoxy lesion frequency map of the training data
  MODEL_CARD.md            intended use, training data, metrics, limits
  table3.csv               the cross-validated figures of the training cohort
  quality.json             q estimators, temperature and decision bands (qcgate train-gate; optional:
                           older models have none and the gate gives review with that reason)
```

Loading verifies every listed file's sha256, that every file a component needs is listed, and that
the feature names a Ridge was trained on are exactly what this version of ``qcgate.features``
computes, in the same order. Any failure is an ``InputError`` naming the directory, the file and the
problem. Nothing is unpickled: JSON and safetensors only.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from qcgate.config import Settings
from qcgate.errors import ConfigError, InputError

MANIFEST = "manifest.json"
FORMAT_NAME = "qcgate-threshold-model"
FORMAT_VERSION = 1
COMPONENTS = ("ridge", "ridge_uncertainty", "resnet", "resnet_uncertainty")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path, manifest: dict) -> None:
    """Hash every file in ``directory`` except the manifest itself and write manifest.json."""
    directory = Path(directory)
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name != MANIFEST)
    manifest = dict(manifest)
    manifest["files"] = {p.name: sha256_file(p) for p in files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=False) + "\n")


def expected_feature_names(component: str, feature_groups, uses_image: bool) -> tuple[str, ...]:
    """What qcgate.features computes today for the component's groups (UM group for *_uncertainty)."""
    from qcgate.features import feature_names

    groups = [g for g in feature_groups if g != "uncertainty"]
    if component.endswith("_uncertainty"):
        groups.append("uncertainty")
    return feature_names(groups, with_image=uses_image)


def _feature_mismatch(where: str, trained: tuple[str, ...], current: tuple[str, ...]) -> str:
    first = next((i for i, (a, b) in enumerate(zip(trained, current)) if a != b), min(len(trained), len(current)))
    trained_at = trained[first] if first < len(trained) else "(end)"
    current_at = current[first] if first < len(current) else "(end)"
    return (f"{where}: the model was trained on {len(trained)} features but this version of qcgate computes "
            f"{len(current)} for the same groups; first difference at position {first}: model {trained_at!r}, "
            f"code {current_at!r}. Retrain the model with this version (qcgate train).")


def resolve_model_directory(name_or_path: str) -> Path:
    """The directory of the configured model: an existing directory as given, else a plain name
    under ``models_dir()``; InputError for a name that is not a plain directory name."""
    from qcgate.predictors import models_dir

    path = Path(name_or_path)
    if path.is_dir():
        return path
    if not name_or_path or path.name != name_or_path or name_or_path in (".", ".."):
        raise InputError(f"model name {name_or_path!r} must be a directory or a plain directory name under {models_dir()}")
    return models_dir() / name_or_path


def verify_configured_model(settings: Settings) -> str:
    """Verify ``pipeline.model`` without loading weights (manifest and file hashes); returns
    "name version". ConfigError naming the key when the model is missing or does not verify."""
    try:
        manifest = verify_model_directory(resolve_model_directory(settings.pipeline.model))
    except InputError as exc:
        raise ConfigError(f"pipeline.model = {settings.pipeline.model!r}: {exc}") from None
    return f"{manifest.get('name', '?')} {manifest.get('version', '?')}"


def verify_model_directory(directory: Path) -> dict:
    """Check a model directory without loading its weights: the manifest parses, every listed file
    is present with its sha256. Returns the manifest; InputError naming the first problem."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"{directory}: no such model directory")
    manifest_path = directory / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise InputError(f"{directory}: not a model directory (no {MANIFEST})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{manifest_path}: not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise InputError(f"{manifest_path}: not a {FORMAT_NAME} manifest")
    if int(manifest.get("format_version", 0)) > FORMAT_VERSION:
        raise InputError(f"{manifest_path}: format version {manifest.get('format_version')} is newer than this "
                         f"qcgate reads ({FORMAT_VERSION})")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise InputError(f"{manifest_path}: no file hashes")
    for name, expected in files.items():
        path = directory / name
        if Path(name).name != name:
            raise InputError(f"{manifest_path}: file entry {name!r} is not a plain file name")
        if not path.is_file():
            raise InputError(f"{directory}: {name} is listed in the manifest but missing")
        actual = sha256_file(path)
        if actual != expected:
            raise InputError(f"{directory}: {name} does not match its sha256 in the manifest (expected "
                             f"{str(expected)[:12]}…, found {actual[:12]}…): the file was changed or corrupted "
                             "after training; restore it or retrain")
    return manifest


def load_model_directory(directory: Path):
    """Verify and load ``directory`` into a ThresholdModel (see the module docstring)."""
    from qcgate.predictors import ThresholdModel
    from qcgate.predictors.ridge import RidgeModel

    directory = Path(directory)
    manifest = verify_model_directory(directory)
    manifest_path = directory / MANIFEST
    files = manifest["files"]
    try:
        groups = list(manifest["feature_groups"])
        uses_image = bool(manifest["uses_image"])
        components_spec = dict(manifest["components"])
        name = str(manifest["name"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{manifest_path}: missing or malformed key ({exc})") from exc

    def listed(file_name: str) -> Path:
        if file_name not in files:
            raise InputError(f"{manifest_path}: {file_name} is used but has no sha256 in the manifest")
        return directory / file_name

    loaded: dict[str, object] = {}
    for component, spec in components_spec.items():
        if component not in COMPONENTS:
            raise InputError(f"{manifest_path}: unknown component {component!r}")
        path = listed(spec["file"])
        if component.startswith("ridge"):
            ridge = RidgeModel.from_json(path.read_text(), source=str(path))
            trained = tuple(spec.get("feature_names", ridge.feature_names))
            if trained != ridge.feature_names:
                raise InputError(f"{path}: feature names differ from the manifest's")
            current = expected_feature_names(component, groups, uses_image)
            if trained != current:
                raise InputError(_feature_mismatch(str(directory), trained, current))
            loaded[component] = ridge
        else:
            from qcgate.predictors.resnet import ResNetConfig, ResNetPredictor

            try:
                config = ResNetConfig.from_dict(dict(spec["config"]))
                channels = tuple(spec["channels"])
            except (KeyError, TypeError, ValueError) as exc:
                raise InputError(f"{manifest_path}: bad ResNet entry for {component} ({exc})") from exc
            loaded[component] = ResNetPredictor.load(path, config, channels)
    position_map = None
    if manifest.get("position_map"):
        from qcgate.features import PositionFrequencyMap

        path = listed(manifest["position_map"])
        try:
            position_map = PositionFrequencyMap.from_json(path.read_text())
        except (ValueError, KeyError) as exc:
            raise InputError(f"{path}: not a position frequency map ({exc})") from exc
    q_estimators = None
    if manifest.get("quality"):
        from qcgate.predictors.quality import QualityEstimators

        try:
            quality_file = listed(str(manifest["quality"]["file"]))
        except (KeyError, TypeError) as exc:
            raise InputError(f"{manifest_path}: malformed quality entry ({exc})") from exc
        q_estimators = QualityEstimators.from_json(quality_file.read_text(), source=str(quality_file))
    try:
        model = ThresholdModel(
            name=name, version=str(manifest["version"]), kind=str(manifest["kind"]),
            validation_mae=float(manifest["validation_mae"]),
            validation_mae_without_uncertainty=float(manifest.get("validation_mae_without_uncertainty",
                                                                  manifest["validation_mae"])),
            training_mean_dsc=float(manifest["training"]["mean_dsc"]),
            feature_groups=groups, uses_image=uses_image, position_map=position_map,
            synthetic=bool(manifest.get("synthetic", False)), directory=directory, manifest=manifest,
            **loaded,  # type: ignore[arg-type]
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{manifest_path}: missing or malformed key ({exc})") from exc
    # q estimators + decision band (quality.json); None for a model trained before they existed: the
    # gate then gives review with that reason.
    model.q_estimators = q_estimators  # type: ignore[attr-defined]
    return model
