"""The outputs of ``qcgate analyze``: Table 2 as text, the CSVs, the figures and report.md."""

from __future__ import annotations

import csv
from pathlib import Path

from qcgate.science.plots import plot_correlations, plot_density
from qcgate.science.results import BASELINE_NAME, AnalysisResult


def _pct(value: float) -> str:
    """A fraction of Dice as percent with one decimal."""
    return f"{100 * value:.1f}"


def format_table(result: AnalysisResult) -> str:
    """Table 2 as fixed-width text (MAE in percent of Dice)."""
    header = (f"{'Group':<12} {'n':>4} {'Max r':>7}  {'MAE slice %':>13} {'MAE patient %':>14}  "
              f"{'(global mean: slice / patient %)':>33}  top feature")
    lines = [header, "-" * len(header)]
    for row in result.rows:
        r = "n/a" if row.top_r is None else f"{row.top_r:+.2f}"
        lines.append(
            f"{row.group:<12} {row.n_features:>4} {r:>7}  "
            f"{_pct(row.model.mae_slice):>6} ± {_pct(row.model.sd_slice):<4} "
            f"{_pct(row.model.mae_patient):>7} ± {_pct(row.model.sd_patient):<4}  "
            f"{_pct(row.baseline.mae_slice) + ' ± ' + _pct(row.baseline.sd_slice) + ' / ' + _pct(row.baseline.mae_patient) + ' ± ' + _pct(row.baseline.sd_patient):>33}  "
            f"{row.top_feature or ''}"
        )
    return "\n".join(lines)


def write_analysis_outputs(result: AnalysisResult, out: Path, *, command: str = "") -> dict[str, Path]:
    """Write the CSVs, the two PNGs and report.md under ``out``; returns name -> path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = result.table
    paths = {
        "features": out / "features.csv", "correlations": out / "correlations.csv",
        "table2": out / "table2.csv", "predictions": out / "predictions.csv",
        "density": out / "dsc_lesion_density.png", "correlation_plot": out / "correlations.png",
        "report": out / "report.md",
    }
    with open(paths["features"], "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["patient_id", "case_id", "slice_index", "dsc_lesion", *table.feature_names])
        for i in range(len(table)):
            writer.writerow([table.patient_ids[i], table.case_ids[i], table.slice_indices[i],
                             f"{table.dsc_lesion[i]:.6f}", *(f"{v:.6g}" for v in table.values[i])])
    with open(paths["correlations"], "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["group", "feature", "pearson_r", "abs_r", "fallback_fraction"])
        flag_fraction = table.flagged.mean(axis=0) if table.flagged is not None and len(table) else None
        for j, c in sorted(enumerate(result.correlations), key=lambda jc: -abs(jc[1].r or 0.0)):
            writer.writerow([c.group, c.feature, "" if c.r is None else f"{c.r:.4f}",
                             "" if c.r is None else f"{abs(c.r):.4f}",
                             "" if flag_fraction is None else f"{flag_fraction[j]:.3f}"])
    with open(paths["table2"], "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["group", "n_features", "top_feature", "max_r", "mae_slice", "sd_slice",
                         "mae_patient", "sd_patient", "baseline_mae_slice", "baseline_sd_slice",
                         "baseline_mae_patient", "baseline_sd_patient", "median_alpha", "n_slices",
                         "n_patients", "n_folds"])
        for row in result.rows:
            writer.writerow([row.group, row.n_features, row.top_feature or "",
                             "" if row.top_r is None else f"{row.top_r:.4f}",
                             *(f"{v:.5f}" for v in (row.model.mae_slice, row.model.sd_slice,
                                                    row.model.mae_patient, row.model.sd_patient,
                                                    row.baseline.mae_slice, row.baseline.sd_slice,
                                                    row.baseline.mae_patient, row.baseline.sd_patient)),
                             f"{row.median_alpha:.4g}", len(table), len(set(table.patient_ids)), result.n_folds])
    with open(paths["predictions"], "w", newline="") as handle:
        writer = csv.writer(handle)
        groups = list(result.predictions)
        writer.writerow(["patient_id", "case_id", "slice_index", "dsc_lesion", BASELINE_NAME.replace(" ", "_"),
                         *groups])
        for i in range(len(table)):
            writer.writerow([table.patient_ids[i], table.case_ids[i], table.slice_indices[i],
                             f"{table.dsc_lesion[i]:.6f}", f"{result.baseline_predictions[i]:.6f}",
                             *(f"{result.predictions[g][i]:.6f}" for g in groups)])
    plot_density(result, paths["density"])
    plot_correlations(result, paths["correlation_plot"])
    paths["report"].write_text(report_markdown(result, command))
    return paths


def report_markdown(result: AnalysisResult, command: str = "") -> str:
    """report.md: the cohort, the method, Table 2 in Markdown and the strongest correlations."""
    table = result.table
    y = table.dsc_lesion
    lines = [f"# DSC Lesion analysis: {result.cohort_name}", ""]
    if result.synthetic:
        lines += ["**SYNTHETIC data** (qcgate phantom): no patient, not evidence about real readers.", ""]
    if command:
        lines += ["Command:", "", f"    {command}", ""]
    lines += [
        f"- {len(table)} lesion slices from {len(set(table.patient_ids))} patients "
        f"({len(set(table.case_ids))} cases); DSC Lesion mean {y.mean():.3f} ± {y.std():.3f} (SD).",
        f"- Ridge per group (signed-log1p, standardise, Ridge; alpha by inner patient-grouped CV), "
        f"outer patient-grouped CV with {result.n_folds} folds; baseline = training folds' mean DSC Lesion.",
        "- MAE in percent of Dice. Slice ± = SD over patients of per-patient slice MAE; "
        "patient ± = SD over patients.",
        "",
        "| Group | n features | Max r (feature) | MAE slice | MAE patient | Global mean: slice | Global mean: patient |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result.rows:
        r = "n/a" if row.top_r is None else f"{row.top_r:+.2f} ({row.top_feature})"
        lines.append(
            f"| {row.group} | {row.n_features} | {r} | {_pct(row.model.mae_slice)} ± {_pct(row.model.sd_slice)} % | "
            f"{_pct(row.model.mae_patient)} ± {_pct(row.model.sd_patient)} % | "
            f"{_pct(row.baseline.mae_slice)} ± {_pct(row.baseline.sd_slice)} % | "
            f"{_pct(row.baseline.mae_patient)} ± {_pct(row.baseline.sd_patient)} % |"
        )
    defined = sorted((c for c in result.correlations if c.r is not None), key=lambda c: -abs(c.r))  # type: ignore[arg-type]
    lines += ["", "Strongest correlations:", ""]
    lines += [f"- {c.feature}: r = {c.r:+.3f}" for c in defined[:10]]
    lines += ["", "Files: features.csv, correlations.csv, table2.csv, predictions.csv, "
              "dsc_lesion_density.png (Fig. 2), correlations.png.", ""]
    return "\n".join(lines)
