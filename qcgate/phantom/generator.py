"""Synthetic multi-reader chest-CT cohort (SYNTHETIC: no patient, for development and tests).

Why it exists: no public chest CT with multi-reader lesion outlines is reachable, and the analysis
must be exercised on full images (imaging, texture, border, geometry and uncertainty groups).

What a patient is
-----------------
Per patient (all drawn from ``np.random.default_rng([seed, patient_index])``): scanner noise
(8-45 HU, spatially correlated), blur (PSF sigma 0.5-1.4 px), pixel spacing, lung density, body and
lung shapes. Then ``slices`` axial slices, each with anatomy (body, fat, mediastinum, spine, ribs,
lungs near -850 HU with real lung texture, vessels, airways) and one lesion whose

* kind is ground glass (peak -700..-250 HU), consolidation (0..100 HU) or mixed (ground glass with a
  consolidated core),
* texture is uniform, fragmented (patchy islands, small fragments) or hybrid (large-scale variation),
* size (radius 3-30 mm) and border complexity (harmonics of the outline, edge width) vary.

Readers: disagreement from mechanisms only
------------------------------------------
Each simulated reader segments the *observed* (blurred, noisy) image; nothing reads the lesion's
parameters or any feature. A reader

1. smooths what it sees at a personal scale and keeps pixels above an absolute HU level that it
   picks for ground glass (personal preference plus per-case jitter; a reader falls back to a relative
   level when the lesion is fainter than its preferred level) -> faint ground glass and diffuse edges
   split readers, dense consolidation with a sharp edge does not;
2. keeps only the connected pieces that touch the lesion it sees;
3. merges nearby fragments (closing at a personal radius) and fills holes, or drops fragments below
   a personal minimum area (missed) -> fragmented textures split readers;
4. traces the outline with smooth random boundary noise of a personal amplitude -> small lesions and
   long outlines lose more Dice.

A reader's levels also move from case to case (its "impression" of the case). The reference reader
"R1A" and its repeat "R1B" share their habits (the repeat with small jitter) and most of that per-case
movement, and differ in tracing noise; "R2" and "R3" have their own habits and move independently.

AI ensemble
-----------
``members`` (>= 2) simulated networks output probability maps: a soft threshold of the smoothed image
at a member-specific level and temperature, plus a smooth member-specific bias field (spatially
correlated errors), limited to a soft region around the lesion, and each member occasionally misses
a fragment. Their mean (>= 0.5) is the AI mask and their std the uncertainty map.
"""

from __future__ import annotations

import logging
import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from qcgate.cohort.model import Case, Cohort
from qcgate.cohort.store import write_cohort
from qcgate.errors import InputError
from qcgate.phantom.texture import lung_texture

log = logging.getLogger(__name__)

LESION_KINDS = ("ground_glass", "consolidation", "mixed")
TEXTURES = ("uniform", "fragmented", "hybrid")
READERS = ("R1A", "R1B", "R2", "R3")
REFERENCE_READER, REPEAT_READER = "R1A", "R1B"
IMAGE_SIZE = 256
SLICE_THICKNESS_MM = 5.0
REAL_LUNG_PIXEL_MM = 0.6


@dataclass(frozen=True)
class ReaderStyle:
    """A reader's habits (fixed per reader across the cohort, drawn from the cohort seed)."""

    ground_glass_level_hu: float  # the absolute HU level chosen on ground glass
    relative_level: float  # fallback fraction of the lung->lesion contrast for faint lesions
    perception_sigma_px: float
    merge_radius_px: int
    min_fragment_px: int
    tracing_noise_px: float


@dataclass(frozen=True)
class PhantomConfig:
    patients: int = 30
    seed: int = 0
    slices_min: int = 4
    slices_max: int = 8
    members: int = 2
    image_size: int = IMAGE_SIZE


def reader_styles(seed: int) -> dict[str, ReaderStyle]:
    """The cohort's readers. R1B repeats R1A with slightly jittered habits."""
    rng = np.random.default_rng([seed, 10_000])
    styles: dict[str, ReaderStyle] = {}
    for reader in ("R1A", "R2", "R3"):
        styles[reader] = ReaderStyle(
            ground_glass_level_hu=float(rng.uniform(-720, -520)),
            relative_level=float(rng.uniform(0.35, 0.65)),
            perception_sigma_px=float(rng.uniform(0.6, 1.4)),
            merge_radius_px=int(rng.integers(0, 4)),
            min_fragment_px=int(rng.integers(2, 30)),
            tracing_noise_px=float(rng.uniform(0.8, 2.0)),
        )
    base = styles["R1A"]
    styles["R1B"] = ReaderStyle(
        ground_glass_level_hu=base.ground_glass_level_hu + float(rng.normal(0, 20)),
        relative_level=float(np.clip(base.relative_level + rng.normal(0, 0.04), 0.3, 0.7)),
        perception_sigma_px=base.perception_sigma_px,
        merge_radius_px=base.merge_radius_px,
        min_fragment_px=base.min_fragment_px,
        tracing_noise_px=base.tracing_noise_px,
    )
    return {r: styles[r] for r in READERS}


# --------------------------------------------------------------------------------------------------
# Anatomy
# --------------------------------------------------------------------------------------------------


def _ellipse(shape: tuple[int, int], center: tuple[float, float], axes: tuple[float, float],
             angle: float = 0.0, harmonics: np.ndarray | None = None) -> np.ndarray:
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    y, x = rows - center[0], cols - center[1]
    cos_a, sin_a = math.cos(angle), math.sin(angle)
    u, v = x * cos_a + y * sin_a, -x * sin_a + y * cos_a
    radius = np.sqrt((u / axes[1]) ** 2 + (v / axes[0]) ** 2)
    if harmonics is not None:
        theta = np.arctan2(v, u)
        radius = radius / (1 + sum(a * np.cos((k + 2) * theta + p) for k, (a, p) in enumerate(harmonics)))
    return radius <= 1.0


@dataclass
class PatientScanner:
    """Per-patient acquisition and anatomy parameters."""

    noise_hu: float
    noise_corr_px: float
    blur_px: float
    pixel_spacing_mm: float
    lung_hu: float
    texture_gain: float
    body_axes: tuple[float, float]
    lung_axes: tuple[float, float]
    lung_offset: float


def draw_scanner(rng: np.random.Generator, size: int) -> PatientScanner:
    return PatientScanner(
        noise_hu=float(rng.uniform(8, 45)),
        noise_corr_px=float(rng.uniform(0.4, 1.0)),
        blur_px=float(rng.uniform(0.5, 1.4)),
        pixel_spacing_mm=float(rng.uniform(1.15, 1.45)),
        lung_hu=float(rng.uniform(-880, -800)),
        texture_gain=float(rng.uniform(0.7, 1.3)),
        body_axes=(float(rng.uniform(0.30, 0.36) * size), float(rng.uniform(0.42, 0.47) * size)),
        lung_axes=(float(rng.uniform(0.21, 0.26) * size), float(rng.uniform(0.13, 0.16) * size)),
        lung_offset=float(rng.uniform(0.17, 0.20) * size),
    )


def draw_anatomy(rng: np.random.Generator, scanner: PatientScanner, size: int,
                 slice_position: float) -> tuple[np.ndarray, np.ndarray]:
    """(HU image before lesion/blur/noise, lung mask) of one axial slice.

    ``slice_position`` in [0, 1] moves from the upper to the lower thorax (lungs grow, heart appears).
    """
    shape = (size, size)
    centre = (size / 2 + 0.02 * size, size / 2)
    image = np.full(shape, -1000.0, np.float32)
    body = _ellipse(shape, centre, scanner.body_axes)
    inner = _ellipse(shape, centre, (scanner.body_axes[0] * 0.9, scanner.body_axes[1] * 0.92))
    image[body] = -100.0  # subcutaneous fat
    image[inner] = 40.0  # muscle / mediastinum
    growth = 0.85 + 0.25 * slice_position
    lungs = np.zeros(shape, bool)
    for side in (-1, 1):
        harmonics = np.stack([rng.normal(0, 0.03, 3), rng.uniform(0, 2 * np.pi, 3)], axis=1)
        lungs |= _ellipse(
            shape, (centre[0] - 0.01 * size, centre[1] + side * scanner.lung_offset),
            (scanner.lung_axes[0] * growth, scanner.lung_axes[1] * (0.95 + 0.1 * slice_position)),
            angle=side * rng.uniform(0.05, 0.2), harmonics=harmonics,
        )
    heart = _ellipse(shape, (centre[0] + 0.04 * size, centre[1] + 0.03 * size),
                     (0.09 * size * (0.5 + slice_position), 0.1 * size * (0.5 + slice_position)))
    lungs &= inner & ~heart
    gradient = (np.mgrid[0:size, 0:size][0] - centre[0]) / size  # posterior lung is denser (gravity)
    texture, _ = lung_texture(shape, rng, zoom=REAL_LUNG_PIXEL_MM / scanner.pixel_spacing_mm)
    image[lungs] = (scanner.lung_hu + 60.0 * gradient + scanner.texture_gain * texture)[lungs]
    image[heart & inner] = 45.0
    # Spine and ribs
    spine_centre = (centre[0] + scanner.body_axes[0] * 0.72, centre[1])
    image[_ellipse(shape, spine_centre, (0.05 * size, 0.045 * size))] = 700.0
    image[_ellipse(shape, spine_centre, (0.038 * size, 0.033 * size))] = 250.0
    for angle in rng.uniform(0, 2 * np.pi, 10):
        r = (scanner.body_axes[0] * 0.86, scanner.body_axes[1] * 0.86)
        rib = (centre[0] + r[0] * math.sin(angle), centre[1] + r[1] * math.cos(angle))
        image[_ellipse(shape, rib, (0.012 * size, 0.02 * size), angle=angle)] = 600.0
    # Airways: trachea/main bronchi in the mediastinum, small bronchi (air with a wall) in the lungs
    trachea = (centre[0] - 0.06 * size, centre[1])
    image[_ellipse(shape, trachea, (0.03 * size, 0.03 * size))] = 20.0
    image[_ellipse(shape, trachea, (0.024 * size, 0.024 * size))] = -1000.0
    lung_points = np.argwhere(ndimage.binary_erosion(lungs, iterations=6))
    for _ in range(int(rng.integers(2, 6))):
        if len(lung_points) == 0:
            break
        point = lung_points[rng.integers(len(lung_points))]
        radius = rng.uniform(1.5, 3.5)
        image[_ellipse(shape, tuple(point), (radius + 1.0, radius + 1.0))] = -50.0
        image[_ellipse(shape, tuple(point), (radius, radius))] = -980.0
    # Vessels: short lines radiating from the hilum, thicker near it
    vessel_layers = {0.6: np.zeros(shape, np.float32), 1.0: np.zeros(shape, np.float32),
                     1.6: np.zeros(shape, np.float32)}
    hila = [(centre[0], centre[1] + side * scanner.lung_offset * 0.55) for side in (-1, 1)]
    for _ in range(int(rng.integers(50, 90))):
        hilum = hila[rng.integers(2)]
        angle = rng.uniform(0, 2 * np.pi)
        start = rng.uniform(0.1, 0.8) * scanner.lung_axes[0]
        length = rng.uniform(5, 25)
        sigma = 1.6 if start < 0.3 * scanner.lung_axes[0] else (1.0 if rng.random() < 0.5 else 0.6)
        steps = np.linspace(start, start + length, int(length * 2))
        rows_ = np.clip((hilum[0] + steps * math.sin(angle)).astype(int), 0, size - 1)
        cols_ = np.clip((hilum[1] + steps * math.cos(angle)).astype(int), 0, size - 1)
        vessel_layers[sigma][rows_, cols_] = 1.0
    vessels = sum(ndimage.gaussian_filter(layer, s) * math.sqrt(2 * math.pi) * s for s, layer in vessel_layers.items())
    image = np.where(lungs, image + 750.0 * np.clip(vessels, 0, 1.1), image)
    return image.astype(np.float32), lungs


# --------------------------------------------------------------------------------------------------
# Lesion
# --------------------------------------------------------------------------------------------------


@dataclass
class LesionSpec:
    kind: str
    texture: str
    radius_px: float
    complexity: float
    edge_width_px: float
    peak_hu: float
    core_hu: float


def draw_lesion_spec(rng: np.random.Generator, kind: str, texture: str, radius_mm: float,
                     spacing_mm: float) -> LesionSpec:
    ground_glass = float(rng.uniform(-700, -250))
    consolidation = float(rng.uniform(0, 100))
    if kind == "consolidation":
        peak, edge = consolidation, float(rng.uniform(0.3, 1.2))
    elif kind == "ground_glass":
        peak, edge = ground_glass, float(rng.uniform(0.8, 3.5))
    else:
        peak, edge = ground_glass, float(rng.uniform(0.6, 2.5))
    return LesionSpec(kind=kind, texture=texture, radius_px=radius_mm / spacing_mm,
                      complexity=float(rng.uniform(0.0, 0.3)), edge_width_px=edge, peak_hu=peak,
                      core_hu=consolidation)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise with unit SD in expectation.

    White noise filtered by a 2-D Gaussian of SD sigma has SD 1 / (2 sigma sqrt(pi)); scaling by the
    inverse (not by the sample SD, and without removing the sample mean) keeps the field's slow,
    local offsets, so a small crop behaves like the same region of a large image.
    """
    field = ndimage.gaussian_filter(rng.normal(0, 1, shape), sigma, mode="wrap")
    return field * (2.0 * sigma * math.sqrt(math.pi))


def lesion_density(rng: np.random.Generator, spec: LesionSpec, shape: tuple[int, int],
                   centre: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """(filling fraction in [0, 1], consolidated-core weight in [0, 1]) of the lesion on the grid."""
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    y, x = rows - centre[0], cols - centre[1]
    rho, theta = np.hypot(x, y), np.arctan2(y, x)
    n_harmonics = 8
    amplitudes = spec.complexity * rng.uniform(0.3, 1.0, n_harmonics) / np.arange(1, n_harmonics + 1) ** 0.6
    phases = rng.uniform(0, 2 * np.pi, n_harmonics)
    outline = spec.radius_px * (1 + sum(a * np.cos((k + 2) * theta + p) for k, (a, p) in enumerate(zip(amplitudes, phases))))
    outline = np.maximum(outline, 0.3 * spec.radius_px)
    signed = rho - outline  # < 0 inside
    filling = 1.0 / (1.0 + np.exp(np.clip(signed / spec.edge_width_px, -30, 30)))
    if spec.texture == "uniform":
        modulation = 1.0 + 0.04 * _smooth_noise(rng, shape, 1.0)
    elif spec.texture == "fragmented":
        patches = _smooth_noise(rng, shape, rng.uniform(0.9, 1.8))
        level = rng.uniform(-0.2, 0.5)
        modulation = 1.0 / (1.0 + np.exp(-(patches - level) / 0.15))
        modulation = 0.1 + 0.9 * modulation + 0.1 * _smooth_noise(rng, shape, 0.6)
    else:  # hybrid: uniform areas with variation on a larger scale
        broad = _smooth_noise(rng, shape, max(2.0, spec.radius_px / 3))
        modulation = 0.82 + 0.18 * np.tanh(broad) + 0.03 * _smooth_noise(rng, shape, 1.0)
    density = np.clip(filling * modulation, 0.0, 1.0)
    core = np.zeros(shape, np.float32)
    if spec.kind == "mixed":
        core_radius = spec.radius_px * rng.uniform(0.3, 0.6)
        offset = rng.normal(0, 0.2 * spec.radius_px, 2)
        core_rho = np.hypot(x - offset[1], y - offset[0])
        core = 1.0 / (1.0 + np.exp(np.clip((core_rho - core_radius) / 0.8, -30, 30)))
    return density.astype(np.float32), core.astype(np.float32)


def place_lesion(rng: np.random.Generator, lungs: np.ndarray, radius_px: float) -> tuple[tuple[float, float], float]:
    """A centre inside the lung at least ~0.7 radius from its edge (shrinking the lesion if needed)."""
    distance = ndimage.distance_transform_edt(lungs)
    for shrink in (1.0, 0.8, 0.6, 0.45, 0.3):
        candidates = np.argwhere(distance > 0.7 * radius_px * shrink + 2)
        if len(candidates):
            point = candidates[rng.integers(len(candidates))]
            return (float(point[0]), float(point[1])), radius_px * shrink
    point = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return (float(point[0]), float(point[1])), max(2.0, float(distance.max()) * 0.5)


# --------------------------------------------------------------------------------------------------
# Readers and AI members
# --------------------------------------------------------------------------------------------------


def _touching(candidate: np.ndarray, seed_region: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(candidate, structure=np.ones((3, 3), bool))
    if n == 0:
        return candidate
    keep = np.unique(labels[seed_region & candidate])
    return np.isin(labels, keep[keep > 0])


def _trace(mask: np.ndarray, rng: np.random.Generator, amplitude_px: float) -> np.ndarray:
    """Re-draw the outline with smooth random displacement of about ``amplitude_px``."""
    if not mask.any():
        return mask
    signed = ndimage.distance_transform_edt(mask) - ndimage.distance_transform_edt(~mask)
    displacement = _smooth_noise(rng, mask.shape, rng.uniform(2.5, 5.0)) * amplitude_px
    return (signed + displacement) > 0


def reader_mask(observed: np.ndarray, style: ReaderStyle, rng: np.random.Generator, lung_hu: float,
                seen_peak_hu: float, lesion_seed: np.ndarray, roi: np.ndarray,
                impression: tuple[float, float]) -> np.ndarray:
    """One reader's outline on the observed slice (see the module docstring for the mechanism).

    ``impression`` = (HU shift, relative-level shift): how this reader's levels move on this case.
    """
    perceived = ndimage.gaussian_filter(observed, style.perception_sigma_px)
    preferred = style.ground_glass_level_hu + impression[0]
    relative = lung_hu + (style.relative_level + impression[1]) * (seen_peak_hu - lung_hu)
    level = min(preferred, relative)
    candidate = (perceived > level) & roi
    candidate = _touching(candidate, lesion_seed)
    if style.merge_radius_px > 0:
        candidate = ndimage.binary_closing(candidate, iterations=style.merge_radius_px) & roi
    candidate = ndimage.binary_fill_holes(candidate)
    labels, n = ndimage.label(candidate)
    if n > 1:
        sizes = ndimage.sum(candidate, labels, range(1, n + 1))
        keep = [i + 1 for i, s in enumerate(sizes) if s >= style.min_fragment_px or s == sizes.max()]
        candidate = np.isin(labels, keep)
    return _trace(candidate, rng, style.tracing_noise_px) & roi


def ai_probabilities(observed: np.ndarray, rng: np.random.Generator, members: int, lung_hu: float,
                     seen_peak_hu: float, lesion_seed: np.ndarray, roi: np.ndarray) -> np.ndarray:
    """(members, rows, cols) probability maps with member-specific, spatially correlated errors."""
    distance_to_lesion = ndimage.distance_transform_edt(~lesion_seed) if lesion_seed.any() else np.full(observed.shape, 99.0)
    attention = 1.0 / (1.0 + np.exp((distance_to_lesion - rng.uniform(3, 8)) / 1.5))
    maps = []
    for _ in range(members):
        smoothed = ndimage.gaussian_filter(observed, rng.uniform(0.8, 1.8))
        level = lung_hu + rng.uniform(0.3, 0.6) * (seen_peak_hu - lung_hu) + rng.normal(0, 30)
        temperature = rng.uniform(30, 90)
        bias = 60.0 * _smooth_noise(rng, observed.shape, rng.uniform(3, 8))
        logits = np.clip((smoothed - level + bias) / temperature, -30, 30)
        probability = attention / (1.0 + np.exp(-logits))
        hard = probability >= 0.5
        labels, n = ndimage.label(hard)
        if n > 1 and rng.random() < 0.5:  # this member misses one small fragment
            sizes = ndimage.sum(hard, labels, range(1, n + 1))
            smallest = int(np.argmin(sizes)) + 1
            probability = np.where(labels == smallest, probability * 0.3, probability)
        maps.append(np.where(roi, probability, 0.0))
    return np.clip(np.stack(maps), 0.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Patients and cohort
# --------------------------------------------------------------------------------------------------


def _crop_window(region: np.ndarray, margin: int) -> tuple[slice, slice]:
    rows, cols = np.nonzero(region)
    return (slice(max(0, rows.min() - margin), min(region.shape[0], rows.max() + margin + 1)),
            slice(max(0, cols.min() - margin), min(region.shape[1], cols.max() + margin + 1)))


def generate_patient(seed: int, index: int, config: PhantomConfig, styles: dict[str, ReaderStyle]) -> Case:
    """One synthetic patient: a stack of lesion slices with readers, AI members and a lung mask."""
    rng = np.random.default_rng([seed, index])
    size = config.image_size
    scanner = draw_scanner(rng, size)
    n_slices = int(rng.integers(config.slices_min, config.slices_max + 1))
    dominant_kind = LESION_KINDS[rng.integers(len(LESION_KINDS))]
    dominant_texture = TEXTURES[rng.integers(len(TEXTURES))]
    base_radius_mm = float(np.exp(rng.uniform(np.log(5), np.log(28))))
    images, lungs_all, probabilities = [], [], []
    readers: dict[str, list[np.ndarray]] = {r: [] for r in READERS}
    kinds, textures = [], []
    for k in range(n_slices):
        position = (k + 0.5) / n_slices
        anatomy, lungs = draw_anatomy(rng, scanner, size, 0.2 + 0.6 * position)
        kind = dominant_kind if rng.random() < 0.7 else LESION_KINDS[rng.integers(len(LESION_KINDS))]
        texture = dominant_texture if rng.random() < 0.7 else TEXTURES[rng.integers(len(TEXTURES))]
        radius_mm = base_radius_mm * float(np.exp(rng.normal(0, 0.35))) * math.sqrt(max(0.15, 1 - (2 * position - 1) ** 2))
        radius_mm = float(np.clip(radius_mm, 3.0, 30.0))
        spec = draw_lesion_spec(rng, kind, texture, radius_mm, scanner.pixel_spacing_mm)
        centre, spec.radius_px = place_lesion(rng, lungs, spec.radius_px)
        density, core = lesion_density(rng, spec, (size, size), centre)
        density *= ndimage.binary_dilation(lungs, iterations=1)
        lesion_hu = spec.peak_hu + core * (spec.core_hu - spec.peak_hu)
        clean = anatomy + density * (lesion_hu - anatomy) * (anatomy < lesion_hu)
        blurred = ndimage.gaussian_filter(clean, scanner.blur_px)
        noise = ndimage.gaussian_filter(rng.normal(0, 1, clean.shape), scanner.noise_corr_px)
        observed = (blurred + scanner.noise_hu * noise / (noise.std() + 1e-9)).astype(np.float32)
        # What every reader "sees" as the lesion: its densest part, and a region around it.
        seed_region = density >= 0.5 * density.max()
        roi = ndimage.binary_dilation(density > 0.02, iterations=int(4 + 0.4 * spec.radius_px))
        roi &= ndimage.binary_dilation(lungs, iterations=2)
        seen_peak = float(np.percentile(ndimage.gaussian_filter(observed, 1.0)[seed_region], 75))
        # Readers and AI members work on a crop around the lesion: nothing they do reaches further.
        window = _crop_window(roi, margin=8)
        crop_obs, crop_seed, crop_roi = observed[window], seed_region[window], roi[window]
        # A reader's levels move from case to case; the reference and its repeat share most of that
        # movement (same person, same case), other readers move independently.
        shared = (rng.normal(0, 35), rng.normal(0, 0.045))
        impressions = {
            reader: (shared[0] + rng.normal(0, 12), shared[1] + rng.normal(0, 0.015))
            if reader in (REFERENCE_READER, REPEAT_READER) else (rng.normal(0, 40), rng.normal(0, 0.05))
            for reader in styles
        }
        for reader, style in styles.items():
            full = np.zeros(observed.shape, bool)
            full[window] = reader_mask(crop_obs, style, rng, scanner.lung_hu, seen_peak, crop_seed, crop_roi,
                                       impressions[reader])
            readers[reader].append(full)
        members = np.zeros((config.members, *observed.shape), np.float32)
        members[(slice(None), *window)] = ai_probabilities(crop_obs, rng, config.members, scanner.lung_hu,
                                                           seen_peak, crop_seed, crop_roi)
        probabilities.append(members)
        images.append(observed)
        lungs_all.append(lungs | (density > 0.5))
        kinds.append(kind)
        textures.append(texture)
    case_id = f"PHANTOM-{seed}-{index:03d}"
    return Case(
        case_id=case_id,
        patient_id=case_id,
        pixel_spacing=(scanner.pixel_spacing_mm, scanner.pixel_spacing_mm),
        reader_masks={r: np.stack(masks) for r, masks in readers.items()},
        image_hu=np.stack(images),
        ai_probabilities=np.stack(probabilities, axis=1),
        lung_mask=np.stack(lungs_all),
        reference_reader=REFERENCE_READER,
        repeat_reader=REPEAT_READER,
        synthetic=True,
        source=f"phantom(seed={seed}, patient={index})",
        attributes={"kinds": kinds, "textures": textures, "noise_hu": scanner.noise_hu, "blur_px": scanner.blur_px},
    )


def _generate_one(args: tuple[int, int, PhantomConfig]) -> Case:
    seed, index, config = args
    return generate_patient(seed, index, config, reader_styles(seed))


def generate_cohort(config: PhantomConfig, *, workers: int | None = None) -> Cohort:
    """Every patient of the cohort, deterministic from ``config.seed`` whatever ``workers`` is."""
    if config.patients < 1:
        raise InputError(f"phantom: --patients must be at least 1, got {config.patients}")
    if config.members < 2:
        raise InputError(f"phantom: the AI ensemble needs at least 2 members, got {config.members}")
    if not 1 <= config.slices_min <= config.slices_max:
        raise InputError(f"phantom: bad slice range {config.slices_min}..{config.slices_max}")
    jobs = [(config.seed, i, config) for i in range(config.patients)]
    workers = max(1, min(workers or os.cpu_count() or 1, config.patients))
    if workers == 1:
        cases = [_generate_one(job) for job in jobs]
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            cases = list(pool.map(_generate_one, jobs))
    return Cohort(name=f"phantom-seed{config.seed}-n{config.patients}", cases=cases, synthetic=True,
                  source="qcgate phantom")


def write_phantom(config: PhantomConfig, out: Path, *, dicom: bool = False, workers: int | None = None) -> Cohort:
    """Generate and write the cohort (qcgate format; with ``dicom`` also a CT series + SEGs per case)."""
    from qcgate.phantom.texture import real_lung_patches

    cohort = generate_cohort(config, workers=workers)
    texture_source = "real lung CT texture (pyradiomics lung1/lung2)" if real_lung_patches() is not None else "procedural texture"
    description = (
        f"SYNTHETIC cohort generated by `qcgate phantom --patients {config.patients} --seed {config.seed}` "
        f"({texture_source}). Not patient data; not for clinical use."
    )
    write_cohort(cohort, out, description=description)
    (Path(out) / "SYNTHETIC.txt").write_text(description + "\n")
    if dicom:
        write_cohort_dicom(cohort, Path(out) / "dicom")
    return cohort


def write_cohort_dicom(cohort: Cohort, out: Path) -> None:
    """Per case: ``<case>/ct/`` (CT series), ``<case>/seg_reader_<id>.dcm`` (BINARY, one per reader)
    and ``<case>/seg_ai_member<m>.dcm`` (FRACTIONAL, one per AI ensemble member)."""
    from qcgate.phantom.dicom_export import write_ct_series, write_seg

    for case in cohort.cases:
        if case.image_hu is None:
            continue
        case_dir = Path(out) / case.case_id
        key = f"qcgate-phantom:{case.case_id}"
        datasets = write_ct_series(case.image_hu, case.pixel_spacing, SLICE_THICKNESS_MM, case_dir / "ct",
                                   patient_id=case.patient_id, series_description=f"SYNTHETIC chest CT {case.case_id}",
                                   deterministic_key=key)
        for number, (reader, masks) in enumerate(case.reader_masks.items()):
            write_seg(datasets, masks, case_dir / f"seg_reader_{reader}.dcm", algorithm_name=f"simulated-reader-{reader}",
                      manufacturer="qcgate phantom", series_description=f"SYNTHETIC reader {reader}",
                      series_number=100 + number, deterministic_key=f"{key}:{reader}")
        if case.ai_probabilities is not None:
            for member, probs in enumerate(case.ai_probabilities, start=1):
                write_seg(datasets, probs, case_dir / f"seg_ai_member{member}.dcm", fractional=True,
                          algorithm_name=f"simulated-ai-member{member}", manufacturer="qcgate phantom",
                          series_description=f"SYNTHETIC AI member {member}", series_number=200 + member,
                          deterministic_key=f"{key}:member{member}")
