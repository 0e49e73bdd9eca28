"""Profile the job's SR stage on a SYNTHETIC 300-slice CT (headers only) with 100 lesion slices.

SYNTHETIC data: generated CT headers, disk lesions, seeded τ, q and UM statistics.

As in the job's ``write_sr`` stage: ``build_qc_sr`` with prepared derivation sources, then
``save_dataset`` (the pydicom file write), each slice carrying the nine UM statistics of the job.

    .venv/bin/python bench/profile_sr.py [--slices 300] [--lesion-slices 100] [--repeats 3] [--profile]
        [--dump out.dcm] [--reference ../other-checkout]

``--reference``: run the same measurement, in the same invocation and alternating (reference first
in each repeat), with the other checkout's code and its own ``.venv/bin/python``; medians of both.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
#: The job's UM statistics (qcgate.features.uncertainty), so each group has as many items as in the job.
UM_STATISTICS = ("um_mean", "um_std", "um_entropy", "um_p50", "um_p90", "um_p99",
                 "um_frac_gt_0p1", "um_frac_gt_0p2", "um_frac_gt_0p3")


def make_result(slices: int, lesion: int):
    """A SYNTHETIC CaseResult: a disk lesion on ``lesion`` consecutive slices, τ and q seeded, the
    job's nine UM statistics, two members (no pytest needed: a reference checkout has no test extras)."""
    import highdicom as hd
    import pydicom

    from qcgate.core.results import CaseResult, SliceResult, Verdict, slice_verdict
    from qcgate.phantom.dicom_export import write_ct_series

    with tempfile.TemporaryDirectory() as tmp:
        write_ct_series(np.zeros((slices, 512, 512), np.int16), (0.7, 0.7), 1.0, Path(tmp), patient_id="PROFSR", deterministic_key="profsr")
        datasets = hd.spatial.sort_datasets([pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(Path(tmp).glob("*.dcm"))])
    first = (slices - lesion) // 2
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:512, 0:512]
    items = []
    for k in range(first, first + lesion):
        tau, q = float(rng.uniform(0.4, 0.8)), float(rng.uniform(0.3, 0.9))
        radius = 8 + (k - first) % 20
        mask = (yy - 200) ** 2 + (xx - 180 - (k - first)) ** 2 <= radius**2
        items.append(SliceResult(
            source_image=datasets[k], slice_index=k, ai_mask=mask, tau=tau, q=q, margin=0.05,
            verdict=slice_verdict(tau, q, 0.05), lesion_area_mm2=float(mask.sum() * 0.49),
            uncertainty={name: float(rng.uniform(0.0, 1.0)) for name in UM_STATISTICS},
        ))
    verdicts = [item.verdict for item in items]
    series = Verdict.REJECT if Verdict.REJECT in verdicts else Verdict.REVIEW if Verdict.REVIEW in verdicts else Verdict.ACCEPT
    return CaseResult(
        ct_datasets=datasets, slices=items, series_verdict=series,
        series_policy="reject if any slice is rejected, review if any is for review, else accept",
        model_name="phantom-full", model_version="1.2.0", q_source="ensemble-agreement", n_members=2,
        uses_uncertainty=True, notes=["SYNTHETIC profile case"],
    )


def measure_once(result, sources, out_dir: Path) -> tuple[float, float]:
    """(build seconds, write seconds) of one SR, as the job's write_sr stage does it."""
    from qcgate.writers.common import save_dataset
    from qcgate.writers.sr import build_qc_sr

    start = time.perf_counter()
    sr = build_qc_sr(result, sources=sources, series_instance_uid="1.2.3", sop_instance_uid="1.2.3.4")
    built = time.perf_counter()
    save_dataset(sr, out_dir / "qc-sr.dcm")
    return built - start, time.perf_counter() - built


def worker_main(args: argparse.Namespace) -> None:
    """Measure in this process with the checkout at ``args.repo``; one JSON line per repeat on stdout."""
    sys.path.insert(0, str(Path(args.repo).resolve()))
    from qcgate.writers.common import prepare_derivation_sources

    result = make_result(args.slices, args.lesion_slices)
    sources = prepare_derivation_sources(result)
    with tempfile.TemporaryDirectory() as tmp:
        if args.profile:
            from qcgate.writers.common import save_dataset
            from qcgate.writers.sr import build_qc_sr

            measure_once(result, sources, Path(tmp))  # warm highdicom's tables, as in a warm worker
            profile = cProfile.Profile()
            profile.enable()
            sr = build_qc_sr(result, sources=sources)
            save_dataset(sr, Path(tmp) / "qc-sr.dcm")
            profile.disable()
            pstats.Stats(profile, stream=sys.stderr).sort_stats("cumulative").print_stats(40)
            pstats.Stats(profile, stream=sys.stderr).sort_stats("tottime").print_stats(30)
            return
        measure_once(result, sources, Path(tmp))  # the first build loads highdicom's tables: not counted
        for _ in range(args.repeats_here):
            build_s, write_s = measure_once(result, sources, Path(tmp))
            print(json.dumps({"build": build_s, "write": write_s}), flush=True)
        if args.dump:
            from qcgate.writers.sr import build_qc_sr

            build_qc_sr(result, sources=sources, series_instance_uid="1.2.3", sop_instance_uid="1.2.3.4").save_as(
                args.dump, enforce_file_format=True)


def _run_checkout(checkout: Path, args: argparse.Namespace) -> list[dict[str, float]]:
    python = checkout / ".venv" / "bin" / "python"
    command = [str(python if python.exists() else sys.executable), str(Path(__file__).resolve()), "--worker",
               "--repo", str(checkout), "--slices", str(args.slices), "--lesion-slices", str(args.lesion_slices),
               "--repeats-here", "1"]
    env = dict(os.environ, PYTHONPATH=str(checkout))
    done = subprocess.run(command, check=True, capture_output=True, text=True, env=env, cwd=checkout)
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def _summary(label: str, runs: list[dict[str, float]]) -> str:
    def fmt(key: str) -> str:
        values = [run[key] for run in runs]
        return f"{key} median {statistics.median(values):.3f} s (" + ", ".join(f"{v:.3f}" for v in values) + ")"
    totals = [{"total": run["build"] + run["write"]} for run in runs]
    total_values = [t["total"] for t in totals]
    return (f"{label}: {fmt('build')}; {fmt('write')}; build+write median {statistics.median(total_values):.3f} s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--lesion-slices", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--dump")
    parser.add_argument("--reference", help="another checkout (with its own .venv) to measure alternately")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--repo", default=str(REPO), help=argparse.SUPPRESS)
    parser.add_argument("--repeats-here", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker or args.profile or args.dump or args.reference is None:
        args.repeats_here = args.repeats if args.repeats_here is None else args.repeats_here
        if args.reference is None and not args.worker and not args.profile:
            # one process per checkout, as with a reference (a fresh interpreter, warmed once)
            runs = [run for _ in range(args.repeats) for run in _run_checkout(REPO, args)]
            print(f"SR stage, {args.slices} slices / {args.lesion_slices} lesion, {len(UM_STATISTICS)} UM statistics")
            print(_summary("this checkout", runs))
            return
        worker_main(args)
        return
    reference = Path(args.reference).resolve()
    mine: list[dict[str, float]] = []
    theirs: list[dict[str, float]] = []
    for _ in range(args.repeats):
        theirs.extend(_run_checkout(reference, args))
        mine.extend(_run_checkout(REPO, args))
    print(f"SR stage, {args.slices} slices / {args.lesion_slices} lesion, {len(UM_STATISTICS)} UM statistics; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(_summary(f"reference {args.reference}", theirs))
    print(_summary("this checkout", mine))


if __name__ == "__main__":
    main()
