"""Tiny SYNTHETIC cohorts and models for the predictor tests (seconds, not minutes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qcgate.cohort.model import Case, Cohort
from qcgate.predictors.resnet import ResNetConfig

SIZE = 48


def _disk(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    rows, cols = np.indices(shape)
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius ** 2


def make_tiny_cohort(*, patients: int = 8, slices: int = 3, seed: int = 0, members: int = 2,
                     with_image: bool = True) -> Cohort:
    """SYNTHETIC: disks of varying radius, three readers whose outlines move by about a pixel (so
    small lesions get a low DSC Lesion: a learnable signal), AI members with a smooth probability."""
    rng = np.random.default_rng(seed)
    cases = []
    for p in range(patients):
        radius = rng.uniform(2.0, 11.0, size=slices)
        images, readers, probabilities = [], {"R1": [], "R2": [], "R3": []}, []
        for k in range(slices):
            centre = (SIZE / 2 + rng.uniform(-5, 5), SIZE / 2 + rng.uniform(-5, 5))
            lesion = _disk((SIZE, SIZE), centre, radius[k])
            image = -850 + 900 * lesion + rng.normal(0, 30, (SIZE, SIZE))
            images.append(image.astype(np.float32))
            for reader in readers:
                jitter = rng.uniform(-1.5, 1.5)
                shift = (centre[0] + rng.uniform(-1, 1), centre[1] + rng.uniform(-1, 1))
                readers[reader].append(_disk((SIZE, SIZE), shift, max(0.8, radius[k] + jitter)))
            rows, cols = np.indices((SIZE, SIZE))
            distance = np.sqrt((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2)
            members_maps = [1 / (1 + np.exp((distance - radius[k] - rng.uniform(-1, 1)) / 0.8)) for _ in range(members)]
            probabilities.append(np.stack(members_maps))
        case_id = f"TINY-{seed}-{p:02d}"
        cases.append(Case(
            case_id=case_id, patient_id=case_id, pixel_spacing=(0.8, 0.8),
            reader_masks={r: np.stack(m) for r, m in readers.items()},
            image_hu=np.stack(images) if with_image else None,
            ai_probabilities=np.stack(probabilities, axis=1).astype(np.float32) if members else None,
            synthetic=True, source=f"tiny(seed={seed}, patient={p})",
        ))
    return Cohort(name=f"tiny-synthetic-{seed}", cases=cases, synthetic=True, source="tests")


def tiny_resnet_config(seed: int = 0) -> ResNetConfig:
    return ResNetConfig(crop_size=32, stem_width=4, stage_widths=(2, 2, 4, 4), expansion=2, epochs=2,
                        batch_size=8, seed=seed, threads=1)


@pytest.fixture(scope="session")
def tiny_cohort() -> Cohort:
    return make_tiny_cohort()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_cohort: Cohort) -> Path:
    """A trained ensemble (Ridge + ResNet, with and without UM) on the tiny cohort."""
    from qcgate.predictors.training import train_model

    out = tmp_path_factory.mktemp("models") / "tiny-ensemble"
    train_model(tiny_cohort, "ensemble", out, n_folds=2, resnet_config=tiny_resnet_config(), repeats=3)
    return out
