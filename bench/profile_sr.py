"""Profile build_qc_sr on a SYNTHETIC 300-slice CT (headers only) with 100 lesion slices.

    .venv/bin/python bench/profile_sr.py [--slices 300] [--lesion-slices 100] [--profile] [--dump out.dcm]
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_result(slices: int, lesion: int):
    import pydicom
    from qcgate.phantom.dicom_export import write_ct_series
    from tests.writers.conftest import build_case

    with tempfile.TemporaryDirectory() as tmp:
        write_ct_series(np.zeros((slices, 512, 512), np.int16), (0.7, 0.7), 1.0, Path(tmp), patient_id="PROFSR", deterministic_key="profsr")
        datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(Path(tmp).glob("*.dcm"))]
    first = (slices - lesion) // 2
    rng = np.random.default_rng(1)
    lesions = [(k, float(rng.uniform(0.4, 0.8)), float(rng.uniform(0.3, 0.9))) for k in range(first, first + lesion)]
    return build_case(datasets, lesions, n_members=2).result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--lesion-slices", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--dump")
    args = parser.parse_args()
    from qcgate.writers.common import prepare_derivation_sources
    from qcgate.writers.sr import build_qc_sr

    result = make_result(args.slices, args.lesion_slices)
    sources = prepare_derivation_sources(result)
    if args.profile:
        profile = cProfile.Profile()
        profile.enable()
        build_qc_sr(result, sources=sources)
        profile.disable()
        pstats.Stats(profile).sort_stats("cumulative").print_stats(40)
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)
        return
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        sr = build_qc_sr(result, sources=sources, series_instance_uid="1.2.3", sop_instance_uid="1.2.3.4")
        times.append(time.perf_counter() - start)
    print(f"build_qc_sr {args.slices} slices / {args.lesion_slices} lesion: " + ", ".join(f"{t:.3f}" for t in times) + " s")
    if args.dump:
        sr.save_as(args.dump, enforce_file_format=True)


if __name__ == "__main__":
    main()
