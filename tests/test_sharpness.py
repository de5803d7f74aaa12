"""The high-frequency share: white noise spreads power evenly, blur removes the high frequencies."""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

from medivae.evaluation.sharpness import hf_power_ratio, high_frequency_share, sharpness_ratio


def test_white_noise_has_the_share_of_the_frequency_plane_above_the_cutoff():
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(200, 1, 64, 64))
    f = np.fft.fftfreq(64)
    area = (np.sqrt(f[:, None] ** 2 + f[None, :] ** 2) > 0.25).mean()
    assert abs(high_frequency_share(noise).mean() - area) < 0.01


def test_blur_lowers_the_share_and_the_ratio_to_real_images():
    rng = np.random.default_rng(1)
    sharp = rng.integers(0, 256, size=(20, 1, 32, 32), dtype=np.uint8)
    blurred = gaussian_filter(sharp.astype(float) / 255, sigma=(0, 0, 1.5, 1.5))
    assert (high_frequency_share(blurred) < 0.5 * high_frequency_share(sharp)).all()
    assert sharpness_ratio(blurred, sharp) < 0.5
    assert abs(sharpness_ratio(sharp, sharp) - 1.0) < 1e-12
    assert high_frequency_share(np.full((2, 1, 8, 8), 0.3)).tolist() == [0.0, 0.0]  # flat: no power at all
    faint = 0.5 + 0.001 * (np.indices((32, 32)).sum(0) % 2)[None, None].repeat(4, 0)  # a flat checkerboard
    assert sharpness_ratio(faint, sharp) > 1 and hf_power_ratio(faint, sharp) < 0.01  # share fooled, power not
