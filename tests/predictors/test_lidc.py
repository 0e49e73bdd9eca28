"""The real LIDC development split: the shipped model's headline figure is reproducible (about 40 s)."""

from __future__ import annotations

from pathlib import Path

import pytest

LIDC = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "lidc"  # ../shared, relative to the repository root


@pytest.mark.slow
@pytest.mark.skipif(not LIDC.exists(), reason="needs ../shared/data/lidc")
def test_lidc_ridge_beats_the_global_threshold_by_the_documented_margin() -> None:
    from qcgate.cohort import load_cohort
    from qcgate.predictors.dataset import build_rows
    from qcgate.predictors.evaluation import GLOBAL, RIDGE, cross_validated_table3

    rows = build_rows(load_cohort(LIDC), workers=1)
    table = cross_validated_table3(rows, kind="ridge", n_folds=10, repeats=3)
    ratio = table.errors[RIDGE].mae / table.errors[GLOBAL].mae
    assert ratio <= 0.70  # docs/PREDICTORS.md: 0.667 (goal <= 0.70)
    assert table.simulation[RIDGE].bad_rejected_pct > table.simulation[GLOBAL].bad_rejected_pct + 10
    assert set(table.patients) and len(table.truth) > 9000
