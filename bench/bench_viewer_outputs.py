"""Benchmark: what the viewer-visible outputs (issue 10) add to a QC job: the Secondary Capture series
and the Encapsulated PDF, for a case with N lesion slices (default 100) on a 512² CT.

Data: a SYNTHETIC 512² CT series (body, lungs, a lesion per slice, noise; qcgate phantom export) with
N lesion slices, each with an AI mask (a disc) and an uncertainty map, as ``write_case_outputs``
receives them. Timed, as the worker runs them (``pipeline.write_secondary_capture`` and
``pipeline.write_pdf``): build + save of every SC instance; the PDF render (fpdf2) + encapsulation +
save. The τ/q plot is shared with the HTML report, which the job writes anyway, so it is timed apart
("plot, shared"). "cold" is the first job of a worker process (imports, fonts); "warm" the median of
the next ``--repeats`` jobs. One core: BLAS threads limited to 1.

Run: .venv/bin/python bench/bench_viewer_outputs.py [--slices 100] [--repeats 3]
"""

from __future__ import annotations

import os

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402


def _case(n_slices: int, size: int, out_dir: Path):  # type: ignore[no-untyped-def]
    from qcgate.core.results import CaseResult, SliceResult, Verdict, slice_verdict
    from qcgate.phantom.dicom_export import write_ct_series

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    body = ((yy - 0.5) / 0.42) ** 2 + ((xx - 0.5) / 0.48) ** 2 < 1
    lungs = (((yy - 0.5) / 0.3) ** 2 + ((xx - 0.3) / 0.14) ** 2 < 1) | (((yy - 0.5) / 0.3) ** 2 + ((xx - 0.7) / 0.14) ** 2 < 1)
    plane = np.where(body, 40.0, -1000.0)
    plane[lungs] = -850.0
    volume = np.repeat(plane[None], n_slices, axis=0) + rng.normal(0, 20, (n_slices, size, size))
    masks = []
    for k in range(n_slices):
        radius = 8 + 6 * np.sin(k / 7)
        mask = ((yy * size - size * 0.45) ** 2 + (xx * size - size * 0.3) ** 2) <= radius**2
        volume[k][mask] = 20.0
        masks.append(mask)
    datasets = write_ct_series(volume.astype(np.int16), (0.7, 0.7), 1.25, out_dir, patient_id="SYNTH-BENCH",
                               deterministic_key="bench-viewer")
    hu = volume.astype(np.float32)
    slices = []
    for k, ds in enumerate(datasets):
        tau, q = 0.6 + 0.2 * np.sin(k / 5), float(np.clip(0.7 + 0.2 * np.cos(k / 3), 0, 1))
        um = np.where(masks[k], rng.uniform(0.0, 0.3, (size, size)), 0.0).astype(np.float32)
        slices.append(SliceResult(
            source_image=ds, slice_index=k, ai_mask=masks[k], tau=tau, q=q, margin=0.05,
            verdict=slice_verdict(tau, q, 0.05), lesion_area_mm2=float(masks[k].sum() * 0.49),
            key_features={"imaging.fourier_snr": 1.2, "geometry.area": 123.0, "border.sharpness": 0.4},
            uncertainty_map=um,
        ))
    verdicts = [s.verdict for s in slices]
    series = Verdict.REJECT if Verdict.REJECT in verdicts else Verdict.REVIEW if Verdict.REVIEW in verdicts else Verdict.ACCEPT
    result = CaseResult(ct_datasets=datasets, slices=slices, series_verdict=series, series_policy="strict",
                        model_name="phantom-full", model_version="1", q_source="ensemble-agreement", n_members=3,
                        uses_uncertainty=True)
    return result, hu


def _job(result, hu, out_dir: Path) -> dict[str, float]:  # type: ignore[no-untyped-def]
    from qcgate.report.content import tau_q_plot_png
    from qcgate.report.pdf import render_case_pdf
    from qcgate.writers.common import prepare_derivation_sources, save_dataset
    from qcgate.writers.pdf import build_qc_pdf
    from qcgate.writers.sc import build_qc_sc_series, sc_file_name

    sources = prepare_derivation_sources(result)
    times: dict[str, float] = {}
    start = time.perf_counter()
    plot = tau_q_plot_png(result)
    times["plot, shared"] = time.perf_counter() - start
    start = time.perf_counter()
    series = build_qc_sc_series(result, hu, sources=sources, model_synthetic=True)
    times["sc build"] = time.perf_counter() - start
    start = time.perf_counter()
    for sc in series:
        save_dataset(sc, out_dir / "sc" / sc_file_name(int(sc.InstanceNumber)))
    times["sc save"] = time.perf_counter() - start
    start = time.perf_counter()
    document = render_case_pdf(result, hu, model_synthetic=True, plot_png=plot)
    times["pdf render"] = time.perf_counter() - start
    start = time.perf_counter()
    save_dataset(build_qc_pdf(result, document, sources=sources, model_synthetic=True), out_dir / "qc-report-pdf.dcm")
    times["pdf encapsulate+save"] = time.perf_counter() - start
    times["SC + PDF (added)"] = sum(v for k, v in times.items() if k != "plot, shared")
    times["sc bytes"] = sum((out_dir / "sc" / sc_file_name(int(sc.InstanceNumber))).stat().st_size for sc in series)
    times["pdf bytes"] = len(document)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result, hu = _case(args.slices, args.size, Path(tmp) / "ct")
        cold = _job(result, hu, Path(tmp) / "cold")
        warm = [_job(result, hu, Path(tmp) / f"warm{k}") for k in range(args.repeats)]
    print(f"{args.slices} lesion slices, {args.size}² CT; seconds (bytes for sizes)")
    print(f"{'stage':<24}{'cold':>10}{'warm (median)':>16}")
    for key in cold:
        median = statistics.median(w[key] for w in warm)
        if key.endswith("bytes"):
            print(f"{key:<24}{cold[key] / 1e6:>9.1f}M{median / 1e6:>15.1f}M")
        else:
            print(f"{key:<24}{cold[key]:>10.3f}{median:>16.3f}")


if __name__ == "__main__":
    main()
