"""A documented, seeded family of simulated AI segmentations on real reader outlines.

The gate's q must be *learned and validated* where the AI's real Dice against the experts is known. LIDC
has reader masks and no AI; the phantom has AI members. This module turns one reader's outline on a
slice (the *template*) into a simulated AI probability map, with errors of the kinds real networks make.
The template reader is then left out of the experts the AI is scored against (the AI *replaces* that
reader), so an unperturbed copy is not scored against itself.

Per slice, with ``rng = np.random.default_rng([seed, case_number, slice_index])`` (reproducible
whatever the order of the work):

1. Template: one reader drawn uniformly among those with a non-empty mask on the slice.
2. Error kind, drawn with the proportions of ``ERROR_KINDS`` (they sum to 1):

   ============== ====== =====================================================================
   kind           share  what is done to the template (pixels of the slice's grid)
   ============== ====== =====================================================================
   faithful       0.20   light boundary noise, amplitude 0.5 px (a good AI)
   erode          0.15   binary erosion by 1-3 px
   dilate         0.15   binary dilation by 1-3 px
   boundary_noise 0.15   smooth random boundary displacement, amplitude 1-3 px
   shift          0.10   translation by 1-4 px in a random direction
   missed_part    0.10   a component dropped (several components), else 25-60 % of the lesion cut
                         off along a random line
   spurious       0.10   an extra blob of radius 1-4 px placed 3-10 px from the lesion
   mixed          0.05   two of the kinds above (not faithful, not mixed), one after the other
   ============== ====== =====================================================================

   A result with no pixel left is a *missed slice*: the gate sees no lesion there and the slice is
   not a sample (counted in ``SimulationStats``).
3. Members: ``members`` (default 2) soft maps of the *same* simulated mask (members share its error,
   as real ensemble members share theirs), each with its own boundary noise of amplitude U(0.3, 1.0) px.
   The AI is their mean; the uncertainty map their pixel-wise SD. Each member's soft map is
   p = sigmoid(s / (κ · w)) where s is the signed distance (px, positive inside) to that member's
   boundary, w = 0.6 + 0.5 · (error magnitude in px) is the AI's "own" boundary
   uncertainty (an honest network is less sure where it errs more), and κ the confidence state:

   ================ ====== =====================================================
   confidence       share  κ and extras
   ================ ====== =====================================================
   calibrated       0.50   κ = 1
   over-confident   0.25   κ = 0.35 (p close to 0/1: "temperature too low")
   under-confident  0.25   κ = 2.5, then a Gaussian blur σ 1-2 px
   ================ ====== =====================================================

   Where the simulated mask and the template disagree, the AI is unsure: pixels the error removed
   (erosion, shift, dropped parts) keep a sub-threshold logit U(−1.2, −0.2)/κ (a calibrated AI
   half-sees what it missed), pixels it added (dilation, shift, spurious blobs) a supra-threshold
   logit U(0.2, 1.2)/κ (it doubts them). Over-confident maps (small κ) push these towards 0/1: the
   probability map then hides the error, as a confidently wrong network does.

These are modelling choices, not measurements of any real network: a q estimator trained on them
learns these errors. The phantom's own AI members (``--ai members``) are the check that it transfers.

Leave-one-reader-out (``loro_samples``): every reader with a non-empty mask plays a BINARY AI in turn
(probability 0/1: no probability information), scored against the other readers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

ERROR_KINDS: dict[str, float] = {
    "faithful": 0.20, "erode": 0.15, "dilate": 0.15, "boundary_noise": 0.15, "shift": 0.10,
    "missed_part": 0.10, "spurious": 0.10, "mixed": 0.05,
}
CONFIDENCE: dict[str, float] = {"calibrated": 0.50, "over-confident": 0.25, "under-confident": 0.25}
KAPPA = {"calibrated": 1.0, "over-confident": 0.35, "under-confident": 2.5}
#: In-plane padding (px) added around a cropped case so that dilations, shifts and blobs fit.
PAD_PX = 12


@dataclass
class SimulatedAI:
    """One simulated AI segmentation of a slice."""

    probability: np.ndarray  # float32 in [0, 1], the members' mean; the AI mask is probability >= 0.5
    members: np.ndarray  # (M, rows, cols) float32, each member's map
    template: int  # index of the reader whose outline was the template (left out of the experts)
    kind: str
    confidence: str
    magnitude_px: float


@dataclass
class SimulationStats:
    """How many slices the family produced and how many it lost (missed slices)."""

    produced: int = 0
    missed: int = 0
    kinds: dict[str, int] = field(default_factory=dict)


def _distance_signed(mask: np.ndarray) -> np.ndarray:
    inside = ndimage.distance_transform_edt(mask)
    outside = ndimage.distance_transform_edt(~mask)
    return np.where(mask, inside - 0.5, -(outside - 0.5))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    noise = ndimage.gaussian_filter(rng.normal(0.0, 1.0, shape), sigma)
    return noise / (noise.std() + 1e-9)


def _disk(radius: int) -> np.ndarray:
    r = int(radius)
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return (yy ** 2 + xx ** 2) <= r * r + 0.5


def _apply(kind: str, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, float, np.ndarray | None,
                                                                          np.ndarray | None]:
    """(new mask, magnitude px, dropped region or None, spurious region or None)."""
    if kind == "faithful":
        signed = _distance_signed(mask) + 0.5 * _smooth_noise(rng, mask.shape, 2.0)
        return signed > 0, 0.5, None, None
    if kind in ("erode", "dilate"):
        k = int(rng.integers(1, 4))
        op = ndimage.binary_erosion if kind == "erode" else ndimage.binary_dilation
        return op(mask, structure=_disk(k)), float(k), None, None
    if kind == "boundary_noise":
        amplitude = float(rng.uniform(1.0, 3.0))
        signed = _distance_signed(mask) + amplitude * _smooth_noise(rng, mask.shape, float(rng.uniform(1.5, 3.5)))
        return signed > 0, amplitude, None, None
    if kind == "shift":
        distance = float(rng.uniform(1.0, 4.0))
        angle = float(rng.uniform(0, 2 * np.pi))
        shifted = ndimage.shift(mask.astype(np.float32), (distance * np.sin(angle), distance * np.cos(angle)),
                                order=1, mode="constant") >= 0.5
        return shifted, distance, None, None
    if kind == "missed_part":
        labels, n = ndimage.label(mask)
        if n > 1:
            drop = int(rng.integers(1, n + 1))
            dropped = labels == drop
        else:
            rows, cols = np.nonzero(mask)
            angle = float(rng.uniform(0, 2 * np.pi))
            projection = rows * np.sin(angle) + cols * np.cos(angle)
            cut = np.quantile(projection, 1.0 - float(rng.uniform(0.25, 0.60)))
            dropped = np.zeros_like(mask)
            dropped[rows[projection > cut], cols[projection > cut]] = True
        magnitude = float(np.sqrt(dropped.sum() / np.pi))
        return mask & ~dropped, magnitude, dropped, None
    if kind == "spurious":
        radius = int(rng.integers(1, 5))
        distance = float(rng.uniform(3.0, 10.0))
        outside = ndimage.distance_transform_edt(~mask)
        ring = (outside >= distance + radius) & (outside < distance + radius + 1.5)
        candidates = np.argwhere(ring)
        if len(candidates) == 0:
            return mask, 0.5, None, None
        centre = candidates[int(rng.integers(len(candidates)))]
        blob = np.zeros_like(mask)
        disk = _disk(radius)
        r0, c0 = centre[0] - radius, centre[1] - radius
        rs = slice(max(r0, 0), min(r0 + disk.shape[0], mask.shape[0]))
        cs = slice(max(c0, 0), min(c0 + disk.shape[1], mask.shape[1]))
        blob[rs, cs] = disk[rs.start - r0:rs.stop - r0, cs.start - c0:cs.stop - c0]
        return mask | blob, float(radius), None, blob & ~mask
    raise ValueError(f"unknown error kind {kind!r}")


def _draw(rng: np.random.Generator, table: dict[str, float]) -> str:
    names = list(table)
    return names[int(rng.choice(len(names), p=np.asarray([table[n] for n in names])))]


def _member_map(mask: np.ndarray, dropped: np.ndarray, spurious: np.ndarray, rng: np.random.Generator,
                confidence: str, width: float) -> np.ndarray:
    kappa = KAPPA[confidence]
    signed = _distance_signed(mask) + float(rng.uniform(0.3, 1.0)) * _smooth_noise(rng, mask.shape, 2.0)
    logits = signed / (kappa * width)
    if dropped.any():
        logits = np.where(dropped, rng.uniform(-1.2, -0.2) / kappa, logits)
    if spurious.any():
        logits = np.where(spurious, rng.uniform(0.2, 1.2) / kappa, logits)
    probability = 1.0 / (1.0 + np.exp(-np.clip(logits, -30, 30)))
    if confidence == "under-confident":
        probability = ndimage.gaussian_filter(probability, float(rng.uniform(1.0, 2.0)))
    return probability.astype(np.float32)


def simulate_ai(reader_masks: Sequence[np.ndarray], rng: np.random.Generator, *, members: int = 2,
                kind: str | None = None, confidence: str | None = None) -> SimulatedAI | None:
    """One simulated AI (``members`` maps and their mean) for a slice from its reader masks (see the
    module docstring); None when no reader drew on the slice. An all-empty result is a missed slice:
    its probability is all zero."""
    drawn = [i for i, m in enumerate(reader_masks) if np.asarray(m).any()]
    if not drawn:
        return None
    template = drawn[int(rng.integers(len(drawn)))]
    mask = np.asarray(reader_masks[template], dtype=bool)
    kind = kind or _draw(rng, ERROR_KINDS)
    confidence = confidence or _draw(rng, CONFIDENCE)
    kinds = [kind]
    if kind == "mixed":
        pool = [k for k in ERROR_KINDS if k not in ("faithful", "mixed")]
        first = int(rng.integers(len(pool)))
        second = int(rng.integers(len(pool) - 1))
        second += second >= first
        kinds = [pool[first], pool[second]]
    magnitude = 0.0
    dropped = np.zeros_like(mask)
    spurious = np.zeros_like(mask)
    for step in kinds:
        mask, size, lost, extra = _apply(step, mask, rng)
        magnitude += size
        if lost is not None:
            dropped |= lost
        if extra is not None:
            spurious |= extra
        if not mask.any():
            empty = np.zeros((members, *mask.shape), np.float32)
            return SimulatedAI(empty[0], empty, template, kind, confidence, magnitude)
    # Where the simulated mask and the template disagree, the AI is unsure (logits near 0, on its side
    # of ½): an AI that is calibrated half-sees what it missed and doubts what it added.
    template_mask = np.asarray(reader_masks[template], dtype=bool)
    dropped = (dropped | (template_mask & ~mask)) & ~mask
    spurious = (spurious | (mask & ~template_mask)) & mask
    width = 0.6 + 0.5 * magnitude
    maps = np.stack([_member_map(mask, dropped, spurious, rng, confidence, width) for _ in range(members)])
    return SimulatedAI(maps.mean(axis=0).astype(np.float32), maps, template, kind, confidence, magnitude)
