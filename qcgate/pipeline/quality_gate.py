"""The verdict's q and band at run time, and the checks that keep a verdict honest.

``slice_quality`` picks the q source of a case and computes q per slice:

* ``reference``: a reader's SEG is in the case: q = Dice(AI, reader) (unchanged); the band is the
  symmetric margin (tau's validation MAE, or ``pipeline.margin``): there is nothing to estimate.
* otherwise the model's q estimators (``quality.json``, ``qcgate.predictors.quality``): the default
  estimator when it applies to the input, else the best-validated one that does (a single BINARY
  member has no probabilities: ``learned-mask``), with that estimator's conformal band
  (``qcgate.predictors.band``) at the configured targets ``pipeline.max_missed_bad`` and
  ``pipeline.max_rejected_good``. The raw ensemble agreement is never q.
* a model without q estimators (trained before they existed): q unknown, every slice ``review``,
  with that reason.

``domain_problems`` lists why an input is outside the model's domain (not CT, not HU, no lung on any
slice); the worker then gives every slice ``review`` with the reasons.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from qcgate.core.results import Q_SOURCE_NONE, Q_SOURCE_REFERENCE

NO_ESTIMATOR_REASON = ("the model {model} has no q estimator (trained before quality.json existed): q is unknown, "
                       "every slice goes to review; retrain it with qcgate train-gate")


@dataclass
class CaseQuality:
    """q per lesion slice and the rule that turns (tau, q) into a verdict."""

    q_source: str  # "probability" | "learned" | "learned-um" | "learned-mask" | "learned-margin" | "reference" | "none"
    q: list[float | None]
    q_validation_mae: float | None  # the estimator's validation MAE (None: reference / none)
    margin_accept: float | None  # accept if q >= tau + margin_accept
    margin_reject: float | None  # reject if q < tau - margin_reject
    rule: str  # the rule and its numbers, in words (SR, report)
    notes: list[str] = field(default_factory=list)
    # why every slice is forced to review (no q estimator, none applies); empty when q is known
    review_reasons: list[str] = field(default_factory=list)


def is_binary_member(member) -> bool:
    """A SEG member without probabilities: a BINARY/LABELMAP SEG, or a FRACTIONAL one holding 0/1 only."""
    kind = str(getattr(member.dataset, "SegmentationType", "") or "").upper()
    if kind and kind != "FRACTIONAL":
        return True
    probability = member.probability
    if hasattr(probability, "crops"):  # a sparse member: its occupied boxes, never the dense series
        values = [crop[crop > 0] for _, _, crop in probability.crops.values()]
        occupied = np.concatenate(values) if values else np.zeros(0, np.float16)
    else:
        occupied = probability[probability > 0]
    return occupied.size > 0 and bool(np.all(occupied >= 0.999))


def slice_quality(model, ensemble, references, mean: np.ndarray, lesion_slices: list[int], ct, taus: list[float],
                  settings, fallback_margin: float, extracted: list[dict[str, float]] | None = None) -> CaseQuality:
    """q and the band of every lesion slice (see the module docstring). ``extracted``: per lesion slice,
    the features already extracted for tau; the q estimator reuses them when they hold all it needs."""
    from qcgate.core.agreement import dice
    from qcgate.predictors.margin import TAU_FEATURE

    if references:
        margin = settings.margin if settings.margin is not None else fallback_margin
        q = [dice(mean[k] >= 0.5, references[0].probability[k] >= 0.5) for k in lesion_slices]
        return CaseQuality(Q_SOURCE_REFERENCE, q, None, margin, margin,
                           f"accept if q >= tau + {margin:.3f}, reject if q < tau - {margin:.3f} (q = Dice against the "
                           "reference reader's SEG; margin = tau's validation MAE)",
                           ["q is the Dice of the AI segmentation against the reference reader's SEG"])
    estimators = getattr(model, "q_estimators", None)
    if estimators is None:
        reason = NO_ESTIMATOR_REASON.format(model=f"{model.name} {model.version}")
        return CaseQuality(Q_SOURCE_NONE, [None] * len(lesion_slices), None, None, None, "review (q unknown)", [reason],
                           [reason])
    binary = all(is_binary_member(m) for m in ensemble)
    name = estimators.choose(has_probability=not binary, n_members=len(ensemble))
    if name is None:
        reason = ("no q estimator of the model applies to this input (" +
                  ("BINARY members: no probabilities" if binary else f"{len(ensemble)} member(s)") + "): review")
        return CaseQuality(Q_SOURCE_NONE, [None] * len(lesion_slices), None, None, None, "review (q unknown)", [reason],
                           [reason])
    estimator = estimators.estimators[name]
    band = estimator.band
    targets = (settings.max_missed_bad, settings.max_rejected_good)
    if (band.max_missed_bad, band.max_rejected_good) != targets:
        band = band.with_targets(*targets)
    notes = []
    if binary:
        notes.append(f"BINARY member(s): no probabilities; q from the {name} estimator (mask geometry only)")
    if name != estimators.default:
        notes.append(f"q estimator {name} (the default {estimators.default} does not apply to this input)")
    values: list[float | None] = []
    for position, k in enumerate(lesion_slices):
        features = _features(estimator, estimators.temperature, model, mean[k].astype(np.float32),
                             np.stack([m.probability[k].astype(np.float32) for m in ensemble]) if len(ensemble) >= 2 else None,
                             ct, k, binary, extracted[position] if extracted is not None and position < len(extracted) else None)
        if estimator.uses_tau:  # learned-margin: q = tau + the estimated margin, on this slice's tau
            features[TAU_FEATURE] = taus[position]
        values.append(estimator.estimate(features))
    rule = f"q source {name} (validation MAE {estimator.validation_mae:.3f}); {band.describe()}"
    return CaseQuality(name, values, estimator.validation_mae, band.margin_accept, band.margin_reject, rule, notes)


def _features(estimator, temperature: float, model, probability: np.ndarray, members, ct, k: int,
              binary: bool, extracted: dict[str, float] | None = None) -> dict[str, float]:
    from qcgate.predictors.quality import NON_MASK_PREFIXES, slice_quality_features

    groups = sorted({n.split(".", 1)[0] for n in estimator.feature_names} - set(NON_MASK_PREFIXES)) or ["geometry"]
    mask_features = [n for n in estimator.feature_names if n.split(".", 1)[0] not in NON_MASK_PREFIXES]
    if extracted and groups == ["geometry"] and all(n in extracted for n in mask_features):
        # The AI mask's geometry was already extracted for tau (same mask, spacing and position map):
        # only the probability and ensemble metrics are computed here.
        features = {n: extracted[n] for n in mask_features}
        features.update(slice_quality_features(probability, ct.pixel_spacing, temperature=temperature,
                                               members=members if "ens" in estimator.needs() else None,
                                               groups=(), binary=binary))
        return features
    if extracted and model.uses_image and all(n in extracted for n in mask_features):
        # tau's extraction saw the same inputs q's would (float32 HU of the slice, mean >= 0.5, the lung
        # mask lung_mask_from_hu of that image, the model's position map): one extraction per slice.
        features = {n: extracted[n] for n in mask_features}
        features.update(slice_quality_features(probability, ct.pixel_spacing, temperature=temperature,
                                               members=members if "ens" in estimator.needs() else None,
                                               groups=(), binary=binary))
        return features
    uses_image = any(g in groups for g in ("imaging", "texture", "border"))
    image = ct.hu[k].astype(np.float32) if uses_image else None
    return slice_quality_features(probability, ct.pixel_spacing, temperature=temperature,
                                  members=members if "ens" in estimator.needs() else None, image_hu=image,
                                  position_map=model.position_map, groups=groups, binary=binary)


HU_PADDING_BELOW = -1100.0  # HU: anything lower is padding, not tissue or air (air is about -1000)


def domain_problems(ct, model, lung_found: bool, lesion_slices: list[int] | None = None) -> list[str]:
    """Why this series is outside the model's domain (empty when it is inside): a modality other than
    CT, pixel values that are not HU (judged on up to 16 of the lesion slices, which the job decodes
    anyway: the series is never decoded whole), no lung on any lesion slice."""
    problems = []
    modalities = {str(ds.get("Modality", "") or "").upper() for ds in ct.datasets} - {""}
    if modalities - {"CT"}:
        problems.append(f"modality {', '.join(sorted(modalities - {'CT'}))}: the model was trained on CT only")
    rescale_type = {str(ds.get("RescaleType", "") or "").upper() for ds in ct.datasets} - {""}
    if rescale_type - {"HU"}:
        problems.append(f"Rescale Type {', '.join(sorted(rescale_type))}: pixel values are not HU")
    else:
        chosen = lesion_slices if lesion_slices is not None else range(len(ct.datasets))
        chosen = list(chosen)[:: max(1, len(chosen) // 16)][:16]
        hu = np.concatenate([np.asarray(ct.hu[k], dtype=np.float32).ravel() for k in chosen]) if chosen else np.zeros(1)
        # Below air is the scanner's padding outside the field of view (GE writes -3024, others -2048):
        # not image content, so it is left out before judging whether the values look like HU.
        hu = hu[hu >= HU_PADDING_BELOW]
        low, high = (float(np.percentile(hu, 0.5)), float(np.percentile(hu, 99.5))) if hu.size else (np.nan, np.nan)
        if not hu.size or low > -500 or high > 4000:
            problems.append(f"pixel values {low:.0f}..{high:.0f} (0.5-99.5 percentiles, padding below "
                            f"{HU_PADDING_BELOW:.0f} left out) do not look like HU (air near -1000 expected)")
    if not lung_found:
        problems.append("no lung found on any lesion slice: the model was trained on lung lesions")
    return problems


def synthetic_warning(model) -> str | None:
    """The flag for a SYNTHETIC model applied to a (presumably real) CT."""
    if getattr(model, "synthetic", False):
        return (f"SYNTHETIC model {model.name} {model.version}: trained on generated data, for demos and tests only; "
                "not for clinical decisions")
    return None


def finite_or_none(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)
