"""Benchmark: threshold inference per lesion slice, features excluded, on one core.

Run from the repository root:

    .venv/bin/python bench/bench_predictors.py            # print the figures
    .venv/bin/python bench/bench_predictors.py --write    # and replace the "## Predictors" section of BENCHMARKS.md

What is timed (one BLAS/torch thread): the shipped ``models/phantom-full`` sub-models on a small
SYNTHETIC phantom generated in-process (``qcgate.phantom``):

* Ridge: ``RidgeModel.predict`` on precomputed feature rows (with UM: 6 groups' features);
* ResNet: ``ResNetPredictor.predict_crops`` on precomputed 64×64 crops (with UM: 3 channels);
* ensemble: both, plus the mean;
* the lesion-centred crop itself (``lesion_crop``) separately, since the ResNet needs it;

each at batch size 1 (one slice per call: the gate's worst case) and batched (every slice in one
call), as the median over ``--repeats`` timed passes after a warm-up. Feature extraction is
excluded (see the "## Features" section). Only the "## Predictors" section of BENCHMARKS.md is
touched.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.sections import write_section  # noqa: E402
SECTION = "## Predictors"


def per_slice_ms(function, n_slices: int, repeats: int) -> float:
    """Median over ``repeats`` of (wall time of ``function()``) / n_slices, in ms, after one warm-up."""
    function()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append((time.perf_counter() - started) / n_slices * 1000)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=8, help="SYNTHETIC phantom patients (default 8)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", default="phantom-full")
    parser.add_argument("--write", action="store_true", help="update the Predictors section of BENCHMARKS.md")
    args = parser.parse_args()

    import torch
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    torch.set_num_threads(1)
    from qcgate.phantom.generator import PhantomConfig, generate_cohort
    from qcgate.predictors import load_named_model
    from qcgate.predictors.dataset import table_slice_inputs
    from qcgate.predictors.ensemble import runtime_features
    from qcgate.predictors.resnet import lesion_crop
    from qcgate.science.feature_table import extract_feature_table

    model = load_named_model(args.model)
    cohort = generate_cohort(PhantomConfig(patients=args.patients, seed=123), workers=1)  # SYNTHETIC
    table = extract_feature_table(cohort, groups=["geometry"], workers=1, feature_mask="ai", progress=False)
    slices = table_slice_inputs(cohort, table, "ai")
    n = len(slices)
    load = os.getloadavg()[0]
    ridge, resnet = model.ridge_uncertainty, model.resnet_uncertainty
    features = runtime_features(model, slices, ridge)  # excluded from the timings
    size = resnet.config.crop_size
    crops = np.stack([lesion_crop(s.image_hu, s.ai_probability, s.uncertainty_map, size) for s in slices])

    def one_by_one(function):
        return lambda: [function(i) for i in range(n)]

    timings = {
        "Ridge w. UM": (
            per_slice_ms(one_by_one(lambda i: ridge.predict(features[i:i + 1])), n, args.repeats),
            per_slice_ms(lambda: ridge.predict(features), n, args.repeats),
        ),
        "ResNet w. UM": (
            per_slice_ms(one_by_one(lambda i: resnet.predict_crops(crops[i:i + 1])), n, args.repeats),
            per_slice_ms(lambda: resnet.predict_crops(crops, batch_size=n), n, args.repeats),
        ),
        "Ensemble w. UM (Ridge + ResNet + mean)": (
            per_slice_ms(one_by_one(lambda i: (ridge.predict(features[i:i + 1]) + resnet.predict_crops(crops[i:i + 1])) / 2),
                         n, args.repeats),
            per_slice_ms(lambda: (ridge.predict(features) + resnet.predict_crops(crops, batch_size=n)) / 2, n, args.repeats),
        ),
        "lesion-centred crop (ResNet input)": (
            per_slice_ms(one_by_one(lambda i: lesion_crop(slices[i].image_hu, slices[i].ai_probability,
                                                          slices[i].uncertainty_map, size)), n, args.repeats),
            float("nan"),  # the crop has no batched form
        ),
    }
    ensemble_ms = timings["Ensemble w. UM (Ridge + ResNet + mean)"][0]
    rows = ["| predictor | batch of 1 (ms/slice) | batched, all slices in one call (ms/slice) |", "|---|---|---|"]
    for label, (single, batched) in timings.items():
        rows.append(f"| {label} | {single:.3f} | {'—' if np.isnan(batched) else f'{batched:.3f}'} |")
    verdict = "met" if ensemble_ms < 50 else "NOT met"
    body = "\n".join([
        f"Threshold inference per lesion slice, features excluded, one core (1 torch and BLAS thread), model "
        f"`models/{args.model}` ({model.describe(use_uncertainty=True)}; ResNet {resnet.config.crop_size}×"
        f"{resnet.config.crop_size} crops, 62 layers), on {n} lesion slices of a SYNTHETIC phantom "
        f"(`PhantomConfig(patients={args.patients}, seed=123)`). Median over {args.repeats} passes after a warm-up.",
        "",
        "Command (from the repository root): `.venv/bin/python bench/bench_predictors.py --write`.",
        "",
        f"Machine: {os.cpu_count()} cores ({platform.processor() or platform.machine()}), Python "
        f"{platform.python_version()}, torch {torch.__version__}; shared with other jobs (1-minute load average "
        f"{load:.1f} at the start), so figures are noisy upper bounds.",
        "",
        *rows,
        "",
        f"Goal ResNet + Ridge < 50 ms per slice on one core at batch size 1: {verdict} ({ensemble_ms:.1f} ms).",
    ])
    print(body)
    if args.write:
        write_section(SECTION, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
