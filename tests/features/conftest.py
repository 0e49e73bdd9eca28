"""Fixtures for the feature-library tests: the real pyradiomics test cases (lung1, lung2) and phantoms."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

# Named once (pydicom habit); relative to the repository root, never an absolute path.
PYRADIOMICS_CASES = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "pyradiomics-testcases"
BASELINE_DIR = PYRADIOMICS_CASES / "baseline"
LUNG_CASES = ("lung1", "lung2")


@dataclass(frozen=True)
class CtCase:
    """A CT volume in HU with its lesion label, numpy (z, row, col) order, spacing in the same order (mm)."""

    name: str
    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]

    def largest_slice(self) -> int:
        return int(np.argmax(self.label.reshape(self.label.shape[0], -1).sum(axis=1)))


@lru_cache(maxsize=None)
def load_case(name: str) -> CtCase:
    image_path = PYRADIOMICS_CASES / f"{name}_image.nrrd"
    label_path = PYRADIOMICS_CASES / f"{name}_label.nrrd"
    if not image_path.exists():
        pytest.skip(f"shared test data missing: {image_path}")
    image = sitk.ReadImage(str(image_path))
    label = sitk.ReadImage(str(label_path))
    spacing = tuple(float(s) for s in reversed(image.GetSpacing()))
    return CtCase(
        name=name,
        image=sitk.GetArrayFromImage(image),
        label=sitk.GetArrayFromImage(label),
        spacing=spacing,  # type: ignore[arg-type]
    )


def disc(shape: tuple[int, int], center: tuple[float, float], radius: float) -> np.ndarray:
    """Digital disc: pixels whose centre lies within ``radius`` of ``center``."""
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    return (rows - center[0]) ** 2 + (cols - center[1]) ** 2 <= radius**2


def ellipse(shape: tuple[int, int], center: tuple[float, float], semi_axes: tuple[float, float]) -> np.ndarray:
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    return ((rows - center[0]) / semi_axes[0]) ** 2 + ((cols - center[1]) / semi_axes[1]) ** 2 <= 1.0


@dataclass(frozen=True)
class ChestPhantom:
    image: np.ndarray  # HU
    body: np.ndarray
    lungs: np.ndarray  # the two lung ellipses (lesion included: it lies inside the right lung)
    lesion: np.ndarray


def chest_phantom(seed: int = 0, noise_hu: float = 20.0) -> ChestPhantom:
    """Air (−1000 HU) around a body ellipse (40 HU) holding two lung ellipses (−850 HU) and a lesion (30 HU)."""
    shape = (256, 256)
    rng = np.random.default_rng(seed)
    body = ellipse(shape, (128, 128), (90, 118))
    left = ellipse(shape, (120, 80), (55, 32))
    right = ellipse(shape, (120, 176), (55, 32))
    lesion = disc(shape, (110, 170), 9)
    image = np.full(shape, -1000.0)
    image[body] = 40.0
    image[left | right] = -850.0
    image[lesion] = 30.0
    image += rng.normal(0.0, noise_hu, shape)
    return ChestPhantom(image=image, body=body, lungs=left | right, lesion=lesion)


@pytest.fixture(scope="session")
def phantom() -> ChestPhantom:
    return chest_phantom()
