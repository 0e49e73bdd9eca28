"""pyradiomics configuration and wrapper: first-order and texture classes (GLCM, GLRLM, GLSZM, GLDM,
NGTDM), and shape2D, on a 2-D region.

The feature formulas are pyradiomics' own (see each class's docstrings, e.g.
``radiomics.glcm.RadiomicsGLCM.getContrastFeatureValue``: Contrast = Σ_i Σ_j (i − j)² p(i, j)).
Configuration (:data:`RADIOMICS_SETTINGS`) — the upstream baseline's settings, chosen for CT:
- ``binWidth = 25`` HU: fixed-width bins keep grey levels comparable across slices
  (discretised X_b = ⌊X / 25⌋ − ⌊min X / 25⌋ + 1) and keep matrices small (cost);
- ``voxelArrayShift = 2000``: first-order energies use (X + 2000)², positive for HU ≥ −1024;
- ``force2D = True`` (axis 0), ``distances = [1]``, GLCM symmetrical, no weighting, ``gldm_a = 0``.

How it runs (cost): the region is cropped to its box, discretised once, and first order plus the five
texture classes are computed by :mod:`qcgate.features.radiomics_numpy` — pyradiomics' C matrix code
with vectorised feature formulas, equal to the pyradiomics classes (tests) and to the upstream baselines.
shape2D (and the reference path :func:`pyradiomics_class_values`) runs the pyradiomics classes on a
one-slice 3-D volume: pyradiomics' ``force2D`` on a *2-D* image drops the row axis and builds 1-D
(horizontal-only) texture matrices.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from functools import lru_cache
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
from qcgate.features.radiomics_numpy import (
    discretise,
    firstorder_features,
    glcm_features,
    glcm_matrix,
    gldm_features,
    glrlm_features,
    glszm_features,
    ngtdm_features,
    present_levels,
)

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


#: Classes we compute with the vectorised equivalents of :mod:`qcgate.features.radiomics_numpy`.
NUMPY_CLASSES: tuple[str, ...] = ("firstorder", "glcm", "glrlm", "glszm", "gldm", "ngtdm")


def numpy_class_values(
    image_array: np.ndarray,
    mask_array: np.ndarray,
    voxel_volume: float,
    classes: Sequence[str],
    settings: Mapping[str, Any] = RADIOMICS_SETTINGS,
) -> dict[str, float]:
    """First-order and texture-class features from arrays (3-D, (z, y, x)), equal to pyradiomics' classes
    (grey levels discretised once per region, each texture matrix built once by pyradiomics' C code)."""
    values: dict[str, float] = {}
    wanted = [c for c in classes if c in NUMPY_CLASSES]
    if not wanted:
        return values
    mask_array = np.asarray(mask_array, dtype=bool)
    binned = discretise(image_array, mask_array, float(settings["binWidth"]))
    levels = present_levels(binned, mask_array) if mask_array.any() else None  # shared by every class
    with np.errstate(all="ignore"):
        if "firstorder" in wanted:
            first = firstorder_features(
                image_array[mask_array], binned[mask_array], voxel_volume, float(settings.get("voxelArrayShift", 0))
            )
            values.update({f"firstorder_{k}": v for k, v in first.items()})
        if "glcm" in wanted:
            p, glcm_levels, ng = glcm_matrix(
                binned,
                mask_array,
                tuple(settings.get("distances", [1])),
                bool(settings.get("force2D", False)),
                int(settings.get("force2Ddimension", 0)),
                levels,
            )
            values.update({f"glcm_{k}": v for k, v in glcm_features(p, glcm_levels, ng).items()})
        force2d = bool(settings.get("force2D", False))
        dimension = int(settings.get("force2Ddimension", 0))
        distances = tuple(settings.get("distances", [1]))
        if "glrlm" in wanted:
            run = glrlm_features(binned, mask_array, force2d, dimension, levels)
            values.update({f"glrlm_{k}": v for k, v in run.items()})
        if "glszm" in wanted:
            zone = glszm_features(binned, mask_array, force2d, dimension, levels)
            values.update({f"glszm_{k}": v for k, v in zone.items()})
        if "gldm" in wanted:
            dependence = gldm_features(binned, mask_array, distances, settings.get("gldm_a", 0), force2d, dimension, levels)
            values.update({f"gldm_{k}": v for k, v in dependence.items()})
        if "ngtdm" in wanted:
            neighbourhood = ngtdm_features(binned, mask_array, distances, force2d, dimension, levels)
            values.update({f"ngtdm_{k}": v for k, v in neighbourhood.items()})
    return values


def pyradiomics_class_values(
    image: sitk.Image,
    mask: sitk.Image,
    classes: Sequence[str],
    settings: Mapping[str, Any] = RADIOMICS_SETTINGS,
) -> dict[str, float]:
    """Run the pyradiomics classes themselves: ``{f"{class}_{feature}": value}``."""
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


def run_feature_classes(
    image: sitk.Image,
    mask: sitk.Image,
    classes: Sequence[str],
    settings: Mapping[str, Any] = RADIOMICS_SETTINGS,
) -> dict[str, float]:
    """Our configured extraction on SimpleITK ``image``/``mask`` (label 1): ``{f"{class}_{feature}": value}``.

    First order and the five texture classes go through :func:`numpy_class_values`, the rest (shape2D)
    through pyradiomics. Works on 2-D images and on 3-D volumes (``force2D`` then builds in-plane
    matrices), which is how the upstream baselines are reproduced.
    """
    image_array = sitk.GetArrayFromImage(image).astype(np.float64)
    mask_array = sitk.GetArrayFromImage(mask) == int(settings.get("label", 1))
    if image_array.ndim == 2:
        image_array, mask_array = image_array[None], mask_array[None]
    voxel_volume = float(np.prod(image.GetSpacing()))
    values = numpy_class_values(image_array, mask_array, voxel_volume, classes, settings)
    others = [c for c in classes if c not in NUMPY_CLASSES]
    if others:
        values.update(pyradiomics_class_values(image, mask, others, settings))
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
    crop_mask = np.asarray(region[box], dtype=bool)
    try:
        values = numpy_class_values(
            crop[None], crop_mask[None], float(pixel_spacing[0]) * float(pixel_spacing[1]), classes, settings
        )
        others = [c for c in classes if c not in NUMPY_CLASSES]
        if others:
            # A one-slice 3-D volume, as in the upstream baselines: on a 2-D image, force2D with axis 0 would
            # drop the row axis and build 1-D (horizontal-only) matrices.
            image_itk = to_sitk(crop[None], (1.0, *pixel_spacing))
            mask_itk = to_sitk(crop_mask[None].astype(np.uint8), (1.0, *pixel_spacing))
            values.update(pyradiomics_class_values(image_itk, mask_itk, others, settings))
    except (ValueError, IndexError, ZeroDivisionError):
        # pyradiomics raises on degenerate ROIs (e.g. a single pixel for shape2D): treat as undefined.
        return {name: math.nan for name in names}
    return {name: values.get(name, math.nan) for name in names}
