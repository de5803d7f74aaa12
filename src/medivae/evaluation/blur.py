"""The blur check of a sample metric: real images blurred by wider and wider Gaussians must score worse and
worse, and a blur of one pixel well above two real sets (the floor). A metric that fails it ranks a blurry
model near real data.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.ndimage import gaussian_filter

from medivae.evaluation import sample_quality as sq
from medivae.evaluation.sharpness import hf_power_ratio

SIGMAS = (0.7, 1.0, 1.5)  # pixels


def gaussian_blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """uint8 (N, C, H, W) -> the same blurred over H and W (edges reflected), rounded back to 8 bits as
    generated images are before they are scored."""
    out = gaussian_filter(np.asarray(images, dtype=np.float64), sigma=(0, 0, sigma, sigma), mode="reflect")
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def blur_rows(features: Callable[[np.ndarray], np.ndarray], reference: np.ndarray, held_out: np.ndarray,
              sigmas: tuple[float, ...] = SIGMAS) -> list[dict]:
    """Every sample metric of real ``held_out`` images (uint8 (M, C, H, W)) against other real ``reference``
    images (N, C, H, W), as they are and blurred: [{"sigma": 0.0 (the floor), fd, precision, recall, density,
    coverage, hf_power_ratio}, then one row per sigma]. ``features``: images -> (n, F) features."""
    f_ref = features(reference)
    rows = []
    for sigma in (0.0, *sigmas):
        x = held_out if sigma == 0 else gaussian_blur(held_out, sigma)
        rows.append({"sigma": sigma, **sq.compare(f_ref, features(x)), "hf_power_ratio": hf_power_ratio(x, reference)})
    return rows
