"""``qcgate train``: cross-validate (Table 3 of the training cohort), fit on every slice, write the
model directory (``qcgate.predictors.artifacts``) with its model card."""

from __future__ import annotations

import datetime as _dt
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

import qcgate
from qcgate.cohort.model import Cohort
from qcgate.errors import InputError
from qcgate.predictors.artifacts import FORMAT_NAME, FORMAT_VERSION, write_manifest
from qcgate.predictors.evaluation import (
    ENSEMBLE, ENSEMBLE_UM, RESNET, RESNET_UM, RIDGE, RIDGE_UM, Table3, cross_validated_table3, markdown_table,
    resnet_channels, write_evaluation_outputs,
)

KINDS = ("ridge", "resnet", "ensemble")
HEADLINE = {"ridge": (RIDGE, RIDGE_UM), "resnet": (RESNET, RESNET_UM), "ensemble": (ENSEMBLE, ENSEMBLE_UM)}


def train_model(cohort: Cohort, kind: str, out: Path, *, name: str | None = None, version: str = "1",
                n_folds: int | None = 5, resnet_config=None, calibrate: bool = True, repeats: int = 20,
                seed: int = 0, workers: int | None = 1, command: str = "", description: str = "",
                intended_use: str = "", limits: str = "", progress: Callable[[str], None] | None = None,
                force: bool = False) -> tuple[Path, Table3]:
    """Train ``kind`` on ``cohort`` and write the model directory ``out``; returns it and its Table 3."""
    from qcgate.predictors.dataset import build_rows
    from qcgate.predictors.resnet import ResNetConfig, train_resnet
    from qcgate.predictors.ridge import fit_ridge

    if kind not in KINDS:
        raise InputError(f"--model must be one of {KINDS}, got {kind!r}")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise InputError(f"{out}: output directory exists and is not empty (use --force to replace it)")
    say = progress or (lambda message: None)
    config = resnet_config or ResNetConfig(seed=seed)
    needs_crops = kind in ("resnet", "ensemble")
    say(f"features of {cohort.name} ({len(cohort.cases)} cases)")
    rows = build_rows(cohort, with_crops=needs_crops, crop_size=config.crop_size, workers=workers)
    if needs_crops and not rows.has_image and kind == "resnet":
        say("no CT in this cohort: the ResNet sees the mask (probability channel) only")
    say(f"{len(rows.targets)} slices, {len(set(rows.patients))} patients; cross-validation")
    table3 = cross_validated_table3(rows, kind=kind, n_folds=n_folds, resnet_config=config, calibrate=calibrate,
                                    repeats=repeats, seed=seed, progress=say)

    staging = out.with_name(out.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    components: dict[str, dict] = {}
    y, patients = rows.targets, rows.patients
    if kind in ("ridge", "ensemble"):
        say("fitting the Ridge on every slice")
        for component, groups in (("ridge", rows.plain_groups), ("ridge_uncertainty", rows.all_groups)):
            if component == "ridge_uncertainty" and not rows.has_uncertainty:
                continue
            x, names = rows.columns(groups)
            ridge = fit_ridge(x, y, patients, names, calibrate=calibrate)
            (staging / f"{component}.json").write_text(ridge.to_json())
            components[component] = {"file": f"{component}.json", "feature_names": names, "alpha": ridge.alpha,
                                     "median_calibration": ridge.calibration_scores is not None}
    if needs_crops:
        for component, with_um in (("resnet", False), ("resnet_uncertainty", True)):
            if with_um and not rows.has_uncertainty:
                continue
            say(f"training the {component} on every slice")
            channels = resnet_channels(rows, with_um)
            net = train_resnet(rows.crops, y, channels, config)
            net.save(staging / f"{component}.safetensors")
            components[component] = {"file": f"{component}.safetensors", "config": config.to_dict(),
                                     "channels": list(channels), "final_training_l1": net.training_log[-1]}
    if rows.position_map is not None:
        rows.position_map.save(staging / "position_map.json")
    write_evaluation_outputs(table3, staging / "evaluation", command=command)
    shutil.move(str(staging / "evaluation" / "table3.csv"), staging / "table3.csv")
    shutil.rmtree(staging / "evaluation")

    plain, with_um = HEADLINE[kind]
    validation_without = table3.errors[plain].mae
    validation = table3.errors[with_um].mae if with_um in table3.errors else validation_without
    model_name = name or out.name
    manifest = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "name": model_name, "version": version,
        "kind": kind, "synthetic": bool(cohort.synthetic), "qcgate_version": qcgate.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "feature_groups": rows.all_groups, "uses_image": rows.has_image, "feature_mask": rows.feature_mask,
        "components": components, "position_map": "position_map.json" if rows.position_map is not None else None,
        "validation_mae": validation, "validation_mae_without_uncertainty": validation_without,
        "training": {
            "cohort": cohort.name, "description": description, "synthetic": bool(cohort.synthetic),
            "n_slices": int(len(y)), "n_patients": int(len(set(patients))), "mean_dsc": float(y.mean()),
            "median_dsc": float(np.median(y)), "sd_dsc": float(y.std()), "command": command, "seed": seed, "calibrate": calibrate,
        },
        "metrics": table3.to_dict(),
    }
    (staging / "MODEL_CARD.md").write_text(model_card(manifest, table3, intended_use=intended_use, limits=limits))
    write_manifest(staging, manifest)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    say(f"model written to {out}")
    return out, table3


def model_card(manifest: dict, table3: Table3, *, intended_use: str, limits: str) -> str:
    training = manifest["training"]
    synthetic = manifest["synthetic"]
    lines = [f"# Model card: {manifest['name']} (version {manifest['version']})", ""]
    if synthetic:
        lines += ["**SYNTHETIC**: trained on a generated cohort (`qcgate phantom`); for demos and pipeline tests, "
                  "never for clinical decisions.", ""]
    components = ", ".join(manifest["components"])
    lines += [
        "## What it is",
        "",
        f"- Predicts, per CT lesion slice, the experts' expected agreement (DSC Lesion), used as the slice's QC "
        f"threshold tau. Kind: `{manifest['kind']}` (sub-models: {components}).",
        f"- Feature groups: {', '.join(manifest['feature_groups'])}; features describe the "
        f"{'AI ensemble mask' if manifest['feature_mask'] == 'ai' else 'reader mask (the AI mask at run time)'}.",
        f"- Default verdict margin (validation MAE): {manifest['validation_mae']:.4f}; without UM "
        f"{manifest['validation_mae_without_uncertainty']:.4f}. Global threshold (training mean): "
        f"{training['mean_dsc']:.4f}.",
        "",
        "## Intended use",
        "",
        intended_use or "Image-specific QC thresholds in the qcgate pipeline.",
        "",
        "## Training data",
        "",
        f"- Cohort `{training['cohort']}`{' (SYNTHETIC)' if synthetic else ''}: {training['n_slices']} lesion slices, "
        f"{training['n_patients']} patients; DSC Lesion {training['mean_dsc']:.3f} ± {training['sd_dsc']:.3f}.",
    ]
    if training.get("description"):
        lines.append(f"- {training['description']}")
    lines += ["", "Training command:", "", f"    {training['command'] or '(not recorded)'}", "",
              "## Metrics (on the training cohort, " + table3.setting + ")", "",
              f"Simulated clinical setting: synthetic DSC ~ N({table3.simulation_mean:.3f}, {table3.simulation_sd:.3f}), "
              f"{next(iter(table3.simulation.values())).repeats} repeats, seed {table3.seed}; percentages are mean ± SD "
              "over repeats, counts from repeat 0.", "", markdown_table(table3), ""]
    from qcgate.predictors.evaluation import CONSTANTS, better_constant

    if any(m in table3.errors for m in CONSTANTS):
        constant = better_constant(table3)
        best = min((m for m in table3.errors if m not in CONSTANTS), key=lambda m: table3.errors[m].mae)
        ratios = ", ".join(f"{table3.errors[best].mae / table3.errors[c].mae:.3f} against the training "
                           f"{'mean' if c == CONSTANTS[0] else 'median'}" for c in CONSTANTS if c in table3.errors)
        lines += [f"MAE ratio model/better constant ({best} / {constant}): "
                  f"{table3.errors[best].mae / table3.errors[constant].mae:.3f} ({ratios}).", ""]
    lines += ["## Limits", "", limits or "Validated only by cross-validation on its training cohort.", "",
              "## Files", "", "Every file's sha256 is in `manifest.json`; loading refuses a changed file. "
              "Ridge as JSON, ResNet weights as safetensors; nothing is pickled.", ""]
    return "\n".join(lines)

