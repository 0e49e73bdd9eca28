"""pyradiomics wrapper: first-order and texture classes (GLCM, GLRLM, GLSZM, GLDM, NGTDM) and shape2D
on a 2-D region.

The feature formulas are pyradiomics' own (see each class's docstrings, e.g.
``radiomics.glcm.RadiomicsGLCM.getContrastFeatureValue``: Contrast = Σ_i Σ_j (i − j)² p(i, j)).
Configuration (:data:`RADIOMICS_SETTINGS`) — the upstream baseline's settings, chosen for CT:
- ``binWidth = 25`` HU: fixed-width bins keep grey levels comparable across slices
  (discretised X_b = ⌊X / 25⌋ − ⌊min X / 25⌋ + 1) and keep matrices small (cost);
- ``voxelArrayShift = 2000``: first-order energies use (X + 2000)², positive for HU ≥ −1024;
- ``force2D = True`` (axis 0), ``distances = [1]``, GLCM symmetrical, no weighting, ``gldm_a = 0``.

We call the feature classes directly on pre-cropped SimpleITK images instead of going through
``RadiomicsFeatureExtractor``: same maths, none of the extractor's per-call image checks, hashing and
diagnostics (cost). Each class computes its texture matrix once, in its constructor.
"""

from __future__ import annotations

import logging
import math
import warnings
from functools import lru_cache
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import SimpleITK as sitk
from radiomics.firstorder import RadiomicsFirstOrder
from radiomics.glcm import RadiomicsGLCM
from radiomics.gldm import RadiomicsGLDM
from radiomics.glrlm import RadiomicsGLRLM
from radiomics.glszm import RadiomicsGLSZM
from radiomics.ngtdm import RadiomicsNGTDM
from radiomics.shape2D import RadiomicsShape2D

from qcgate.features.intensity import bounding_box

# pyradiomics logs every class construction at INFO/DEBUG; a daemon does not want that per slice.
logging.getLogger("radiomics").setLevel(logging.ERROR)

RADIOMICS_SETTINGS: Mapping[str, Any] = {
    "binWidth": 25.0,
    "voxelArrayShift": 2000,
    "force2D": True,
    "force2Ddimension": 0,
    "distances": [1],
    "symmetricalGLCM": True,
    "weightingNorm": None,
    "gldm_a": 0,
    "label": 1,
}

FEATURE_CLASSES: Mapping[str, type] = {
    "firstorder": RadiomicsFirstOrder,
    "glcm": RadiomicsGLCM,
    "glrlm": RadiomicsGLRLM,
    "glszm": RadiomicsGLSZM,
    "gldm": RadiomicsGLDM,
    "ngtdm": RadiomicsNGTDM,
    "shape2D": RadiomicsShape2D,
}
TEXTURE_CLASSES: tuple[str, ...] = ("glcm", "glrlm", "glszm", "gldm", "ngtdm")


@lru_cache(maxsize=None)
def class_feature_names(class_name: str) -> tuple[str, ...]:
    """The non-deprecated features of a pyradiomics class, sorted (a stable order for our vectors)."""
    names = FEATURE_CLASSES[class_name].getFeatureNames()
    return tuple(sorted(name for name, deprecated in names.items() if not deprecated))


def radiomics_descriptor_names(classes: Sequence[str]) -> tuple[str, ...]:
    """Our descriptor names ``f"{class}_{feature}"`` for ``classes``, in class then feature order."""
    return _descriptor_names(tuple(classes))


@lru_cache(maxsize=None)
def _descriptor_names(classes: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(f"{cls}_{name}" for cls in classes for name in class_feature_names(cls))


def to_sitk(array: np.ndarray, pixel_spacing: tuple[float, ...]) -> sitk.Image:
    """A SimpleITK image of a 2-D or 3-D numpy array; ``pixel_spacing`` in numpy axis order (mm)."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in reversed(pixel_spacing)))  # SimpleITK is (x, y[, z])
    return image


def run_feature_classes(
    image: sitk.Image,
    mask: sitk.Image,
    classes: Sequence[str],
    settings: Mapping[str, Any] = RADIOMICS_SETTINGS,
) -> dict[str, float]:
    """Run pyradiomics classes on SimpleITK ``image``/``mask`` (label 1): ``{f"{class}_{feature}": value}``.

    Works on 2-D images and on 3-D volumes (``force2D`` then builds in-plane matrices slice by slice),
    which is how the upstream baselines are reproduced.
    """
    values: dict[str, float] = {}
    # Degenerate ROIs make pyradiomics average empty slices; the nan it returns is handled by the caller.
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        for class_name in classes:
            feature_class = FEATURE_CLASSES[class_name](image, mask, **dict(settings))
            feature_class.enableAllFeatures()
            for name, value in feature_class.execute().items():
                values[f"{class_name}_{name}"] = float(np.asarray(value).reshape(-1)[0])
    return values


def radiomics_descriptors(
    image: np.ndarray,
    region: np.ndarray,
    pixel_spacing: tuple[float, float],
    classes: Sequence[str],
    settings: Mapping[str, Any] = RADIOMICS_SETTINGS,
) -> dict[str, float]:
    """pyradiomics features of ``image`` over the 2-D ``region`` (nan for all when the region is empty).

    The image is cropped to the region's bounding box plus 1 pixel first: pyradiomics only pairs and
    neighbours pixels inside the mask, so the crop changes no value and bounds the cost.
    """
    names = radiomics_descriptor_names(classes)
    box = bounding_box(np.asarray(region, dtype=bool), pad=1)
    if box is None:
        return {name: math.nan for name in names}
    crop = np.asarray(image[box], dtype=np.float64)
    crop_mask = np.asarray(region[box], dtype=np.uint8)
    image_itk = to_sitk(crop, pixel_spacing)
    mask_itk = to_sitk(crop_mask, pixel_spacing)
    try:
        values = run_feature_classes(image_itk, mask_itk, classes, settings)
    except (ValueError, IndexError, ZeroDivisionError):
        # pyradiomics raises on degenerate ROIs (e.g. a single pixel for shape2D): treat as undefined.
        return {name: math.nan for name in names}
    return {name: values.get(name, math.nan) for name in names}
