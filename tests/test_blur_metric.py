"""The sample metric sees blur: real images blurred by Gaussians of sigma 0.7, 1 and 1.5 px score monotonically
worse in both reference extractors (``cnn`` for labelled data, ``ae`` for unlabelled), and sigma = 1 at least
three times the floor of two disjoint real sets; on phantoms here, on MedNIST when ../shared/data is there."""

from __future__ import annotations

import numpy as np
import pytest

from medivae.data.imageset import ImageSet
from medivae.data.phantoms import make_phantoms
from medivae.evaluation.blur import SIGMAS, blur_rows, gaussian_blur
from medivae.evaluation.features import detail_features, load_or_fit_reference
from medivae.evaluation.sharpness import high_frequency_power


def _as_kind(train: ImageSet, kind: str) -> ImageSet:
    """The labelled set as it is (the classifier), or without its labels (the autoencoder)."""
    return train if kind == "cnn" else ImageSet(train.images, np.full(len(train), -1))


def _check(rows: list[dict]) -> None:
    assert [r["sigma"] for r in rows] == [0.0, *SIGMAS]
    fd = [r["fd"] for r in rows]
    assert fd[0] < fd[1] < fd[2] < fd[3], fd  # the floor, then wider and wider blur
    assert fd[2] >= 3 * fd[0], fd  # sigma = 1 px
    hf = [r["hf_power_ratio"] for r in rows]
    assert hf[0] > hf[1] > hf[2] > hf[3] and hf[2] < 0.5, hf  # the number reported beside FD falls too


@pytest.mark.parametrize("kind", ["cnn", "ae"])
def test_blur_raises_fd_monotonically_on_phantoms(tmp_path, kind):
    s = make_phantoms(700, 32, seed=11)
    ref = load_or_fit_reference(tmp_path, _as_kind(s.subset(np.arange(300)), kind), {"source": "phantoms:700"},
                                epochs=1, width=4, progress=False)
    assert ref.name == kind
    _check(blur_rows(ref.features, s.images[300:500], s.images[500:]))


@pytest.mark.realdata
@pytest.mark.parametrize("kind", ["cnn", "ae"])
def test_blur_raises_fd_monotonically_on_mednist(tmp_path, mednist_sample, kind):
    """The 600-image MedNIST sample (six classes): 300 train the extractor, 2 x 150 held-out images are compared."""
    from medivae.data import load_source
    from medivae.runfolder.config import DataConfig

    s = load_source(DataConfig(source=str(mednist_sample), image_size=64, cache=False), progress=False)["all"]
    order = np.random.default_rng(0).permutation(len(s))
    train = s.subset(np.sort(order[:300]))
    ref = load_or_fit_reference(tmp_path, _as_kind(train, kind), {"source": "mednist sample"}, epochs=3, width=8,
                                progress=False)
    _check(blur_rows(ref.features, s.images[order[300:450]], s.images[order[450:600]]))  # random halves


def test_the_detail_features_measure_each_octave_where_it_is():
    """A checkerboard of period 2 px has all its power in the finest octave; a flat image has none; detail in
    one quadrant shows in that quadrant's cells only."""
    import torch

    flat = torch.full((1, 1, 32, 32), 0.5)
    assert detail_features(flat).shape == (1, 3 * 16) and detail_features(flat).abs().max() < 1e-6
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    checker = ((yy + xx) % 2).float().view(1, 1, 32, 32)
    f = detail_features(checker).view(3, 4, 4)
    # the binomial kernel passes nothing at the Nyquist frequency ((1 - 4 + 6 - 4 + 1) / 16 = 0): the band is
    # the checkerboard minus its mean, +-1/2 everywhere
    torch.testing.assert_close(f[0], torch.full((4, 4), 0.5))
    assert f[1:].abs().max() < 1e-6  # the blurred checkerboard is flat: nothing left for the coarser octaves
    corner = flat.clone()
    corner[..., :8, :8] = checker[..., :8, :8]
    g = detail_features(corner).view(3, 4, 4)[0]
    assert g[0, 0] > 0.3 and g[2:, 2:].abs().max() < 1e-6


def test_gaussian_blur_keeps_the_mean_and_removes_high_frequency_power():
    s = make_phantoms(8, 32, seed=3).images
    b = gaussian_blur(s, 1.0)
    assert b.dtype == np.uint8 and b.shape == s.shape
    assert abs(b.astype(float).mean() - s.astype(float).mean()) < 1.0  # within 8-bit rounding, per image mean
    assert (high_frequency_power(b) < 0.5 * high_frequency_power(s)).all()
