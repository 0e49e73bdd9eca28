"""Agreement between masks: Dice, the experts' per-slice agreement "DSC Lesion", and ensemble agreement.

The one place Dice is written; the science (targets), the cohort and the QC worker all use it.

Empty-mask conventions (one place, used by every caller)
--------------------------------------------------------
* ``dice(a, b)`` on its own: both masks empty -> 1.0 (the two agree that nothing is there);
  exactly one empty -> 0.0 (follows from the formula, 2*0 / |A|).
* In the agreement averages below a *pair in which both masks are empty carries no information about
  the lesion* and is left out of the mean, while a pair in which only one reader drew something counts
  as Dice 0 (a missed or spurious lesion is full disagreement).
* A slice on which no mask holds a pixel is not a lesion slice: its DSC Lesion is undefined and the
  functions return ``None`` (never NaN), so callers must decide to skip it.
* A slice with fewer than two masks (one reader) has no agreement to measure: ``None``.

These are the conventions of ``../shared/data/lidc/lidc_slice_dsc_lesion.csv`` (checked in
tests/science/test_targets.py).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import numpy as np

from qcgate.errors import InputError

EMPTY_PAIR_DICE = 1.0


def _as_bool(mask: np.ndarray) -> np.ndarray:
    """Bool view of a mask: floats binarise at > 0.5 (probabilities), integers at != 0."""
    array = np.asarray(mask)
    if array.dtype != bool:
        array = array > 0.5 if np.issubdtype(array.dtype, np.floating) else array != 0
    return array


def dice(mask_a: np.ndarray, mask_b: np.ndarray) -> float:
    """Dice similarity coefficient of two binary masks.

    DSC(A, B) = 2 |A ∩ B| / (|A| + |B|), with DSC = 1.0 when |A| + |B| = 0 (both empty).
    Float masks are binarised at > 0.5, integer masks at != 0. Shapes must match.
    """
    a = _as_bool(mask_a)
    b = _as_bool(mask_b)
    if a.shape != b.shape:
        raise InputError(f"dice: mask shapes differ: {a.shape} vs {b.shape}")
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return EMPTY_PAIR_DICE
    return 2.0 * int(np.logical_and(a, b).sum()) / total


def _informative_dice(a: np.ndarray, b: np.ndarray) -> float | None:
    """Dice of a pair, or None when both are empty (the pair is left out of agreement means)."""
    if not a.any() and not b.any():
        return None
    return dice(a, b)


def mean_pairwise_dice(masks: Sequence[np.ndarray]) -> float | None:
    """Readers' agreement on a slice when readers carry no identity (e.g. LIDC).

    DSC_pairwise = (1 / |P|) * sum_{(i, j) in P} DSC(M_i, M_j), where P is the set of reader pairs
    i < j in which at least one of M_i, M_j is non-empty. Returns None when fewer than two masks are
    given or when every mask is empty (not a lesion slice).
    """
    arrays = [_as_bool(m) for m in masks]
    if len(arrays) < 2:
        return None
    scores = [s for a, b in itertools.combinations(arrays, 2) if (s := _informative_dice(a, b)) is not None]
    if not scores:
        return None
    return float(np.mean(scores))


def dsc_lesion_vs_reference(reference: np.ndarray, others: Sequence[np.ndarray]) -> float | None:
    """The paper's DSC Lesion: mean Dice of each reader (and the reference's repeat) vs the reference.

    DSC_Lesion = (1 / |Q|) * sum_{k in Q} DSC(M_k, M_ref), where ``others`` holds M_k for the other
    readers and the reference reader's repeat, and Q keeps the k for which M_k or M_ref is non-empty.
    Returns None when ``others`` is empty or every mask (reference included) is empty.
    """
    ref = _as_bool(reference)
    scores = []
    for k, other in enumerate(others):
        candidate = _as_bool(other)
        if candidate.shape != ref.shape:
            raise InputError(f"dsc_lesion_vs_reference: reader {k} mask shape {candidate.shape} != {ref.shape}")
        score = _informative_dice(candidate, ref)
        if score is not None:
            scores.append(score)
    if not scores:
        return None
    return float(np.mean(scores))


def slice_dsc_lesion(
    reader_masks: Mapping[str, np.ndarray], reference_reader: str | None = None
) -> float | None:
    """DSC Lesion of one slice from named reader masks.

    With ``reference_reader`` (a key of ``reader_masks``): ``dsc_lesion_vs_reference`` of that
    reader against every other (the repeat included). Without it: ``mean_pairwise_dice``.
    """
    if reference_reader is None:
        return mean_pairwise_dice(list(reader_masks.values()))
    if reference_reader not in reader_masks:
        raise InputError(
            f"reference reader {reference_reader!r} not among the readers {sorted(reader_masks)}"
        )
    others = [mask for reader, mask in reader_masks.items() if reader != reference_reader]
    return dsc_lesion_vs_reference(reader_masks[reference_reader], others)


def ensemble_agreement(member_masks: Sequence[np.ndarray], consensus: np.ndarray) -> float:
    """q_agreement = (1/M) Σ_m DSC(B_m, C): mean Dice of each member's binary mask B_m (p_m ≥ 0.5)
    against the consensus C (mean probability ≥ 0.5), on one slice. DSC of two empty masks is 1."""
    return float(np.mean([dice(mask, consensus) for mask in member_masks]))


def soft_self_dice(probability: np.ndarray, threshold: float = 0.5) -> float | None:
    """Expected Dice of a probability map P against its own binarisation B = [P ≥ ½]:

        q_soft = 2 Σ_i p_i · [p_i ≥ ½] / (Σ_i p_i + Σ_i [p_i ≥ ½]).

    If each pixel's true label were Bernoulli(p_i) independently, 2 Σ p·B / (Σ p + Σ B) is the ratio
    of the expected overlap to the expected size, a first-order estimate of E[DSC(B, truth)]; it is 1
    for a binary map and falls as probability mass lies outside B or B holds pixels with p near ½.
    Returns None when B is empty (no segmentation to judge). Calibrate p first
    (``qcgate.predictors.quality``): the estimate is only as good as the probabilities.
    """
    p = np.clip(np.asarray(probability, dtype=np.float64), 0.0, 1.0)
    binary = p >= threshold
    n_binary = int(binary.sum())
    if n_binary == 0:
        return None
    return float(2.0 * p[binary].sum() / (p.sum() + n_binary))


def dice_against_experts(mask: np.ndarray, experts: Sequence[np.ndarray]) -> float | None:
    """The AI's quality on a slice: D_AI = (1/|K|) Σ_{k in K} DSC(A, M_k), the mean Dice of the AI
    mask A against each expert mask M_k, K = the experts for which A or M_k is non-empty (the
    agreement conventions above). None when A and every M_k are empty, or no expert is given.
    The gate's truth: the AI is *acceptable* on the slice iff D_AI ≥ the experts' DSC Lesion there."""
    ai = _as_bool(mask)
    scores = [s for expert in experts if (s := _informative_dice(ai, _as_bool(expert))) is not None]
    return float(np.mean(scores)) if scores else None
