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
