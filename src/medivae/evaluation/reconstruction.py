"""Reconstruction quality from the posterior mean: MSE, PSNR and SSIM (Wang et al. 2004).

PSNR and SSIM come from scikit-image with ``data_range=1`` (images in [0, 1]); each metric is
computed per image, then averaged over images. SSIM uses the standard window of Wang et al. 2004: an
11x11 Gaussian with sigma 1.5 and population covariances (before issue 20: scikit-image's default 7x7
uniform window, which gives other numbers).
"""

from __future__ import annotations

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

PSNR_CAP_DB = 100.0  # a perfect reconstruction has infinite PSNR, which JSON cannot hold


def per_image_metrics(x: np.ndarray, x_hat: np.ndarray) -> dict[str, np.ndarray]:
    """x, x_hat: float (N, C, H, W) in [0, 1] -> {"mse", "psnr_db", "ssim"}, each (N,) float64."""
    x = np.asarray(x, dtype=np.float64)
    x_hat = np.clip(np.asarray(x_hat, dtype=np.float64), 0.0, 1.0)
    if x.shape != x_hat.shape or x.ndim != 4:
        raise ValueError(f"need two (N, C, H, W) arrays of one shape, got {x.shape} and {x_hat.shape}")
    mse = ((x - x_hat) ** 2).reshape(len(x), -1).mean(1)
    psnr = np.empty(len(x))
    ssim = np.empty(len(x))
    side = min(x.shape[2:])
    win = min(11, side if side % 2 else side - 1)  # 11x11, or the largest odd window an image smaller than that holds
    for i in range(len(x)):
        a, b = x[i].transpose(1, 2, 0), x_hat[i].transpose(1, 2, 0)  # (H, W, C)
        with np.errstate(divide="ignore"):
            psnr[i] = min(peak_signal_noise_ratio(a, b, data_range=1.0), PSNR_CAP_DB)
        ssim[i] = structural_similarity(a, b, data_range=1.0, channel_axis=2, gaussian_weights=True, sigma=1.5,
                                        use_sample_covariance=False, win_size=win)
    return {"mse": mse, "psnr_db": psnr, "ssim": ssim}


def reconstruction_metrics(x: np.ndarray, x_hat: np.ndarray) -> dict[str, float]:
    """Means over images of ``per_image_metrics``; keys mse, psnr_db, ssim, n_images."""
    per = per_image_metrics(x, x_hat)
    return {**{k: float(v.mean()) for k, v in per.items()}, "n_images": int(len(x))}
