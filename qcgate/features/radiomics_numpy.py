"""Vectorised re-implementations of pyradiomics' first-order and texture feature classes (GLCM,
GLRLM, GLSZM, GLDM, NGTDM).

Same maths, same edge cases and the same numbers as ``radiomics.firstorder``, ``radiomics.glcm`` and
the other classes (tests compare them, and the upstream baselines), without the per-feature Python
overhead: every statistic is computed once per region from one sorted value array or one texture
matrix, which pyradiomics' own C code (``radiomics.cMatrices``) builds. This is where most of the
per-slice time went (four regions per slice).

Grey-level discretisation is pyradiomics' own (``imageoperations.getBinEdges`` + ``numpy.digitize``):
X_b = ⌊X / W⌋ − ⌊min X / W⌋ + 1 for bin width W.
"""

from __future__ import annotations

import math

import numpy as np
from radiomics import cMatrices

EPS = float(np.spacing(1))

FIRSTORDER_FEATURES: tuple[str, ...] = (
    "10Percentile", "90Percentile", "Energy", "Entropy", "InterquartileRange", "Kurtosis", "Maximum",
    "Mean", "MeanAbsoluteDeviation", "Median", "Minimum", "Range", "RobustMeanAbsoluteDeviation",
    "RootMeanSquared", "Skewness", "TotalEnergy", "Uniformity", "Variance",
)  # fmt: skip
GLCM_FEATURES: tuple[str, ...] = (
    "Autocorrelation", "ClusterProminence", "ClusterShade", "ClusterTendency", "Contrast", "Correlation",
    "DifferenceAverage", "DifferenceEntropy", "DifferenceVariance", "Id", "Idm", "Idmn", "Idn", "Imc1",
    "Imc2", "InverseVariance", "JointAverage", "JointEnergy", "JointEntropy", "MCC", "MaximumProbability",
    "SumAverage", "SumEntropy", "SumSquares",
)  # fmt: skip


def discretise(image: np.ndarray, mask: np.ndarray, bin_width: float) -> np.ndarray:
    """pyradiomics fixed-bin-width discretisation inside ``mask`` (0 outside):
    X_b = digitize(X, edges), edges = W·⌊min X / W⌋ + k·W — i.e. X_b = ⌊X/W⌋ − ⌊min X/W⌋ + 1."""
    binned = np.zeros(image.shape, dtype=int)
    values = image[mask]
    if values.size == 0:
        return binned
    binned[mask] = np.digitize(values, bin_edges(values, bin_width))
    return binned


def present_levels(binned: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Sorted grey levels present in the ROI: {g : #{x ∈ ROI : X_b(x) = g} > 0} (np.unique's result, via
    bincount: cheaper)."""
    return np.flatnonzero(np.bincount(binned[mask].ravel()))


def bin_edges(values: np.ndarray, bin_width: float) -> np.ndarray:
    """``imageoperations.getBinEdges`` (fixed bin width) with numpy reductions instead of Python's
    builtin min/max over the array (cost): edges = L, L + W, … < max + 2W with L = min − (min mod W);
    a single edge (flat region) becomes [L − ½, L + ½]."""
    minimum = values.min()
    maximum = values.max()
    low_bound = minimum - (minimum % bin_width)
    edges = np.arange(low_bound, maximum + 2 * bin_width, bin_width)
    if len(edges) == 1:
        return np.array([edges[0] - 0.5, edges[0] + 0.5])
    return edges


def _linear_percentiles(sorted_values: np.ndarray, percents: tuple[float, ...]) -> list[float]:
    """numpy's default ("linear") percentiles of an already sorted array: with h = (N − 1)·q/100,
    P_q = x_⌊h⌋ + (h − ⌊h⌋)(x_⌊h⌋+1 − x_⌊h⌋) — one sort shared by all five percentiles (cost)."""
    last = sorted_values.size - 1
    result = []
    for percent in percents:
        position = last * percent / 100.0
        lower = int(math.floor(position))
        upper = min(lower + 1, last)
        fraction = position - lower
        low_value, high_value = float(sorted_values[lower]), float(sorted_values[upper])
        # numpy's _lerp expression: equal to np.percentile up to rounding (~1e-16 relative)
        value = low_value + (high_value - low_value) * fraction
        if fraction >= 0.5:
            value = high_value - (high_value - low_value) * (1 - fraction)
        result.append(value)
    return result


def firstorder_features(values: np.ndarray, binned_values: np.ndarray, voxel_volume: float, shift: float) -> dict[str, float]:
    """pyradiomics first-order features of the ROI's N intensities X (``values``) with c = ``shift``:

    Energy = Σ (X + c)², TotalEnergy = V_voxel · Energy, RMS = √(Energy / N),
    Entropy = −Σ_i p(i) log2(p(i) + ε), Uniformity = Σ_i p(i)² (p over the binned grey levels),
    Mean, Median, Minimum, Maximum, Range = max − min, P10, P90, IQR = P75 − P25 (linear interpolation),
    MAD = (1/N) Σ |X − X̄|, rMAD = MAD of the values within [P10, P90],
    Variance = (1/N) Σ (X − X̄)², Skewness = μ3 / μ2^1.5, Kurtosis = μ4 / μ2² (0 for a flat region).
    All nan for an empty ROI.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        return {name: math.nan for name in FIRSTORDER_FEATURES}
    p10, p25, p50, p75, p90 = _linear_percentiles(np.sort(x), (10.0, 25.0, 50.0, 75.0, 90.0))
    mean = float(x.mean())
    deviation = x - mean
    deviation2 = deviation * deviation  # products, not float powers (cost)
    m2 = float(deviation2.mean())
    m3 = float((deviation2 * deviation).mean())
    m4 = float((deviation2 * deviation2).mean())
    denominator = m2 if m2 != 0 else 1.0  # flat region: pyradiomics returns 0 for skewness/kurtosis
    shifted = x + shift
    shifted_energy = float(np.dot(shifted, shifted))
    counts = np.bincount(np.asarray(binned_values, dtype=np.intp).ravel())
    counts = counts[counts > 0]
    p = counts / counts.sum()
    robust = x[(x >= p10) & (x <= p90)]
    return {
        "10Percentile": float(p10),
        "90Percentile": float(p90),
        "Energy": shifted_energy,
        "Entropy": float(-np.sum(p * np.log2(p + EPS))),
        "InterquartileRange": float(p75 - p25),
        "Kurtosis": m4 / denominator**2,
        "Maximum": float(x.max()),
        "Mean": mean,
        "MeanAbsoluteDeviation": float(np.mean(np.abs(deviation))),
        "Median": float(p50),
        "Minimum": float(x.min()),
        "Range": float(x.max() - x.min()),
        # Empty when no value lies in [P10, P90] (two distinct values): nan, as in pyradiomics.
        "RobustMeanAbsoluteDeviation": float(np.mean(np.abs(robust - robust.mean()))) if robust.size else math.nan,
        "RootMeanSquared": math.sqrt(shifted_energy / x.size),
        "Skewness": m3 / denominator**1.5,
        "TotalEnergy": shifted_energy * voxel_volume,
        "Uniformity": float(np.sum(p * p)),
        "Variance": m2,
    }


def glcm_matrix(binned: np.ndarray, mask: np.ndarray, distances: tuple[int, ...] = (1,), force2d: bool = True, force2d_dimension: int = 0, levels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Normalised symmetrical GLCMs p_a(i, j) = (P_a + P_aᵀ)(i, j) / Σ_ij (P_a + P_aᵀ), one per angle a,
    over the grey levels present in the ROI. Returns (p of shape (G, G, A), levels (G,), Ng = max level).

    ``binned`` and ``mask`` are 3-D (z, y, x); with ``force2d`` only in-plane angles are used. Angles
    without any pair are dropped (pyradiomics' convention).
    """
    levels = present_levels(binned, mask) if levels is None else levels
    ng = int(levels.max())
    matrix, _angles = cMatrices.calculate_glcm(
        binned, mask, np.asarray(distances), ng, bool(force2d), int(force2d_dimension)
    )
    present = levels - 1
    p = matrix[0][np.ix_(present, present)]  # (G, G, A)
    p = p + np.transpose(p, (1, 0, 2))
    totals = p.sum(axis=(0, 1))
    if p.shape[2] > 1:
        p = p[:, :, totals > 0]
        totals = totals[totals > 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        p = p / np.where(totals == 0, np.nan, totals)[None, None, :]
    return p, levels.astype(np.float64), ng


def maximal_correlation_coefficient(p: np.ndarray, px: np.ndarray, py: np.ndarray) -> float:
    """MCC = mean over angles of √λ₂(Q), Q(i, j) = Σ_k p(i, k) p(j, k) / (p_x(i) p_y(k)); 1 for a flat region.

    Q = D_x⁻¹ P D_y⁻¹ Pᵀ is similar to the symmetric B·Bᵀ with B = D_x^{-½} P D_y^{-½} (rows and columns of
    levels without pairs at that angle contribute eigenvalue 0 and are dropped), so a symmetric eigen-solver
    replaces pyradiomics' general one (cost). pyradiomics adds ε = 2.2e-16 to p_x·p_y, so values agree
    within 1e-9 relative on the test ROIs, not bit for bit.
    """
    if p.shape[0] < 2:
        return 1.0  # flat region
    if np.all(px > 0) and np.all(py > 0):
        # Common case, all angles at once: B_a = D_x^{-½} P_a D_y^{-½}, eigenvalues of B_a B_aᵀ.
        b_stack = np.transpose(p / np.sqrt(px)[:, None, :] / np.sqrt(py)[None, :, :], (2, 0, 1))
        eigenvalues = np.linalg.eigvalsh(b_stack @ np.transpose(b_stack, (0, 2, 1)))
        with np.errstate(invalid="ignore"):
            second_roots = np.sqrt(eigenvalues[:, -2])
        kept_roots = second_roots[~np.isnan(second_roots)]
        return float(kept_roots.mean()) if kept_roots.size else math.nan
    roots: list[float] = []
    for angle in range(p.shape[2]):
        rows = px[:, angle] > 0
        cols = py[:, angle] > 0
        block = p[np.ix_(rows, cols, [angle])][:, :, 0]
        b = block / np.sqrt(px[rows, angle])[:, None] / np.sqrt(py[cols, angle])[None, :]
        eigenvalues = np.linalg.eigvalsh(b @ b.T)  # ascending
        padded = np.concatenate([np.zeros(p.shape[0] - eigenvalues.size), eigenvalues])
        second = padded[-2]
        roots.append(math.sqrt(second) if second >= 0 else math.nan)
    kept = [r for r in roots if not math.isnan(r)]
    return float(sum(kept) / len(kept)) if kept else math.nan


def glcm_features(p: np.ndarray, levels: np.ndarray, ng: int) -> dict[str, float]:
    """pyradiomics GLCM features, each averaged over angles (nanmean), from p(i, j) per angle:

    μx = Σ i·p, σx² = Σ (i − μx)² p; p_{x+y}(k) = Σ_{i+j=k} p, p_{x−y}(k) = Σ_{|i−j|=k} p;
    Autocorrelation = Σ ij·p, JointAverage = μx, ClusterTendency/Shade/Prominence = Σ (i + j − μx − μy)^{2,3,4} p,
    Contrast = Σ (i − j)² p, Correlation = (Σ ij·p − μxμy) / (σxσy) (1 if σxσy = 0),
    DifferenceAverage DA = Σ k p_{x−y}(k), DifferenceVariance = Σ (k − DA)² p_{x−y}, DifferenceEntropy,
    JointEnergy = Σ p², JointEntropy HXY = −Σ p log2(p + ε), Imc1 = (HXY − HXY1) / max(HX, HY),
    Imc2 = √(1 − e^{−2(HXY2 − HXY)}), Id = Σ p_{x−y}/(1 + k), Idn = Σ p_{x−y}/(1 + k/Ng),
    Idm = Σ p_{x−y}/(1 + k²), Idmn = Σ p_{x−y}/(1 + k²/Ng²), InverseVariance = Σ_{k≥1} p_{x−y}/k²,
    MCC = √(second largest eigenvalue of Q), Q(i, j) = Σ_k p(i, k) p(j, k) / (p_x(i) p_y(k)),
    MaximumProbability = max p, SumAverage = Σ k p_{x+y}(k), SumEntropy, SumSquares = Σ (i − μx)² p.
    """
    n_angles = p.shape[2]
    if n_angles == 0:  # no neighbouring pair at all (e.g. one pixel): pyradiomics averages over nothing
        values = {name: math.nan for name in GLCM_FEATURES}
        values["MCC"] = 1.0 if p.shape[0] < 2 else math.nan
        return values
    px = p.sum(axis=1)  # (G, A)
    py = p.sum(axis=0)  # (G, A)
    level_column = levels[:, None]
    # Marginal means: μx = Σ_i i p_x(i) (= Σ_ij i p(i, j)), μy likewise.
    ux = np.sum(level_column * px, axis=0)  # (A,)
    uy = np.sum(level_column * py, axis=0)
    # Sum and difference distributions: scatter p into k = i + j and k = |i − j| with bincount (cost).
    sum_index = (levels[:, None] + levels[None, :]).astype(np.intp) - 2  # k = 2 .. 2Ng
    diff_index = np.abs(levels[:, None] - levels[None, :]).astype(np.intp)  # k = 0 .. Ng − 1
    p_flat = p.reshape(-1, n_angles)
    p_sum = np.stack([np.bincount(sum_index.ravel(), p_flat[:, a], minlength=2 * ng - 1) for a in range(n_angles)], axis=1)
    p_diff = np.stack([np.bincount(diff_index.ravel(), p_flat[:, a], minlength=ng) for a in range(n_angles)], axis=1)
    k_sum = np.arange(2, 2 * ng + 1, dtype=np.float64)[:, None]
    k_diff = np.arange(0, ng, dtype=np.float64)[:, None]

    # Terms that depend on (i, j) only through i + j, |i − j| or one marginal are summed over those
    # distributions (Σ_ij p f(i + j) = Σ_k p_{x+y}(k) f(k)): arrays of 2Ng instead of G²·A (cost).
    hxy = -np.sum(p * np.log2(p + EPS), axis=(0, 1))
    centred_sum = k_sum - (ux + uy)[None, :]  # (2Ng − 1, A)
    centred_sum2 = centred_sum * centred_sum
    p_centred2 = p_sum * centred_sum2
    i_dev = level_column - ux[None, :]
    j_dev = level_column - uy[None, :]
    sum_squares = np.sum(px * (i_dev * i_dev), axis=0)
    sigx = np.sqrt(sum_squares)
    sigy = np.sqrt(np.sum(py * (j_dev * j_dev), axis=0))
    # Σ_ij i·j·p(i, j) per angle, as iᵀ P j
    autocorrelation = np.einsum("i,ija,j->a", levels, p, levels)
    correlation_numerator = autocorrelation - ux * uy  # Σ p (i − μx)(j − μy), Σ p = 1
    correlation = correlation_numerator / (sigx * sigy + EPS)
    correlation[sigx * sigy == 0] = 1.0
    difference_average = np.sum(k_diff * p_diff, axis=0)

    hx = -np.sum(px * np.log2(px + EPS), axis=0)
    hy = -np.sum(py * np.log2(py + EPS), axis=0)
    pxpy = px[:, None, :] * py[None, :, :]
    log_pxpy = np.log2(pxpy + EPS)
    hxy1 = -np.sum(p * log_pxpy, axis=(0, 1))
    hxy2 = -np.sum(pxpy * log_pxpy, axis=(0, 1))
    div = np.fmax(hx, hy)
    imc1 = hxy - hxy1
    imc1 = np.where(div != 0, imc1 / np.where(div != 0, div, 1.0), 0.0)
    with np.errstate(invalid="ignore"):
        imc2 = np.sqrt(1 - np.exp(-2 * (hxy2 - hxy)))
    imc2[hxy2 == hxy] = 0.0

    mcc = maximal_correlation_coefficient(p, px, py)
    k_diff2 = k_diff * k_diff

    def angle_mean(per_angle: np.ndarray) -> float:
        # nanmean without its per-call overhead (23 calls per region)
        kept = per_angle[~np.isnan(per_angle)]
        return float(kept.sum() / kept.size) if kept.size else math.nan

    return {
        "Autocorrelation": angle_mean(autocorrelation),
        "ClusterProminence": angle_mean(np.sum(p_centred2 * centred_sum2, axis=0)),
        "ClusterShade": angle_mean(np.sum(p_centred2 * centred_sum, axis=0)),
        "ClusterTendency": angle_mean(np.sum(p_centred2, axis=0)),
        "Contrast": angle_mean(np.sum(p_diff * k_diff2, axis=0)),
        "Correlation": angle_mean(correlation),
        "DifferenceAverage": angle_mean(difference_average),
        "DifferenceEntropy": angle_mean(-np.sum(p_diff * np.log2(p_diff + EPS), axis=0)),
        "DifferenceVariance": angle_mean(np.sum(p_diff * np.square(k_diff - difference_average[None, :]), axis=0)),
        "Id": angle_mean(np.sum(p_diff / (1 + k_diff), axis=0)),
        "Idm": angle_mean(np.sum(p_diff / (1 + k_diff2), axis=0)),
        "Idmn": angle_mean(np.sum(p_diff / (1 + k_diff2 / ng**2), axis=0)),
        "Idn": angle_mean(np.sum(p_diff / (1 + k_diff / ng), axis=0)),
        "Imc1": angle_mean(imc1),
        "Imc2": angle_mean(imc2),
        "InverseVariance": angle_mean(np.sum(p_diff[1:] / k_diff2[1:], axis=0)),
        "JointAverage": angle_mean(ux),
        "JointEnergy": angle_mean(np.sum(p * p, axis=(0, 1))),
        "JointEntropy": angle_mean(hxy),
        "MCC": mcc,
        "MaximumProbability": angle_mean(np.max(p, axis=(0, 1))),
        "SumAverage": angle_mean(np.sum(k_sum * p_sum, axis=0)),
        "SumEntropy": angle_mean(-np.sum(p_sum * np.log2(p_sum + EPS), axis=0)),
        "SumSquares": angle_mean(sum_squares),
    }


# --- Run-length, size-zone and dependence matrices (GLRLM, GLSZM, GLDM) and NGTDM -------------------

# Generic descriptor -> class-specific pyradiomics name.
_GLRLM_NAMES = {
    "small": "ShortRunEmphasis", "large": "LongRunEmphasis", "gln": "GrayLevelNonUniformity",
    "glnn": "GrayLevelNonUniformityNormalized", "sn": "RunLengthNonUniformity",
    "snn": "RunLengthNonUniformityNormalized", "glv": "GrayLevelVariance", "sv": "RunVariance",
    "entropy": "RunEntropy", "lgle": "LowGrayLevelRunEmphasis", "hgle": "HighGrayLevelRunEmphasis",
    "slgle": "ShortRunLowGrayLevelEmphasis", "shgle": "ShortRunHighGrayLevelEmphasis",
    "llgle": "LongRunLowGrayLevelEmphasis", "lhgle": "LongRunHighGrayLevelEmphasis", "percentage": "RunPercentage",
}  # fmt: skip
_GLSZM_NAMES = {
    "small": "SmallAreaEmphasis", "large": "LargeAreaEmphasis", "gln": "GrayLevelNonUniformity",
    "glnn": "GrayLevelNonUniformityNormalized", "sn": "SizeZoneNonUniformity",
    "snn": "SizeZoneNonUniformityNormalized", "glv": "GrayLevelVariance", "sv": "ZoneVariance",
    "entropy": "ZoneEntropy", "lgle": "LowGrayLevelZoneEmphasis", "hgle": "HighGrayLevelZoneEmphasis",
    "slgle": "SmallAreaLowGrayLevelEmphasis", "shgle": "SmallAreaHighGrayLevelEmphasis",
    "llgle": "LargeAreaLowGrayLevelEmphasis", "lhgle": "LargeAreaHighGrayLevelEmphasis", "percentage": "ZonePercentage",
}  # fmt: skip
_GLDM_NAMES = {
    "small": "SmallDependenceEmphasis", "large": "LargeDependenceEmphasis", "gln": "GrayLevelNonUniformity",
    "sn": "DependenceNonUniformity", "snn": "DependenceNonUniformityNormalized", "glv": "GrayLevelVariance",
    "sv": "DependenceVariance", "entropy": "DependenceEntropy", "lgle": "LowGrayLevelEmphasis",
    "hgle": "HighGrayLevelEmphasis", "slgle": "SmallDependenceLowGrayLevelEmphasis",
    "shgle": "SmallDependenceHighGrayLevelEmphasis", "llgle": "LargeDependenceLowGrayLevelEmphasis",
    "lhgle": "LargeDependenceHighGrayLevelEmphasis",
}  # fmt: skip


def compress_sizes(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keep only the sizes j with Σ_{i,a} P(i, j, a) > 0 (pyradiomics drops the others), first, so that the
    GLSZM's N_s-wide matrix shrinks to the handful of zone sizes present (cost). Returns (P', sizes')."""
    occurring = matrix.any(axis=(0, 2))
    sizes = np.arange(1, matrix.shape[1] + 1, dtype=np.float64)[occurring]
    return matrix[:, occurring, :], sizes


def size_matrix_features(
    matrix: np.ndarray, levels: np.ndarray, sizes: np.ndarray, totals: np.ndarray, n_pixels: np.ndarray
) -> dict[str, float]:
    """Shared features of a grey-level × size matrix P(i, j) per angle a (run length, zone size or
    dependence size j), N_a = Σ_ij P, p_g(i) = Σ_j P, p_s(j) = Σ_i P; each averaged over angles (nanmean):

    small = Σ p_s(j)/j² / N, large = Σ p_s(j) j² / N, gln = Σ p_g² / N, glnn = Σ p_g² / N²,
    sn = Σ p_s² / N, snn = Σ p_s² / N², glv = Σ (p_g/N)(i − μ_i)², sv = Σ (p_s/N)(j − μ_j)²,
    entropy = −Σ (P/N) log2(P/N + ε), lgle = Σ p_g/i² / N, hgle = Σ p_g i² / N,
    slgle = Σ P/(i²j²) / N, shgle = Σ P i²/j² / N, llgle = Σ P j²/i² / N, lhgle = Σ P i²j² / N,
    percentage = N / N_p (N_p = ``n_pixels`` per angle).

    ``matrix`` (G, J', A) holds the present grey ``levels`` and the occurring ``sizes``
    (:func:`compress_sizes`); ``totals`` is N_a (nan when empty).
    """
    p_size = matrix.sum(axis=0)  # (J', A)
    p_grey = matrix.sum(axis=1)  # (G, A)
    j = sizes[:, None]  # (J', 1)
    i = levels[:, None]  # (G, 1)
    j2 = j * j
    i2 = i * i
    n = totals
    p_grey_norm = p_grey / n
    mu_i = np.sum(p_grey_norm * i, axis=0)
    p_size_norm = p_size / n
    mu_j = np.sum(p_size_norm * j, axis=0)
    p_norm = matrix / n[None, None, :]
    i2_3 = i2[:, :, None]  # (G, 1, 1)
    j2_3 = j2[None, :, :]  # (1, J', 1)
    i_dev = i - mu_i
    j_dev = j - mu_j

    def mean(per_angle: np.ndarray) -> float:
        kept = per_angle[~np.isnan(per_angle)]
        return float(kept.sum() / kept.size) if kept.size else math.nan

    return {
        "small": mean(np.sum(p_size / j2, axis=0) / n),
        "large": mean(np.sum(p_size * j2, axis=0) / n),
        "gln": mean(np.sum(p_grey * p_grey, axis=0) / n),
        "glnn": mean(np.sum(p_grey * p_grey, axis=0) / (n * n)),
        "sn": mean(np.sum(p_size * p_size, axis=0) / n),
        "snn": mean(np.sum(p_size * p_size, axis=0) / (n * n)),
        "glv": mean(np.sum(p_grey_norm * (i_dev * i_dev), axis=0)),
        "sv": mean(np.sum(p_size_norm * (j_dev * j_dev), axis=0)),
        "entropy": mean(-np.sum(p_norm * np.log2(p_norm + EPS), axis=(0, 1))),
        "lgle": mean(np.sum(p_grey / i2, axis=0) / n),
        "hgle": mean(np.sum(p_grey * i2, axis=0) / n),
        "slgle": mean(np.sum(matrix / (i2_3 * j2_3), axis=(0, 1)) / n),
        "shgle": mean(np.sum(matrix * i2_3 / j2_3, axis=(0, 1)) / n),
        "llgle": mean(np.sum(matrix * j2_3 / i2_3, axis=(0, 1)) / n),
        "lhgle": mean(np.sum(matrix * (j2_3 * i2_3), axis=(0, 1)) / n),
        "percentage": mean(n / n_pixels),
    }


def _present(matrix: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Rows of the grey levels present in the ROI (pyradiomics deletes the absent ones)."""
    return matrix[levels.astype(np.intp) - 1]


def glrlm_features(binned: np.ndarray, mask: np.ndarray, force2d: bool = True, force2d_dimension: int = 0, levels: np.ndarray | None = None) -> dict[str, float]:
    """pyradiomics GLRLM features (formulas in :func:`size_matrix_features`, j = run length, N = number of
    runs per angle, RunPercentage = N / Σ_j p_s(j)·j), averaged over the in-plane angles."""
    levels = present_levels(binned, mask) if levels is None else levels
    ng = int(levels.max())
    matrix, _angles = cMatrices.calculate_glrlm(binned, mask, ng, int(max(binned.shape)), bool(force2d), int(force2d_dimension))
    matrix = _present(matrix[0], levels)  # (G, J, A)
    totals = matrix.sum(axis=(0, 1))
    if matrix.shape[2] > 1:
        matrix, totals = matrix[:, :, totals != 0], totals[totals != 0]
    totals = np.where(totals == 0, np.nan, totals)
    matrix, sizes = compress_sizes(matrix)
    n_pixels = np.sum(matrix.sum(axis=0) * sizes[:, None], axis=0)
    generic = size_matrix_features(matrix, levels.astype(np.float64), sizes, totals, n_pixels)
    return {_GLRLM_NAMES[key]: value for key, value in generic.items()}


def glszm_features(binned: np.ndarray, mask: np.ndarray, force2d: bool = True, force2d_dimension: int = 0, levels: np.ndarray | None = None) -> dict[str, float]:
    """pyradiomics GLSZM features (formulas in :func:`size_matrix_features`, j = zone size of 8-connected
    same-level zones in 2-D, N = N_z zones, ZonePercentage = N_z / N_p, N_p = Σ_j p_s(j)·j)."""
    levels = present_levels(binned, mask) if levels is None else levels
    ng = int(levels.max())
    matrix = cMatrices.calculate_glszm(binned, mask, ng, int(mask.sum()), bool(force2d), int(force2d_dimension))
    matrix, sizes = compress_sizes(_present(matrix[0], levels)[:, :, None])  # (G, J', 1)
    n_zones = float(matrix.sum()) or 1.0
    n_pixels = float(np.sum(matrix.sum(axis=0)[:, 0] * sizes)) or 1.0
    generic = size_matrix_features(matrix, levels.astype(np.float64), sizes, np.array([n_zones]), np.array([n_pixels]))
    return {_GLSZM_NAMES[key]: value for key, value in generic.items()}


def gldm_features(binned: np.ndarray, mask: np.ndarray, distances: tuple[int, ...] = (1,), alpha: int = 0, force2d: bool = True, force2d_dimension: int = 0, levels: np.ndarray | None = None) -> dict[str, float]:
    """pyradiomics GLDM features (formulas in :func:`size_matrix_features`, j = dependence size: 1 + the
    number of neighbours within |Δ| ≤ α of the centre's grey level, N = N_z = number of pixels)."""
    levels = present_levels(binned, mask) if levels is None else levels
    ng = int(levels.max())
    matrix = cMatrices.calculate_gldm(binned, mask, np.asarray(distances), ng, alpha, bool(force2d), int(force2d_dimension))
    matrix, sizes = compress_sizes(_present(matrix[0], levels)[:, :, None])
    n_total = float(matrix.sum()) or 1.0
    generic = size_matrix_features(matrix, levels.astype(np.float64), sizes, np.array([n_total]), np.array([n_total]))
    return {_GLDM_NAMES[key]: value for key, value in generic.items() if key in _GLDM_NAMES}


def ngtdm_features(binned: np.ndarray, mask: np.ndarray, distances: tuple[int, ...] = (1,), force2d: bool = True, force2d_dimension: int = 0, levels: np.ndarray | None = None) -> dict[str, float]:
    """pyradiomics NGTDM features from n_i (pixels of level i with a valid neighbourhood), p_i = n_i / N_vp
    and s_i = Σ |i − Ā_i| (Ā the neighbourhood mean), over the N_gp present levels:

    Coarseness = 1 / Σ p_i s_i (10⁶ if 0), Contrast = [Σ_ij p_i p_j (i − j)² / (N_gp(N_gp − 1))]·Σ s_i / N_vp,
    Busyness = Σ p_i s_i / Σ_ij |i p_i − j p_j|, Complexity = Σ_ij |i − j| (p_i s_i + p_j s_j)/(p_i + p_j) / N_vp,
    Strength = Σ_ij (p_i + p_j)(i − j)² / Σ s_i (0 where a denominator is 0).
    """
    levels = present_levels(binned, mask) if levels is None else levels
    ng = int(levels.max())
    matrix = cMatrices.calculate_ngtdm(binned, mask, np.asarray(distances), ng, bool(force2d), int(force2d_dimension))[0]
    matrix = matrix[matrix[:, 0] != 0]
    counts, s, i = matrix[:, 0], matrix[:, 1], matrix[:, 2]
    n_vp = counts.sum()
    p = counts / n_vp
    n_gp = int(np.count_nonzero(counts))
    sum_ps = float(np.sum(p * s))
    sum_s = float(np.sum(s))
    di = i[:, None] - i[None, :]
    contrast_div = n_gp * (n_gp - 1)
    contrast = float(np.sum(p[:, None] * p[None, :] * di**2)) * sum_s / n_vp
    contrast = contrast / contrast_div if contrast_div != 0 else 0.0
    ip = i * p
    absdiff = float(np.sum(np.abs(ip[:, None] - ip[None, :])))
    ps = p * s
    divisor = p[:, None] + p[None, :]
    divisor = np.where(divisor == 0, 1.0, divisor)
    strength = float(np.sum((p[:, None] + p[None, :]) * di**2))
    return {
        "Busyness": sum_ps / absdiff if absdiff != 0 else 0.0,
        "Coarseness": 1.0 / sum_ps if sum_ps != 0 else 1e6,
        "Complexity": float(np.sum(np.abs(di) * (ps[:, None] + ps[None, :]) / divisor)) / n_vp,
        "Contrast": contrast,
        "Strength": strength / sum_s if sum_s != 0 else 0.0,
    }
