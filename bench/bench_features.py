"""Benchmark: qcgate.features (all groups + UM metrics) against plain pyradiomics, per lesion slice.

Data: the real lung1/lung2 chest CT volumes (HU) and their one-reader lesion labels from
../shared/data/pyradiomics-testcases (read with SimpleITK); every slice with lesion pixels is one sample.
The uncertainty map is SYNTHETIC (no AI ensemble exists for these cases): σ(x) = 0.25·exp(−d(x)²/8) + 0.02·|N(0,1)|,
d the distance (px) to the lesion boundary. The position map is fitted on the same lesions (fit cost
not timed).

Per slice, in the same process and interleaved (the machine is noisy):
- ours: ``extract_slice_features(full 512² slice, lesion, spacing, uncertainty_map=..., position_map=...)``
  — imaging/texture/border/geometry/uncertainty, lung mask computed from HU;
- pyradiomics: ``RadiomicsFeatureExtractor`` with force2D, all of firstorder, glcm, glrlm, glszm, gldm,
  ngtdm and shape2D, on the lesion crop (its bounding box + the extractor's own padDistance of 5 px,
  as a one-slice volume so that force2D gives in-plane 2-D matrices) — its cheapest input. A secondary
  figure gives pyradiomics the whole 512² slice and lets it crop itself (its usual call);
  with the same binWidth (25) and voxelArrayShift (2000).
Each is run ``--repeats`` times per slice; we report medians over the per-slice medians, of wall time
and of the thread's CPU time (less sensitive to other processes on a shared machine). One core:
BLAS/OpenMP threads are limited to 1 and the process is pinned to one CPU.

Run: .venv/bin/python bench/bench_features.py [--repeats 7]
"""

from __future__ import annotations

import os

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
    os.environ.setdefault(_variable, "1")

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qcgate.features import PositionFrequencyMap, extract_slice_features  # noqa: E402
from qcgate.features.radiomics_features import RADIOMICS_SETTINGS  # noqa: E402

CASES_DIR = REPO / ".." / "shared" / "data" / "pyradiomics-testcases"
PYRADIOMICS_CLASSES = ("firstorder", "glcm", "glrlm", "glszm", "gldm", "ngtdm", "shape2D")
PAD_DISTANCE = 5


def load_slices() -> list[tuple[str, np.ndarray, np.ndarray, tuple[float, float]]]:
    slices = []
    for case in ("lung1", "lung2"):
        image = sitk.ReadImage(str(CASES_DIR / f"{case}_image.nrrd"))
        label = sitk.ReadImage(str(CASES_DIR / f"{case}_label.nrrd"))
        spacing = tuple(float(s) for s in reversed(image.GetSpacing()))[1:]
        volume = sitk.GetArrayFromImage(image).astype(np.float64)
        labels = sitk.GetArrayFromImage(label) > 0
        for z in np.flatnonzero(labels.reshape(labels.shape[0], -1).any(axis=1)):
            slices.append((f"{case}[{z}]", volume[z], labels[z], spacing))  # type: ignore[arg-type]
    return slices


def synthetic_uncertainty(lesion: np.ndarray, seed: int) -> np.ndarray:
    """SYNTHETIC ensemble std map: high along the lesion boundary, low elsewhere."""
    inside = ndimage.distance_transform_edt(lesion)
    outside = ndimage.distance_transform_edt(~lesion)
    distance = np.where(lesion, inside, outside)
    noise = np.abs(np.random.default_rng(seed).normal(0.0, 0.02, lesion.shape))
    return 0.25 * np.exp(-(distance**2) / 8.0) + noise


def pyradiomics_extractor():
    from radiomics import featureextractor

    logging.getLogger("radiomics").setLevel(logging.ERROR)
    extractor = featureextractor.RadiomicsFeatureExtractor(
        force2D=True,
        binWidth=RADIOMICS_SETTINGS["binWidth"],
        voxelArrayShift=RADIOMICS_SETTINGS["voxelArrayShift"],
        padDistance=PAD_DISTANCE,
    )
    extractor.disableAllFeatures()
    for class_name in PYRADIOMICS_CLASSES:
        extractor.enableFeatureClassByName(class_name)
    return extractor


def lesion_crop_images(image: np.ndarray, lesion: np.ndarray, spacing: tuple[float, float]) -> tuple[sitk.Image, sitk.Image]:
    rows = np.flatnonzero(lesion.any(axis=1))
    cols = np.flatnonzero(lesion.any(axis=0))
    box = (
        slice(max(rows[0] - PAD_DISTANCE, 0), rows[-1] + 1 + PAD_DISTANCE),
        slice(max(cols[0] - PAD_DISTANCE, 0), cols[-1] + 1 + PAD_DISTANCE),
    )
    # One-slice volumes: pyradiomics' force2D on a 2-D image would drop the row axis (1-D matrices).
    image_itk = sitk.GetImageFromArray(image[box][None])
    mask_itk = sitk.GetImageFromArray(lesion[box][None].astype(np.uint8))
    for item in (image_itk, mask_itk):
        item.SetSpacing((spacing[1], spacing[0], 1.0))
    return image_itk, mask_itk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

    slices = load_slices()
    position_map = PositionFrequencyMap.fit([(lesion, None) for _, _, lesion, _ in slices])
    extractor = pyradiomics_extractor()
    ours_ms: list[float] = []
    theirs_ms: list[float] = []
    ours_cpu: list[float] = []
    theirs_cpu: list[float] = []
    full_slice_ms: list[float] = []

    def timed(call) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.thread_time()
        call()
        return (time.perf_counter() - wall) * 1e3, (time.thread_time() - cpu) * 1e3

    print(
        f"{'slice':>12} {'area_px':>8} {'ours_ms':>8} {'pyrad_ms':>9} {'ratio':>6} {'ours_cpu':>9} {'pyrad_cpu':>10}"
        f" {'pyrad_full_ms':>14}"
    )
    for index, (name, image, lesion, spacing) in enumerate(slices):
        um = synthetic_uncertainty(lesion, index)
        image_itk, mask_itk = lesion_crop_images(image, lesion, spacing)
        # Secondary reference: pyradiomics handed the whole slice, cropping it itself (its usual call).
        full_image_itk = sitk.GetImageFromArray(image[None])
        full_mask_itk = sitk.GetImageFromArray(lesion[None].astype(np.uint8))
        for item in (full_image_itk, full_mask_itk):
            item.SetSpacing((spacing[1], spacing[0], 1.0))

        def ours() -> None:
            extract_slice_features(image, lesion, spacing, uncertainty_map=um, position_map=position_map)

        def theirs() -> None:
            extractor.execute(image_itk, mask_itk)

        def theirs_full_slice() -> None:
            extractor.execute(full_image_itk, full_mask_itk)

        ours(), theirs(), theirs_full_slice()  # warm-up (imports, caches) outside the timing
        runs_ours, runs_theirs, runs_full = [], [], []
        for _ in range(args.repeats):
            runs_ours.append(timed(ours))
            runs_theirs.append(timed(theirs))
            runs_full.append(timed(theirs_full_slice))
        full_slice_ms.append(statistics.median(w for w, _ in runs_full))
        ours_ms.append(statistics.median(w for w, _ in runs_ours))
        theirs_ms.append(statistics.median(w for w, _ in runs_theirs))
        ours_cpu.append(statistics.median(c for _, c in runs_ours))
        theirs_cpu.append(statistics.median(c for _, c in runs_theirs))
        print(
            f"{name:>12} {int(lesion.sum()):>8} {ours_ms[-1]:>8.1f} {theirs_ms[-1]:>9.1f} {ours_ms[-1] / theirs_ms[-1]:>6.2f}"
            f" {ours_cpu[-1]:>9.1f} {theirs_cpu[-1]:>10.1f} {full_slice_ms[-1]:>14.1f}"
        )
    print(f"slices: {len(slices)}, repeats per slice: {args.repeats}, one core")
    for label, mine, reference in (("wall", ours_ms, theirs_ms), ("cpu", ours_cpu, theirs_cpu)):
        ratios = [o / t for o, t in zip(mine, reference)]
        print(
            f"{label}: median ours {statistics.median(mine):.1f} ms/slice (max {max(mine):.1f}); "
            f"median pyradiomics (all 7 classes) {statistics.median(reference):.1f} ms/slice; "
            f"ratio of medians {statistics.median(mine) / statistics.median(reference):.2f}; "
            f"median per-slice ratio {statistics.median(ratios):.2f}"
        )
    full_median = statistics.median(full_slice_ms)
    print(
        f"secondary: pyradiomics given the whole 512² slice: median {full_median:.1f} ms/slice; "
        f"ratio ours/that {statistics.median(ours_ms) / full_median:.2f}"
    )

if __name__ == "__main__":
    main()
