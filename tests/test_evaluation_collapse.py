"""Posterior-collapse diagnostics on encoders whose informative dimensions are known by construction."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from medivae.data.imageset import ImageSet
from medivae.evaluation.collapse import active_units, collapse_metrics, kl_per_dimension, mutual_information
from medivae.models.distributions import Bernoulli, DiagonalGaussian
from medivae.runtime.seeding import numpy_rng, torch_generator
from medivae.workflows.evaluate import posterior_and_reconstruction


class ProjectionEncoder(nn.Module):
    """q(z|x): the first ``informative`` latent dimensions are fixed projections of the image,
    the rest ignore x and equal the prior N(0, 1) (a collapsed dimension)."""

    def __init__(self, latent_dim: int, informative: int, pixels: int = 64, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.latent_dim, self.informative = latent_dim, informative
        self.proj = torch.randn(pixels, informative, generator=g) * 4 / math.sqrt(pixels)
        self.likelihood = Bernoulli()

    def encode(self, x, y=None):
        b = len(x)
        mean = torch.zeros(b, self.latent_dim)
        mean[:, : self.informative] = (x.flatten(1) - 0.5) @ self.proj
        logvar = torch.zeros(b, self.latent_dim)
        logvar[:, : self.informative] = math.log(0.05)
        return DiagonalGaussian(mean, logvar)

    capabilities = frozenset({"gaussian_latent"})

    def decode(self, z, y=None):
        return self.likelihood.mean(torch.zeros(len(z), 1, 8, 8))

    def reconstruct(self, x, y=None):
        return self.decode(self.encode(x, y).mode())

    def forward(self, x, y=None, sample=False, generator=None):
        from medivae.models.outputs import VAEOutput

        q = self.encode(x, y)
        return VAEOutput(self.decode(q.mean), q, q.mean)


def _images(n=200, seed=0) -> ImageSet:
    imgs = numpy_rng(seed, "collapse").integers(0, 256, size=(n, 1, 8, 8), dtype=np.uint8)
    return ImageSet(imgs, np.full(n, -1))


def _stats(model, s):
    return posterior_and_reconstruction(model, s, batch_size=64, device="cpu")


@pytest.mark.parametrize("informative", [0, 1, 3])
def test_active_units_count_the_informative_dimensions(informative):
    mean, logvar, _ = _stats(ProjectionEncoder(6, informative), _images())
    au, var = active_units(mean)
    assert au == informative
    assert (var[informative:] == 0).all()


def test_collapsed_encoder_has_zero_kl_and_zero_mutual_information():
    mean, logvar, _ = _stats(ProjectionEncoder(5, 0), _images())
    res = collapse_metrics(mean, logvar, torch_generator(0, "mi"))
    assert res["active_units"] == 0 and res["latent_dim"] == 5
    assert res["kl_total_nats"] == pytest.approx(0.0, abs=1e-12)
    assert res["mutual_information_nats"] == pytest.approx(0.0, abs=1e-9)


def test_informative_dimensions_carry_kl_and_mutual_information():
    mean, logvar, _ = _stats(ProjectionEncoder(5, 2), _images(150))
    kl = kl_per_dimension(mean, logvar)
    assert (kl[:2] > 0.5).all() and np.allclose(kl[2:], 0.0)
    mi = mutual_information(mean, logvar, torch_generator(0, "mi"))
    assert 0.5 < mi <= math.log(150) + 1e-6
    more = mutual_information(*_stats(ProjectionEncoder(5, 4), _images(150))[:2], torch_generator(0, "mi"))
    assert more > mi  # two more informative dimensions, more information


def test_mutual_information_matches_a_gaussian_channel():
    # z = x + noise with x ~ N(0, 1) per dim, noise variance s2: I = D/2 log(1 + 1/s2), minus the
    # estimator's finite-N bias (it cannot exceed log N), small here.
    n, d, s2 = 400, 2, 0.25
    x = np.random.default_rng(0).normal(size=(n, d))
    mi = mutual_information(x, np.full((n, d), math.log(s2)), torch_generator(0, "mi"))
    assert mi == pytest.approx(d / 2 * math.log(1 + 1 / s2), abs=0.1)
