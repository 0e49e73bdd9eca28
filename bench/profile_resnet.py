"""Time the ResNet forward of the job's thresholds stage: 100 SYNTHETIC lesion crops (seeded noise)
through the ``phantom-full`` model's ResNets, per slice, in chunks of the worker's ASSESS_CHUNK, and
in one batch, on one and on two torch threads (the predictor's own thread setting bypassed).

    .venv/bin/python bench/profile_resnet.py [--crops 100] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--crops", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="phantom-full")
    args = parser.parse_args()
    import torch

    from qcgate.pipeline.worker import ASSESS_CHUNK
    from qcgate.predictors import load_named_model, resnet

    model = load_named_model(args.model)
    for component in ("resnet", "resnet_uncertainty"):
        predictor = getattr(model, component, None)
        if predictor is None:
            continue
        size = predictor.config.crop_size
        crops = np.random.default_rng(0).normal(size=(args.crops, 3, size, size)).astype(np.float32)
        predictor.predict_crops(crops[:2])  # first call: torch's one-time set-up, not counted
        ways = {
            "per slice": lambda p=predictor, c=crops: [p.predict_crops(c[i:i + 1]) for i in range(len(c))],
            f"chunks of {ASSESS_CHUNK}": lambda p=predictor, c=crops: [p.predict_crops(c[i:i + ASSESS_CHUNK])
                                                                       for i in range(0, len(c), ASSESS_CHUNK)],
            "one batch": lambda p=predictor, c=crops: p.predict_crops(c, batch_size=len(c)),
        }
        for threads in (1, 2):
            resnet.INFERENCE_THREADS = threads
            torch.set_num_threads(threads)
            for label, run in ways.items():
                times = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    run()
                    times.append(time.perf_counter() - start)
                print(f"{component} {threads} thread(s) {label}: median {statistics.median(times):.3f} s ("
                      + ", ".join(f"{t:.3f}" for t in times) + ")")


if __name__ == "__main__":
    main()
