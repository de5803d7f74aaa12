"""Posterior-collapse diagnostics on encoders whose informative dimensions are known by construction."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from medivae.data.imageset import ImageSet
from medivae.evaluation.collapse import (
    active_units,
    collapse_metrics,
    kl_per_dimension,
    kl_to_mixture,
    mutual_information,
)
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


def _kl_gauss(m, lv, pm, plv):
    """KL(N(m, e^lv) || N(pm, e^plv)) per dimension, by formula."""
    return 0.5 * (plv - lv + (np.exp(lv) + (m - pm) ** 2) / np.exp(plv) - 1.0)


def test_the_monte_carlo_kl_to_a_one_component_mixture_is_the_gaussian_kl():
    rng = np.random.default_rng(0)
    mean, logvar = rng.normal(size=(200, 3)), rng.normal(scale=0.3, size=(200, 3))
    pm, plv = np.array([[0.5, -1.0, 0.0]]), np.array([[0.2, -0.3, 0.0]])
    total, per_dim = kl_to_mixture(mean, logvar, pm, plv, torch_generator(0, "kl"), samples=64)
    exact = _kl_gauss(mean, logvar, pm, plv)  # (N, D)
    # unbiased Monte Carlo: each image's error is draw noise alone, independent across images, so the
    # average error lies within a few of its standard errors (and each image's error is that noise)
    err, err_dim = total - exact.sum(1), per_dim - exact
    assert abs(err.mean()) < 5 * err.std() / np.sqrt(200) and err.std() < 0.5
    assert (np.abs(err_dim.mean(0)) < 5 * err_dim.std(0) / np.sqrt(200)).all()


def test_the_kl_to_a_mixture_of_two_far_components_is_log_two_from_either():
    """q(z|x) equal to one of two well separated components: p(z) = q(z)/2 where q lives, so KL = log 2 exactly
    (up to the other component's mass there, ~e^-50), for every draw: no Monte Carlo noise either."""
    pm, plv = np.array([[0.0, 0.0], [20.0, -20.0]]), np.zeros((2, 2))
    total, per_dim = kl_to_mixture(pm, plv, pm, plv, torch_generator(0, "kl"), samples=8)
    np.testing.assert_allclose(total, math.log(2), rtol=1e-9)
    np.testing.assert_allclose(per_dim, math.log(2), rtol=1e-9)  # each marginal is a mixture of two far ones


def test_collapse_metrics_take_the_kl_to_a_learned_prior_and_name_it():
    from medivae.models import build_model, model_config
    from medivae.models.family import latent_prior

    torch.manual_seed(0)
    model = build_model(model_config("vamp_vae", image_size=32, latent_dim=3, base_width=4, max_width=8,
                                     pseudo_inputs=5)).eval()
    x = torch.rand(64, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        q = model.encode(x)
        lw = model.log_weights(x, k=64, generator=torch.Generator().manual_seed(2))
    res = collapse_metrics(q.mean.numpy(), q.logvar.numpy(), torch_generator(0, "kl"), latent_prior(model), 64)
    assert res["kl_prior"].startswith("VampPrior, Monte Carlo")
    assert res["kl_to_standard_normal_nats"] == pytest.approx(kl_per_dimension(q.mean, q.logvar).sum())
    # an independent estimate of KL(q || VampPrior): the model's own importance log-ratios, other draws
    ratio = -lw.log_ratio  # (K, B): log q(z|x) - log p(z) at z ~ q(z|x)
    # the same images, independent draws of the same quantity: the difference is draw noise of two means
    se = math.sqrt(2 * float(ratio.var(0).mean()) / ratio.numel())
    assert abs(res["kl_total_nats"] - float(ratio.mean())) < 5 * se
    assert abs(res["kl_total_nats"] - res["kl_to_standard_normal_nats"]) > 10 * se  # not the N(0, I) KL
