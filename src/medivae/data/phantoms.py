"""Built-in procedural chest-radiograph phantoms: a dataset with no download.

Each image: a body outline, two dark lung fields, a bright mediastinum and spine, curved ribs,
soft-tissue texture and quantum noise, all with per-image random anatomy drawn deterministically
from the seed. The "lesion" class adds one to three focal opacities inside the lungs.
Labels: 0 = normal, 1 = lesion. Synthetic data: no patient is involved anywhere.
"""

from __future__ import annotations

import numpy as np

from medivae.data.imageset import ImageSet
from medivae.runtime.seeding import numpy_rng

LABEL_NAMES = ("normal", "lesion")


def _ellipse(X, Y, cx, cy, rx, ry, soft):
    r = np.sqrt(((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2)
    return 1.0 / (1.0 + np.exp((r - 1.0) / soft))


def lung_mask(size: int, params: dict) -> np.ndarray:
    X, Y = _grid(size)
    left = _ellipse(X, Y, -params["lx"], params["ly"], params["rx"], params["ry"], 0.04)
    right = _ellipse(X, Y, params["lx"], params["ly"], params["rx"] * 1.05, params["ry"], 0.04)
    return np.maximum(left, right)


def _grid(size: int):
    t = (np.arange(size) + 0.5) / size * 2 - 1
    return np.meshgrid(t, t, indexing="xy")


def _draw_params(rng: np.random.Generator) -> dict:
    return {
        "lx": rng.uniform(0.30, 0.40),
        "ly": rng.uniform(-0.05, 0.10),
        "rx": rng.uniform(0.22, 0.30),
        "ry": rng.uniform(0.50, 0.62),
        "body_w": rng.uniform(0.78, 0.92),
        "med_w": rng.uniform(0.10, 0.16),
        "rib_gap": rng.uniform(0.13, 0.17),
        "rib_phase": rng.uniform(0, 1),
        "rib_curve": rng.uniform(0.25, 0.45),
        "exposure": rng.uniform(0.85, 1.15),
        "tilt": rng.uniform(-0.06, 0.06),
        "heart": rng.uniform(0.16, 0.24),
    }


def phantom(size: int, rng: np.random.Generator, lesion: bool) -> tuple[np.ndarray, np.ndarray]:
    """One image (size, size) float in [0, 1] and its lesion mask (all zero for normal)."""
    p = _draw_params(rng)
    X, Y = _grid(size)
    X = X + p["tilt"] * Y
    body = _ellipse(X, Y, 0, 0.05, p["body_w"], 1.15, 0.05)
    img = 0.55 * body
    lungs = lung_mask(size, p)
    img -= 0.35 * lungs
    # mediastinum and spine: bright vertical band, heart bulging to the left at the bottom
    img += 0.25 * np.exp(-(X / p["med_w"]) ** 2) * body
    img += 0.18 * _ellipse(X, Y, -0.08, 0.35, p["heart"], 0.22, 0.08) * body
    # ribs: curved bright arcs across both lung fields
    rib_y = Y + p["rib_curve"] * X**2
    rib = 0.5 + 0.5 * np.cos(2 * np.pi * (rib_y / p["rib_gap"] + p["rib_phase"]))
    img += 0.12 * rib**6 * lungs
    # clavicles
    img += 0.10 * np.exp(-(((Y + 0.62 - 0.25 * np.abs(X)) / 0.04) ** 2)) * (np.abs(X) < 0.6) * body
    # soft-tissue texture: smoothed noise
    tex = rng.normal(size=(size // 4 + 1, size // 4 + 1))
    tex = np.kron(tex, np.ones((4, 4)))[:size, :size]
    img += 0.02 * tex * body
    mask = np.zeros((size, size))
    if lesion:
        for _ in range(rng.integers(1, 4)):
            side = rng.choice([-1, 1])
            cx = side * p["lx"] + rng.uniform(-0.5, 0.5) * p["rx"]
            cy = p["ly"] + rng.uniform(-0.6, 0.6) * p["ry"]
            r = rng.uniform(0.06, 0.14)
            blob = np.exp(-((X - cx) ** 2 + (Y - cy) ** 2) / (2 * r**2))
            blob *= lungs
            mask = np.maximum(mask, blob > 0.3)
            img += rng.uniform(0.25, 0.4) * blob
    img = img * p["exposure"]
    img += rng.normal(scale=0.015, size=img.shape)
    return np.clip(img, 0, 1), mask


def make_phantoms(n: int, size: int, seed: int, lesion_fraction: float = 0.3) -> ImageSet:
    """n images (N, 1, size, size) uint8, label 1 for the lesion variant; image i depends on (seed, i)."""
    images = np.empty((n, 1, size, size), dtype=np.uint8)
    labels = np.empty(n, dtype=np.int64)
    for i in range(n):
        rng = numpy_rng(seed, "phantom", i)
        lesion = bool(rng.random() < lesion_fraction)
        img, _ = phantom(size, rng, lesion)
        images[i, 0] = np.round(img * 255).astype(np.uint8)
        labels[i] = int(lesion)
    meta = {"source": "phantoms", "n": n, "lesion_fraction": lesion_fraction}
    return ImageSet(images, labels, LABEL_NAMES, meta=meta)


def phantom_with_mask(size: int, seed: int, index: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A lesion phantom and its ground-truth lesion mask, both (size, size); for anomaly-map checks."""
    img, mask = phantom(size, numpy_rng(seed, "phantom-lesion", index), lesion=True)
    return np.round(img * 255).astype(np.uint8), mask.astype(bool)
