"""The paper's Table 3 under patient-grouped cross-validation, and its simulated clinical setting.

Methods (rows): "Global thresholding" (tau = the training folds' mean DSC Lesion), "Global
thresholding (median)" (their median: the constant that minimises the MAE, the fair baseline for the
median-calibrated Ridge; model cards report the ratio against the better of the two), "Ridge w/o UM",
"Ridge w. UM", "ResNet w/o UM", "ResNet w. UM", "Ensemble w. UM" = (Ridge w. UM + ResNet w. UM) / 2,
and "Ensemble w/o UM" = (Ridge w/o UM + ResNet w/o UM) / 2 (what a model answers without a UM). Rows the cohort cannot support
(no CT: no image ResNet; no AI ensemble: no UM) are left out. Every model is fitted on the training
folds only; patients never straddle folds (``qcgate.science.ridge_cv.grouped_folds``).

Error metrics (fractions of Dice; tables print percent)
-------------------------------------------------------
* MAE = (1/N) Σ_s |τ_s − y_s| over the N slices; ± SD = the population standard deviation of the
  N absolute errors |τ_s − y_s| (the paper's "MAE ± SD").
* Patient MAE = (1/P) Σ_p |mean_{s∈p} τ_s − mean_{s∈p} y_s|.

Simulated clinical setting (the paper, Sec. 3)
----------------------------------------------
Per repeat r (seed ``[seed, r]``), one synthetic DSC d_s ~ N(μ, σ) per slice, μ and σ the mean and
the population SD of the cohort's DSC Lesion (unless given), not clipped. A slice is *good* when
d_s ≥ y_s (the segmentation is as good as the experts agree), *bad* otherwise. A method *includes*
the slice when d_s ≥ τ_s. Then

* good included = #{good ∧ included} / #{good},
* bad rejected  = #{bad ∧ ¬included} / #{bad}.

The same draws serve every method within a repeat (a paired comparison). Reported: the mean and the
SD over repeats of each percentage, and the counts of repeat 0.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

GLOBAL = "Global thresholding"
GLOBAL_MEDIAN = "Global thresholding (median)"
RIDGE, RIDGE_UM = "Ridge w/o UM", "Ridge w. UM"
RESNET, RESNET_UM = "ResNet w/o UM", "ResNet w. UM"
ENSEMBLE, ENSEMBLE_UM = "Ensemble w/o UM", "Ensemble w. UM"
CONSTANTS = (GLOBAL, GLOBAL_MEDIAN)
METHOD_ORDER = (GLOBAL, GLOBAL_MEDIAN, RIDGE, RIDGE_UM, RESNET, RESNET_UM, ENSEMBLE, ENSEMBLE_UM)


@dataclass
class ErrorFigures:
    """MAE ± SD over slices and the patient-level MAE (see the module docstring)."""

    mae: float
    sd: float
    mae_patient: float
    n_slices: int


def error_figures(predicted: np.ndarray, truth: np.ndarray, patients: np.ndarray) -> ErrorFigures:
    """MAE = mean |τ − y|, SD = std |τ − y| (population), patient MAE = mean_p |mean τ_p − mean y_p|."""
    predicted = np.asarray(predicted, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    errors = np.abs(predicted - truth)
    patients = np.asarray(patients)
    per_patient = [abs(predicted[patients == p].mean() - truth[patients == p].mean()) for p in np.unique(patients)]
    return ErrorFigures(float(errors.mean()), float(errors.std()), float(np.mean(per_patient)), len(truth))


@dataclass
class SimulationFigures:
    """The simulated clinical setting for one method (see the module docstring)."""

    good_included_pct: float  # mean over repeats
    good_included_sd: float  # SD over repeats
    bad_rejected_pct: float
    bad_rejected_sd: float
    good_included: int  # counts of repeat 0
    good: int
    bad_rejected: int
    bad: int
    repeats: int


def draw_synthetic_dsc(n: int, mean: float, sd: float, seed: int, repeat: int) -> np.ndarray:
    """d_s ~ N(mean, sd), one per slice, from ``np.random.default_rng([seed, repeat])``."""
    return np.random.default_rng([seed, repeat]).normal(mean, sd, n)


def inclusion_counts(synthetic: np.ndarray, truth: np.ndarray, threshold: np.ndarray) -> tuple[int, int, int, int]:
    """(good ∧ included, good, bad ∧ rejected, bad) with good = d ≥ y and included = d ≥ τ."""
    good = synthetic >= truth
    included = synthetic >= threshold
    return (int(np.count_nonzero(good & included)), int(np.count_nonzero(good)),
            int(np.count_nonzero(~good & ~included)), int(np.count_nonzero(~good)))


def simulate_clinical_setting(truth: np.ndarray, thresholds: dict[str, np.ndarray], *, mean: float, sd: float,
                              repeats: int = 20, seed: int = 0) -> dict[str, SimulationFigures]:
    """Good included and bad rejected per method, paired draws, ``repeats`` repeats."""
    truth = np.asarray(truth, dtype=np.float64)
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    percentages: dict[str, list[tuple[float, float]]] = {m: [] for m in thresholds}
    first: dict[str, tuple[int, int, int, int]] = {}
    for repeat in range(repeats):
        synthetic = draw_synthetic_dsc(len(truth), mean, sd, seed, repeat)
        for method, tau in thresholds.items():
            counts = inclusion_counts(synthetic, truth, np.asarray(tau, dtype=np.float64))
            if repeat == 0:
                first[method] = counts
            gi, g, br, b = counts
            percentages[method].append((100.0 * gi / g if g else math.nan, 100.0 * br / b if b else math.nan))
    result = {}
    for method, values in percentages.items():
        array = np.asarray(values)
        result[method] = SimulationFigures(
            float(np.nanmean(array[:, 0])), float(np.nanstd(array[:, 0])),
            float(np.nanmean(array[:, 1])), float(np.nanstd(array[:, 1])), *first[method], repeats,
        )
    return result


@dataclass
class Table3:
    """Every row of Table 3 for one cohort, with the per-slice predictions behind it."""

    cohort_name: str
    synthetic: bool
    setting: str  # "cross-validation (k folds)" or "trained model NAME, no refitting"
    truth: np.ndarray
    patients: list[str]
    case_ids: list[str]
    slice_indices: list[int]
    predictions: dict[str, np.ndarray]
    errors: dict[str, ErrorFigures]
    simulation: dict[str, SimulationFigures]
    simulation_mean: float
    simulation_sd: float
    seed: int
    extra: dict[str, object] = field(default_factory=dict)

    def methods(self) -> list[str]:
        return [m for m in METHOD_ORDER if m in self.predictions] + [m for m in self.predictions if m not in METHOD_ORDER]

    def to_dict(self) -> dict:
        return {
            "cohort": self.cohort_name, "synthetic": self.synthetic, "setting": self.setting,
            "n_slices": int(len(self.truth)), "n_patients": len(set(self.patients)),
            "dsc_lesion_mean": float(self.truth.mean()), "dsc_lesion_sd": float(self.truth.std()),
            "simulation": {"mean": self.simulation_mean, "sd": self.simulation_sd, "seed": self.seed,
                           "repeats": next(iter(self.simulation.values())).repeats if self.simulation else 0},
            "rows": [{"method": m, **asdict(self.errors[m]), **asdict(self.simulation[m])} for m in self.methods()],
            **({"extra": self.extra} if self.extra else {}),
        }


def build_table3(*, cohort_name: str, synthetic: bool, setting: str, truth: np.ndarray, patients: Sequence[str],
                 case_ids: Sequence[str], slice_indices: Sequence[int], predictions: dict[str, np.ndarray],
                 repeats: int = 20, seed: int = 0, simulation_mean: float | None = None,
                 simulation_sd: float | None = None, extra: dict | None = None) -> Table3:
    """Errors and the simulation for every method's predictions."""
    truth = np.asarray(truth, dtype=np.float64)
    mean = float(truth.mean()) if simulation_mean is None else float(simulation_mean)
    sd = float(truth.std()) if simulation_sd is None else float(simulation_sd)
    patients_array = np.asarray(patients)
    errors = {m: error_figures(p, truth, patients_array) for m, p in predictions.items()}
    simulation = simulate_clinical_setting(truth, predictions, mean=mean, sd=sd, repeats=repeats, seed=seed)
    return Table3(cohort_name, synthetic, setting, truth, list(patients), list(case_ids), [int(k) for k in slice_indices],
                  dict(predictions), errors, simulation, mean, sd, seed, dict(extra or {}))


# --------------------------------------------------------------------------------------------------
# Cross-validation
# --------------------------------------------------------------------------------------------------


class EvaluationProgress:
    """"[elapsed s] message" lines on stderr for ``qcgate train``/``evaluate`` (long runs show they are alive)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.started = time.monotonic()

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(f"[{time.monotonic() - self.started:7.1f} s] {message}", file=sys.stderr, flush=True)


def available_methods(rows, kind: str = "ensemble") -> list[str]:
    """Table 3 rows that the cohort (image, UM) and the model kind support."""
    methods = [GLOBAL, GLOBAL_MEDIAN, RIDGE]
    if rows.has_uncertainty:
        methods.append(RIDGE_UM)
    if kind in ("resnet", "ensemble") and rows.crops is not None:
        methods.append(RESNET)
        if rows.has_uncertainty:
            methods.append(RESNET_UM)
        methods.append(ENSEMBLE)  # what the model answers for a slice without a UM
        if rows.has_uncertainty:
            methods.append(ENSEMBLE_UM)
    if kind == "resnet":
        methods = [m for m in methods if not m.startswith("Ridge") and not m.startswith("Ensemble")]
    return methods


def resnet_channels(rows, with_uncertainty: bool) -> tuple[str, ...]:
    channels = (("ct",) if rows.has_image else ()) + ("probability",)
    return channels + (("uncertainty",) if with_uncertainty else ())


def cross_validate(rows, *, kind: str = "ensemble", n_folds: int | None = 5, resnet_config=None,
                   calibrate: bool = True, progress: Callable[[str], None] | None = None) -> dict[str, np.ndarray]:
    """Out-of-fold predictions of every available method (see the module docstring)."""
    from qcgate.predictors.ridge import fit_ridge
    from qcgate.science.ridge_cv import grouped_folds

    say = progress or (lambda message: None)
    y = rows.targets
    patients = rows.patients
    folds = grouped_folds(patients, n_folds)
    methods = available_methods(rows, kind)
    predictions = {m: np.empty_like(y) for m in methods}
    x_plain, names_plain = rows.columns(rows.plain_groups)
    x_all, names_all = rows.columns(rows.all_groups)
    for number, (train, test) in enumerate(folds, start=1):
        say(f"fold {number}/{len(folds)}: {len(train)} training, {len(test)} test slices")
        predictions[GLOBAL][test] = y[train].mean()
        predictions[GLOBAL_MEDIAN][test] = np.median(y[train])
        if RIDGE in methods:
            predictions[RIDGE][test] = fit_ridge(x_plain[train], y[train], patients[train], names_plain,
                                                 calibrate=calibrate).predict(x_plain[test])
        if RIDGE_UM in methods:
            predictions[RIDGE_UM][test] = fit_ridge(x_all[train], y[train], patients[train], names_all,
                                                    calibrate=calibrate).predict(x_all[test])
        for method, with_um in ((RESNET, False), (RESNET_UM, True)):
            if method in methods:
                from qcgate.predictors.resnet import train_resnet

                net = train_resnet(rows.crops[train], y[train], resnet_channels(rows, with_um), resnet_config)
                predictions[method][test] = net.predict_crops(rows.crops[test])
                say(f"fold {number}/{len(folds)}: {method} trained ({net.training_log[-1]:.3f} final training L1)")
    if ENSEMBLE_UM in methods:
        predictions[ENSEMBLE_UM] = (predictions[RIDGE_UM] + predictions[RESNET_UM]) / 2
    if ENSEMBLE in methods:
        predictions[ENSEMBLE] = (predictions[RIDGE] + predictions[RESNET]) / 2
    return predictions


def cross_validated_table3(rows, *, kind: str = "ensemble", n_folds: int | None = 5, resnet_config=None,
                           calibrate: bool = True, repeats: int = 20, seed: int = 0,
                           simulation_mean: float | None = None, simulation_sd: float | None = None,
                           progress: Callable[[str], None] | None = None) -> Table3:
    from qcgate.science.ridge_cv import grouped_folds

    predictions = cross_validate(rows, kind=kind, n_folds=n_folds, resnet_config=resnet_config,
                                 calibrate=calibrate, progress=progress)
    k = len(grouped_folds(rows.patients, n_folds))
    table = rows.table
    return build_table3(cohort_name=rows.cohort_name, synthetic=rows.synthetic,
                        setting=f"patient-grouped cross-validation, {k} folds", truth=rows.targets,
                        patients=table.patient_ids, case_ids=table.case_ids, slice_indices=table.slice_indices,
                        predictions=predictions, repeats=repeats, seed=seed,
                        simulation_mean=simulation_mean, simulation_sd=simulation_sd)


# --------------------------------------------------------------------------------------------------
# A trained model on a new cohort (no refitting)
# --------------------------------------------------------------------------------------------------


def trained_model_table3(model, cohort, *, repeats: int = 20, seed: int = 0, simulation_mean: float | None = None,
                         simulation_sd: float | None = None, progress: Callable[[str], None] | None = None) -> Table3:
    """Score ``model`` on every lesion slice of ``cohort`` with a defined DSC Lesion and a non-empty AI
    mask (the reader mask for mask-only cohorts); global threshold = the model's training mean."""
    from qcgate.predictors.dataset import resolve_feature_mask, slice_input

    say = progress or (lambda message: None)
    feature_mask = resolve_feature_mask(cohort, "auto")
    labels = {"ridge": (RIDGE, RIDGE_UM), "resnet": (RESNET, RESNET_UM), "ensemble": (ENSEMBLE, ENSEMBLE_UM)}[model.kind]
    truth, patients, case_ids, indices = [], [], [], []
    plain: list[np.ndarray] = []
    with_um: list[np.ndarray] = []
    all_have_um = True
    for number, case in enumerate(cohort.cases, start=1):
        # One case at a time: full-frame slices of a cropped cohort are large.
        inputs = []
        for index in case.lesion_slices():
            target = case.dsc_lesion(index)
            if target is None:
                continue
            item = slice_input(case, index, feature_mask, full_frame=True)
            if not item.ai_mask.any():
                continue
            if not model.uses_image:
                item.image_hu = None
            inputs.append(item)
            truth.append(float(target))
            patients.append(case.patient_id)
            case_ids.append(case.case_id)
            indices.append(index)
        if not inputs:
            continue
        plain.append(model.predict(inputs, use_uncertainty=False))
        if all(s.uncertainty_map is not None for s in inputs) and model.has_uncertainty_variant:
            with_um.append(model.predict(inputs, use_uncertainty=True))
        else:
            all_have_um = False
        if number % 200 == 0:
            say(f"scored {number}/{len(cohort.cases)} cases")
    if not truth:
        from qcgate.errors import InputError

        raise InputError(f"{cohort.source or cohort.name}: no lesion slice with a defined DSC Lesion to score")
    median = float(model.manifest.get("training", {}).get("median_dsc", model.training_mean_dsc))
    predictions = {GLOBAL: np.full(len(truth), model.training_mean_dsc), GLOBAL_MEDIAN: np.full(len(truth), median),
                   labels[0]: np.concatenate(plain)}
    has_um = all_have_um and bool(with_um)
    if has_um:
        predictions[labels[1]] = np.concatenate(with_um)
    return build_table3(cohort_name=cohort.name, synthetic=cohort.synthetic or model.synthetic,
                        setting=f"trained model {model.name} {model.version} ({model.describe(use_uncertainty=has_um)}), no refitting",
                        truth=np.asarray(truth), patients=patients, case_ids=case_ids, slice_indices=indices,
                        predictions=predictions, repeats=repeats, seed=seed, simulation_mean=simulation_mean,
                        simulation_sd=simulation_sd)


# --------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------


def _pct(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{100 * value:.1f}"


def markdown_table(result: Table3) -> str:
    """Table 3 as Markdown (MAE in percent of Dice; simulation: mean ± SD over repeats, repeat-0 counts)."""
    lines = [
        "| Input / Method | MAE DSC Lesion | MAE patient | Good slices included | Bad slices rejected |",
        "|---|---|---|---|---|",
    ]
    for method in result.methods():
        e, s = result.errors[method], result.simulation[method]
        lines.append(
            f"| {method} | {_pct(e.mae)} ± {_pct(e.sd)} % | {_pct(e.mae_patient)} % | "
            f"{s.good_included_pct:.1f} ± {s.good_included_sd:.1f} % ({s.good_included}/{s.good}) | "
            f"{s.bad_rejected_pct:.1f} ± {s.bad_rejected_sd:.1f} % ({s.bad_rejected}/{s.bad}) |"
        )
    return "\n".join(lines)


def text_summary(result: Table3) -> str:
    tag = "  [SYNTHETIC data]" if result.synthetic else ""
    head = (f"{result.cohort_name}{tag}: {len(result.truth)} slices, {len(set(result.patients))} patients; "
            f"{result.setting}; DSC Lesion {result.truth.mean():.3f} ± {result.truth.std():.3f}; simulated DSC "
            f"N({result.simulation_mean:.3f}, {result.simulation_sd:.3f}), "
            f"{next(iter(result.simulation.values())).repeats} repeats, seed {result.seed}")
    return head + "\n" + markdown_table(result)


def write_evaluation_outputs(result: Table3, out: Path, *, command: str = "") -> dict[str, Path]:
    """table3.csv, table3.md, table3.html, table3.json, predictions.csv, predicted_vs_true.png,
    error_distributions.png under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in ("table3.csv", "table3.md", "table3.html", "table3.json",
                                           "predictions.csv", "predicted_vs_true.png", "error_distributions.png",
                                           "tradeoff.png")}
    with open(paths["table3.csv"], "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "mae", "sd_abs_error", "mae_patient", "good_included_pct", "good_included_sd",
                         "good_included", "good", "bad_rejected_pct", "bad_rejected_sd", "bad_rejected", "bad",
                         "repeats", "n_slices", "n_patients", "synthetic"])
        for method in result.methods():
            e, s = result.errors[method], result.simulation[method]
            writer.writerow([method, f"{e.mae:.5f}", f"{e.sd:.5f}", f"{e.mae_patient:.5f}",
                             f"{s.good_included_pct:.3f}", f"{s.good_included_sd:.3f}", s.good_included, s.good,
                             f"{s.bad_rejected_pct:.3f}", f"{s.bad_rejected_sd:.3f}", s.bad_rejected, s.bad,
                             s.repeats, len(result.truth), len(set(result.patients)), result.synthetic])
    with open(paths["predictions.csv"], "w", newline="") as handle:
        writer = csv.writer(handle)
        methods = result.methods()
        writer.writerow(["patient_id", "case_id", "slice_index", "dsc_lesion", *methods])
        for i in range(len(result.truth)):
            writer.writerow([result.patients[i], result.case_ids[i], result.slice_indices[i], f"{result.truth[i]:.6f}",
                             *(f"{result.predictions[m][i]:.6f}" for m in methods)])
    title = f"Table 3: {result.cohort_name}" + (" (SYNTHETIC data)" if result.synthetic else "")
    body = [f"# {title}", ""]
    if result.synthetic:
        body += ["**SYNTHETIC data**: generated, no patient; not evidence about real readers.", ""]
    if command:
        body += ["Command:", "", f"    {command}", ""]
    body += [text_summary(result).split("\n", 1)[0], "", markdown_table(result), "",
             "MAE ± SD: mean and SD of |τ − y| over slices (percent of Dice). Simulation: mean ± SD over "
             "repeats, counts of repeat 0. See qcgate/predictors/evaluation.py for every formula.", ""]
    paths["table3.md"].write_text("\n".join(body))
    paths["table3.html"].write_text(_html(result, title))
    paths["table3.json"].write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    _plots(result, paths["predicted_vs_true.png"], paths["error_distributions.png"])
    _tradeoff(result, paths["tradeoff.png"])
    return paths


def better_constant(result: Table3) -> str:
    """The constant row (training mean or median) with the lower MAE."""
    present = [m for m in CONSTANTS if m in result.errors]
    return min(present, key=lambda m: result.errors[m].mae)


def tradeoff_points(result: Table3, method: str, offsets: np.ndarray) -> list[tuple[float, float]]:
    """(bad rejected %, good included %) of the simulation's repeat 0 as τ is offset by each value."""
    synthetic = draw_synthetic_dsc(len(result.truth), result.simulation_mean, result.simulation_sd, result.seed, 0)
    points = []
    for offset in offsets:
        gi, g, br, b = inclusion_counts(synthetic, result.truth, result.predictions[method] + offset)
        points.append((100.0 * br / b if b else math.nan, 100.0 * gi / g if g else math.nan))
    return points


def _tradeoff(result: Table3, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    offsets = np.linspace(-0.4, 0.4, 33)
    fig, ax = plt.subplots(figsize=(5.2, 4.2), dpi=110)
    for method in result.methods():
        points = np.asarray(tradeoff_points(result, method, offsets))
        ax.plot(points[:, 0], points[:, 1], label=method, linewidth=1, linestyle="--" if method in CONSTANTS else "-")
    ax.set_xlabel("bad slices rejected (%)")
    ax.set_ylabel("good slices included (%)")
    ax.set_title(f"Trade-off as τ is offset by −0.4…+0.4, {result.cohort_name}"
                 f"{' — SYNTHETIC' if result.synthetic else ''}", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _html(result: Table3, title: str) -> str:
    import html

    rows = []
    for method in result.methods():
        e, s = result.errors[method], result.simulation[method]
        cells = [method, f"{_pct(e.mae)} ± {_pct(e.sd)} %", f"{_pct(e.mae_patient)} %",
                 f"{s.good_included_pct:.1f} ± {s.good_included_sd:.1f} % ({s.good_included}/{s.good})",
                 f"{s.bad_rejected_pct:.1f} ± {s.bad_rejected_sd:.1f} % ({s.bad_rejected}/{s.bad})"]
        rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    header = "".join(f"<th>{h}</th>" for h in ("Input / Method", "MAE DSC Lesion", "MAE patient",
                                                "Good slices included", "Bad slices rejected"))
    note = "<p><strong>SYNTHETIC data</strong></p>" if result.synthetic else ""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head><body>"
            f"<h1>{html.escape(title)}</h1>{note}<p>{html.escape(result.setting)}</p>"
            f"<table border='1' cellpadding='4'><tr>{header}</tr>{''.join(rows)}</table></body></html>\n")


def _plots(result: Table3, scatter_path: Path, errors_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in result.methods() if m not in CONSTANTS] or result.methods()
    tag = " — SYNTHETIC data" if result.synthetic else ""
    fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods), 3.4), dpi=110, squeeze=False)
    for ax, method in zip(axes[0], methods):
        ax.scatter(result.truth, result.predictions[method], s=4, alpha=0.35)
        ax.plot([0, 1], [0, 1], color="black", linewidth=0.7)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(f"{method}\nMAE {_pct(result.errors[method].mae)} %", fontsize=8)
        ax.set_xlabel("true DSC Lesion", fontsize=7)
        ax.set_ylabel("predicted threshold", fontsize=7)
    fig.suptitle(f"{result.cohort_name}{tag}", fontsize=9)
    fig.tight_layout()
    fig.savefig(scatter_path)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    all_methods = result.methods()
    ax.boxplot([result.predictions[m] - result.truth for m in all_methods], showfliers=False)
    ax.set_xticks(range(1, len(all_methods) + 1), all_methods, rotation=20, fontsize=7)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_ylabel("predicted − true DSC Lesion")
    ax.set_title(f"Error distributions, {result.cohort_name}{tag}", fontsize=9)
    fig.tight_layout()
    fig.savefig(errors_path)
    plt.close(fig)
