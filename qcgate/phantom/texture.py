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
def rotated_bank() -> np.ndarray | None:
    """The real patches in all four 90° rotations: (4n, PATCH, PATCH), or None if unavailable."""
    patches = real_lung_patches()
    if patches is None:
        return None
    return np.ascontiguousarray(np.concatenate([np.rot90(patches, k, axes=(1, 2)) for k in range(4)]))


@lru_cache(maxsize=1)
def real_lung_patches() -> np.ndarray | None:
    """(n, PATCH, PATCH) float32 residual patches fully inside real lung, or None if unavailable.

    Residual = HU − gaussian_filter(HU, 3 px), clipped to ±250 HU so vessels stay plausible. Patches
    are taken on a fixed grid (deterministic), every 4th slice, where the eroded lung mask
    (−1000 < HU < −500, closed by 3 px so small vessels stay in, eroded by 4 px) covers the whole
    patch and the patch's mean HU lies in [-950, -650] (aerated parenchyma, not outside air).
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
            # closing keeps small vessels inside the lung (they are part of its texture)
            lung = ndimage.binary_closing((hu > -1000) & (hu < -500), iterations=3)
            lung = ndimage.binary_erosion(lung, iterations=4)
            residual = np.clip(hu - ndimage.gaussian_filter(hu, 3.0), -250, 250)
            coverage = ndimage.uniform_filter(lung.astype(np.float32), PATCH)
            # parenchyma only: outside air (about -1000 HU) and the trachea fall outside this band
            patch_mean = ndimage.uniform_filter(hu, PATCH)
            coverage[(patch_mean < -950) | (patch_mean > -650)] = 0.0
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
    bank = rotated_bank() * window  # every patch in its 4 rotations, pre-windowed
    tiles_r, tiles_c = rows // PATCH + 3, cols // PATCH + 3
    padded_rows, padded_cols = tiles_r * PATCH + STEP, tiles_c * PATCH + STEP
    accumulated = np.zeros((padded_rows, padded_cols), np.float32)
    weights = np.full((padded_rows, padded_cols), 1e-6, np.float32)
    # Four interleaved, non-overlapping tile grids (offsets 0 or PATCH/2 in each axis) = overlap-add
    # at step PATCH/2, placed with one reshape each instead of a Python loop over tiles.
    for dr in (0, STEP):
        for dc in (0, STEP):
            chosen = bank[rng.integers(len(bank), size=tiles_r * tiles_c)]
            mosaic = chosen.reshape(tiles_r, tiles_c, PATCH, PATCH).transpose(0, 2, 1, 3)
            mosaic = mosaic.reshape(tiles_r * PATCH, tiles_c * PATCH)
            accumulated[dr : dr + tiles_r * PATCH, dc : dc + tiles_c * PATCH] += mosaic
            weights[dr : dr + tiles_r * PATCH, dc : dc + tiles_c * PATCH] += np.tile(window, (tiles_r, tiles_c))
    # Overlap-add averages neighbouring patches, which lowers the variance: restore the real
    # patches' SD at their own pixel size, then resample (a coarser pixel averages, as a scanner does).
    field = accumulated / weights
    field = field[PATCH : PATCH + rows, PATCH : PATCH + cols]
    field = (field - field.mean()) / (field.std() + 1e-9) * float(np.std(patches))
    if (rows, cols) != (out_rows, out_cols):
        if zoom < 1.0:  # anti-alias: a synthetic pixel integrates about 1/zoom real pixels
            field = ndimage.gaussian_filter(field, 0.4 / zoom)
        field = ndimage.zoom(field, (out_rows / rows, out_cols / cols), order=1)[:out_rows, :out_cols]
    return field.astype(np.float32), "real-ct"
