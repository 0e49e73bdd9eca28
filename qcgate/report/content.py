"""What the HTML and the PDF report both say: context, explanations, legend, thumbnails, the plot.

No patient names or IDs: the context is UIDs, dates, modality, manufacturer and the AI algorithm.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from qcgate.core.results import CaseResult, SliceResult, Verdict

COLOURS = {Verdict.ACCEPT: "#2e7d32", Verdict.REVIEW: "#f9a825", Verdict.REJECT: "#c62828"}
VERDICT_WORDS = {Verdict.ACCEPT: "accept", Verdict.REVIEW: "needs review", Verdict.REJECT: "reject"}
#: One fixed scale for every uncertainty-map thumbnail: the members' pixel-wise standard deviation of
#: probabilities in [0, 1] is at most 0.5 (half the members say 0, half say 1).
UM_SCALE_MAX = 0.5
MAX_THUMBNAILS = 120

EXPLANATION = (
    "τ (tau) is the Dice score two expert readers would be predicted to agree on for this lesion slice "
    "(image-specific: harder images get a lower bar), and q is the estimated Dice of the AI segmentation "
    "against expert readers on it (from the model's validated q estimator, or a reference reader's SEG). "
    "The band runs from τ − m_reject to τ + m_accept, both margins fitted on validation data for a stated "
    "rate of missed bad slices: q above the band accepts the slice, q below it rejects it, and q inside "
    "the band, or unknown, sends it to a person for review."
)

LEGEND = [
    ("τ", "image-specific threshold: predicted agreement of expert readers (Dice)"),
    ("q", "estimated Dice of the AI segmentation against expert readers; \"unknown\" when no estimator applies"),
    ("band", "τ − m_reject … τ + m_accept; the verdict compares q with it"),
    ("accept", "q ≥ τ + m_accept: green, solid outline"),
    ("review", "inside the band, or q unknown: amber, dashed outline (needs review, not a failure)"),
    ("reject", "q < τ − m_reject: red, dotted outline"),
    ("thumbnail, left", "the CT in a lung window (W 1500 / L −600) with the AI outline in the verdict's colour"),
    ("thumbnail, right", f"the ensemble uncertainty map (members' pixel-wise SD), one scale 0 – {UM_SCALE_MAX} for all slices"),
    ("image N (z Z mm)", "the CT image's InstanceNumber and its z position: the slice numbering of every qcgate output"),
    ("key features", "the image features that moved τ most for that slice (feature value shown)"),
]


@dataclass(frozen=True)
class SliceLabel:
    instance_number: int | None
    z_mm: float | None

    @property
    def text(self) -> str:
        number = "?" if self.instance_number is None else str(self.instance_number)
        return f"image {number}" + ("" if self.z_mm is None else f" (z {self.z_mm:.1f} mm)")


def slice_label(ds: Dataset) -> SliceLabel:
    """The CT InstanceNumber and z position (same rule as qcgate.writers.common.slice_location)."""
    try:
        number = int(ds.InstanceNumber) if ds.get("InstanceNumber") not in (None, "") else None
    except (TypeError, ValueError):
        number = None
    try:
        position = ds.get("ImagePositionPatient")
        z = float(position[2]) if position is not None and len(position) == 3 else None
    except (TypeError, ValueError):
        z = None
    return SliceLabel(number, z)


def is_synthetic(result: CaseResult, model_synthetic: bool) -> bool:
    """SYNTHETIC banner: the model is synthetic, the CT says so, or a note of the job does."""
    if model_synthetic or any("SYNTHETIC" in note.upper() for note in result.notes):
        return True
    for ds in result.ct_datasets[:1]:
        text = " ".join(str(ds.get(k, "")) for k in ("SeriesDescription", "ImageComments", "DeidentificationMethod"))
        if "SYNTHETIC" in text.upper():
            return True
    return False


def _date(value: object) -> str:
    text = str(value or "")
    return f"{text[:4]}-{text[4:6]}-{text[6:8]}" if len(text) == 8 and text.isdigit() else (text or "—")


def study_context(result: CaseResult) -> list[tuple[str, str]]:
    """(label, value) rows: study and series identity and the AI algorithm; never patient names."""
    ct = result.ct_datasets[0] if result.ct_datasets else Dataset()
    rows = [
        ("Study Instance UID", str(ct.get("StudyInstanceUID", "—"))),
        ("Study date", _date(ct.get("StudyDate"))),
        ("CT series", f"{ct.get('SeriesInstanceUID', '—')} (series {ct.get('SeriesNumber', '—')}, "
                      f"{len(result.ct_datasets)} images)"),
        ("Series description", str(ct.get("SeriesDescription", "")) or "—"),
        ("Modality, manufacturer", f"{ct.get('Modality', '—')}, {ct.get('Manufacturer', '') or '—'} "
                                   f"{ct.get('ManufacturerModelName', '')}".rstrip()),
    ]
    algorithms: list[str] = []
    for seg in result.segmentation_datasets:
        names = []
        for segment in seg.get("SegmentSequence", []):
            name = str(segment.get("SegmentAlgorithmName", "")).strip()
            if name and name not in names:
                names.append(name)
        version = str(seg.get("SoftwareVersions", "")).strip()
        maker = str(seg.get("Manufacturer", "")).strip()
        text = ", ".join(names) or str(seg.get("ManufacturerModelName", "")) or "unnamed"
        line = f"{text}" + (f" version {version}" if version else "") + (f" ({maker})" if maker else "")
        if line not in algorithms:
            algorithms.append(line)
    rows.append(("AI segmentation", "; ".join(algorithms) or "—"))
    rows.append(("Threshold model", f"{result.model_name} {result.model_version}"))
    rows.append(("q source", f"{result.q_source}; {result.n_members} ensemble member(s); uncertainty map "
                             f"{'used' if result.uses_uncertainty else 'not used'}"))
    return rows


def key_feature_text(item: SliceResult, top: int = 3) -> str:
    if not item.key_features:
        return "—"
    return ", ".join(f"{name.split('.', 1)[-1]} = {value:.3g}" for name, value in list(item.key_features.items())[:top])


def outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it."""
    padded = np.pad(mask, 1)
    interior = padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def hot(scaled: np.ndarray) -> np.ndarray:
    """black -> red -> yellow for values in [0, 1]; (…, 3) uint8."""
    scaled = np.clip(scaled, 0, 1)
    rgb = np.stack([np.clip(scaled * 2, 0, 1), np.clip(scaled * 2 - 1, 0, 1), np.zeros_like(scaled)], axis=-1)
    return (rgb * 255).astype(np.uint8)


def _dashes(mask: np.ndarray, verdict: Verdict) -> np.ndarray:
    """Thin the outline into the verdict's line style: solid, dashed (review), dotted (reject)."""
    if verdict is Verdict.ACCEPT:
        return mask
    rows, cols = np.indices(mask.shape)
    phase = (rows + cols) if verdict is Verdict.REJECT else (rows // 3 + cols // 3)
    return mask & ((phase % 2) == 0)


def thumbnail(item: SliceResult, image_hu: np.ndarray | None) -> np.ndarray:
    """Two panels side by side, (h, w, 3) uint8: CT (lung window) with the AI outline in the verdict's
    colour and line style, and the uncertainty map on the fixed scale (or the mask when there is none),
    each a lesion-centred crop scaled ×2."""
    rows, cols = np.nonzero(item.ai_mask)
    pad = 24
    if rows.size == 0:
        rows, cols = np.array([item.ai_mask.shape[0] // 2]), np.array([item.ai_mask.shape[1] // 2])
    r0, r1 = max(int(rows.min()) - pad, 0), min(int(rows.max()) + pad + 1, item.ai_mask.shape[0])
    c0, c1 = max(int(cols.min()) - pad, 0), min(int(cols.max()) + pad + 1, item.ai_mask.shape[1])
    mask = np.asarray(item.ai_mask[r0:r1, c0:c1], bool)
    if image_hu is not None:
        grey = ((np.clip(image_hu[r0:r1, c0:c1], -1350, 150) + 1350) / 1500 * 255).astype(np.uint8)
    else:
        grey = np.where(mask, 160, 40).astype(np.uint8)
    left = np.repeat(grey[..., None], 3, axis=2)
    colour = np.array([int(COLOURS[item.verdict][i:i + 2], 16) for i in (1, 3, 5)], np.uint8)
    left = np.repeat(np.repeat(left, 2, axis=0), 2, axis=1)
    big_mask = np.repeat(np.repeat(mask, 2, axis=0), 2, axis=1)
    left[_dashes(outline(big_mask), item.verdict)] = colour
    if item.uncertainty_map is not None:
        um = np.asarray(item.uncertainty_map[r0:r1, c0:c1], np.float32)
        right = hot(um / UM_SCALE_MAX)
    else:
        right = np.repeat(np.where(mask, 200, 30).astype(np.uint8)[..., None], 3, axis=2)
    right = np.repeat(np.repeat(right, 2, axis=0), 2, axis=1)
    gap = np.full((left.shape[0], 8, 3), 255, np.uint8)
    return np.ascontiguousarray(np.concatenate([left, gap, right], axis=1))


def colour_bar(width: int = 160, height: int = 12) -> np.ndarray:
    """The UM scale 0 … UM_SCALE_MAX as an RGB strip (for the PDF; the HTML uses a CSS gradient)."""
    return np.ascontiguousarray(np.repeat(hot(np.linspace(0, 1, width))[None], height, axis=0))


def tau_q_plot_png(result: CaseResult, dpi: int = 100) -> bytes | None:
    """τ, the band and q against the CT InstanceNumber; None for fewer than two lesion slices (a plot
    of one point says nothing the table does not)."""
    if len(result.slices) < 2:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ordered = sorted(result.slices, key=lambda s: s.slice_index)
    labels = [slice_label(s.source_image) for s in ordered]
    numbered = all(label.instance_number is not None for label in labels)
    x = np.array([label.instance_number if numbered else s.slice_index for label, s in zip(labels, ordered)], float)
    tau = np.array([s.tau for s in ordered])
    low = np.array([np.nan if s.reject_below is None else s.reject_below for s in ordered], float)
    high = np.array([np.nan if s.accept_at is None else s.accept_at for s in ordered], float)
    figure = Figure(figsize=(6.4, 2.6))
    FigureCanvasAgg(figure)
    axis = figure.add_subplot()
    figure.subplots_adjust(left=0.09, right=0.98, bottom=0.18, top=0.96)  # fixed: tight_layout costs 0.1 s
    axis.plot(x, tau, "-", color="#1565c0", label="τ (image-specific threshold)")
    axis.fill_between(x, np.clip(low, -0.02, 1.02), np.clip(high, -0.02, 1.02), color="#1565c0", alpha=0.15,
                      label="band (review)")
    for verdict, marker in ((Verdict.ACCEPT, "o"), (Verdict.REVIEW, "s"), (Verdict.REJECT, "v")):
        points = [(xi, s.q) for xi, s in zip(x, ordered) if s.verdict is verdict and s.q is not None and s.q == s.q]
        if points:
            axis.plot([p[0] for p in points], [p[1] for p in points], marker, color=COLOURS[verdict], markersize=5,
                      linestyle="none", label=f"q, {VERDICT_WORDS[verdict]}")
    unknown = [xi for xi, s in zip(x, ordered) if s.q is None or s.q != s.q]
    if unknown:
        axis.plot(unknown, [0.02] * len(unknown), "x", color="#555555", linestyle="none", label="q unknown (review)")
    from matplotlib.ticker import MaxNLocator

    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("CT image (InstanceNumber)" if numbered else "slice index")
    axis.set_ylabel("Dice")
    axis.set_ylim(0, 1.02)
    axis.legend(fontsize=7, loc="lower left", ncol=2)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def band_text(item: SliceResult) -> str:
    """The slice's band as "low – high" (reject below low, accept at or above high); "—" without one."""
    if item.accept_at is None or item.reject_below is None:
        return "—"
    high = "never" if item.accept_at > 1 else f"{item.accept_at:.3f}"
    return f"{item.reject_below:.3f} – {high}"
