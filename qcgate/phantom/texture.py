"""Realistic lung parenchyma texture, borrowed from the real chest CTs in pyradiomics' test cases.

``../shared/data/pyradiomics-testcases/lung{1,2}_image.nrrd`` (relative to the repository root) are
real chest CT volumes in HU. From their lung regions we cut small patches of the *high-pass residual*
(the image minus its local mean): the fine vessels-and-septa texture of real lung, without its
large-scale anatomy. The generator quilts these patches over its synthetic lungs. When the files are
not there (an installed package without the repository), a procedural fallback (band-passed Gaussian
noise with a similar spectrum) keeps the generator working; the cohort manifest records which source
was used.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage

log = logging.getLogger(__name__)

PATCH = 24
STEP = PATCH // 2
REAL_CASES = ("lung1_image.nrrd", "lung2_image.nrrd")


def testcases_dir() -> Path:
    """``../shared/data/pyradiomics-testcases`` relative to the repository root."""
    return Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "pyradiomics-testcases"


@lru_cache(maxsize=1)
def real_lung_patches() -> np.ndarray | None:
    """(n, PATCH, PATCH) float32 residual patches fully inside real lung, or None if unavailable.

    Residual = HU − gaussian_filter(HU, 3 px), clipped to ±250 HU so vessels stay plausible. Patches
    are taken on a fixed grid (deterministic), every 4th slice, where the eroded lung mask
    (−1000 < HU < −500 after a 2-px median) covers the whole patch.
    """
    try:
        import SimpleITK as sitk
    except ImportError:  # pragma: no cover - SimpleITK is a dependency
        return None
    patches = []
    for name in REAL_CASES:
        path = testcases_dir() / name
        if not path.is_file():
            log.info("lung texture: %s not found, using the procedural fallback", path)
            return None
        volume = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float32)
        for k in range(2, volume.shape[0] - 2, 4):
            hu = volume[k]
            lung = ndimage.median_filter((hu > -1000) & (hu < -500), size=5)
            lung = ndimage.binary_erosion(lung, iterations=4)
            residual = np.clip(hu - ndimage.gaussian_filter(hu, 3.0), -250, 250)
            coverage = ndimage.uniform_filter(lung.astype(np.float32), PATCH)
            half = PATCH // 2
            for r in range(half, hu.shape[0] - half, PATCH):
                for c in range(half, hu.shape[1] - half, PATCH):
                    if coverage[r, c] > 0.999:
                        patches.append(residual[r - half : r + half, c - half : c + half])
    if len(patches) < 20:
        return None
    return np.stack(patches).astype(np.float32)


def lung_texture(shape: tuple[int, int], rng: np.random.Generator, zoom: float = 1.0) -> tuple[np.ndarray, str]:
    """A (rows, cols) zero-mean texture field in HU, and its source ("real-ct" or "procedural").

    Real patches are blended with overlapping Hann windows (step PATCH/2), so no seams show. ``zoom``
    = real pixel size / synthetic pixel size (≈ 0.6 mm / 1.3 mm): the field is quilted on a grid
    ``1/zoom`` times larger and resampled, so structures keep their physical size.
    """
    patches = real_lung_patches()
    rows, cols = shape
    if patches is None:
        field = ndimage.gaussian_filter(rng.normal(0.0, 1.0, shape), 0.8) - ndimage.gaussian_filter(
            rng.normal(0.0, 1.0, shape), 3.0
        )
        return (field / (field.std() + 1e-9) * 35.0).astype(np.float32), "procedural"
    out_rows, out_cols = rows, cols
    # Quilt at the real pixel size, then resample to the synthetic grid.
    rows, cols = int(np.ceil(rows / zoom)), int(np.ceil(cols / zoom))
    window_1d = np.hanning(PATCH + 2)[1:-1]
    window = np.outer(window_1d, window_1d).astype(np.float32)
    padded_rows, padded_cols = rows + 2 * PATCH, cols + 2 * PATCH
    accumulated = np.zeros((padded_rows, padded_cols), np.float32)
    weights = np.full((padded_rows, padded_cols), 1e-6, np.float32)
    for r in range(0, padded_rows - PATCH + 1, STEP):
        for c in range(0, padded_cols - PATCH + 1, STEP):
            patch = patches[rng.integers(len(patches))]
            patch = np.rot90(patch, rng.integers(4))
            accumulated[r : r + PATCH, c : c + PATCH] += patch * window
            weights[r : r + PATCH, c : c + PATCH] += window
    # Overlap-add averages neighbouring patches, which lowers the variance: restore it.
    field = accumulated / weights
    field = field[PATCH : PATCH + rows, PATCH : PATCH + cols]
    if (rows, cols) != (out_rows, out_cols):
        field = ndimage.zoom(field, (out_rows / rows, out_cols / cols), order=1)[:out_rows, :out_cols]
    target_sd = float(np.std(patches))
    field = (field - field.mean()) / (field.std() + 1e-9) * target_sd
    return field.astype(np.float32), "real-ct"
