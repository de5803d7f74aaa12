"""Sharpness of images as the share of their spectral power at high spatial frequencies.

Blur removes high frequencies, so the share of an image's power (after removing its mean) that lies
above a radial frequency cutoff measures how sharp it is; samples are compared with real images through
the ratio of the two shares (1: as sharp as real data; VAE samples are typically well below 1). A
standard, model-free measure; no library computes exactly this, so it is a few lines of NumPy FFT.
"""

from __future__ import annotations

import numpy as np


def _power(images: np.ndarray, cutoff: float) -> tuple[np.ndarray, np.ndarray]:
    """(power above ``cutoff`` cycles/pixel, all non-DC power), per image (N,), intensities in [0, 1]."""
    raw = np.asarray(images)
    x = raw.astype(np.float64) / (255.0 if raw.dtype == np.uint8 else 1.0)
    x = x - x.mean(axis=(-2, -1), keepdims=True)
    power = np.abs(np.fft.fft2(x)) ** 2 / (x.shape[-2] * x.shape[-1])  # (N, C, H, W), Parseval-normalised
    fy = np.fft.fftfreq(x.shape[-2])[:, None]
    fx = np.fft.fftfreq(x.shape[-1])[None, :]
    high = np.sqrt(fy**2 + fx**2) > cutoff  # (H, W)
    return power[..., high].sum(axis=(1, 2)), power.sum(axis=(1, 2, 3))


def high_frequency_share(images: np.ndarray, cutoff: float = 0.25) -> np.ndarray:
    """images: (N, C, H, W), uint8 or float in [0, 1] -> (N,) share of each image's non-DC power at
    radial frequencies above ``cutoff`` cycles/pixel (0.5 is the Nyquist limit)."""
    high, total = _power(images, cutoff)
    return np.where(total > 0, high / np.maximum(total, 1e-30), 0.0)


def high_frequency_power(images: np.ndarray, cutoff: float = 0.25) -> np.ndarray:
    """(N,) power above ``cutoff`` per pixel: unlike the share, a near-blank image with faint artefacts
    has almost none."""
    return _power(images, cutoff)[0]


def sharpness_ratio(generated: np.ndarray, real: np.ndarray, cutoff: float = 0.25) -> float:
    """Mean high-frequency share of ``generated`` over that of ``real`` images (1: as sharp as real)."""
    return float(high_frequency_share(generated, cutoff).mean() / high_frequency_share(real, cutoff).mean())


def hf_power_ratio(generated: np.ndarray, real: np.ndarray, cutoff: float = 0.25) -> float:
    """Mean high-frequency power of ``generated`` over that of ``real`` images (1: as much detail)."""
    return float(high_frequency_power(generated, cutoff).mean() / high_frequency_power(real, cutoff).mean())
