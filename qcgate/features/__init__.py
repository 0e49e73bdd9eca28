"""Per-slice difficulty descriptors (DESIGN §1, paper Table 1).

Five groups, each a :class:`FeatureVector` with a stable, ordered list of names:

- ``imaging``: the healthy-lung crop near the lesion (:func:`regions.healthy_lung_region`);
- ``texture``: the lesion crop;
- ``border``: inner ring / outer ring ratio of every image descriptor (:func:`regions.border_rings`);
- ``geometry``: the binary mask only (the one group for mask-only cohorts such as LIDC);
- ``uncertainty``: metrics of the ensemble's pixel-wise std map (:mod:`uncertainty`).

Image-group descriptors: energy of gradient, variance of Laplacian, Fourier SNR (:mod:`intensity`),
db2 wavelet descriptors (:mod:`wavelets`) and pyradiomics features (:mod:`radiomics_features`, computed
by the equivalent vectorised :mod:`radiomics_numpy`). To bound cost the full set of texture classes runs
on the lesion only; the healthy-lung crop and the two rings use first order + GLCM (run-length and zone
matrices of a 2-pixel ring or a vessel-riddled lung crop repeat what GLCM says).

Modules: vector (FeatureVector), geometry, intensity, wavelets, radiomics_features + radiomics_numpy,
regions, lung, position (PositionFrequencyMap), uncertainty.

Every value is finite: an undefined descriptor gets a documented fallback and its name in ``flags``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from qcgate.features.geometry import GEOMETRY_DESCRIPTORS, geometry_features
from qcgate.features.intensity import INTENSITY_DESCRIPTORS, bounding_box, intensity_descriptors
from qcgate.features.lung import lung_mask_from_hu
from qcgate.features.position import PositionFrequencyMap
from qcgate.features.radiomics_features import radiomics_descriptor_names, radiomics_descriptors
from qcgate.features.regions import border_rings, healthy_lung_region, lesion_region, safe_ratio
from qcgate.features.uncertainty import UNCERTAINTY_DESCRIPTORS, ensemble_mean_and_std, uncertainty_features
from qcgate.features.vector import FeatureVector, build_vector, qualified_names
from qcgate.features.wavelets import WAVELET_DESCRIPTORS, image_region_wavelet_descriptors

__all__ = [
    "ALL_GROUPS",
    "IMAGE_GROUPS",
    "FeatureVector",
    "PositionFrequencyMap",
    "ensemble_mean_and_std",
    "extract_slice_features",
    "feature_names",
    "group_descriptors",
    "lung_mask_from_hu",
]

ALL_GROUPS: tuple[str, ...] = ("imaging", "texture", "border", "geometry", "uncertainty")
IMAGE_GROUPS: tuple[str, ...] = ("imaging", "texture", "border")

#: pyradiomics classes per image group (see the module docstring for why they differ).
GROUP_RADIOMICS_CLASSES: Mapping[str, tuple[str, ...]] = {
    "imaging": ("firstorder", "glcm"),
    "texture": ("firstorder", "glcm", "glrlm", "glszm", "gldm", "ngtdm"),
    "border": ("firstorder", "glcm"),
}


def group_descriptors(group: str) -> tuple[str, ...]:
    """Bare descriptor names of ``group`` in their fixed order."""
    if group in IMAGE_GROUPS:
        return (
            *INTENSITY_DESCRIPTORS,
            *WAVELET_DESCRIPTORS,
            *radiomics_descriptor_names(GROUP_RADIOMICS_CLASSES[group]),
        )
    if group == "geometry":
        return GEOMETRY_DESCRIPTORS
    if group == "uncertainty":
        return UNCERTAINTY_DESCRIPTORS
    raise ValueError(f"unknown feature group {group!r}; known: {ALL_GROUPS}")


def _checked_groups(groups: Sequence[str]) -> tuple[str, ...]:
    if isinstance(groups, str):  # a bare "texture" would otherwise iterate letters
        groups = (groups,)
    unknown = [g for g in groups if g not in ALL_GROUPS]
    if unknown:
        raise ValueError(f"unknown feature groups {unknown}; known: {ALL_GROUPS}")
    # ALL_GROUPS order, duplicates removed: the order models see never depends on how groups were listed.
    return tuple(g for g in ALL_GROUPS if g in groups)


def feature_names(groups: Sequence[str] = ALL_GROUPS, *, with_image: bool = True) -> tuple[str, ...]:
    """The stable ordered list of qualified names that :func:`extract_slice_features` produces for
    ``groups`` (image groups left out when ``with_image`` is False), concatenated in ALL_GROUPS order."""
    names: list[str] = []
    for group in _checked_groups(groups):
        if group in IMAGE_GROUPS and not with_image:
            continue
        names.extend(qualified_names(group, group_descriptors(group)))
    return tuple(names)


def _image_region_descriptors(
    image: np.ndarray, region: np.ndarray, pixel_spacing: tuple[float, float], group: str
) -> dict[str, float]:
    # Crop once to the region's box + 1 px (every descriptor below is translation-invariant and looks at
    # most one pixel beyond the region), instead of each one rescanning the 512² frame (cost).
    box = bounding_box(region, pad=1)
    if box is not None:
        image, region = image[box], region[box]
    values = intensity_descriptors(image, region)
    values.update(image_region_wavelet_descriptors(image, region))
    values.update(radiomics_descriptors(image, region, pixel_spacing, GROUP_RADIOMICS_CLASSES[group]))
    return values


def _border_vector(image: np.ndarray, lesion: np.ndarray, pixel_spacing: tuple[float, float]) -> FeatureVector:
    """border.d = d(inner ring) / d(outer ring), fallback 1 + flag where undefined (:func:`regions.safe_ratio`)."""
    inner, outer = border_rings(lesion)
    inner_values = _image_region_descriptors(image, inner, pixel_spacing, "border")
    outer_values = _image_region_descriptors(image, outer, pixel_spacing, "border")
    ratios: dict[str, float] = {}
    fell_back: list[str] = []
    for descriptor in group_descriptors("border"):
        ratio, is_fallback = safe_ratio(
            inner_values.get(descriptor, math.nan), outer_values.get(descriptor, math.nan)
        )
        ratios[descriptor] = ratio
        if is_fallback:
            fell_back.append(descriptor)
    return build_vector("border", group_descriptors("border"), ratios, extra_flags=fell_back)


def extract_slice_features(
    image_hu: np.ndarray | None,
    lesion_mask: np.ndarray,
    pixel_spacing: tuple[float, float],
    *,
    lung_mask: np.ndarray | None = None,
    uncertainty_map: np.ndarray | None = None,
    position_map: PositionFrequencyMap | None = None,
    frame_shape: tuple[int, int] | None = None,
    offset: tuple[int, int] = (0, 0),
    groups: Sequence[str] = ALL_GROUPS,
) -> dict[str, FeatureVector]:
    """Descriptors of one lesion slice, one :class:`FeatureVector` per computed group (ALL_GROUPS order).

    ``image_hu``, ``lung_mask`` and ``uncertainty_map`` share ``lesion_mask``'s shape; ``frame_shape`` and
    ``offset`` (row, col) place that crop in the full frame (used for positional orthodoxy only).
    Image groups are skipped when ``image_hu`` is None, ``uncertainty`` when ``uncertainty_map`` is None.
    Orthodoxy uses the position map's own reference: the lung mask (given, or computed from HU) for a
    lung-fitted map, the frame for a frame-fitted one (:class:`PositionFrequencyMap`).
    """
    selected = _checked_groups(groups)
    lesion = np.asarray(lesion_mask, dtype=bool)
    if lesion.ndim != 2:
        raise ValueError(f"lesion mask must be 2-D, got shape {lesion.shape}")
    image = None if image_hu is None else np.asarray(image_hu)
    if image is not None and image.dtype.kind not in "iuf":
        image = image.astype(np.float64)
    # Integer HU (as read from DICOM) stay integer here: only the small crops are converted to float64.
    if image is not None and image.shape != lesion.shape:
        raise ValueError(f"image {image.shape} and lesion mask {lesion.shape} differ in shape")
    if lung_mask is not None:
        lung_mask = np.asarray(lung_mask, dtype=bool)
        if lung_mask.shape != lesion.shape:
            raise ValueError(f"lung mask {lung_mask.shape} and lesion mask {lesion.shape} differ in shape")
    needs_lung = image is not None and (
        "imaging" in selected
        or ("geometry" in selected and position_map is not None and position_map.reference == "lung")
    )
    if lung_mask is None and needs_lung:
        assert image is not None
        lung_mask = lung_mask_from_hu(image)

    results: dict[str, FeatureVector] = {}
    for group in selected:
        if group in IMAGE_GROUPS:
            if image is None:
                continue
            if group == "border":
                results[group] = _border_vector(image, lesion, pixel_spacing)
                continue
            if group == "imaging":
                assert lung_mask is not None
                region = healthy_lung_region(lesion, lung_mask)
            else:
                region = lesion_region(lesion)
            values = _image_region_descriptors(image, region, pixel_spacing, group)
            results[group] = build_vector(group, group_descriptors(group), values)
        elif group == "geometry":
            orthodoxy = None
            if position_map is not None:
                value = position_map.orthodoxy(lesion, lung_mask, frame_shape=frame_shape, offset=offset)
                orthodoxy = value if math.isfinite(value) else None
            results[group] = geometry_features(lesion, pixel_spacing, orthodoxy)
        elif group == "uncertainty":
            if uncertainty_map is None:
                continue
            results[group] = uncertainty_features(uncertainty_map, lesion)
    return results
