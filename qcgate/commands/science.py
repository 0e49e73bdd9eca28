"""Sub-commands `qcgate analyze` and `qcgate phantom`."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

from qcgate.commands.common import positive_int
from qcgate.errors import InputError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `analyze` and `phantom` to the qcgate command line."""
    analyze = subparsers.add_parser(
        "analyze",
        help="which input properties explain the experts' disagreement (Table 2, Fig. 2)",
        description="Per-feature Pearson r with DSC Lesion, a Ridge per feature group under "
        "patient-grouped cross-validation against the global-mean baseline, the DSC Lesion density plot "
        "and a correlation plot. COHORT is a qcgate cohort directory (cohort.json) or an LIDC-layout "
        "directory (lidc_meta.json + lidc_masks_packed.npz).",
    )
    analyze.add_argument("cohort", type=Path, metavar="COHORT")
    analyze.add_argument("--out", type=Path, required=True, help="output directory (created)")
    analyze.add_argument("--folds", type=int, default=10,
                         help="outer patient-grouped folds (default 10; 0 = leave-one-patient-out)")
    analyze.add_argument("--workers", type=positive_int, default=None,
                         help="worker processes (default: every core)")
    analyze.add_argument("--max-patients", type=positive_int, default=None,
                         help="analyse only the first N patients (sorted ids), for quick runs")
    analyze.add_argument("--feature-mask", choices=("reference", "ai"), default="reference",
                         help="mask the features describe: the reference reader's (default) or the AI ensemble's")
    analyze.add_argument("--min-readers", type=positive_int, default=1,
                         help="analyse only slices on which at least N readers drew (default 1: every lesion slice)")
    analyze.add_argument("--skip-bad-cases", action="store_true",
                         help="skip unreadable case files with a warning instead of stopping")
    analyze.add_argument("--quiet", action="store_true", help="no progress lines")
    analyze.set_defaults(handler=run_analyze)

    phantom = subparsers.add_parser(
        "phantom",
        help="generate a SYNTHETIC multi-reader chest-CT cohort",
        description="Write a deterministic SYNTHETIC cohort (qcgate cohort format) of chest CT slices "
        "with lesions, four simulated readers (R1A reference, R1B its repeat, R2, R3) and a simulated AI "
        "ensemble. Every file is labelled synthetic.",
    )
    phantom.add_argument("--patients", type=positive_int, default=30)
    phantom.add_argument("--seed", type=int, default=0)
    phantom.add_argument("--out", type=Path, required=True)
    phantom.add_argument("--members", type=int, default=2, help="AI ensemble members (>= 2)")
    phantom.add_argument("--dicom", action="store_true",
                         help="also write each case as DICOM: a CT series, one SEG per reader and per AI member")
    phantom.add_argument("--workers", type=positive_int, default=None)
    phantom.set_defaults(handler=run_phantom)

    importer = subparsers.add_parser(
        "import-cohort",
        help="convert a site's DICOM (CT + SEG per reader) or NIfTI cases into a qcgate cohort",
        description="SITE holds one directory per case: ct/*.dcm + seg_reader_<ID>.dcm [+ seg_ai_<name>.dcm] "
        "(DICOM) or image.nii.gz + reader_<ID>.nii.gz [+ ai_<name>.nii.gz, lung.nii.gz] (NIfTI). "
        "See docs/COHORT_FORMAT.md.",
    )
    importer.add_argument("site", type=Path, metavar="SITE")
    importer.add_argument("--format", choices=("dicom", "nifti"), required=True, dest="fmt")
    importer.add_argument("--out", type=Path, required=True)
    importer.add_argument("--reference", default=None, help="reader id of the reference reader")
    importer.add_argument("--repeat", default=None, help="reader id of the reference reader's repeat")
    importer.add_argument("--skip-bad-cases", action="store_true")
    importer.set_defaults(handler=run_import)


def run_analyze(args: argparse.Namespace) -> int:
    from qcgate.cohort import load_cohort
    from qcgate.science.analysis import run_analysis

    if args.folds < 0 or args.folds == 1:
        raise InputError(f"--folds must be 0 (leave-one-patient-out) or at least 2, got {args.folds}")
    cohort = load_cohort(args.cohort, max_patients=args.max_patients, skip_bad_cases=args.skip_bad_cases)
    command = "qcgate analyze " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 2 else ""
    run_analysis(cohort, args.out, n_folds=None if args.folds == 0 else args.folds, workers=args.workers,
                 feature_mask=args.feature_mask, progress=not args.quiet, command=command,
                 min_readers=args.min_readers)
    return 0


def run_phantom(args: argparse.Namespace) -> int:
    from qcgate.phantom.generator import PhantomConfig, write_phantom

    out: Path = args.out
    if out.exists() and any(out.iterdir()):
        raise InputError(f"{out}: output directory exists and is not empty")
    started = time.monotonic()
    config = PhantomConfig(patients=args.patients, seed=args.seed, members=args.members)
    cohort = write_phantom(config, out, dicom=args.dicom, workers=args.workers or os.cpu_count())
    slices = sum(case.n_slices for case in cohort.cases)
    print(f"SYNTHETIC cohort: {len(cohort)} patients, {slices} slices, seed {args.seed} -> {out} "
          f"({time.monotonic() - started:.1f} s)")
    return 0


def run_import(args: argparse.Namespace) -> int:
    from qcgate.cohort.importers import import_site
    from qcgate.cohort.store import write_cohort

    cohort = import_site(args.site, args.fmt, reference_reader=args.reference, repeat_reader=args.repeat,
                         skip_bad_cases=args.skip_bad_cases)
    write_cohort(cohort, args.out, description=f"imported from {args.site} ({args.fmt})")
    slices = sum(case.n_slices for case in cohort.cases)
    print(f"imported {len(cohort)} cases ({len(cohort.patients)} patients, {slices} lesion slices) -> {args.out}"
          + (f"; skipped {len(cohort.skipped)}" if cohort.skipped else ""))
    return 0
