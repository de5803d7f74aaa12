"""Synthetic anomalies made from normal images, for choosing scores without looking at real anomalies.

Each kind changes one random elliptic region of a normal image the way a lesion might; image i of every kind
is made from normal i. A score chosen on one kind learns that kind (a default chosen on foreign patches alone
did no better than PNG size on smooth blobs), so choices are made across all of them (:mod:`.selection`).

- ``foreign_patch``: the region blended with the same region of *another* normal, ``(1 - a) x + a x_other``
  (foreign-patch interpolation, Tan et al. 2020): locally implausible, yet made only of normal anatomy;
- ``blob``: a smooth bright or dark Gaussian bump of random size and contrast added (a nodule, an opacity);
- ``intensity_shift``: the region's intensities scaled up or down, with a sharp edge (a local change of density);
- ``noise``: Gaussian noise added in the region (texture without structure);
- ``blur``: the region blurred (structure without texture);
- ``deformation``: the image warped smoothly around a point, bulging out or pulled in (a mass effect).

A mask is True exactly where the synthetic image differs from its normal after rounding to uint8, so the
same images measure localisation; an image its kind left unchanged has an empty mask.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from medivae.runtime.seeding import numpy_rng

MAX_TRIES = 10  # draws per image before an unchanged image is kept (a constant image)


@dataclass
class SyntheticAnomalies:
    """kind: its name; images: uint8 (N, C, H, W), image i made from normal i; masks: bool (N, H, W), True
    exactly where image i differs from normal i; params: {name: (N,)}, what was drawn for each image."""

    kind: str
    images: np.ndarray
    masks: np.ndarray
    params: dict[str, np.ndarray]


def _ellipse(rng: np.random.Generator, size: int, min_frac: float, max_frac: float) -> tuple[np.ndarray, float]:
    """The normalised radius (size, size) of a random ellipse (axes ``min_frac``..``max_frac`` of the side,
    random centre and tilt; <= 1 inside) and its mean semi-axis in pixels."""
    ry, rx = rng.uniform(min_frac, max_frac, 2) * size / 2
    cy, cx = rng.uniform(ry, size - ry), rng.uniform(rx, size - rx)
    t = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    u = (xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)
    v = -(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)
    return np.sqrt((u / rx) ** 2 + (v / ry) ** 2), float((rx + ry) / 2)


def random_mask(rng: np.random.Generator, size: int, min_frac: float, max_frac: float) -> np.ndarray:
    """A bool (size, size) ellipse with random axes (``min_frac``..``max_frac`` of the side), centre and tilt."""
    r, _ = _ellipse(rng, size, min_frac, max_frac)
    mask = r <= 1.0
    if not mask.any():  # a sliver below one pixel: keep the pixel nearest the centre
        mask[np.unravel_index(np.argmin(r), r.shape)] = True
    return mask


def _sign(rng) -> float:
    return 1.0 if rng.random() < 0.5 else -1.0


# Each kind: (rng, x float64 (C, H, W) in 0..255, all normals uint8, index i) -> (changed x, {param: value}).
def _foreign_patch(rng, x, normals, i):
    j = int(rng.integers(0, len(normals) - 1))
    j += j >= i  # any image but i itself
    m, a = random_mask(rng, x.shape[-1], 0.15, 0.5), rng.uniform(0.3, 1.0)
    x[:, m] = (1 - a) * x[:, m] + a * normals[j][:, m]
    return x, {"factor": a, "source": j}


def _blob(rng, x, normals, i):
    r, _ = _ellipse(rng, x.shape[-1], 0.1, 0.4)
    contrast = _sign(rng) * rng.uniform(0.15, 0.5) * 255
    return x + contrast * np.exp(-2.0 * r**2), {"contrast": contrast}  # r = 1 at two standard deviations


def _intensity_shift(rng, x, normals, i):
    m = random_mask(rng, x.shape[-1], 0.15, 0.5)
    gain = rng.uniform(1.2, 1.5) if rng.random() < 0.5 else rng.uniform(0.55, 0.85)
    x[:, m] *= gain
    return x, {"gain": gain}


def _noise(rng, x, normals, i):
    m = random_mask(rng, x.shape[-1], 0.15, 0.5)
    sigma = rng.uniform(0.05, 0.2) * 255
    x[:, m] += rng.normal(0.0, sigma, (x.shape[0], int(m.sum())))
    return x, {"sigma": sigma}


def _blur(rng, x, normals, i):
    from scipy.ndimage import gaussian_filter

    m = random_mask(rng, x.shape[-1], 0.15, 0.5)
    sigma = rng.uniform(1.0, 3.0)
    x[:, m] = gaussian_filter(x, sigma=(0, sigma, sigma), mode="nearest")[:, m]
    return x, {"sigma": sigma}


def _deformation(rng, x, normals, i):
    """x sampled at p - w(p) (p - c), w = s (1 - |p - c|^2 / R^2)^2 inside radius R, 0 outside: a smooth bulge
    (s > 0) or pull (s < 0) that leaves every pixel beyond R as it was."""
    from scipy.ndimage import map_coordinates

    size = x.shape[-1]
    reach = rng.uniform(0.15, 0.35) * size
    cy, cx = rng.uniform(0.25 * size, 0.75 * size, 2)
    strength = _sign(rng) * rng.uniform(0.4, 0.8)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    w = strength * np.clip(1.0 - ((yy - cy) ** 2 + (xx - cx) ** 2) / reach**2, 0.0, None) ** 2
    at = np.stack([yy - w * (yy - cy), xx - w * (xx - cx)])
    return np.stack([map_coordinates(c, at, order=1, mode="nearest") for c in x]), {"strength": strength}


KINDS: dict[str, Callable] = {"foreign_patch": _foreign_patch, "blob": _blob, "intensity_shift": _intensity_shift,
                              "noise": _noise, "blur": _blur, "deformation": _deformation}


def synthesize(kind: str, normals: np.ndarray, seed: int) -> SyntheticAnomalies:
    """One anomaly of ``kind`` (:data:`KINDS`) per normal uint8 image (N, C, H, W), image i made from normal i.
    Deterministic given ``seed``; a foreign patch needs N >= 2."""
    n, _, h, w = normals.shape
    if h != w:
        raise ValueError(f"square images expected, got {h}x{w}")
    if kind == "foreign_patch" and n < 2:
        raise ValueError(f"foreign-patch interpolation needs at least 2 normal images, got {n}")
    make, rng = KINDS[kind], numpy_rng(seed, "synthetic", kind)
    out = np.empty_like(normals)
    params: dict[str, list] = {}
    for i in range(n):
        for _ in range(MAX_TRIES):  # a region where the kind changes nothing (blur on a flat patch): draw again
            x, drawn = make(rng, normals[i].astype(np.float64), normals, i)
            out[i] = np.clip(np.round(x), 0, 255).astype(np.uint8)
            if (out[i] != normals[i]).any():
                break
        for k, v in drawn.items():
            params.setdefault(k, []).append(v)
    masks = (out != normals).any(1)  # what changed, nothing else
    return SyntheticAnomalies(kind, out, masks, {k: np.asarray(v) for k, v in params.items()})


def suite(normals: np.ndarray, seed: int, kinds=tuple(KINDS)) -> dict[str, SyntheticAnomalies]:
    """Every kind of ``kinds`` made from the same normals: {kind: SyntheticAnomalies}."""
    return {k: synthesize(k, normals, seed) for k in kinds}


def foreign_patch(normals: np.ndarray, seed: int) -> SyntheticAnomalies:
    """Foreign-patch interpolation (Tan et al. 2020) of every normal: :func:`synthesize` ``("foreign_patch")``."""
    return synthesize("foreign_patch", normals, seed)
