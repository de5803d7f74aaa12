"""Reconstruction metrics: per image from scikit-image, then averaged."""

from __future__ import annotations

import numpy as np
import pytest

from medivae.data.phantoms import make_phantoms
from medivae.evaluation.reconstruction import PSNR_CAP_DB, per_image_metrics, reconstruction_metrics


def _x(n=6):
    return make_phantoms(n, 32, seed=2).images.astype(np.float64) / 255


def test_perfect_reconstruction():
    x = _x()
    m = reconstruction_metrics(x, x)
    assert m["mse"] == 0.0 and m["psnr_db"] == PSNR_CAP_DB and m["ssim"] == pytest.approx(1.0)


def test_noise_lowers_psnr_and_ssim_and_psnr_follows_mse():
    x = _x()
    rng = np.random.default_rng(0)
    small = per_image_metrics(x, np.clip(x + 0.02 * rng.normal(size=x.shape), 0, 1))
    large = per_image_metrics(x, np.clip(x + 0.2 * rng.normal(size=x.shape), 0, 1))
    assert (large["mse"] > small["mse"]).all() and (large["ssim"] < small["ssim"]).all()
    np.testing.assert_allclose(small["psnr_db"], 10 * np.log10(1 / small["mse"]), rtol=1e-6)


def test_rgb_images_and_shape_mismatch():
    x = np.random.default_rng(1).random((3, 3, 32, 32))
    assert reconstruction_metrics(x, x)["ssim"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        per_image_metrics(x, x[:, :1])


def test_ssim_uses_the_standard_gaussian_window():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(3)
    x = rng.random((2, 1, 32, 32))
    y = np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1)
    want = structural_similarity(x[0, 0], y[0, 0], data_range=1.0, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False)
    assert per_image_metrics(x, y)["ssim"][0] == pytest.approx(want)
    assert per_image_metrics(x, y)["ssim"][0] != pytest.approx(structural_similarity(x[0, 0], y[0, 0], data_range=1.0))
