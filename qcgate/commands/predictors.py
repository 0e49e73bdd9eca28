"""Sub-commands `qcgate train` and `qcgate evaluate` (the paper's Table 3)."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

from qcgate.commands.common import positive_int
from qcgate.errors import InputError

if TYPE_CHECKING:
    from qcgate.predictors.evaluation import EvaluationProgress


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("cohort", type=Path, metavar="COHORT",
                        help="a qcgate cohort directory (cohort.json) or an LIDC-layout directory")
    parser.add_argument("--folds", type=int, default=5,
                        help="outer patient-grouped folds (default 5; 0 = leave-one-patient-out)")
    parser.add_argument("--repeats", type=positive_int, default=20, help="simulation repeats (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulation and the ResNet (default 0)")
    parser.add_argument("--sim-mean", type=float, default=None,
                        help="mean of the synthetic DSC (default: the cohort's mean DSC Lesion)")
    parser.add_argument("--sim-sd", type=float, default=None,
                        help="SD of the synthetic DSC (default: the cohort's SD of DSC Lesion)")
    parser.add_argument("--epochs", type=positive_int, default=None, help="ResNet epochs (default 20)")
    parser.add_argument("--no-calibration", action="store_true",
                        help="plain Ridge (no median calibration of its output)")
    parser.add_argument("--max-patients", type=positive_int, default=None)
    parser.add_argument("--patients", choices=("all", "train", "holdout"), default=None, dest="part",
                        help="all patients (default), or the train / holdout part of the stable split "
                        "(qcgate.predictors.gate_evaluation.holdout_patient)")
    parser.add_argument("--holdout-fraction", type=float, default=None, help="held-out share (default 0.2)")
    parser.add_argument("--split-seed", type=int, default=None, help="seed of the split (default 0)")
    parser.add_argument("--workers", type=positive_int, default=1, help="feature extraction processes (default 1)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `train` and `evaluate` to the qcgate command line."""
    train = subparsers.add_parser(
        "train", help="train a threshold model (Ridge, Mish-ResNet or ensemble) and write its directory",
        description="Cross-validate (Table 3 of the training cohort), fit on every lesion slice, and write "
        "the model directory: manifest with sha256 of every file, Ridge as JSON, ResNet weights as "
        "safetensors, position map, model card. See docs/PREDICTORS.md.",
    )
    _add_common(train)
    train.add_argument("--model", choices=("ridge", "resnet", "ensemble"), required=True, dest="kind")
    train.add_argument("--out", type=Path, required=True, help="model directory, e.g. models/NAME")
    train.add_argument("--name", default=None, help="model name (default: the directory name)")
    train.add_argument("--version", default="1")
    train.add_argument("--description", default="", help="training data description for the manifest and card")
    train.add_argument("--intended-use", default="", help="model card: intended use")
    train.add_argument("--limits", default="", help="model card: limits")
    train.add_argument("--force", action="store_true", help="replace an existing model directory")
    train.set_defaults(handler=run_train)

    evaluate = subparsers.add_parser(
        "evaluate", help="Table 3: threshold prediction MAE and the simulated clinical setting",
        description="Without --model: every predictor the cohort supports under patient-grouped CV. With "
        "--model DIR: score that trained model on COHORT with no refitting (global threshold = the "
        "model's training mean).",
    )
    _add_common(evaluate)
    evaluate.add_argument("--model", type=Path, default=None, dest="model_dir", metavar="DIR")
    evaluate.add_argument("--kind", choices=("auto", "ridge", "resnet", "ensemble"), default="auto",
                          help="without --model: which predictors to cross-validate; ensemble = all rows; "
                          "auto (default) = ensemble when the cohort has CT images, else ridge (on mask-only "
                          "cohorts such as LIDC the mask ResNet costs minutes per fold and did not help)")
    evaluate.add_argument("--out", type=Path, default=None, help="write CSV, Markdown, HTML, JSON and plots here")
    evaluate.add_argument("--format", choices=("text", "json"), default="text")
    evaluate.set_defaults(handler=run_evaluate)

    for command, help_text, description in (
        ("evaluate-gate", "the gate's operating characteristics: bad caught, good accepted, review",
         "Per slice the AI is good iff its mean Dice against the experts >= the experts' DSC Lesion. Without "
         "--model: patient-grouped CV (tau, q estimators and band fitted on training folds). With --model DIR: that "
         "model's tau, q estimators and band, no refitting. Rows: every q estimator with its conformal band, and the "
         "baselines 'global threshold + raw ensemble agreement' and 'tau + raw ensemble agreement'. See "
         "docs/SCIENCE.md."),
        ("train-gate", "fit the q estimators and decision band of a threshold model (writes quality.json)",
         "Fit the probability calibration (temperature), the learned q Ridges and their class-conditional "
         "split-conformal bands on COHORT, and store them in the model directory (quality.json, hashed in the "
         "manifest)."),
    ):
        sub = subparsers.add_parser(command, help=help_text, description=description)
        sub.add_argument("cohort", type=Path, metavar="COHORT")
        sub.add_argument("--model", type=Path, default=None, dest="model_dir", metavar="DIR",
                         required=command == "train-gate")
        sub.add_argument("--ai", choices=("members", "simulated", "leave-one-reader-out", "members+simulated"),
                         default="simulated",
                         help="where the AI segmentations come from (default simulated: the documented error "
                         "family of qcgate.predictors.simulated_ai on real reader outlines)")
        sub.add_argument("--seed", type=int, default=0, help="seed of the simulated AI and the bootstrap (default 0)")
        sub.add_argument("--folds", type=int, default=5, help="outer patient-grouped folds without --model (default 5)")
        sub.add_argument("--max-missed-bad", type=float, default=0.10,
                         help="band target: the largest share of bad slices accepted (default 0.10)")
        sub.add_argument("--max-rejected-good", type=float, default=0.10,
                         help="band target: the largest share of good slices rejected (default 0.10)")
        sub.add_argument("--patients", choices=("all", "train", "holdout"), default="all", dest="part",
                         help="use all patients, or the train / holdout part of the stable split "
                         "(sha256 of seed:patient_id, --holdout-fraction)")
        sub.add_argument("--holdout-fraction", type=float, default=0.2)
        sub.add_argument("--split-seed", type=int, default=0)
        sub.add_argument("--max-patients", type=positive_int, default=None)
        sub.add_argument("--workers", type=positive_int, default=1)
        sub.add_argument("--quiet", action="store_true")
        if command == "evaluate-gate":
            sub.add_argument("--format", choices=("text", "json"), default="text")
            sub.add_argument("--out", type=Path, default=None, help="gate.json, gate.md, gate_slices.csv, gate_tradeoff.png")
            sub.set_defaults(handler=run_evaluate_gate)
        else:
            sub.add_argument("--tau", choices=("auto", "cross-fitted", "model"), default="auto", dest="tau_source",
                             help="the tau the band is fitted on: cross-fitted (the cohort's Ridge w/o UM, out of "
                             "fold: right for a ridge model trained on this cohort), model (the model's own run-time "
                             "tau, ensemble and UM included: the cohort must be held out of its training) or auto "
                             "(cross-fitted for a Ridge w/o UM, else model; default)")
            sub.set_defaults(handler=run_train_gate)


_OPTIONS = {  # attribute -> flag, for the reconstructed command line recorded in manifests and reports
    "kind": "--model", "out": "--out", "model_dir": "--model", "folds": "--folds", "repeats": "--repeats",
    "seed": "--seed", "sim_mean": "--sim-mean", "sim_sd": "--sim-sd", "epochs": "--epochs",
    "max_patients": "--max-patients", "name": "--name", "version": "--version", "description": "--description",
    "intended_use": "--intended-use", "limits": "--limits", "part": "--patients",
    "holdout_fraction": "--holdout-fraction", "split_seed": "--split-seed",
}


def _command_line(args: argparse.Namespace) -> str:
    """The command as it would be typed (from the parsed arguments, so it is right in-process too)."""
    words = ["qcgate", args.command, str(args.cohort)]
    for attribute, flag in _OPTIONS.items():
        value = getattr(args, attribute, None)
        if value is None or value == "" or (attribute == "kind" and args.command == "evaluate"):
            continue
        words += [flag, str(value)]
    if getattr(args, "no_calibration", False):
        words.append("--no-calibration")
    return " ".join(shlex.quote(w) for w in words)


def _resnet_config(args: argparse.Namespace):
    from qcgate.predictors.resnet import ResNetConfig

    config = ResNetConfig(seed=args.seed)
    if args.epochs is not None:
        config.epochs = args.epochs
    return config


def _folds(args: argparse.Namespace) -> int | None:
    if args.folds < 0 or args.folds == 1:
        raise InputError(f"--folds must be 0 (leave-one-patient-out) or at least 2, got {args.folds}")
    return None if args.folds == 0 else args.folds


def _progress(args: argparse.Namespace) -> EvaluationProgress:
    from qcgate.predictors.evaluation import EvaluationProgress

    return EvaluationProgress(enabled=not args.quiet and getattr(args, "format", "text") != "json")


def run_train(args: argparse.Namespace) -> int:
    from qcgate.cohort import load_cohort
    from qcgate.predictors.evaluation import text_summary
    from qcgate.predictors.training import train_model

    _limit_threads()
    cohort = _part(args, load_cohort(args.cohort, max_patients=args.max_patients))
    out, table3 = train_model(
        cohort, args.kind, args.out, name=args.name, version=args.version, n_folds=_folds(args),
        resnet_config=_resnet_config(args), calibrate=not args.no_calibration, repeats=args.repeats,
        seed=args.seed, workers=args.workers, command=_command_line(args), description=args.description,
        intended_use=args.intended_use, limits=args.limits, progress=_progress(args), force=args.force,
    )
    print(text_summary(table3))
    print(f"model written to {out}")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from qcgate.cohort import load_cohort
    from qcgate.predictors.evaluation import (
        cross_validated_table3,
        text_summary,
        trained_model_table3,
        write_evaluation_outputs,
    )

    _limit_threads()
    cohort = _part(args, load_cohort(args.cohort, max_patients=args.max_patients))
    progress = _progress(args)
    if args.model_dir is not None:
        from qcgate.predictors import load_model

        model = load_model(args.model_dir)
        table3 = trained_model_table3(model, cohort, repeats=args.repeats, seed=args.seed,
                                      simulation_mean=args.sim_mean, simulation_sd=args.sim_sd, progress=progress)
    else:
        from qcgate.predictors.dataset import build_rows

        config = _resnet_config(args)
        if args.kind == "auto":
            args.kind = "ensemble" if cohort.has_images else "ridge"
        rows = build_rows(cohort, with_crops=args.kind in ("resnet", "ensemble"), crop_size=config.crop_size,
                          workers=args.workers, progress=not args.quiet and args.format != "json")
        table3 = cross_validated_table3(rows, kind=args.kind, n_folds=_folds(args), resnet_config=config,
                                        calibrate=not args.no_calibration, repeats=args.repeats, seed=args.seed,
                                        simulation_mean=args.sim_mean, simulation_sd=args.sim_sd, progress=progress)
    if args.out is not None:
        write_evaluation_outputs(table3, args.out, command=_command_line(args))
    if args.format == "json":
        print(json.dumps(table3.to_dict(), indent=1))
    else:
        print(text_summary(table3))
        if args.out is not None:
            print(f"outputs in {args.out}")
    return 0


def _part(args: argparse.Namespace, cohort):
    from qcgate.predictors.gate_evaluation import select_part

    fraction = 0.2 if args.holdout_fraction is None else args.holdout_fraction
    return select_part(cohort, args.part or "all", fraction, args.split_seed or 0)


def _gate_cohort(args: argparse.Namespace):
    from qcgate.cohort import load_cohort
    from qcgate.predictors.gate_evaluation import select_part

    if not 0 < args.holdout_fraction < 1:
        raise InputError(f"--holdout-fraction must be in (0, 1), got {args.holdout_fraction}")
    for flag, value in (("--max-missed-bad", args.max_missed_bad), ("--max-rejected-good", args.max_rejected_good)):
        if not 0 < value < 1:
            raise InputError(f"{flag} must be in (0, 1), got {value}")
    cohort = load_cohort(args.cohort, max_patients=args.max_patients)
    return select_part(cohort, args.part, args.holdout_fraction, args.split_seed)


def _gate_command_line(args: argparse.Namespace) -> str:
    words = ["qcgate", args.command, str(args.cohort)]
    for attribute, flag in (("model_dir", "--model"), ("ai", "--ai"), ("seed", "--seed"), ("folds", "--folds"),
                            ("max_missed_bad", "--max-missed-bad"), ("max_rejected_good", "--max-rejected-good"),
                            ("part", "--patients"), ("holdout_fraction", "--holdout-fraction"),
                            ("split_seed", "--split-seed"), ("max_patients", "--max-patients"), ("tau_source", "--tau"),
                            ("out", "--out")):
        value = getattr(args, attribute, None)
        if value is not None:
            words += [flag, str(value)]
    return " ".join(shlex.quote(w) for w in words)


def run_evaluate_gate(args: argparse.Namespace) -> int:
    from qcgate.predictors.evaluation import EvaluationProgress
    from qcgate.predictors.gate_evaluation import evaluate_gate, text_summary, write_gate_outputs

    _limit_threads()
    cohort = _gate_cohort(args)
    progress = EvaluationProgress(enabled=not args.quiet and args.format != "json")
    model = None
    if args.model_dir is not None:
        from qcgate.predictors import load_model

        model = load_model(args.model_dir)
    result = evaluate_gate(cohort, ai=args.ai, seed=args.seed, n_folds=_folds(args), model=model,
                           max_missed_bad=args.max_missed_bad, max_rejected_good=args.max_rejected_good,
                           workers=args.workers, progress=progress)
    command = _gate_command_line(args)
    if args.out is not None:
        write_gate_outputs(result, args.out, command=command)
    if args.format == "json":
        from qcgate.predictors.gate_evaluation import _json_default

        print(json.dumps({**result.to_dict(), "command": command}, indent=1, default=_json_default))
    else:
        print(text_summary(result))
        if args.out is not None:
            print(f"outputs in {args.out}")
    return 0


def run_train_gate(args: argparse.Namespace) -> int:
    from qcgate.predictors.evaluation import EvaluationProgress
    from qcgate.predictors.gate_evaluation import train_gate

    _limit_threads()
    cohort = _gate_cohort(args)
    estimators = train_gate(args.model_dir, cohort, ai=args.ai, seed=args.seed, max_missed_bad=args.max_missed_bad,
                            max_rejected_good=args.max_rejected_good, command=_gate_command_line(args),
                            workers=args.workers, tau_source=args.tau_source,
                            progress=EvaluationProgress(enabled=not args.quiet))
    print(f"q estimators of {args.model_dir} (temperature {estimators.temperature:.3f}; default {estimators.default}):")
    for name, estimator in estimators.estimators.items():
        print(f"  {name}: validation MAE {estimator.validation_mae:.3f}; {estimator.band.describe()}")  # type: ignore[attr-defined]
    return 0


def _limit_threads() -> None:
    """One BLAS thread: the machines this runs on are shared, and oversubscribed BLAS spins."""
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:  # pragma: no cover
        pass
