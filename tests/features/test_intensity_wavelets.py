"""Intensity and wavelet descriptors on signals whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import pywt

from qcgate.features.intensity import (
    energy_of_gradient,
    fourier_snr_db,
    intensity_descriptors,
    variance_of_laplacian,
)
FRAME_SIZE = 256

from qcgate.features.wavelets import (
    WAVELET_DESCRIPTORS,
    image_region_wavelet_descriptors,
    level_energies,
    wavelet_descriptors,
)

FULL = np.ones((64, 64), dtype=bool)


def test_constant_image_has_no_gradient_no_laplacian_and_undefined_snr() -> None:
    image = np.full((64, 64), -800.0)
    assert energy_of_gradient(image, FULL) == 0.0
    assert variance_of_laplacian(image, FULL) == 0.0
    assert math.isnan(fourier_snr_db(image))
    assert math.isnan(fourier_snr_db(np.zeros((16, 16))))
    assert all(math.isnan(v) for v in image_region_wavelet_descriptors(image, FULL).values())


def test_energy_of_gradient_of_a_ramp() -> None:
    rows, cols = np.mgrid[:40, :40]
    ramp = 3.0 * cols + 4.0 * rows  # |∇I|² = 9 + 16 everywhere
    assert energy_of_gradient(ramp.astype(float), np.ones((40, 40), bool)) == pytest.approx(25.0)


def test_variance_of_laplacian_separates_smooth_from_noisy() -> None:
    rows, cols = np.mgrid[:50, :50].astype(float)
    quadratic = rows**2 + 2 * cols**2  # ∇² = 2 + 4 = 6 everywhere inside
    inner = np.zeros((50, 50), bool)
    inner[2:-2, 2:-2] = True
    assert variance_of_laplacian(quadratic, inner) == pytest.approx(0.0, abs=1e-9)
    noise = np.random.default_rng(1).normal(0, 10, (50, 50))
    # Var(∇² of white noise) = (16 + 4·1) σ² = 20 σ²
    assert variance_of_laplacian(noise, inner) == pytest.approx(20 * 100, rel=0.1)


def test_fourier_snr_of_white_noise_and_smooth_signal() -> None:
    noise = np.random.default_rng(2).normal(0, 1, (128, 128))
    expected = 10 * math.log10((math.pi / 16) / (1 - math.pi / 16))  # disc of radius 0.25 in the unit square
    assert fourier_snr_db(noise) == pytest.approx(expected, abs=0.3)
    rows, cols = np.mgrid[:128, :128]
    smooth = np.sin(2 * np.pi * cols / 32.0) + np.cos(2 * np.pi * rows / 64.0)
    assert 40.0 < fourier_snr_db(smooth) <= 100.0 + 1e-6  # noiseless: large but finite
    assert fourier_snr_db(smooth + 0.5 * noise) < fourier_snr_db(smooth + 0.05 * noise)


def test_region_outside_pixels_do_not_count() -> None:
    image = np.random.default_rng(3).normal(0, 50, (60, 60))
    region = np.zeros((60, 60), bool)
    region[20:40, 20:40] = True
    image[region] = 10.0  # flat inside, noisy outside
    values = intensity_descriptors(image, region)
    inner = np.zeros_like(region)
    inner[22:38, 22:38] = True
    # The region's interior sees only flat HU: zero gradient there; the SNR of a flat (mean-filled) crop is undefined.
    assert energy_of_gradient(image, inner) == 0.0
    assert math.isnan(values["fourier_snr"])


@pytest.mark.parametrize("level", [1, 2, 3, 4, 5])
def test_sinusoid_dominant_scale(level: int) -> None:
    period = 2 ** (level + 0.5)  # geometric middle of level j's band [2^j, 2^(j+1)] pixels
    rows, cols = np.mgrid[:FRAME_SIZE, :FRAME_SIZE]
    for image in (np.sin(2 * np.pi * cols / period), np.sin(2 * np.pi * rows / period)):
        values = wavelet_descriptors(image, "db2")
        assert values["wavelet_dominant_scale"] == level
        # Most energy in one band (≳ 60 %): energy variance well above a flat spectrum's 0.
        assert values["wavelet_energy_variance"] > 0.03


def test_white_noise_has_flat_per_coefficient_spectrum() -> None:
    noise = np.random.default_rng(4).normal(0, 1, (FRAME_SIZE, FRAME_SIZE))
    values = wavelet_descriptors(noise, "db2")
    assert values["wavelet_fractality"] == pytest.approx(0.0, abs=0.15)
    # Energy follows the coefficient count: 3/4 of it in level 1, so fine dominates coarse by ~2.4 decades.
    assert values["wavelet_dominant_scale"] == 1
    assert values["wavelet_scale_ratio"] == pytest.approx(math.log10((1 - 2**-8) / 2**-8), abs=0.3)


def test_brownian_surface_is_more_fractal_than_noise() -> None:
    rng = np.random.default_rng(5)
    brown = np.cumsum(np.cumsum(rng.normal(0, 1, (FRAME_SIZE, FRAME_SIZE)), axis=0), axis=1)
    noise = rng.normal(0, 1, (FRAME_SIZE, FRAME_SIZE))
    assert wavelet_descriptors(brown)["wavelet_fractality"] > wavelet_descriptors(noise)["wavelet_fractality"] + 1.5


@pytest.mark.filterwarnings("ignore:Level value")
def test_level_energies_satisfy_parseval_and_match_pywt() -> None:
    image = np.random.default_rng(6).normal(0, 1, (100, 70))
    for wavelet in ("db1", "db2"):
        energies, counts = level_energies(image, wavelet)
        coefficients = pywt.wavedec2(image, wavelet, mode="zero", level=8)
        approx_energy = float(np.sum(coefficients[0] ** 2))
        # Orthonormal transform of the zero-extended crop: detail + approximation energy = signal energy.
        assert energies.sum() + approx_energy == pytest.approx(float(np.sum(image**2)), rel=1e-9)
        np.testing.assert_allclose(counts, [3 * 7000 / 4**j for j in range(1, 9)])
        expected = [sum(float(np.sum(band**2)) for band in level) for level in coefficients[1:][::-1]]
        np.testing.assert_allclose(energies, expected, rtol=1e-12)


def test_mask_and_empty_inputs() -> None:
    values = wavelet_descriptors(np.zeros((20, 20)), "db1")
    assert set(values) == set(WAVELET_DESCRIPTORS) and all(math.isnan(v) for v in values.values())
    rows, cols = np.mgrid[:300, :300]
    big = ((rows - 150) ** 2 + (cols - 150) ** 2 <= 140**2).astype(float)  # larger than the frame: centre-cropped
    assert all(math.isfinite(v) for v in wavelet_descriptors(big, "db1").values())


@pytest.mark.parametrize("shape", [(5, 5), (8, 9), (17, 16), (81, 88), (64, 64)])
def test_fourier_snr_half_spectrum_equals_full_spectrum(shape: tuple[int, int]) -> None:
    data = np.random.default_rng(12).normal(size=shape) + np.linspace(0, 3, shape[1])[None, :]
    power = np.abs(np.fft.fft2(data - data.mean())) ** 2
    radial = np.sqrt(np.fft.fftfreq(shape[0])[:, None] ** 2 + np.fft.fftfreq(shape[1])[None, :] ** 2)
    low, high = power[(radial > 0) & (radial <= 0.25)].sum(), power[radial > 0.25].sum()
    floor = 1e-10 * power.sum()
    assert fourier_snr_db(data) == pytest.approx(10 * math.log10((low + floor) / (high + floor)), rel=1e-12)


def test_direct_dwt_kernel_equals_public_pywt_dwt() -> None:
    from qcgate.features.wavelets import _dwt_axis, _wavelet

    data = np.random.default_rng(13).normal(size=(9, 14))
    for name in ("db1", "db2"):
        for axis in (0, 1):
            ours = _dwt_axis(data, _wavelet(name), axis)
            theirs = pywt.dwt(data, name, mode="zero", axis=axis)
            for a, b in zip(ours, theirs):
                np.testing.assert_array_equal(a, b)
