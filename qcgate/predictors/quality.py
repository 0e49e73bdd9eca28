"""q estimators: the estimated Dice of the AI segmentation against the experts, on tau's scale.

Estimators (each stored in the model directory's ``quality.json`` with its validation error and its
decision band, ``qcgate.predictors.band``):

* ``probability``: q = soft self-Dice of the *calibrated* probability map,
  2 Σ p̃·[p̃ ≥ ½] / (Σ p̃ + Σ [p̃ ≥ ½]) (``qcgate.core.agreement.soft_self_dice``), with
  p̃ = σ(logit(p) / T). Works for a single FRACTIONAL member or the ensemble mean.
* ``learned``: a Ridge (``qcgate.predictors.ridge``, median-calibrated, JSON) predicting
  Dice(AI mask, experts) from the AI mask's geometry (and the image groups where the cohort has CT),
  plus the probability metrics below (the idea of Robinson et al. 2018, the paper's ref. 2).
* ``learned-um``: ``learned`` plus the uncertainty-map metrics and the raw ensemble agreement of two or
  more members (the agreement only as a feature, never compared with tau).
* ``learned-mask``: geometry (and image groups) only: the estimator for a single BINARY member, which
  carries no probability information.
* ``learned-margin``: a direct estimate of the margin Δ = D_AI − y (``qcgate.predictors.margin``: an
  additive spline Ridge on the ``learned-um`` features plus τ̂), q = clip(τ̂ + Δ̂, 0, 1): the band on
  q − τ is then a band on Δ̂, without the separate errors of q̂ and τ̂.
* ``reference`` (a reader's SEG in the case) is not stored: it is measured.

Calibration: **temperature scaling** (one T for the cohort, fitted by minimising the pixel-wise
cross-entropy of p̃ against the experts' pixel-wise vote fraction, on at most ``PIXELS_PER_SLICE``
sampled pixels per slice near the lesion). Why temperature and not isotonic: (1) it is monotone and
leaves logit 0 where it is, so the AI mask p ≥ ½, and with it tau's features, is unchanged; isotonic
regression may move the ½ level and re-segment; (2) one parameter cannot over-fit a few hundred
slices (the phantom) and is stored as one number in JSON; (3) it corrects exactly the over/under-
confidence (a global temperature error) that networks show. What it cannot correct is a confident
error (a missed part with p ≈ 0): the ``learned`` estimators exist for that.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from qcgate.core.agreement import soft_self_dice
from qcgate.errors import InputError

FORMAT_NAME = "qcgate-q-estimators"
FORMAT_VERSION = 2  # 2: an estimator may carry a "margin" model (learned-margin); files without one are written as 1
QUALITY_FILE = "quality.json"
PROBABILITY, LEARNED, LEARNED_UM, LEARNED_MASK = "probability", "learned", "learned-um", "learned-mask"
LEARNED_MARGIN = "learned-margin"
ESTIMATORS = (PROBABILITY, LEARNED, LEARNED_UM, LEARNED_MASK, LEARNED_MARGIN)
#: Feature prefixes that are not the AI mask's feature groups (computed from the map, the members, tau).
NON_MASK_PREFIXES = ("prob", "ens", "tau")
#: Temperatures at which the soft self-Dice is tabulated per training slice (cheap refits in CV).
TEMPERATURE_GRID = np.geomspace(0.2, 5.0, 41)
PIXELS_PER_SLICE = 128
_EPS = 1e-4

PROBABILITY_FEATURES = (
    "prob.soft_dice", "prob.soft_dice_raw", "prob.frac_soft", "prob.mean_inside", "prob.mean_ring",
    "prob.boundary_width_px", "prob.n_components", "prob.largest_fraction",
)
ENSEMBLE_FEATURES = ("ens.agreement", "ens.um_mean", "ens.um_p90", "ens.um_frac_gt_0_2", "ens.um_entropy")


def logit(p: np.ndarray) -> np.ndarray:
    q = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1.0 - _EPS)
    return np.log(q / (1.0 - q))


def calibrate(probability: np.ndarray, temperature: float) -> np.ndarray:
    """p̃ = σ(logit(p) / T); T > 1 softens, T < 1 sharpens; p = ½ stays ½."""
    return 1.0 / (1.0 + np.exp(-logit(probability) / float(temperature)))


def _box(mask: np.ndarray, pad: int) -> tuple[slice, slice] | None:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return (slice(max(rows[0] - pad, 0), rows[-1] + pad + 1), slice(max(cols[0] - pad, 0), cols[-1] + pad + 1))


def crop_to_support(probability: np.ndarray, *others: np.ndarray | None, pad: int = 12):
    """The probability map (and others of the same shape) cropped to p > 0.01 plus ``pad`` px."""
    box = _box(np.asarray(probability) > 0.01, pad)
    if box is None:
        return (probability, *others)
    return (probability[box], *(None if o is None else np.asarray(o)[box] for o in others))


def probability_metrics(probability: np.ndarray, temperature: float = 1.0) -> dict[str, float]:
    """The ``prob.*`` features of one map (see ``PROBABILITY_FEATURES``):

    soft_dice = soft self-Dice of the calibrated map; soft_dice_raw = of the map as given;
    frac_soft = #{0.1 < p < 0.9} / #{p ≥ ½}; mean_inside = mean p over p ≥ ½; mean_ring = mean p over
    the 1-3 px ring outside the mask; boundary_width_px = Σ 4p(1−p) / #boundary pixels (0 for a binary
    map); n_components of the mask; largest_fraction = largest component's share of the mask.
    """
    p = np.asarray(probability, dtype=np.float64)
    mask = p >= 0.5
    n = int(mask.sum())
    if n == 0:
        raise InputError("probability_metrics: the map has no pixel at p >= 0.5")
    calibrated = calibrate(p, temperature)
    ring = ndimage.binary_dilation(mask, iterations=3) & ~mask
    boundary = mask & ~ndimage.binary_erosion(mask)
    labels, count = ndimage.label(mask)
    sizes = np.bincount(labels.ravel())[1:] if count else np.zeros(1)
    return {
        "prob.soft_dice": float(soft_self_dice(calibrated) or 0.0),
        "prob.soft_dice_raw": float(soft_self_dice(p) or 0.0),
        "prob.frac_soft": float(np.count_nonzero((p > 0.1) & (p < 0.9)) / n),
        "prob.mean_inside": float(p[mask].mean()),
        "prob.mean_ring": float(p[ring].mean()) if ring.any() else 0.0,
        "prob.boundary_width_px": float((4 * p * (1 - p)).sum() / max(int(boundary.sum()), 1)),
        "prob.n_components": float(count),
        "prob.largest_fraction": float(sizes.max() / n) if count else 1.0,
    }


def soft_dice_grid(probability: np.ndarray) -> np.ndarray:
    """The calibrated soft self-Dice at every temperature of ``TEMPERATURE_GRID``."""
    p = np.asarray(probability, dtype=np.float64)
    return np.asarray([soft_self_dice(calibrate(p, t)) or 0.0 for t in TEMPERATURE_GRID])


def soft_dice_at(grid_values: np.ndarray, temperature: float) -> float:
    """Interpolate a ``soft_dice_grid`` row at ``temperature`` (log-T linear)."""
    return float(np.interp(math.log(temperature), np.log(TEMPERATURE_GRID), grid_values))


def ensemble_metrics(members: np.ndarray) -> dict[str, float]:
    """The ``ens.*`` features of two or more member maps (M, rows, cols): the raw ensemble agreement
    (``qcgate.core.agreement.ensemble_agreement``) and UM metrics of their pixel-wise SD over the
    uncertainty region (``qcgate.features.uncertainty.uncertainty_metrics``)."""
    from qcgate.core.agreement import ensemble_agreement
    from qcgate.features.uncertainty import uncertainty_metrics

    stack = np.asarray(members, dtype=np.float64)
    mean = stack.mean(axis=0)
    consensus = mean >= 0.5
    metrics = uncertainty_metrics(stack.std(axis=0), consensus)
    return {
        "ens.agreement": ensemble_agreement([m >= 0.5 for m in stack], consensus),
        "ens.um_mean": float(metrics.get("um_mean", 0.0)),
        "ens.um_p90": float(metrics.get("um_p90", 0.0)),
        "ens.um_frac_gt_0_2": float(metrics.get("um_frac_gt_0_2", 0.0)),
        "ens.um_entropy": float(metrics.get("um_entropy", 0.0)),
    }


def pixel_sample(probability: np.ndarray, expert_masks: Sequence[np.ndarray], rng: np.random.Generator,
                 n: int = PIXELS_PER_SLICE) -> tuple[np.ndarray, np.ndarray]:
    """(logits, expert vote fractions) of up to ``n`` pixels drawn from the lesion's neighbourhood
    (AI mask ∪ any expert's mask, dilated by 3 px), for fitting the temperature."""
    p = np.asarray(probability, dtype=np.float64)
    votes = np.mean([np.asarray(m, dtype=np.float64) for m in expert_masks], axis=0)
    region = ndimage.binary_dilation((p >= 0.5) | (votes > 0) | ((p > 0.05) & (p < 0.95)), iterations=3)
    where = np.flatnonzero(region.ravel())
    if where.size > n:
        where = rng.choice(where, n, replace=False)
    return logit(p.ravel()[where]).astype(np.float32), votes.ravel()[where].astype(np.float32)


def fit_temperature(logits: Sequence[np.ndarray], targets: Sequence[np.ndarray]) -> float:
    """T minimising the mean binary cross-entropy −[y log σ(z/T) + (1−y) log(1−σ(z/T))] over every
    sampled pixel (soft targets y = expert vote fraction); searched on log T in [log 0.05, log 20]."""
    from scipy.optimize import minimize_scalar

    z = np.concatenate([np.asarray(v, np.float64) for v in logits])
    y = np.concatenate([np.asarray(v, np.float64) for v in targets])
    if z.size == 0:
        return 1.0

    def loss(log_t: float) -> float:
        s = z / math.exp(log_t)
        return float(np.mean(np.logaddexp(0.0, s) - y * s))

    result = minimize_scalar(loss, bounds=(math.log(0.05), math.log(20.0)), method="bounded",
                             options={"xatol": 1e-4})
    return float(math.exp(result.x))


@dataclass
class QualityEstimator:
    """One stored estimator: how q is computed, its validation error and its band."""

    name: str
    validation_mae: float  # mean |q − Dice(AI, experts)| on validation (out-of-fold) slices
    band: object  # qcgate.predictors.band.DecisionBand
    ridge: object | None = None  # qcgate.predictors.ridge.RidgeModel for the learned kinds
    n_validation: int = 0
    margin: object | None = None  # qcgate.predictors.margin.SplineRidge for learned-margin (Δ̂)

    @property
    def feature_names(self) -> tuple[str, ...]:
        if self.margin is not None:
            return tuple(self.margin.feature_names)  # type: ignore[attr-defined]
        return tuple(self.ridge.feature_names) if self.ridge is not None else ("prob.soft_dice",)  # type: ignore[attr-defined]

    @property
    def uses_tau(self) -> bool:
        """True when q depends on the slice's τ (``learned-margin``: q = τ̂ + Δ̂): the caller passes
        ``tau.value`` in the features."""
        from qcgate.predictors.margin import TAU_FEATURE

        return TAU_FEATURE in self.feature_names

    def estimate(self, features: Mapping[str, float]) -> float:
        """q for one slice from its feature dict (``slice_quality_features``, plus ``tau.value`` for
        ``learned-margin``)."""
        model = self.margin if self.margin is not None else self.ridge
        if model is None:
            return float(np.clip(features["prob.soft_dice"], 0.0, 1.0))
        try:
            row = np.asarray([[features[n] for n in model.feature_names]], dtype=np.float64)  # type: ignore[attr-defined]
        except KeyError as exc:
            raise InputError(f"q estimator {self.name}: feature {exc} was not computed") from None
        if self.margin is not None:
            from qcgate.predictors.margin import TAU_FEATURE

            return float(np.clip(features[TAU_FEATURE] + self.margin.predict(row)[0], 0.0, 1.0))  # type: ignore[attr-defined]
        return float(np.clip(model.predict(row)[0], 0.0, 1.0))  # type: ignore[attr-defined]

    def needs(self) -> set[str]:
        """Feature prefixes the estimator reads ("tau" is given by the threshold model, always present)."""
        return {n.split(".", 1)[0] for n in self.feature_names} - {"tau"}


@dataclass
class QualityEstimators:
    """Every q estimator of a model, the temperature, and which one is the default."""

    temperature: float
    estimators: dict[str, QualityEstimator]
    default: str
    training: dict = field(default_factory=dict)  # how they were trained (AI source, seed, counts)

    def applicable(self, *, has_probability: bool, n_members: int) -> list[str]:
        """Estimators that can score this input, best validated first."""
        names = []
        for name, estimator in self.estimators.items():
            needs = estimator.needs()
            if "prob" in needs and not has_probability:
                continue
            if "ens" in needs and n_members < 2:
                continue
            names.append(name)
        return sorted(names, key=lambda n: self.estimators[n].validation_mae)

    def choose(self, *, has_probability: bool, n_members: int) -> str | None:
        """The default when it applies, else the best-validated applicable estimator, else None."""
        names = self.applicable(has_probability=has_probability, n_members=n_members)
        if self.default in names:
            return self.default
        return names[0] if names else None

    def to_json(self) -> str:
        from qcgate.predictors.band import band_to_dict

        payload = {
            # version 1 readers would take a margin estimator (no "ridge") for the probability one: refuse them
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION if any(e.margin is not None for e in self.estimators.values()) else 1,
            "calibration": {"method": "temperature", "temperature": self.temperature,
                            "why": "monotone, keeps p = 1/2 (the AI mask) fixed, one parameter"},
            "default": self.default,
            "estimators": {
                name: {"validation_mae": e.validation_mae, "n_validation": e.n_validation,
                       "band": band_to_dict(e.band),
                       "ridge": None if e.ridge is None else json.loads(e.ridge.to_json()),  # type: ignore[attr-defined]
                       **({} if e.margin is None else {"margin": e.margin.to_dict()})}  # type: ignore[attr-defined]
                for name, e in self.estimators.items()
            },
            "training": self.training,
        }
        return json.dumps(payload, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, *, source: str = QUALITY_FILE) -> QualityEstimators:
        from qcgate.predictors.band import band_from_dict
        from qcgate.predictors.margin import SplineRidge
        from qcgate.predictors.ridge import RidgeModel

        try:
            payload = json.loads(text)
            if payload.get("format") != FORMAT_NAME:
                raise ValueError(f"not a {FORMAT_NAME} file")
            if int(payload.get("format_version", 0)) > FORMAT_VERSION:
                raise ValueError(f"format version {payload['format_version']} is newer than this qcgate reads")
            estimators = {}
            for name, spec in payload["estimators"].items():
                ridge = None if spec.get("ridge") is None else RidgeModel.from_json(json.dumps(spec["ridge"]),
                                                                                   source=f"{source}:{name}")
                margin = None if spec.get("margin") is None else SplineRidge.from_dict(spec["margin"],
                                                                                      source=f"{source}:{name}")
                estimators[name] = QualityEstimator(name, float(spec["validation_mae"]), band_from_dict(spec["band"]),
                                                    ridge, int(spec.get("n_validation", 0)), margin)
            default = str(payload["default"])
            if default not in estimators:
                raise ValueError(f"default {default!r} is not among the estimators {sorted(estimators)}")
            return cls(float(payload["calibration"]["temperature"]), estimators, default,
                       dict(payload.get("training", {})))
        except InputError:
            raise
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
            raise InputError(f"{source}: not a valid q-estimator file ({exc})") from exc


def slice_quality_features(probability: np.ndarray, pixel_spacing: tuple[float, float], *, temperature: float,
                           members: np.ndarray | None = None, image_hu: np.ndarray | None = None,
                           lung_mask: np.ndarray | None = None, position_map=None,
                           frame_shape: tuple[int, int] | None = None, offset: tuple[int, int] = (0, 0),
                           groups: Sequence[str] = ("geometry",), binary: bool = False) -> dict[str, float]:
    """Every feature a q estimator may use for one slice: the AI mask's ``groups``
    (``qcgate.features.extract_slice_features``), ``prob.*`` (unless ``binary``: a BINARY member has no
    probabilities) and ``ens.*`` (two or more members)."""
    from qcgate.features import extract_slice_features

    features: dict[str, float] = {}
    if groups:  # none: the mask's features were extracted already (shared with tau)
        mask = np.asarray(probability) >= 0.5
        vectors = extract_slice_features(image_hu, mask, tuple(pixel_spacing), lung_mask=lung_mask,
                                         position_map=position_map, frame_shape=frame_shape, offset=offset,
                                         groups=list(groups))
        for vector in vectors.values():
            features.update(vector.as_dict())
    if not binary:
        cropped = crop_to_support(probability)[0]
        features.update(probability_metrics(cropped, temperature))
    if members is not None and len(members) >= 2:
        features.update(ensemble_metrics(members))
    return features
