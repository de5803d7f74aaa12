"""Likelihood bounds: IWAE vs ELBO, convergence to the exact log-likelihood of probabilistic PCA,
and the discretised logistic as a real probability over the 256 values of a pixel."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from medivae.data.phantoms import make_phantoms
from medivae.evaluation.likelihood import batch_bounds, iwae_from_log_weights, ks_for, likelihood_bounds
from medivae.models import build_model
from medivae.models.distributions import DiagonalGaussian, DiscretizedLogistic, gaussian_log_weights
from medivae.runtime.seeding import torch_generator

from tiny import tiny_model


class GaussianLik:
    """log N(x; params, sigma^2 I) summed over all but the batch dimension."""

    is_discrete_image_likelihood = False

    def __init__(self, sigma: float):
        self.sigma = sigma

    def log_prob(self, params, x):
        r = ((x - params) / self.sigma).pow(2) + 2 * math.log(self.sigma) + math.log(2 * math.pi)
        return -0.5 * r.flatten(1).sum(1)


class PPCA(nn.Module):
    """Probabilistic PCA as a VAE: z ~ N(0, I_k), x = W z + sigma * eps, x laid out as (B, 1, 1, d).

    W has orthogonal columns, so the exact posterior is diagonal; the encoder returns its mean but
    ``std_scale`` times its standard deviation, which leaves a known ELBO gap for IWAE to close:
    k * (r^2 - 1 - 2 ln r) / 2 nats for r = std_scale.
    """

    def __init__(self, d=6, k=2, sigma=0.5, std_scale=1.5, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        self.W = q[:, :k] * torch.tensor([2.0, 1.0], dtype=torch.float64)[:k]  # (d, k)
        self.sigma, self.std_scale, self.latent_dim = sigma, std_scale, k
        self.likelihood = GaussianLik(sigma)
        self.m_diag = (self.W**2).sum(0) + sigma**2  # diag of W^T W + sigma^2 I

    def encode(self, x, y=None):
        mean = (x.flatten(1) @ self.W) / self.m_diag
        var = self.sigma**2 / self.m_diag * self.std_scale**2
        return DiagonalGaussian(mean, var.log().expand_as(mean))

    capabilities = frozenset({"likelihood", "gaussian_latent"})

    def decode_params(self, z, y=None):
        return (z.double() @ self.W.T).view(len(z), 1, 1, -1)

    def log_weights(self, x, y=None, k=100, generator=None, max_decode=256):
        return gaussian_log_weights(self, x, y, k, generator, max_decode)

    def sample(self, n, g):
        z = torch.randn(n, self.latent_dim, generator=g, dtype=torch.float64)
        noise = torch.randn(n, 1, 1, self.W.shape[0], generator=g, dtype=torch.float64)
        return self.decode_params(z) + self.sigma * noise

    def exact_log_px(self, x):
        cov = self.W @ self.W.T + self.sigma**2 * torch.eye(self.W.shape[0], dtype=torch.float64)
        mvn = torch.distributions.MultivariateNormal(torch.zeros(self.W.shape[0], dtype=torch.float64), cov)
        return mvn.log_prob(x.flatten(1))


def test_ks_for_lists_divisors_on_the_decade_ladder():
    assert ks_for(100) == [1, 10, 100]
    assert ks_for(50) == [1, 10, 50]
    assert ks_for(1) == [1]


def test_grouped_iwae_equals_logmeanexp_for_the_full_set_and_mean_for_k1():
    log_w = torch.randn(12, 5, dtype=torch.float64)
    assert torch.allclose(iwae_from_log_weights(log_w, 12), torch.logsumexp(log_w, 0) - math.log(12))
    assert torch.allclose(iwae_from_log_weights(log_w, 1), log_w.mean(0))
    with pytest.raises(ValueError):
        iwae_from_log_weights(log_w, 5)


def test_iwae_approaches_the_exact_log_likelihood_of_ppca():
    model = PPCA()
    x = model.sample(64, torch.Generator().manual_seed(1))
    exact = model.exact_log_px(x).mean().item()
    res = likelihood_bounds(model, [(x, None)], 1000, torch_generator(7, "ppca"), max_decode=1 << 17)
    gaps = {int(k): v + exact for k, v in res["neg_iwae_nats_by_k"].items()}  # log p(x) - L_k >= 0
    r = model.std_scale
    expected_elbo_gap = model.latent_dim * 0.5 * (r**2 - 1 - 2 * math.log(r))
    assert -res["neg_elbo_nats"] - exact == pytest.approx(-expected_elbo_gap, abs=0.05)
    assert gaps[1] == pytest.approx(expected_elbo_gap, abs=0.05)
    assert gaps[1] > gaps[10] > gaps[100] > gaps[1000] > -0.01
    assert gaps[1000] < 0.02


def _iwae_by_hand(model, x, k: int, replicates: int, g) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_k, L_1) of a conv_vae per replicate and image, (R, B) float64, from the family's own distributions
    (its encoder's Gaussian, the N(0, I) prior, its decoder's likelihood) on draws of our own."""
    with torch.no_grad():
        q = model.encode(x)
        eps = torch.randn(replicates * k, *q.mean.shape, generator=g)  # (R K, B, D)
        z = (q.mean + q.std * eps).flatten(0, 1)  # (R K B, D), sample-major
        xr = x.repeat(replicates * k, 1, 1, 1)
        log_px = model.likelihood.log_prob(model.decode_params(z), xr).double()
        log_pz = -0.5 * (z.double().pow(2) + math.log(2 * math.pi)).sum(1)
        log_q = -0.5 * (eps.double().pow(2) + q.logvar.double() + math.log(2 * math.pi)).sum(-1).flatten()
    log_w = (log_px + log_pz - log_q).view(replicates, k, len(x))
    return torch.logsumexp(log_w, 1) - math.log(k), log_w.mean(1)


def test_the_iwae_of_a_conv_vae_is_importance_sampling_with_its_own_distributions():
    """likelihood_bounds (through the family's log_weights) against IWAE worked out here from the family's
    distributions on independent draws: per image, each bound lies within the spread of our replicates; and
    on those independent draws L_50 is above the ELBO by more than their noise (the gap is real)."""
    torch.manual_seed(0)
    model = build_model(tiny_model()).eval()
    with torch.no_grad():  # an untrained decoder hardly reads z: make it, so that every draw counts
        model.decoder_input.weight.mul_(5.0)
        model.fc_mu.bias.add_(1.0)  # and a posterior away from the prior
    x = torch.from_numpy(make_phantoms(8, 32, seed=3).images).float() / 255
    res = likelihood_bounds(model, [(x, None)], k=50, generator=torch_generator(1, "t"))
    got = batch_bounds(model, x, k=50, generator=torch_generator(1, "t"))  # the per-image bounds of the same draws
    assert res["n_images"] == 8 and res["neg_iwae_nats"] == pytest.approx(got["neg_iwae"][50].mean())
    iwae, elbo = _iwae_by_hand(model, x, 50, 40, torch.Generator().manual_seed(9))
    for name, ours, theirs in (("iwae", iwae, -got["neg_iwae"][50]), ("elbo", elbo, -got["neg_elbo"])):
        spread = ours.std(0)  # one replicate's standard deviation, per image (B,)
        assert (np.abs(theirs - ours.mean(0).numpy()) < 4 * spread.numpy() + 1e-9).all(), name
    gap = iwae - elbo  # (R, B): the same draws in each replicate, other draws than the bounds above
    assert (gap.mean(0) > 4 * gap.std(0) / math.sqrt(len(gap))).all()
    assert res["neg_elbo_bpd"] is None and "not a probability" in res["note"]


def test_chunking_over_k_does_not_change_the_bound_of_an_exact_posterior():
    model = PPCA(std_scale=1.0)  # exact posterior: every log weight equals log p(x)
    x = model.sample(8, torch.Generator().manual_seed(2))
    exact = model.exact_log_px(x).mean().item()
    for max_decode in (8, 64, 4096):
        res = likelihood_bounds(model, [(x, None)], 20, torch_generator(0, "c"), max_decode=max_decode)
        assert -res["neg_iwae_nats"] == pytest.approx(exact, abs=1e-6)


def test_bits_per_dim_only_for_a_discrete_image_likelihood():
    torch.manual_seed(0)
    model = build_model(tiny_model(likelihood="discretized_logistic")).eval()
    x = torch.from_numpy(make_phantoms(8, 32, seed=4).images).float() / 255
    res = likelihood_bounds(model, [(x, None)], k=4, generator=torch_generator(1, "d"))
    assert res["discrete_image_likelihood"] and res["note"] == ""
    assert res["neg_iwae_bpd"] == pytest.approx(res["neg_iwae_nats"] / (32 * 32 * math.log(2)))


@pytest.mark.parametrize("log_scale", [-4.0, -2.0, 0.0, 1.0])
def test_discretized_logistic_bin_probabilities_sum_to_one(log_scale):
    lik = DiscretizedLogistic()
    g = torch.Generator().manual_seed(0)
    loc = torch.randn(5, generator=g) * 2  # pre-tanh locations, some near the edges
    values = torch.arange(256, dtype=torch.float32) / 255  # every 8-bit value
    for raw in loc:
        params = torch.stack([raw.expand(256), torch.full((256,), log_scale)], 1).view(256, 2, 1, 1)
        p = lik.log_prob(params, values.view(256, 1, 1, 1)).exp()
        assert p.sum().item() == pytest.approx(1.0, abs=2e-3)
        assert (p >= 0).all()


def test_bounds_are_reproducible_with_the_same_generator():
    model = PPCA()
    x = model.sample(16, torch.Generator().manual_seed(3))
    a = likelihood_bounds(model, [(x, None)], k=10, generator=torch_generator(5, "r"))
    b = likelihood_bounds(model, [(x, None)], k=10, generator=torch_generator(5, "r"))
    per_a, per_b = a.pop("per_image"), b.pop("per_image")  # per-image arrays, then the JSON summary
    assert a == b and per_a.keys() == per_b.keys() == {"neg_elbo", "neg_iwae"}
    for name in per_a:
        np.testing.assert_array_equal(per_a[name], per_b[name])
    assert per_a["neg_iwae"].mean() == pytest.approx(a["neg_iwae_nats"])
    assert np.isfinite(a["neg_iwae_nats"])


def test_effective_sample_size_is_k_for_equal_weights_and_one_for_a_single_dominant_draw():
    from medivae.evaluation.likelihood import effective_sample_size

    equal = torch.zeros(10, 3, dtype=torch.float64)
    assert torch.allclose(effective_sample_size(equal), torch.full((3,), 10.0, dtype=torch.float64))
    one = torch.full((10, 1), -1000.0, dtype=torch.float64)
    one[3] = 0.0
    assert effective_sample_size(one).item() == pytest.approx(1.0)
