"""The public contract of qcgate.features: groups, stable names, finiteness, fallbacks."""

from __future__ import annotations

import numpy as np
import pytest

from qcgate.features import (
    ALL_GROUPS,
    FeatureVector,
    PositionFrequencyMap,
    extract_slice_features,
    feature_names,
    lung_mask_from_hu,
)
from tests.features.conftest import ChestPhantom, disc, load_case

SPACING = (0.7, 0.7)


def concatenated_names(result: dict[str, FeatureVector]) -> tuple[str, ...]:
    return tuple(name for vector in result.values() for name in vector.names)


def test_all_groups_on_the_phantom(phantom: ChestPhantom) -> None:
    um = np.random.default_rng(0).uniform(0.0, 0.3, phantom.image.shape)
    result = extract_slice_features(phantom.image, phantom.lesion, SPACING, uncertainty_map=um)
    assert tuple(result) == ALL_GROUPS
    assert concatenated_names(result) == feature_names()
    for group, vector in result.items():
        assert vector.group == group and vector.values.dtype == np.float64
        assert np.all(np.isfinite(vector.values))
        assert all(name.startswith(f"{group}.") for name in vector.names)
    # Without a position map the orthodoxy is the only fallback of the geometry group.
    assert result["geometry"].flags == ("geometry.positional_orthodoxy",)
    assert result["texture"].flags == () and result["imaging"].flags == ()
    # The lesion (30 HU) is brighter than healthy lung (−850 HU).
    texture, imaging = result["texture"].as_dict(), result["imaging"].as_dict()
    assert texture["texture.firstorder_Mean"] > 0 > -700 > imaging["imaging.firstorder_Mean"]
    # Sharp lesion edge: the inner ring is brighter than the outer ring.
    assert result["border"].as_dict()["border.firstorder_Mean"] != 1.0


def test_names_are_stable_and_ordered() -> None:
    names = feature_names()
    assert names == feature_names() and len(names) == len(set(names))
    assert all(name.count(".") == 1 for name in names)  # "group.descriptor", nothing else
    # Order follows ALL_GROUPS whatever order the groups were requested in.
    assert feature_names(["geometry", "texture"]) == feature_names(["texture", "geometry"])
    mask_only = feature_names(with_image=False)
    assert all(name.split(".")[0] in ("geometry", "uncertainty") for name in mask_only)
    assert feature_names(["geometry"], with_image=False) == feature_names(["geometry"])
    with pytest.raises(ValueError):
        feature_names(["colour"])


def test_mask_only_cohort_gets_geometry_with_frame_orthodoxy() -> None:
    frame = (512, 512)
    lesions = [disc(frame, (200 + k, 150 + k), 6) for k in range(0, 20, 4)]
    position_map = PositionFrequencyMap.fit([(lesion, None) for lesion in lesions])
    crop = disc(frame, (205, 155), 6)[190:220, 140:170]
    result = extract_slice_features(
        None, crop, SPACING, position_map=position_map, frame_shape=frame, offset=(190, 140)
    )
    assert tuple(result) == ("geometry",)  # image groups skipped, no UM given
    assert result["geometry"].flags == ()
    assert result["geometry"].as_dict()["geometry.positional_orthodoxy"] > 0.8
    assert concatenated_names(result) == feature_names(with_image=False, groups=("geometry",))


def test_degenerate_inputs_never_leak_nan(phantom: ChestPhantom) -> None:
    um = np.zeros(phantom.image.shape)
    empty = np.zeros(phantom.image.shape, bool)
    single = empty.copy()
    single[100, 170] = True
    constant = np.full(phantom.image.shape, 40.0)
    for image, lesion in ((phantom.image, empty), (phantom.image, single), (constant, phantom.lesion)):
        result = extract_slice_features(image, lesion, SPACING, uncertainty_map=um)
        assert concatenated_names(result) == feature_names()
        for vector in result.values():
            assert np.all(np.isfinite(vector.values))
    empty_result = extract_slice_features(phantom.image, empty, SPACING)
    assert set(empty_result["texture"].flags) == set(empty_result["texture"].names)
    assert "border.firstorder_Mean" in empty_result["border"].flags


def test_given_lung_mask_and_group_selection(phantom: ChestPhantom) -> None:
    only = extract_slice_features(phantom.image, phantom.lesion, SPACING, lung_mask=phantom.lungs, groups=["imaging"])
    assert tuple(only) == ("imaging",)
    computed = extract_slice_features(phantom.image, phantom.lesion, SPACING, groups=["imaging"])
    # The computed lung mask is close to the true one, so the healthy-lung statistics agree closely.
    assert only["imaging"].as_dict()["imaging.firstorder_Mean"] == pytest.approx(
        computed["imaging"].as_dict()["imaging.firstorder_Mean"], abs=10.0
    )


def test_shape_mismatches_are_rejected(phantom: ChestPhantom) -> None:
    with pytest.raises(ValueError):
        extract_slice_features(phantom.image[:-1], phantom.lesion, SPACING)
    with pytest.raises(ValueError):
        extract_slice_features(phantom.image, phantom.lesion, SPACING, lung_mask=phantom.lungs[:, :-1])
    with pytest.raises(ValueError):
        extract_slice_features(None, phantom.lesion[None], SPACING)


def test_real_lung_ct_slice() -> None:
    case = load_case("lung2")
    z = case.largest_slice()
    image, lesion = case.image[z].astype(np.float64), case.label[z] > 0
    lungs = lung_mask_from_hu(image)
    from scipy import ndimage

    assert ndimage.label(lungs)[1] == 2  # two lungs
    # This mass abuts the chest wall, so it is not inside the filled lung, but it borders it.
    assert lungs[ndimage.binary_dilation(lesion, iterations=4)].any()
    result = extract_slice_features(image, lesion, case.spacing[1:], groups=("imaging", "texture", "border", "geometry"))
    assert result["imaging"].flags == () and result["texture"].flags == ()
    # Healthy lung is aerated, the mass is soft tissue.
    assert result["imaging"].as_dict()["imaging.firstorder_Median"] < -600
    assert result["texture"].as_dict()["texture.firstorder_Median"] > -200


def test_feature_vector_rules() -> None:
    vector = FeatureVector("g", ("g.a", "g.b"), np.array([1, 2]), ("g.b",))
    assert vector.as_dict() == {"g.a": 1.0, "g.b": 2.0} and vector.values.dtype == np.float64
    with pytest.raises(ValueError):
        vector.values[0] = 5.0  # read-only
    with pytest.raises(ValueError):
        FeatureVector("g", ("g.a",), np.array([np.nan]))
    with pytest.raises(ValueError):
        FeatureVector("g", ("g.a",), np.array([1.0, 2.0]))
    with pytest.raises(ValueError):
        FeatureVector("g", ("other.a",), np.array([1.0]))
    with pytest.raises(ValueError):
        FeatureVector("g", ("g.a",), np.array([1.0]), ("g.zzz",))


def test_lung_fitted_position_map_uses_the_computed_lung_mask(phantom: ChestPhantom) -> None:
    position_map = PositionFrequencyMap.fit([(phantom.lesion, phantom.lungs)])
    result = extract_slice_features(phantom.image, phantom.lesion, SPACING, position_map=position_map, groups=["geometry"])
    assert result["geometry"].flags == ()
    with_true_lungs = position_map.orthodoxy(phantom.lesion, phantom.lungs)
    assert result["geometry"].as_dict()["geometry.positional_orthodoxy"] == pytest.approx(with_true_lungs, abs=0.05)
    assert with_true_lungs > 0.5
    # Without an image there is no lung mask: the lung-fitted map cannot score, orthodoxy falls back.
    mask_only = extract_slice_features(None, phantom.lesion, SPACING, position_map=position_map)
    assert mask_only["geometry"].flags == ("geometry.positional_orthodoxy",)


def test_integer_hu_input_gives_the_same_features(phantom: ChestPhantom) -> None:
    as_int16 = np.round(phantom.image).astype(np.int16)
    from_int = extract_slice_features(as_int16, phantom.lesion, SPACING)
    from_float = extract_slice_features(as_int16.astype(np.float64), phantom.lesion, SPACING)
    for group in from_float:
        np.testing.assert_allclose(from_int[group].values, from_float[group].values, rtol=1e-12)
        assert from_int[group].flags == from_float[group].flags
