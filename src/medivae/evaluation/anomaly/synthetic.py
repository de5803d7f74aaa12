"""Synthetic anomalies made from normal images, for choosing scores without looking at real anomalies.

Foreign-patch interpolation (Tan et al. 2020, "Detecting outliers with foreign patch interpolation"):
a region of a normal image is blended with the same region of *another* normal image,
``x' = (1 - a) x + a x_other`` inside a random mask, with a random factor ``a`` per image. The result is
locally implausible but made only of normal anatomy, so a score that separates it from normals has
learned something about normal structure rather than about the brightness or contrast of one class
of real anomalies. The mask is known, so the same images measure localisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medivae.runtime.seeding import numpy_rng


@dataclass
class SyntheticAnomalies:
    """images: uint8 (N, C, H, W); masks: bool (N, H, W), True exactly where the image differs from its
    normal; factors: (N,) interpolation factor a; sources: (N,) index of the foreign image."""

    images: np.ndarray
    masks: np.ndarray
    factors: np.ndarray
    sources: np.ndarray


def random_mask(rng: np.random.Generator, size: int, min_frac: float, max_frac: float) -> np.ndarray:
    """A bool (size, size) ellipse with random axes (``min_frac``..``max_frac`` of the side), centre and tilt."""
    ry, rx = rng.uniform(min_frac, max_frac, 2) * size / 2
    cy, cx = rng.uniform(ry, size - ry), rng.uniform(rx, size - rx)
    t = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    u = (xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)
    v = -(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)
    mask = (u / rx) ** 2 + (v / ry) ** 2 <= 1.0
    if not mask.any():  # a sliver below one pixel: keep at least the centre
        mask[min(int(cy), size - 1), min(int(cx), size - 1)] = True
    return mask


def foreign_patch(normals: np.ndarray, seed: int, min_frac: float = 0.15, max_frac: float = 0.5,
                  factor: tuple[float, float] = (0.3, 1.0)) -> SyntheticAnomalies:
    """One synthetic anomaly per normal uint8 image (N, C, H, W), N >= 2: a random elliptic region blended
    with the same region of another random normal at a factor drawn from ``factor``. The mask is the pixels the
    blend changed; the others are the input's, bit for bit. Deterministic given ``seed``."""
    n, _, h, w = normals.shape
    if n < 2:
        raise ValueError(f"foreign-patch interpolation needs at least 2 normal images, got {n}")
    if h != w:
        raise ValueError(f"square images expected, got {h}x{w}")
    rng = numpy_rng(seed, "foreign-patch")
    out = np.array(normals, copy=True)
    masks = np.zeros((n, h, w), dtype=bool)
    factors, sources = rng.uniform(*factor, n), np.empty(n, dtype=np.int64)
    for i in range(n):
        j = int(rng.integers(0, n - 1))
        sources[i] = j + (j >= i)  # any image but i itself
        m = random_mask(rng, h, min_frac, max_frac)
        a = factors[i]
        blend = (1 - a) * normals[i][:, m].astype(np.float64) + a * normals[sources[i]][:, m]
        out[i][:, m] = np.clip(np.round(blend), 0, 255).astype(np.uint8)
        masks[i] = (out[i] != normals[i]).any(0)  # a blend of equal pixels changes nothing: not anomalous there
    return SyntheticAnomalies(out, masks, factors, sources)
