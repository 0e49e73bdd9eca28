"""``qcgate evaluate-gate`` and ``qcgate train-gate``: the gate's operating characteristics, and the q
estimators + band that a model directory stores (``quality.json``).

Truth per slice (document of record; DESIGN "The verdict (revised…)")
--------------------------------------------------------------------
y = the experts' DSC Lesion of the slice (``Case.dsc_lesion``: with reader identity, vs the reference
reader; LIDC, without identity: the *pairwise variant*, the mean pairwise Dice of the readers), and
D_AI = ``qcgate.core.agreement.dice_against_experts`` of the AI mask against the experts. The AI is
**acceptable** (good) iff D_AI ≥ y, else **bad**. Experts: every reader for a real AI (``--ai members``);
the readers other than the template for a simulated AI, and other than the held-out reader for
leave-one-reader-out (the AI replaced that reader, so it is not scored against its own outline). On a
2-reader LIDC slice, D_AI is then the AI's Dice with the remaining reader and y the two readers' Dice:
good iff the AI agrees with that reader at least as well as the replaced reader did.

Slices: every lesion slice with a defined y on which the AI mask is non-empty (an empty AI slice has no
lesion for the gate to judge; simulated misses are counted in the output).

Without ``--model``: patient-grouped cross-validation (``--folds``, default 5). In each outer fold,
tau (the median-calibrated Ridge on the cohort's plain feature groups, trained on the cohort's
feature masks as ``qcgate train`` does), the temperature, the learned q Ridges and the band are all
fitted on the training patients; the band on *inner* out-of-fold (τ, q) of those patients. With
``--model``: that model's tau, q estimators and band, no refitting.

Rows: each q estimator with its conformal band, and two baselines with today's rule (q = the raw
ensemble agreement, margin = tau's validation MAE): "global threshold + raw ensemble agreement"
(tau = the training mean) and "τ + raw ensemble agreement". Rates (percent): bad caught = rejected
bad / bad; bad missed = accepted bad / bad; good accepted = accepted good / good; review = review /
all; q MAE = mean |q − D_AI|; AUC = P(x_good > x_bad) + ½ P(tie) for the score x = q − τ the band cuts
(``auc_good_vs_bad``). 95 % CIs: patient bootstrap (resample patients with replacement, ``BOOTSTRAP``
times, percentiles 2.5/97.5).

``learned-margin`` (``qcgate.predictors.margin``) is fitted on Δ = D_AI − y with τ̂ as a feature: in the
inner folds the τ̂ of a sample is the out-of-fold τ (what a new patient gets), and q = clip(τ̂ + Δ̂, 0, 1).

With ``--ai simulated`` the info carries ``oracle_auc`` (``oracle_aucs``): what separating good from bad
would reach with knowledge no estimator has (the AI's exact damage; the number of readers on the slice).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qcgate.cohort.model import Case, Cohort
from qcgate.core.agreement import dice, dice_against_experts
from qcgate.errors import InputError
from qcgate.predictors.band import DecisionBand, fit_band
from qcgate.predictors.margin import TAU_FEATURE
from qcgate.predictors.quality import (
    ESTIMATORS, LEARNED, LEARNED_MARGIN, LEARNED_MASK, LEARNED_UM, NON_MASK_PREFIXES, PROBABILITY, TEMPERATURE_GRID,
    QualityEstimator, QualityEstimators, fit_temperature, pixel_sample, slice_quality_features, soft_dice_at,
    soft_dice_grid,
)

AI_SOURCES = ("simulated", "members", "leave-one-reader-out", "members+simulated")
BOOTSTRAP = 500
GLOBAL_BASELINE = "global threshold + raw ensemble agreement"
TAU_BASELINE = "τ + raw ensemble agreement"
SWEEP_TARGETS = (0.01, 0.02, 0.05, 0.075, 0.10, 0.15, 0.20, 0.30, 0.40, 0.50)


# --------------------------------------------------------------------------------------------------
# Patient split (held-out patients for the shipped models' cards)
# --------------------------------------------------------------------------------------------------


def holdout_patient(patient_id: str, fraction: float, seed: int) -> bool:
    """True for a held-out patient: the first 8 bytes of sha256(f"{seed}:{patient_id}") as a number in
    [0, 1) below ``fraction``. Stable across machines, versions and cohort orders."""
    digest = hashlib.sha256(f"{seed}:{patient_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64 < fraction


def select_part(cohort: Cohort, part: str, fraction: float = 0.2, seed: int = 0) -> Cohort:
    """``part`` = all | train | holdout of ``cohort`` by ``holdout_patient``."""
    if part == "all":
        return cohort
    if part not in ("train", "holdout"):
        raise InputError(f"--patients must be all, train or holdout, got {part!r}")
    keep = [c for c in cohort.cases if holdout_patient(c.patient_id, fraction, seed) == (part == "holdout")]
    if not keep:
        raise InputError(f"{cohort.name}: no patient in the {part} part (fraction {fraction}, seed {seed})")
    return Cohort(name=f"{cohort.name}[{part} {1 - fraction if part == 'train' else fraction:.0%}, split seed {seed}]",
                  cases=keep, synthetic=cohort.synthetic, source=cohort.source, skipped=cohort.skipped)


# --------------------------------------------------------------------------------------------------
# Samples: one AI segmentation of one slice with its truth and features
# --------------------------------------------------------------------------------------------------


@dataclass
class GateSamples:
    patients: list[str] = field(default_factory=list)
    case_ids: list[str] = field(default_factory=list)
    slice_indices: list[int] = field(default_factory=list)
    dice_ai: list[float] = field(default_factory=list)
    dsc_lesion: list[float] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    confidence: list[str] = field(default_factory=list)
    features: list[dict[str, float]] = field(default_factory=list)
    grids: list[np.ndarray] = field(default_factory=list)
    pixel_logits: list[np.ndarray] = field(default_factory=list)
    pixel_targets: list[np.ndarray] = field(default_factory=list)
    model_tau: list[float] = field(default_factory=list)  # with --model: the model's tau
    # For the oracle ceilings (never features): Dice of the AI with the outline it replaced (simulated
    # AI; NaN otherwise) and the number of readers who drew on the slice.
    replaced_dice: list[float] = field(default_factory=list)
    n_readers: list[int] = field(default_factory=list)
    missed: int = 0
    ai_source: str = "simulated"
    binary: bool = False
    n_members: int = 0

    def __len__(self) -> int:
        return len(self.dice_ai)

    @property
    def truth_bad(self) -> np.ndarray:
        return np.asarray(self.dice_ai) < np.asarray(self.dsc_lesion)

    def matrix(self, names: Sequence[str], index: np.ndarray | None = None) -> np.ndarray:
        rows = self.features if index is None else [self.features[i] for i in index]
        return np.asarray([[f[n] for n in names] for f in rows], dtype=np.float64)


def _pad(case: Case, array: np.ndarray | None, pads: tuple[int, int, int, int], fill) -> np.ndarray | None:
    if array is None:
        return None
    r0, r1, c0, c1 = pads
    return np.pad(array, ((r0, r1), (c0, c1)), constant_values=fill)


def _slice_arrays(case: Case, k: int, pad: int):
    """Reader masks, image, lung, members of slice k, a cropped case padded by up to ``pad`` px inside
    its frame; with the new offset."""
    masks = [m[k] for m in case.reader_masks.values()]
    rows, cols = masks[0].shape
    if case.frame_shape is None:
        pads = (0, 0, 0, 0)
        offset = case.offset
    else:
        fr, fc = case.frame_shape
        r, c = case.offset
        pads = (min(pad, r), min(pad, max(fr - r - rows, 0)), min(pad, c), min(pad, max(fc - c - cols, 0)))
        offset = (r - pads[0], c - pads[2])
    masks = [_pad(case, m, pads, False) for m in masks]
    image = None if case.image_hu is None else _pad(case, case.image_hu[k], pads, -1000.0)
    lung = None if case.lung_mask is None else _pad(case, case.lung_mask[k], pads, False)
    members = None
    if case.ai_probabilities is not None:
        members = np.stack([_pad(case, m[k], pads, 0.0) for m in case.ai_probabilities])
    return masks, image, lung, members, offset


def _full_frame(case: Case, array: np.ndarray | None, offset: tuple[int, int], fill) -> np.ndarray | None:
    if array is None or case.frame_shape is None:
        return array
    frame = np.full(tuple(case.frame_shape), fill, dtype=array.dtype)
    r, c = offset
    frame[r:r + array.shape[0], c:c + array.shape[1]] = array
    return frame


def build_gate_samples(cohort: Cohort, *, ai: str = "simulated", seed: int = 0, position_map=None,
                       groups: Sequence[str] = ("geometry",), model=None, members: int = 2,
                       progress: Callable[[str], None] | None = None) -> GateSamples:
    """Every (AI segmentation, slice) sample of ``cohort`` for ``ai`` (see the module docstring). With
    ``model``, its tau is computed on the AI segmentation (the run-time path, full frame)."""
    from qcgate.predictors import SliceInput
    from qcgate.predictors.simulated_ai import PAD_PX, simulate_ai

    if ai not in AI_SOURCES:
        raise InputError(f"--ai must be one of {AI_SOURCES}, got {ai!r}")
    if ai == "members+simulated":  # both AI sources, one sample set (the phantom supports both)
        first = build_gate_samples(cohort, ai="members", seed=seed, position_map=position_map, groups=groups,
                                   model=model, members=members, progress=progress)
        second = build_gate_samples(cohort, ai="simulated", seed=seed, position_map=position_map, groups=groups,
                                    model=model, members=members, progress=progress)
        for name in ("patients", "case_ids", "slice_indices", "dice_ai", "dsc_lesion", "kinds", "confidence",
                     "features", "grids", "pixel_logits", "pixel_targets", "model_tau", "replaced_dice", "n_readers"):
            getattr(first, name).extend(getattr(second, name))
        first.missed += second.missed
        first.ai_source = ai
        first.n_members = max(first.n_members, second.n_members)
        return first
    if ai == "members" and not any(c.ai_probabilities is not None for c in cohort.cases):
        raise InputError(f"{cohort.name}: --ai members needs AI members in the cohort (ai_probabilities); "
                         "LIDC has masks only: use --ai simulated or leave-one-reader-out")
    say = progress or (lambda message: None)
    temperature_for_features = 1.0  # prob.soft_dice is re-derived from the grid at the fitted T
    out = GateSamples(ai_source=ai, binary=ai == "leave-one-reader-out")
    uses_image = any(g in groups for g in ("imaging", "texture", "border"))
    for number, case in enumerate(cohort.cases):
        if ai == "members" and case.ai_probabilities is None:
            continue
        inputs: list = []
        for k in case.lesion_slices():
            y = case.dsc_lesion(k)
            if y is None:
                continue
            masks, image, lung, case_members, offset = _slice_arrays(case, k, PAD_PX)
            draws: list[tuple[np.ndarray, np.ndarray | None, list[np.ndarray], str, str, bool]] = []
            replaced: np.ndarray | None = None
            if ai == "simulated":
                rng = np.random.default_rng([seed, number, k])
                simulated = simulate_ai(masks, rng, members=members)
                if simulated is None:
                    continue
                experts = [m for i, m in enumerate(masks) if i != simulated.template]
                replaced = masks[simulated.template]
                draws.append((simulated.probability, simulated.members, experts, simulated.kind,
                              simulated.confidence, False))
            elif ai == "members":
                assert case_members is not None
                draws.append((case_members.mean(axis=0), case_members if len(case_members) >= 2 else None,
                              masks, "members", "as given", False))
            else:
                for i, mask in enumerate(masks):
                    if mask.any():
                        draws.append((mask.astype(np.float32), None, [m for j, m in enumerate(masks) if j != i],
                                      f"reader{i + 1}", "binary", True))
            for probability, member_maps, experts, kind, confidence, binary in draws:
                ai_mask = probability >= 0.5
                if not ai_mask.any():
                    out.missed += 1
                    continue
                d = dice_against_experts(ai_mask, experts)
                if d is None:
                    continue
                features = slice_quality_features(
                    probability, case.pixel_spacing, temperature=temperature_for_features, members=member_maps,
                    image_hu=image if uses_image else None, lung_mask=lung if uses_image else None,
                    position_map=position_map, frame_shape=case.frame_shape, offset=offset, groups=groups,
                    binary=binary)
                out.patients.append(case.patient_id)
                out.case_ids.append(case.case_id)
                out.slice_indices.append(int(k))
                out.dice_ai.append(float(d))
                out.dsc_lesion.append(float(y))
                out.kinds.append(kind)
                out.confidence.append(confidence)
                out.features.append(features)
                out.replaced_dice.append(math.nan if replaced is None else float(dice(ai_mask, replaced) or 0.0))
                out.n_readers.append(int(sum(bool(m.any()) for m in masks)))
                if binary:
                    out.grids.append(np.ones(len(TEMPERATURE_GRID)))
                    out.pixel_logits.append(np.zeros(0, np.float32))
                    out.pixel_targets.append(np.zeros(0, np.float32))
                else:
                    from qcgate.predictors.quality import crop_to_support

                    cropped, *cropped_experts = crop_to_support(probability, *experts)
                    out.grids.append(soft_dice_grid(cropped))
                    lg, tg = pixel_sample(cropped, cropped_experts, np.random.default_rng([seed, number, k, 7]))
                    out.pixel_logits.append(lg)
                    out.pixel_targets.append(tg)
                out.n_members = max(out.n_members, 0 if member_maps is None else len(member_maps), 1)
                if model is not None:
                    inputs.append(SliceInput(
                        image_hu=_full_frame(case, image, offset, -1000.0) if model.uses_image else None,
                        ai_probability=_full_frame(case, probability.astype(np.float32), offset, np.float32(0)),
                        uncertainty_map=None if member_maps is None else _full_frame(
                            case, member_maps.std(axis=0).astype(np.float32), offset, np.float32(0)),
                        pixel_spacing=tuple(float(s) for s in case.pixel_spacing),  # type: ignore[arg-type]
                        lung_mask=_full_frame(case, lung, offset, False) if model.uses_image else None))
        if model is not None and inputs:
            use_um = all(s.uncertainty_map is not None for s in inputs) and model.has_uncertainty_variant
            out.model_tau.extend(float(t) for t in model.predict(inputs, use_uncertainty=use_um))
        if (number + 1) % 200 == 0:
            say(f"samples: {number + 1}/{len(cohort.cases)} cases, {len(out)} samples")
    if not len(out):
        raise InputError(f"{cohort.name}: no slice with a non-empty AI segmentation and a defined DSC Lesion")
    return out


# --------------------------------------------------------------------------------------------------
# Fitting: tau Ridge, temperature, learned q, bands
# --------------------------------------------------------------------------------------------------


def learned_feature_names(samples: GateSamples, groups: Sequence[str]) -> dict[str, list[str]]:
    """Feature names of each learned estimator the samples support (see qcgate.predictors.quality)."""
    first = samples.features[0]
    base = [n for n in first if n.split(".", 1)[0] in groups]
    prob = [n for n in first if n.startswith("prob.")]
    ens = [n for n in first if n.startswith("ens.") and n != "ens.agreement"] + (
        ["ens.agreement"] if "ens.agreement" in first else [])
    names = {LEARNED_MASK: base}
    if prob:
        names[LEARNED] = base + prob
        if ens:
            names[LEARNED_UM] = base + prob + ens
        # the margin Δ = D_AI − y from learned-um's features (or learned's, without members) plus τ̂
        names[LEARNED_MARGIN] = base + prob + ens + [TAU_FEATURE]
    return names


def _with_temperature(samples: GateSamples, index: np.ndarray, temperature: float) -> np.ndarray:
    """prob.soft_dice of the samples at ``temperature`` (from their grids)."""
    return np.asarray([soft_dice_at(samples.grids[i], temperature) for i in index])


def _matrix_at(samples: GateSamples, names: Sequence[str], index: np.ndarray, temperature: float,
               tau: np.ndarray | None = None) -> np.ndarray:
    """Feature rows of ``index``; prob.soft_dice at ``temperature``; ``tau.value`` from ``tau`` (aligned
    with ``index``)."""
    names = list(names)
    plain = [n for n in names if n != TAU_FEATURE]
    x = samples.matrix(plain, index)
    if "prob.soft_dice" in plain and not samples.binary:
        x[:, plain.index("prob.soft_dice")] = _with_temperature(samples, index, temperature)
    if TAU_FEATURE in names:
        if tau is None:
            raise ValueError("the learned-margin features need tau")
        x = np.insert(x, names.index(TAU_FEATURE), np.asarray(tau, dtype=np.float64), axis=1)
    return x


@dataclass
class FittedQ:
    temperature: float
    ridges: dict[str, object]  # learned estimator -> RidgeModel
    margins: dict[str, object] = field(default_factory=dict)  # learned-margin -> SplineRidge of Δ


def fit_q(samples: GateSamples, index: np.ndarray, groups: Sequence[str], tau: np.ndarray | None = None) -> FittedQ:
    """Temperature and learned estimators on ``index``; ``tau`` (aligned with ``index``: the τ these
    samples get, out of fold) enables learned-margin, fitted on Δ = D_AI − y."""
    from qcgate.predictors.margin import fit_spline_ridge
    from qcgate.predictors.ridge import fit_ridge

    temperature = 1.0 if samples.binary else fit_temperature([samples.pixel_logits[i] for i in index],
                                                            [samples.pixel_targets[i] for i in index])
    d = np.asarray(samples.dice_ai)[index]
    patients = np.asarray(samples.patients)[index]
    ridges: dict[str, object] = {}
    margins: dict[str, object] = {}
    for name, names in learned_feature_names(samples, groups).items():
        if name == LEARNED_MARGIN:
            if tau is not None:
                delta = d - np.asarray(samples.dsc_lesion)[index]
                margins[name] = fit_spline_ridge(_matrix_at(samples, names, index, temperature, tau), delta, patients,
                                                 names)
            continue
        ridges[name] = fit_ridge(_matrix_at(samples, names, index, temperature), d, patients, names, calibrate=True)
    return FittedQ(temperature, ridges, margins)


def predict_q(fitted: FittedQ, samples: GateSamples, index: np.ndarray,
              tau: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """q of every fitted estimator on ``index``; learned-margin: q = clip(τ + Δ̂, 0, 1) with ``tau``
    aligned with ``index`` (skipped without it)."""
    q: dict[str, np.ndarray] = {}
    if not samples.binary:
        q[PROBABILITY] = np.clip(_with_temperature(samples, index, fitted.temperature), 0, 1)
    for name, ridge in fitted.ridges.items():
        names = list(ridge.feature_names)  # type: ignore[attr-defined]
        q[name] = np.clip(ridge.predict(_matrix_at(samples, names, index, fitted.temperature)), 0, 1)  # type: ignore[attr-defined]
    if tau is not None:
        for name, margin in fitted.margins.items():
            names = list(margin.feature_names)  # type: ignore[attr-defined]
            delta = margin.predict(_matrix_at(samples, names, index, fitted.temperature, tau))  # type: ignore[attr-defined]
            q[name] = np.clip(np.asarray(tau, dtype=np.float64) + delta, 0, 1)
    return q


@dataclass
class TauRows:
    """The cohort's tau training rows (feature masks, as ``qcgate train``) and a sample→tau helper."""

    x: np.ndarray
    y: np.ndarray
    patients: np.ndarray
    names: list[str]
    position_map: object | None
    groups: list[str]

    def fit(self, patients: set[str]):
        from qcgate.predictors.ridge import fit_ridge

        keep = np.asarray([p in patients for p in self.patients])
        return fit_ridge(self.x[keep], self.y[keep], self.patients[keep], self.names, calibrate=True)

    def mean(self, patients: set[str]) -> float:
        return float(self.y[np.asarray([p in patients for p in self.patients])].mean())


def tau_rows(cohort: Cohort, *, workers: int | None = 1) -> TauRows:
    from qcgate.predictors.dataset import build_rows

    rows = build_rows(cohort, workers=workers)
    x, names = rows.columns(rows.plain_groups)
    return TauRows(x, rows.targets, rows.patients, names, rows.position_map, rows.plain_groups)


@dataclass
class GateFit:
    """What one training set yields: tau Ridge, q estimators (with bands), baseline margins."""

    tau_ridge: object
    q: FittedQ
    estimators: QualityEstimators
    tau_validation_mae: float
    global_mean: float
    global_validation_mae: float
    oof: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]  # estimator -> (tau, q, bad) on inner OOF


def fit_gate(samples: GateSamples, index: np.ndarray, rows: TauRows, *, inner_folds: int = 5,
             max_missed_bad: float = 0.10, max_rejected_good: float = 0.10,
             training: dict | None = None, given_tau: np.ndarray | None = None) -> GateFit:
    """Fit everything on ``index`` (training samples) and the band on inner out-of-fold predictions.

    τ for the band (and learned-margin's τ̂ feature): the cohort's Ridge w/o UM, out of fold (inner
    folds), or ``given_tau`` (aligned with the samples): the threshold model's own run-time τ, when
    the cohort was held out of that model's training (``train_gate(tau_source="model")``)."""
    from qcgate.science.ridge_cv import grouped_folds

    index = np.asarray(index)
    patients = np.asarray(samples.patients)[index]
    d = np.asarray(samples.dice_ai)[index]
    bad = samples.truth_bad[index]
    folds = grouped_folds(patients, inner_folds)
    oof_tau = np.empty(len(index))
    oof_q: dict[str, np.ndarray] = {}
    tau_errors, global_errors = [], []
    for train, test in folds:  # first τ out of fold: learned-margin trains on the τ it will see
        train_patients = set(patients[train])
        ridge = rows.fit(train_patients)
        if given_tau is None:
            oof_tau[test] = ridge.predict(samples.matrix(rows.names, index[test]))  # type: ignore[attr-defined]
        test_rows = np.asarray([p in set(patients[test]) for p in rows.patients])
        tau_errors.append(np.abs(ridge.predict(rows.x[test_rows]) - rows.y[test_rows]))  # type: ignore[attr-defined]
        global_errors.append(np.abs(rows.mean(train_patients) - rows.y[test_rows]))
    if given_tau is not None:
        oof_tau = np.asarray(given_tau, dtype=np.float64)[index]
    for train, test in folds:
        fitted = fit_q(samples, index[train], rows.groups, oof_tau[train])
        for name, values in predict_q(fitted, samples, index[test], oof_tau[test]).items():
            oof_q.setdefault(name, np.empty(len(index)))[test] = values
    estimators = {}
    oof = {}
    for name, q in oof_q.items():
        band = fit_band(oof_tau, q, bad, max_missed_bad, max_rejected_good)
        estimators[name] = QualityEstimator(name, float(np.mean(np.abs(q - d))), band, None, len(index))
        oof[name] = (oof_tau, q, bad)
    final = fit_q(samples, index, rows.groups, oof_tau)
    for name, ridge in final.ridges.items():
        estimators[name].ridge = ridge
    for name, margin in final.margins.items():
        estimators[name].margin = margin
    with_probability = [n for n in estimators if n != LEARNED_MASK]
    default = min(with_probability or list(estimators), key=lambda n: estimators[n].validation_mae)
    info = dict(training or {})
    info.update({"ai_source": samples.ai_source, "n_samples": int(len(index)),
                 "n_patients": int(len(set(patients))), "n_bad": int(bad.sum()), "n_good": int((~bad).sum()),
                 "inner_folds": len(folds), "temperature_fit": "pixel-wise cross-entropy vs expert vote fraction"})
    return GateFit(rows.fit(set(patients)), final, QualityEstimators(final.temperature, estimators, default, info),
                   float(np.concatenate(tau_errors).mean()), rows.mean(set(patients)),
                   float(np.concatenate(global_errors).mean()), oof)


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------


def _rule_verdicts(tau: np.ndarray, q: np.ndarray, margin: float) -> np.ndarray:
    out = np.full(len(tau), "review", dtype=object)
    out[q >= tau + margin] = "accept"
    out[q < tau - margin] = "reject"
    return out


def rates(verdicts: np.ndarray, bad: np.ndarray) -> dict[str, float | None]:
    bad = np.asarray(bad, bool)
    good = ~bad
    n_bad, n_good = int(bad.sum()), int(good.sum())
    return {
        "bad_caught_pct": 100.0 * float(np.mean(verdicts[bad] == "reject")) if n_bad else None,
        "bad_missed_pct": 100.0 * float(np.mean(verdicts[bad] == "accept")) if n_bad else None,
        "good_accepted_pct": 100.0 * float(np.mean(verdicts[good] == "accept")) if n_good else None,
        "good_rejected_pct": 100.0 * float(np.mean(verdicts[good] == "reject")) if n_good else None,
        "review_pct": 100.0 * float(np.mean(verdicts == "review")),
    }


def auc_good_vs_bad(score: np.ndarray, bad: np.ndarray) -> float | None:
    """AUC = P(score of a good slice > score of a bad one) + ½ P(tie) (Mann–Whitney, mid-ranks): how well
    the score the band cuts (q − τ) separates good from bad, whatever the cut-offs. None without both classes."""
    from scipy.stats import rankdata

    score = np.asarray(score, dtype=np.float64)
    bad = np.asarray(bad, dtype=bool)
    keep = np.isfinite(score)
    score, bad = score[keep], bad[keep]
    n_good, n_bad = int((~bad).sum()), int(bad.sum())
    if not n_good or not n_bad:
        return None
    ranks = rankdata(score)
    return float((ranks[~bad].sum() - n_good * (n_good + 1) / 2) / (n_good * n_bad))


def bootstrap_cis(verdicts: np.ndarray, bad: np.ndarray, patients: np.ndarray, q_error: np.ndarray | None,
                  *, repeats: int = BOOTSTRAP, seed: int = 0) -> dict[str, list[float] | None]:
    """95 % percentile CIs of every rate (and the q MAE) over patient-bootstrap resamples."""
    rng = np.random.default_rng([seed, 99])
    unique, inverse = np.unique(patients, return_inverse=True)
    groups = [np.flatnonzero(inverse == g) for g in range(len(unique))]
    collected: dict[str, list[float]] = {}
    for _ in range(repeats):
        pick = np.concatenate([groups[g] for g in rng.integers(0, len(groups), len(groups))])
        values = rates(verdicts[pick], bad[pick])
        if q_error is not None:
            values["q_mae"] = float(q_error[pick].mean())
        for key, value in values.items():
            if value is not None:
                collected.setdefault(key, []).append(value)
    return {f"{key}_ci": [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] for key, v in collected.items()}


def _row(method: str, q_source: str, verdicts: np.ndarray, bad: np.ndarray, q: np.ndarray | None,
         d: np.ndarray, patients: np.ndarray, seed: int, rule: str, extra: dict | None = None) -> dict:
    error = None if q is None else np.abs(q - d)
    row = {"method": method, "q_source": q_source, **rates(verdicts, bad),
           "q_mae": None if error is None else float(error.mean()), "n_slices": int(len(bad)),
           "n_bad": int(bad.sum()), "n_good": int((~bad).sum()), "rule": rule}
    row.update(bootstrap_cis(verdicts, bad, patients, error, seed=seed))
    row.update(extra or {})
    return row


@dataclass
class GateEvaluation:
    cohort_name: str
    synthetic: bool
    setting: str
    ai_source: str
    seed: int
    rows: list[dict]
    sweep: dict[str, list[dict]]
    info: dict
    per_slice: dict[str, list]

    def to_dict(self) -> dict:
        return {"cohort": self.cohort_name, "synthetic": self.synthetic, "setting": self.setting,
                "ai": self.ai_source, "seed": self.seed, "truth": "good iff mean Dice(AI, experts) >= DSC Lesion",
                "rows": self.rows, "sweep": self.sweep, **self.info}


def _sweep_point(verdicts: np.ndarray, bad: np.ndarray, target: float) -> dict:
    r = rates(verdicts, bad)
    return {"max_missed_bad": target, "bad_caught_pct": r["bad_caught_pct"],
            "good_accepted_pct": r["good_accepted_pct"], "review_pct": r["review_pct"],
            "bad_missed_pct": r["bad_missed_pct"]}


def evaluate_gate(cohort: Cohort, *, ai: str = "simulated", seed: int = 0, n_folds: int | None = 5,
                  model=None, max_missed_bad: float = 0.10, max_rejected_good: float = 0.10,
                  workers: int | None = 1, progress: Callable[[str], None] | None = None) -> GateEvaluation:
    """The gate's operating characteristics on ``cohort`` (see the module docstring)."""
    from qcgate.science.ridge_cv import grouped_folds

    say = progress or (lambda message: None)
    info: dict = {"max_missed_bad": max_missed_bad, "max_rejected_good": max_rejected_good}
    if model is None:
        say(f"tau rows of {cohort.name}")
        rows = tau_rows(cohort, workers=workers)
        say(f"{len(rows.y)} tau rows; samples (--ai {ai}, seed {seed})")
        samples = build_gate_samples(cohort, ai=ai, seed=seed, position_map=rows.position_map, groups=rows.groups,
                                     progress=say)
    else:
        estimators = getattr(model, "q_estimators", None)
        if estimators is None:
            raise InputError(f"model {model.name} {model.version} has no q estimator (quality.json): "
                             "retrain it (qcgate train-gate) to evaluate the gate")
        groups = sorted({n.split(".", 1)[0] for e in estimators.estimators.values() for n in e.feature_names
                         if n.split(".", 1)[0] not in NON_MASK_PREFIXES})
        samples = build_gate_samples(cohort, ai=ai, seed=seed, position_map=model.position_map, groups=groups,
                                     model=model, progress=say)
    n = len(samples)
    d = np.asarray(samples.dice_ai)
    bad = samples.truth_bad
    patients = np.asarray(samples.patients)
    say(f"{n} samples ({int(bad.sum())} bad, {int((~bad).sum())} good, {samples.missed} simulated misses)")
    has_agreement = "ens.agreement" in samples.features[0]
    agreement = np.asarray([f.get("ens.agreement", math.nan) for f in samples.features])
    verdicts: dict[str, np.ndarray] = {}
    q_values: dict[str, np.ndarray] = {}
    tau_all = np.empty(n)
    sweep_verdicts: dict[str, dict[float, np.ndarray]] = {}
    bands_seen: dict[str, list[DecisionBand]] = {}
    if model is None:
        folds = grouped_folds(patients, n_folds)
        setting = f"patient-grouped cross-validation, {len(folds)} folds (tau, q and band fitted on training folds)"
        base_global = np.full(n, "review", dtype=object)
        base_tau = np.full(n, "review", dtype=object)
        for number, (train, test) in enumerate(folds, start=1):
            say(f"fold {number}/{len(folds)}: {len(train)} training, {len(test)} test samples")
            fit = fit_gate(samples, train, rows, max_missed_bad=max_missed_bad, max_rejected_good=max_rejected_good)
            tau = fit.tau_ridge.predict(samples.matrix(rows.names, test))  # type: ignore[attr-defined]
            tau_all[test] = tau
            for name, values in predict_q(fit.q, samples, test, tau).items():
                q_values.setdefault(name, np.empty(n))[test] = values
                band = fit.estimators.estimators[name].band
                bands_seen.setdefault(name, []).append(band)
                verdicts.setdefault(name, np.empty(n, dtype=object))[test] = band.decide(tau, values)  # type: ignore[attr-defined]
                for target in SWEEP_TARGETS:
                    swept = band.with_targets(target, max_rejected_good)  # type: ignore[attr-defined]
                    sweep_verdicts.setdefault(name, {}).setdefault(target, np.empty(n, dtype=object))[test] = \
                        swept.decide(tau, values)
            if has_agreement:
                base_global[test] = _rule_verdicts(np.full(len(test), fit.global_mean), agreement[test],
                                                   fit.global_validation_mae)
                base_tau[test] = _rule_verdicts(tau, agreement[test], fit.tau_validation_mae)
            info.setdefault("temperature_per_fold", []).append(fit.q.temperature)
            info.setdefault("tau_validation_mae_per_fold", []).append(fit.tau_validation_mae)
        info["tau_mae_on_samples"] = float(np.mean(np.abs(tau_all - np.asarray(samples.dsc_lesion))))
        global_margin = tau_margin = None
    else:
        setting = f"trained model {model.name} {model.version}, no refitting"
        tau_all = np.asarray(samples.model_tau)
        estimators = model.q_estimators
        index = np.arange(n)
        fitted = FittedQ(estimators.temperature, {k: e.ridge for k, e in estimators.estimators.items()
                                                  if e.ridge is not None},
                         {k: e.margin for k, e in estimators.estimators.items() if e.margin is not None})
        if samples.binary:
            fitted.ridges = {k: v for k, v in fitted.ridges.items() if k == LEARNED_MASK}
            fitted.margins = {}
        available = predict_q(fitted, samples, index, tau_all)
        for name, values in available.items():
            if name not in estimators.estimators:
                continue
            q_values[name] = values
            band = estimators.estimators[name].band
            if (band.max_missed_bad, band.max_rejected_good) != (max_missed_bad, max_rejected_good):
                band = band.with_targets(max_missed_bad, max_rejected_good)
            bands_seen[name] = [band]
            verdicts[name] = band.decide(tau_all, values)
            sweep_verdicts[name] = {t: band.with_targets(t, max_rejected_good).decide(tau_all, values)
                                    for t in SWEEP_TARGETS}
        tau_margin = float(model.validation_mae)
        global_margin = _global_mae(model)
        if has_agreement:
            base_global = _rule_verdicts(np.full(n, model.training_mean_dsc), agreement, global_margin)
            base_tau = _rule_verdicts(tau_all, agreement, tau_margin)
        info["temperature"] = estimators.temperature
        info["tau_mae_on_samples"] = float(np.mean(np.abs(tau_all - np.asarray(samples.dsc_lesion))))
    result_rows = []
    for name in [e for e in ESTIMATORS if e in verdicts]:
        band = bands_seen[name][0]
        extra = {"accept_at": [b.accept_at if math.isfinite(b.accept_at) else None for b in bands_seen[name]],
                 "reject_below": [b.reject_below if math.isfinite(b.reject_below) else None for b in bands_seen[name]],
                 "accept_impossible_pct": 100.0 * float(np.mean(tau_all + band.accept_at > 1.0))
                 if math.isfinite(band.accept_at) else 100.0}
        extra["auc"] = auc_good_vs_bad(q_values[name] - tau_all, bad)
        result_rows.append(_row(f"τ + {name} q, conformal band", name, verdicts[name], bad, q_values[name], d,
                                patients, seed, band.method, extra))
    if has_agreement:
        result_rows.append(_row(GLOBAL_BASELINE, "ensemble-agreement", base_global, bad, agreement, d, patients, seed,
                                "q >= tau ± m, tau = training mean, m = its validation MAE",
                                {"margin": global_margin, "auc": auc_good_vs_bad(agreement, bad)}))
        result_rows.append(_row(TAU_BASELINE, "ensemble-agreement", base_tau, bad, agreement, d, patients, seed,
                                "q >= tau ± m, m = tau's validation MAE",
                                {"margin": tau_margin, "auc": auc_good_vs_bad(agreement - tau_all, bad)}))
    sweep = {name: [_sweep_point(v, bad, t) for t, v in sorted(points.items())]
             for name, points in sweep_verdicts.items()}
    info.update({"n_samples": n, "n_patients": int(len(set(samples.patients))), "simulated_misses": samples.missed,
                 "dsc_lesion_mean": float(np.mean(samples.dsc_lesion)), "dice_ai_mean": float(d.mean())})
    if ai == "simulated":
        info["oracle_auc"] = oracle_aucs(samples)
        kinds = np.asarray(samples.kinds)
        conf = np.asarray(samples.confidence)
        info["by_kind"] = {k: {"n": int((kinds == k).sum()), "bad_pct": 100.0 * float(bad[kinds == k].mean())}
                           for k in sorted(set(samples.kinds))}
        if PROBABILITY in q_values:
            err = np.abs(q_values[PROBABILITY] - d)
            info["probability_q_mae_by_confidence"] = {c: float(err[conf == c].mean()) for c in sorted(set(conf))}
    per_slice = {"patient_id": list(samples.patients), "case_id": list(samples.case_ids),
                 "slice_index": list(samples.slice_indices), "dice_ai": list(d), "dsc_lesion": list(samples.dsc_lesion),
                 "tau": list(tau_all), "kind": list(samples.kinds), "confidence": list(samples.confidence),
                 "n_readers": list(samples.n_readers), "replaced_dice": list(samples.replaced_dice),
                 **{f"q_{k}": list(v) for k, v in q_values.items()}, **{f"verdict_{k}": list(v) for k, v in verdicts.items()}}
    return GateEvaluation(cohort.name, cohort.synthetic or bool(model is not None and model.synthetic), setting, ai,
                          seed, result_rows, sweep, info, per_slice)


def oracle_aucs(samples: GateSamples) -> dict[str, float | None]:
    """Ceilings for any q estimator (simulated AI; the oracles see what no estimator can):

    * ``replaced_outline_dice``: AUC of Dice(AI, the outline it replaced), the AI's exact damage;
    * ``readers_and_damage_decile_in_sample``: AUC of P(good | readers on the slice, damage decile),
      tabulated on these very slices (in-sample: an optimistic bound on what both would give).
    """
    bad = samples.truth_bad
    damage = np.asarray(samples.replaced_dice, dtype=np.float64)
    readers = np.asarray(samples.n_readers)
    if not np.isfinite(damage).all():
        return {}
    deciles = np.digitize(damage, np.quantile(damage, np.linspace(0, 1, 11)[1:-1]))
    table: dict[tuple[int, int], list[bool]] = {}
    for r, b, good in zip(readers, deciles, ~bad):
        table.setdefault((int(r), int(b)), []).append(bool(good))
    tabulated = np.asarray([np.mean(table[(int(r), int(b))]) for r, b in zip(readers, deciles)])
    return {"replaced_outline_dice": auc_good_vs_bad(damage, bad),
            "readers_and_damage_decile_in_sample": auc_good_vs_bad(tabulated, bad)}


def _global_mae(model) -> float:
    for row in model.manifest.get("metrics", {}).get("rows", []):
        if row.get("method") == "Global thresholding":
            return float(row["mae"])
    return float(model.validation_mae)


# --------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------


def _fmt(value, ci=None) -> str:
    if value is None:
        return "n/a"
    text = f"{value:.1f}"
    if ci:
        text += f" [{ci[0]:.1f}, {ci[1]:.1f}]"
    return text


def markdown_rows(result: GateEvaluation) -> str:
    lines = ["| Method | q source | Bad caught % | Bad missed % | Good accepted % | Review % | q MAE | AUC of q − τ | slices (bad/good) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result.rows:
        q_mae = "n/a" if r["q_mae"] is None else f"{r['q_mae']:.3f}" + (
            f" [{r['q_mae_ci'][0]:.3f}, {r['q_mae_ci'][1]:.3f}]" if r.get("q_mae_ci") else "")
        lines.append(f"| {r['method']} | {r['q_source']} | {_fmt(r['bad_caught_pct'], r.get('bad_caught_pct_ci'))} | "
                     f"{_fmt(r['bad_missed_pct'], r.get('bad_missed_pct_ci'))} | "
                     f"{_fmt(r['good_accepted_pct'], r.get('good_accepted_pct_ci'))} | "
                     f"{_fmt(r['review_pct'], r.get('review_pct_ci'))} | {q_mae} | "
                     f"{'n/a' if r.get('auc') is None else format(r['auc'], '.3f')} | {r['n_slices']} ({r['n_bad']}/{r['n_good']}) |")
    return "\n".join(lines)


def text_summary(result: GateEvaluation) -> str:
    tag = "  [SYNTHETIC]" if result.synthetic else ""
    info = result.info
    head = (f"{result.cohort_name}{tag}: --ai {result.ai_source}, seed {result.seed}; {result.setting}; "
            f"{info['n_samples']} slices, {info['n_patients']} patients; mean DSC Lesion {info['dsc_lesion_mean']:.3f}, "
            f"mean Dice(AI, experts) {info['dice_ai_mean']:.3f}; targets: missed bad <= {info['max_missed_bad']:.0%}, "
            f"rejected good <= {info['max_rejected_good']:.0%}; 95 % patient-bootstrap CIs in brackets")
    text = head + "\n\n" + markdown_rows(result)
    oracle = info.get("oracle_auc") or {}
    if oracle.get("replaced_outline_dice") is not None:
        text += (f"\n\nCeilings (oracles, not estimators): AUC of Dice(AI, the outline it replaced) "
                 f"{oracle['replaced_outline_dice']:.3f}; of P(good | readers on the slice, damage decile), in-sample "
                 f"{oracle['readers_and_damage_decile_in_sample']:.3f}")
    return text


def write_gate_outputs(result: GateEvaluation, out: Path, *, command: str = "") -> dict[str, Path]:
    """gate.json, gate.md, gate_slices.csv, gate_tradeoff.png under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {n: out / n for n in ("gate.json", "gate.md", "gate_slices.csv", "gate_tradeoff.png")}
    payload = result.to_dict()
    if command:
        payload["command"] = command
    paths["gate.json"].write_text(json.dumps(payload, indent=1, default=_json_default) + "\n")
    body = [f"# Gate operating characteristics: {result.cohort_name}", ""]
    if result.synthetic:
        body += ["**SYNTHETIC**: not evidence about real readers or a real AI.", ""]
    if command:
        body += ["Command:", "", f"    {command}", ""]
    body += [text_summary(result), ""]
    paths["gate.md"].write_text("\n".join(body))
    with open(paths["gate_slices.csv"], "w", newline="") as handle:
        writer = csv.writer(handle)
        keys = list(result.per_slice)
        writer.writerow(keys)
        for i in range(len(result.per_slice["dice_ai"])):
            writer.writerow([_cell(result.per_slice[k][i]) for k in keys])
    _tradeoff_plot(result, paths["gate_tradeoff.png"])
    return paths


def _cell(value) -> str:
    return f"{value:.6f}" if isinstance(value, (float, np.floating)) else str(value)


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(type(value))


def _tradeoff_plot(result: GateEvaluation, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 4.2), dpi=110)
    for name, points in result.sweep.items():
        xs = [p["bad_caught_pct"] for p in points]
        ys = [p["good_accepted_pct"] for p in points]
        ax.plot(xs, ys, marker="o", markersize=3, label=f"{name} q (band target swept)")
    for row in result.rows:
        if row["q_source"] == "ensemble-agreement":
            ax.scatter([row["bad_caught_pct"]], [row["good_accepted_pct"]], marker="x", s=50, label=row["method"])
    ax.set_xlabel("bad slices rejected (%)")
    ax.set_ylabel("good slices accepted (%)")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="lower left")
    tag = " — SYNTHETIC" if result.synthetic else ""
    ax.set_title(f"Gate trade-off, {result.cohort_name}{tag}\n(--ai {result.ai_source}; max missed bad "
                 f"{', '.join(f'{t:g}' for t in SWEEP_TARGETS)})", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# Storing the q estimators with a threshold model (qcgate train-gate)
# --------------------------------------------------------------------------------------------------


TAU_SOURCES = ("auto", "cross-fitted", "model")


def runtime_tau_is_plain_ridge(model) -> bool:
    """True when the model's run-time τ is a Ridge w/o UM (what ``cross-fitted`` refits in inner folds)."""
    return model.kind == "ridge" and not model.has_uncertainty_variant


def train_gate(model_dir: Path, cohort: Cohort, *, ai: str = "simulated", seed: int = 0, inner_folds: int = 5,
               max_missed_bad: float = 0.10, max_rejected_good: float = 0.10, command: str = "",
               workers: int | None = 1, tau_source: str = "auto",
               progress: Callable[[str], None] | None = None) -> QualityEstimators:
    """Fit the q estimators and their bands on ``cohort`` and store them in ``model_dir`` as
    quality.json (hashed in the manifest; the model card gains a section).

    The band must be fitted on the τ the model gives at run time. ``tau_source``:

    * ``cross-fitted``: the cohort's median-calibrated Ridge w/o UM, out of fold (inner folds): the
      same procedure as a ``ridge`` model, which may be trained on this very cohort;
    * ``model``: the model's own run-time τ (its ensemble, with the UM variant when the AI has ≥ 2
      members), computed on the AI segmentation as the worker does. The cohort must be held out of
      the model's τ training (else τ is in-sample and the band too narrow): refused when the cohort
      is the model's training cohort;
    * ``auto``: ``cross-fitted`` for a Ridge w/o UM, ``model`` otherwise.
    """
    from qcgate.predictors import load_model
    from qcgate.predictors.artifacts import MANIFEST, write_manifest

    say = progress or (lambda message: None)
    if tau_source not in TAU_SOURCES:
        raise InputError(f"--tau must be one of {TAU_SOURCES}, got {tau_source!r}")
    model = load_model(model_dir)
    if tau_source == "auto":
        tau_source = "cross-fitted" if runtime_tau_is_plain_ridge(model) else "model"
    trained_on = str(model.manifest.get("training", {}).get("cohort", ""))
    if tau_source == "model" and trained_on and trained_on == cohort.name:
        raise InputError(f"{cohort.name} is the cohort {model.name} was trained on: its τ there is in-sample, so a band "
                         "fitted on it would be too narrow; train the gate on a held-out cohort (e.g. another phantom "
                         "seed) or pass --tau cross-fitted")
    rows = tau_rows(cohort, workers=workers)
    if tau_source == "cross-fitted" and list(rows.names) != list(
            model.ridge.feature_names if model.ridge is not None else rows.names):  # type: ignore[union-attr]
        say("note: the cohort's tau features differ from the model's Ridge; the band uses the cohort's Ridge")
    started = time.monotonic()
    use_model = tau_source == "model"
    samples = build_gate_samples(cohort, ai=ai, seed=seed,
                                 position_map=model.position_map if use_model else rows.position_map,
                                 groups=rows.groups, model=model if use_model else None, progress=say)
    say(f"{len(samples)} samples in {time.monotonic() - started:.0f} s; fitting")
    tau_for_band = ("median-calibrated Ridge w/o UM on the cohort's plain groups, inner CV" if not use_model else
                    f"the model's run-time tau ({model.describe(use_uncertainty=samples.n_members >= 2)}) on the AI "
                    "segmentation, cohort held out of its training")
    fit = fit_gate(samples, np.arange(len(samples)), rows, inner_folds=inner_folds, max_missed_bad=max_missed_bad,
                   max_rejected_good=max_rejected_good, given_tau=np.asarray(samples.model_tau) if use_model else None,
                   training={"cohort": cohort.name, "seed": seed, "command": command, "tau_source": tau_source,
                             "tau_for_band": tau_for_band})
    estimators = fit.estimators
    directory = Path(model_dir)
    (directory / "quality.json").write_text(estimators.to_json())
    manifest = json.loads((directory / MANIFEST).read_text())
    manifest["quality"] = {"file": "quality.json", "default": estimators.default, "temperature": estimators.temperature,
                           "estimators": {k: {"validation_mae": e.validation_mae, "accept_at": _finite(e.band.accept_at),
                                              "reject_below": _finite(e.band.reject_below)}
                                          for k, e in estimators.estimators.items()},
                           "max_missed_bad": max_missed_bad, "max_rejected_good": max_rejected_good,
                           "training": estimators.training}
    manifest.pop("files", None)
    write_manifest(directory, manifest)
    return estimators


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None
