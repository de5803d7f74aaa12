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


def _disc_on_black(n=3, size=32, radius=8):
    """float (n, 1, size, size): a textured bright disc on a black background."""
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < radius**2
    rng = np.random.default_rng(0)
    x = np.zeros((n, 1, size, size))
    x[:, 0][:, disc] = rng.uniform(0.5, 1.0, size=(n, int(disc.sum())))
    return x, disc


def test_foreground_mask_covers_the_disc_and_a_little_more_not_the_background():
    from medivae.evaluation.reconstruction import foreground_mask

    x, disc = _disc_on_black()
    mask = foreground_mask(x[0])
    assert mask[disc].all()  # holes and dark texture inside the outline are filled
    assert disc.sum() < mask.sum() < 1.5 * disc.sum()  # dilated a little, background mostly outside
    assert not foreground_mask(np.zeros((1, 16, 16))).any()


def test_background_errors_do_not_count_in_foreground_psnr_and_ssim():
    x, disc = _disc_on_black()
    x_hat = x.copy()
    x_hat[:, 0][:, ~disc] = np.random.default_rng(1).uniform(0.0, 0.6, size=(len(x), int((~disc).sum())))
    m = per_image_metrics(x, x_hat, foreground="otsu")
    # background errors inside the dilated rim still count, so the foreground PSNR is high, not the cap
    assert (m["psnr_fg_db"] > m["psnr_db"] + 3).all() and (m["ssim_fg"] > m["ssim"]).all()
    x_hat[:, 0][:, disc] = np.clip(x[:, 0][:, disc] + 0.3, 0, 1)  # now the foreground is wrong too
    worse = per_image_metrics(x, x_hat, foreground="otsu")
    assert (worse["psnr_fg_db"] < m["psnr_fg_db"]).all() and (worse["ssim_fg"] < m["ssim_fg"]).all()
    assert "psnr_fg_db" not in per_image_metrics(x, x_hat)  # off by default


def test_a_perfect_foreground_with_a_wrong_far_background_reaches_the_cap():
    x, disc = _disc_on_black(size=64, radius=10)
    yy, xx = np.mgrid[:64, :64]
    far = (yy - 32) ** 2 + (xx - 32) ** 2 > 20**2  # beyond any dilation of the disc
    x_hat = x.copy()
    x_hat[:, 0][:, far] = 0.5
    m = per_image_metrics(x, x_hat, foreground="otsu")
    assert (m["psnr_fg_db"] == PSNR_CAP_DB).all() and (m["psnr_db"] < 15).all()
    np.testing.assert_allclose(m["ssim_fg"], 1.0)
    assert (m["ssim"] < 0.9).all()
    assert (0 < m["fg_fraction"]).all() and (m["fg_fraction"] < 0.3).all()


def test_a_blank_image_has_no_foreground_and_is_left_out_of_the_mean():
    x, _ = _disc_on_black(n=2)
    x[1] = 0.0
    m = reconstruction_metrics(x, x, foreground="otsu")
    per = per_image_metrics(x, x, foreground="otsu")
    assert np.isnan(per["psnr_fg_db"][1]) and m["psnr_fg_db"] == per["psnr_fg_db"][0]
    assert reconstruction_metrics(x[1:], x[1:], foreground="otsu")["ssim_fg"] is None
