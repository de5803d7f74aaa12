"""Reconstruction quality from the posterior mean: MSE, PSNR and SSIM (Wang et al. 2004).

PSNR and SSIM come from scikit-image with ``data_range=1`` (images in [0, 1]); each metric is
computed per image, then averaged over images. SSIM uses the standard window of Wang et al. 2004: an
11x11 Gaussian with sigma 1.5 and population covariances. :func:`ssim_maps` is the one SSIM of medivae:
these metrics and the anomaly scores and maps (:mod:`medivae.evaluation.anomaly`) all read it.

Optionally (``foreground="otsu"``) PSNR and SSIM are also computed over the foreground only, so a
reconstruction is not rewarded for an easy black background (CT / MRI slices, phantoms): the mask is
pixels above the Otsu threshold (Otsu 1979) of the *real* image, holes filled (lungs inside a body
outline stay in), dilated by about 1/32 of the image side; foreground PSNR uses the MSE over masked
pixels, foreground SSIM the mean of scikit-image's SSIM map over them. Keys ``psnr_fg_db``, ``ssim_fg``,
and ``fg_fraction`` (the share of pixels in the mask); NaN for an image whose mask is empty.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import binary_fill_holes
from skimage.filters import threshold_otsu
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from skimage.morphology import dilation, disk

PSNR_CAP_DB = 100.0  # a perfect reconstruction has infinite PSNR, which JSON cannot hold
FOREGROUND_MASKS = ("otsu",)


def foreground_mask(image: np.ndarray, method: str = "otsu") -> np.ndarray:
    """image: float (C, H, W) in [0, 1] -> bool (H, W): the foreground of a real image (module docstring)."""
    if method not in FOREGROUND_MASKS:
        raise ValueError(f"unknown foreground mask {method!r}; choose one of {', '.join(FOREGROUND_MASKS)}")
    gray = image.mean(0)
    if gray.min() == gray.max():  # nothing to separate: a constant image has no foreground
        return np.zeros(gray.shape, dtype=bool)
    mask = binary_fill_holes(gray > threshold_otsu(gray))
    return dilation(mask, disk(max(1, round(min(gray.shape) / 32))))


def ssim_window(side: int) -> int:
    """11 (Wang et al. 2004's window), or the largest odd window an image of ``side`` pixels holds."""
    return min(11, side if side % 2 else side - 1)


def ssim_image(a: np.ndarray, b: np.ndarray) -> tuple[float, np.ndarray]:
    """SSIM of two float images (H, W, C) in [0, 1]: (mean over the pixels at least half a window from the
    border, as scikit-image reports it; the map (H, W), channel mean, every pixel)."""
    score, smap = structural_similarity(a, b, data_range=1.0, channel_axis=2, gaussian_weights=True, sigma=1.5,
                                        use_sample_covariance=False, win_size=ssim_window(min(a.shape[:2])),
                                        full=True)
    return float(score), smap.mean(2)


def ssim_maps(x: np.ndarray, x_hat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SSIM of float images x (N, C, H, W) and x_hat in [0, 1] (computed in float64, whatever the inputs):
    scores (N,) and maps (N, H, W) (:func:`ssim_image` per image)."""
    x = np.asarray(x, dtype=np.float64)
    x_hat = np.clip(np.asarray(x_hat, dtype=np.float64), 0.0, 1.0)
    scores, maps = np.empty(len(x)), np.empty((len(x), *x.shape[2:]))
    for i in range(len(x)):
        scores[i], maps[i] = ssim_image(x[i].transpose(1, 2, 0), x_hat[i].transpose(1, 2, 0))
    return scores, maps


def _foreground_psnr_ssim(a: np.ndarray, b: np.ndarray, smap: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """a, b: (H, W, C); their SSIM map and a mask (H, W) -> (PSNR, SSIM) over the masked pixels; NaN for an
    empty mask."""
    if not mask.any():
        return float("nan"), float("nan")
    mse = ((a - b) ** 2)[mask].mean()
    psnr = PSNR_CAP_DB if mse == 0 else min(10 * np.log10(1.0 / mse), PSNR_CAP_DB)
    return float(psnr), float(smap[mask].mean())


def per_image_metrics(x: np.ndarray, x_hat: np.ndarray, foreground: str | None = None) -> dict[str, np.ndarray]:
    """x, x_hat: float (N, C, H, W) in [0, 1] -> {"mse", "psnr_db", "ssim"}, each (N,) float64; with
    ``foreground`` ("otsu") also {"psnr_fg_db", "ssim_fg", "fg_fraction"} over the real image's foreground."""
    x = np.asarray(x, dtype=np.float64)
    x_hat = np.clip(np.asarray(x_hat, dtype=np.float64), 0.0, 1.0)
    if x.shape != x_hat.shape or x.ndim != 4:
        raise ValueError(f"need two (N, C, H, W) arrays of one shape, got {x.shape} and {x_hat.shape}")
    mse = ((x - x_hat) ** 2).reshape(len(x), -1).mean(1)
    psnr = np.empty(len(x))
    ssim = np.empty(len(x))
    fg = np.full((3, len(x)), np.nan) if foreground else None  # psnr_fg_db, ssim_fg, fg_fraction
    for i in range(len(x)):
        a, b = x[i].transpose(1, 2, 0), x_hat[i].transpose(1, 2, 0)  # (H, W, C)
        with np.errstate(divide="ignore"):
            psnr[i] = min(peak_signal_noise_ratio(a, b, data_range=1.0), PSNR_CAP_DB)
        ssim[i], smap = ssim_image(a, b)
        if foreground:
            mask = foreground_mask(x[i], foreground)
            fg[0, i], fg[1, i] = _foreground_psnr_ssim(a, b, smap, mask)
            fg[2, i] = mask.mean()
    out = {"mse": mse, "psnr_db": psnr, "ssim": ssim}
    if foreground:
        out.update(psnr_fg_db=fg[0], ssim_fg=fg[1], fg_fraction=fg[2])
    return out


def mean_over_images(per: dict[str, np.ndarray]) -> dict[str, float | None]:
    """{metric: mean over the images where it is defined (None where it is nowhere)}."""
    return {k: float(np.nanmean(v)) if np.isfinite(v).any() else None for k, v in per.items()}


def reconstruction_metrics(x: np.ndarray, x_hat: np.ndarray, foreground: str | None = None) -> dict:
    """Means over images of ``per_image_metrics``; keys mse, psnr_db, ssim[, psnr_fg_db, ssim_fg,
    fg_fraction], n_images."""
    per = per_image_metrics(x, x_hat, foreground)
    return {**mean_over_images(per), "n_images": int(len(x))}
