"""Our pyradiomics configuration reproduces the upstream baselines on the real lung1/lung2 CT cases.

Baseline columns (see UPSTREAM-README.md and each CSV's diagnostics_Configuration_Settings):
- texture classes: ``{case}_2d`` — force2D=True, binWidth 25 (default), distances [1], no resampling,
  computed on the whole 3-slice (lung1) / 11-slice (lung2) lesion volume with in-plane matrices;
- firstorder: ``{case}`` — binWidth 25, voxelArrayShift 2000 (our CT setting);
- shape2D: ``{case}_shape2D`` — a single slice of the label (the one with the diagnostics' VoxelNum).
All non-deprecated features of every class are compared, with a relative tolerance of 1e-6.
"""

from __future__ import annotations

import ast
import csv
from functools import lru_cache

import numpy as np
import pytest

from qcgate.features.radiomics_features import (
    RADIOMICS_SETTINGS,
    class_feature_names,
    run_feature_classes,
    to_sitk,
)
from tests.features.conftest import BASELINE_DIR, LUNG_CASES, load_case

CLASSES = ("firstorder", "glcm", "glrlm", "glszm", "gldm", "ngtdm", "shape2D")
RELATIVE_TOLERANCE = 1e-6


@lru_cache(maxsize=None)
def baseline_column(class_name: str, column: str) -> dict[str, str]:
    path = BASELINE_DIR / f"baseline_{class_name}.csv"
    if not path.exists():
        pytest.skip(f"baseline missing: {path}")
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    index = rows[0].index(column)
    return {row[0]: row[index] for row in rows[1:]}


def baseline_column_name(case: str, class_name: str) -> str:
    if class_name == "firstorder":
        return case
    if class_name == "shape2D":
        return f"{case}_shape2D"
    return f"{case}_2d"


def bounding_box_nd(mask: np.ndarray, pad: int) -> tuple[slice, ...]:
    coords = np.nonzero(mask)
    return tuple(
        slice(max(int(c.min()) - pad, 0), min(int(c.max()) + 1 + pad, size)) for c, size in zip(coords, mask.shape)
    )


def our_values(case: str, class_name: str, baseline: dict[str, str]) -> dict[str, float]:
    ct = load_case(case)
    label = ct.label == int(RADIOMICS_SETTINGS["label"])
    if class_name == "shape2D":
        # The baseline used one slice: find the one whose voxel count the diagnostics record.
        voxel_count = int(baseline["diagnostics_Mask-original_VoxelNum"])
        counts = label.reshape(label.shape[0], -1).sum(axis=1)
        matches = np.flatnonzero(counts == voxel_count)
        assert matches.size >= 1, f"no slice of {case} has {voxel_count} label voxels"
        z = int(matches[0])
        image, mask, spacing = ct.image[z], label[z], ct.spacing[1:]
    else:
        image, mask, spacing = ct.image, label, ct.spacing
    box = bounding_box_nd(mask, pad=1)  # pyradiomics only pairs voxels inside the mask: the crop changes nothing
    image_itk = to_sitk(np.asarray(image[box], dtype=np.float64), spacing)
    mask_itk = to_sitk(mask[box].astype(np.uint8), spacing)
    return run_feature_classes(image_itk, mask_itk, [class_name], RADIOMICS_SETTINGS)


@pytest.mark.parametrize("class_name", CLASSES)
@pytest.mark.parametrize("case", LUNG_CASES)
def test_configuration_reproduces_upstream_baseline(case: str, class_name: str) -> None:
    baseline = baseline_column(class_name, baseline_column_name(case, class_name))
    settings = ast.literal_eval(baseline["diagnostics_Configuration_Settings"])
    # Guard the premise: the baseline's settings that matter agree with ours.
    assert settings.get("binWidth", 25) == RADIOMICS_SETTINGS["binWidth"]
    assert settings.get("distances", [1]) == RADIOMICS_SETTINGS["distances"]
    assert settings.get("resampledPixelSpacing") is None
    if class_name != "firstorder":
        assert settings["force2D"] is True
    else:
        assert settings["voxelArrayShift"] == RADIOMICS_SETTINGS["voxelArrayShift"]

    ours = our_values(case, class_name, baseline)
    compared = 0
    for feature in class_feature_names(class_name):
        key = f"original_{class_name}_{feature}"
        if key not in baseline or baseline[key] == "":
            continue  # a feature added upstream after this baseline was written
        expected = float(baseline[key])
        actual = ours[f"{class_name}_{feature}"]
        assert actual == pytest.approx(expected, rel=RELATIVE_TOLERANCE, abs=1e-9), f"{case} {class_name} {feature}"
        compared += 1
    # Most of the class must be covered, or the test would pass vacuously.
    assert compared >= max(len(class_feature_names(class_name)) - 2, 1), compared
