"""The figures of ``qcgate analyze``: DSC Lesion density (Fig. 2) and the strongest correlations."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qcgate.science.results import TABLE_GROUPS, AnalysisResult


def plot_density(result: AnalysisResult, path: Path) -> None:
    """Fig. 2: histogram and KDE of DSC Lesion, each reader's Dice vs the reference, the global mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.stats import gaussian_kde

    y = result.table.dsc_lesion
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    ax.hist(y, bins=40, range=(0, 1), density=True, alpha=0.35, color="tab:blue", label="histogram")
    if len(y) > 2 and np.std(y) > 0:
        grid = np.linspace(0, 1, 201)
        ax.plot(grid, gaussian_kde(y)(grid), color="tab:blue", label="DSC Lesion (averaged)")
        for i, (reader, scores) in enumerate(sorted(result.individual.items())):
            if len(scores) > 2 and np.std(scores) > 0:
                ax.plot(grid, gaussian_kde(scores)(grid), linewidth=0.9, linestyle=":",
                        color=plt.get_cmap("Dark2")(i), label=f"{reader} vs reference")
    ax.axvline(float(y.mean()), color="tab:red", linestyle="--", label=f"mean {y.mean():.2f} (global threshold)")
    tag = " — SYNTHETIC data" if result.synthetic else ""
    ax.set_title(f"DSC Lesion per slice, {result.cohort_name}{tag} (n={len(y)})", fontsize=9)
    ax.set_xlabel("DSC Lesion")
    ax.set_ylabel("density")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_correlations(result: AnalysisResult, path: Path, top: int = 20) -> None:
    """Bar chart of the ``top`` features with the largest |Pearson r| with DSC Lesion, coloured by group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    defined = [c for c in result.correlations if c.r is not None]
    strongest = sorted(defined, key=lambda c: -abs(c.r))[:top][::-1]  # type: ignore[arg-type]
    colours = {g: plt.get_cmap("tab10")(i) for i, g in enumerate(TABLE_GROUPS)}
    fig, ax = plt.subplots(figsize=(7, 0.28 * max(len(strongest), 4) + 1.2), dpi=120)
    ax.barh([c.feature for c in strongest], [c.r for c in strongest],  # type: ignore[misc]
            color=[colours.get(c.group, "grey") for c in strongest])
    ax.axvline(0, color="black", linewidth=0.6)
    ax.set_xlim(-1, 1)
    ax.set_xlabel("Pearson r with DSC Lesion")
    tag = " — SYNTHETIC data" if result.synthetic else ""
    ax.set_title(f"Strongest correlations, {result.cohort_name}{tag}", fontsize=9)
    ax.tick_params(axis="y", labelsize=6)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[g]) for g in TABLE_GROUPS if g in result.table.groups]
    ax.legend(handles, [g for g in TABLE_GROUPS if g in result.table.groups], fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
