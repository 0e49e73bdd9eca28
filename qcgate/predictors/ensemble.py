"""Which sub-models answer, and how they combine.

kind "ridge": the Ridge; kind "resnet": the ResNet; kind "ensemble": the mean of the Ridge and the
ResNet, tau = (tau_ridge + tau_resnet) / 2 (the paper's predictor e; "best" Ridge / ResNet = the
with-UM variants when a UM is used, the without-UM ones otherwise). With a UM, the with-UM variant of
each family answers when the model has one; otherwise (no UM, or ``use_uncertainty=False``) the
without-UM variant.
"""

from __future__ import annotations

import numpy as np

from qcgate.errors import InputError

FAMILIES = {"ridge": ("ridge",), "resnet": ("resnet",), "ensemble": ("ridge", "resnet")}


def check_components(model) -> None:
    """InputError when ``model.kind`` lacks a without-UM sub-model it needs."""
    if model.kind not in FAMILIES:
        raise InputError(f"model {model.name}: unknown kind {model.kind!r}; known {sorted(FAMILIES)}")
    for family in FAMILIES[model.kind]:
        if getattr(model, family) is None:
            raise InputError(f"model {model.name}: kind {model.kind!r} needs a {family} without UM")


def components_for(model, *, use_uncertainty: bool) -> tuple[str, ...]:
    """Attribute names of the sub-models that answer."""
    names = []
    for family in FAMILIES[model.kind]:
        with_um = f"{family}_uncertainty"
        names.append(with_um if use_uncertainty and getattr(model, with_um) is not None else family)
    return tuple(names)


def describe(model, *, use_uncertainty: bool) -> str:
    """e.g. "ensemble(ridge+resnet, with UM)", "ridge(without UM)"."""
    parts = components_for(model, use_uncertainty=use_uncertainty)
    with_um = any(p.endswith("_uncertainty") for p in parts)
    families = "+".join(FAMILIES[model.kind])
    label = "with UM" if with_um else "without UM"
    return f"{model.kind}({families}, {label})" if model.kind == "ensemble" else f"{model.kind}({label})"


def runtime_features(model, slices, ridge, extracted: list[dict[str, float]] | None = None) -> np.ndarray:
    """Feature matrix for ``ridge`` (its own column order) from the AI mask of every slice; every
    value extracted per slice is also appended to ``extracted`` when given (shared with q)."""
    from qcgate.features import extract_slice_features

    groups = sorted({name.split(".", 1)[0] for name in ridge.feature_names})
    rows = []
    for position, item in enumerate(slices):
        image = item.image_hu if model.uses_image else None
        if model.uses_image and image is None:
            raise InputError(f"model {model.name} needs the CT image (image_hu) of slice {position}")
        vectors = extract_slice_features(
            image, item.ai_mask, tuple(item.pixel_spacing),
            lung_mask=item.lung_mask if model.uses_image else None,
            uncertainty_map=item.uncertainty_map, position_map=model.position_map, groups=groups,
        )
        values: dict[str, float] = {}
        for vector in vectors.values():
            values.update(vector.as_dict())
        if extracted is not None:
            extracted.append(values)
        missing = [n for n in ridge.feature_names if n not in values]
        if missing:
            raise InputError(f"model {model.name}: slice {position} lacks features {missing[:5]}")
        rows.append([values[n] for n in ridge.feature_names])
    return np.asarray(rows, dtype=np.float64).reshape(len(slices), len(ridge.feature_names))


def _crops(model, slices, predictor) -> np.ndarray:
    from qcgate.predictors.resnet import lesion_crop

    size = predictor.config.crop_size
    return np.stack([lesion_crop(s.image_hu if model.uses_image else None, s.ai_probability,
                                 s.uncertainty_map, size) for s in slices])


def _explaining_ridge(model, components: tuple[str, ...], with_um: bool):  # type: ignore[no-untyped-def]
    """The Ridge whose inputs explain a slice: the answering Ridge, else (a ResNet-only kind) the one
    ``key_features`` would use; None without a Ridge."""
    for component in components:
        if component.startswith("ridge"):
            return getattr(model, component)
    if model.ridge is None:
        return None
    return model.ridge_uncertainty if with_um and model.ridge_uncertainty is not None else model.ridge


def _explain(ridge, x: np.ndarray, top: int) -> list[dict[str, float]]:  # type: ignore[no-untyped-def]
    """Per row of ``x``, the ``top`` feature values with the largest |w_j z_j| of ``ridge``."""
    contributions = np.abs(ridge.contributions(x))
    explained = []
    for row in range(x.shape[0]):
        order = np.argsort(-contributions[row], kind="stable")[:top]
        explained.append({ridge.feature_names[j]: float(x[row, j]) for j in order})
    return explained


def assess(model, slices, *, use_uncertainty: bool, top: int = 5) -> tuple[np.ndarray, list[dict[str, float]], list[dict[str, float]]]:  # type: ignore[no-untyped-def]
    """tau, key features and every extracted feature per slice, from one feature extraction per slice
    (the Ridge that answers also explains; the ResNet takes image crops, not features). Empty AI
    mask: training mean, {}, {}."""
    tau = np.full(len(slices), model.training_mean_dsc, dtype=np.float64)
    explained: list[dict[str, float]] = [{} for _ in slices]
    extracted: list[dict[str, float]] = [{} for _ in slices]
    for position, item in enumerate(slices):
        item.validate(position)
    lesion = np.array([bool(s.ai_mask.any()) for s in slices], dtype=bool)
    has_um = np.array([s.uncertainty_map is not None for s in slices], dtype=bool)
    for with_um in (False, True):
        selected = np.flatnonzero(lesion & ((has_um & use_uncertainty) == with_um))
        if selected.size == 0:
            continue
        subset = [slices[i] for i in selected]
        components = components_for(model, use_uncertainty=with_um)
        explainer = _explaining_ridge(model, components, with_um)
        features: dict[int, np.ndarray] = {}  # id(ridge) -> its feature matrix of ``subset``

        def matrix(ridge) -> np.ndarray:  # type: ignore[no-untyped-def]
            if id(ridge) not in features:
                values: list[dict[str, float]] = []
                features[id(ridge)] = runtime_features(model, subset, ridge, values)
                for i, row in zip(selected, values):
                    extracted[i].update(row)
            return features[id(ridge)]

        estimates = []
        for component in components:
            predictor = getattr(model, component)
            if component.startswith("ridge"):
                estimates.append(predictor.predict(matrix(predictor)))
            else:
                estimates.append(predictor.predict_crops(_crops(model, subset, predictor)))
        tau[selected] = np.mean(estimates, axis=0)
        if explainer is not None and top > 0:
            for i, values in zip(selected, _explain(explainer, matrix(explainer), top)):
                explained[i] = values
    return np.clip(tau, 0.0, 1.0), explained, extracted


def predict(model, slices, *, use_uncertainty: bool) -> np.ndarray:  # type: ignore[no-untyped-def]
    """tau per slice (see the module docstring); the training mean where the AI mask is empty."""
    return assess(model, slices, use_uncertainty=use_uncertainty, top=0)[0]


def key_features(model, slices, *, top: int = 5) -> list[dict[str, float]]:
    """Per slice, the ``top`` feature values with the largest |w_j z_j| of the Ridge that answers for
    it (the UM Ridge for a slice with a UM when the model has one); {} without a Ridge or a lesion."""
    result: list[dict[str, float]] = [{} for _ in slices]
    if model.ridge is None:
        return result
    for position, item in enumerate(slices):
        item.validate(position)
    by_ridge: dict[int, tuple[object, list[int]]] = {}
    for i, item in enumerate(slices):
        if not item.ai_mask.any():
            continue
        use_um = item.uncertainty_map is not None and model.ridge_uncertainty is not None
        ridge = model.ridge_uncertainty if use_um else model.ridge
        by_ridge.setdefault(id(ridge), (ridge, []))[1].append(i)
    for ridge, selected in by_ridge.values():
        x = runtime_features(model, [slices[i] for i in selected], ridge)
        for i, values in zip(selected, _explain(ridge, x, top)):
            result[i] = values
    return result
