"""Posterior and decoder distributions. Every log-density is returned per sample: shape (B,).

- ``DiagonalGaussian``: the encoder's q(z|x) (Kingma & Welling 2014), with the closed-form KL to N(0, I).
- ``mixture_log_prob``: a uniform mixture of diagonal Gaussians, the VampPrior's density.
- Likelihoods p(x|z) over images x in [0, 1]:
  ``bernoulli`` (the article's BCE; not a likelihood of 8-bit images, only of binary ones),
  ``gaussian`` (fixed sigma; MSE up to constants; a density, not a probability),
  ``discretized_logistic`` (Salimans et al. 2017, PixelCNN++): a real probability of each 8-bit value,
  so its negative log is a true NLL and bits/dim are meaningful.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOG_2PI = math.log(2 * math.pi)


class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))). mean, logvar: (B, D)."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        self.mean = mean
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def arrays(self) -> dict[str, torch.Tensor]:
        """What ``medivae encode`` writes: posterior means and log-variances, (B, D) each."""
        return {"mean": self.mean, "logvar": self.logvar}

    def kl_per_dim(self) -> torch.Tensor:
        """KL(q || N(0, I)) per latent dimension, (B, D)."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar)

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over latent dimensions, (B,)."""
        return self.kl_per_dim().sum(dim=1)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log q(z|x) for z (B, D) or (K, B, D) -> (B,) or (K, B)."""
        return gaussian_log_prob(z, self.mean, self.logvar)


def gaussian_log_prob(z: torch.Tensor, mean, logvar, dim=-1) -> torch.Tensor:
    """log N(z; mean, diag(exp(logvar))) summed over ``dim`` (the one Gaussian log-density of medivae)."""
    return -0.5 * ((z - mean).pow(2) * torch.exp(-logvar) + logvar + LOG_2PI).sum(dim)


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) summed over the last dimension."""
    return -0.5 * (z.pow(2) + LOG_2PI).sum(-1)


def _sum_pixels(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).sum(1)


class Bernoulli:
    """Decoder outputs logits (B, C, H, W). log p = -BCE, as in the seed article."""

    params_per_channel = 1
    is_discrete_image_likelihood = False

    def log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return -_sum_pixels(F.binary_cross_entropy_with_logits(params.float(), x, reduction="none"))

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(params.float())

    def sample(self, params: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.mean(params)  # pixel-independent noise only hurts the picture; show the mean


class Gaussian:
    """Decoder outputs pre-sigmoid means (B, C, H, W); fixed std ``sigma``."""

    params_per_channel = 1
    is_discrete_image_likelihood = False

    def __init__(self, sigma: float = 0.1):
        self.sigma = sigma

    def log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        mu = torch.sigmoid(params.float())
        return -_sum_pixels(0.5 * ((x - mu) / self.sigma).pow(2) + math.log(self.sigma) + 0.5 * LOG_2PI)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(params.float())

    def sample(self, params: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.mean(params)


class DiscretizedLogistic:
    """Decoder outputs (B, 2C, H, W): per-pixel location and log-scale of a logistic over [-1, 1],
    integrated over each of the 256 bins (edge bins take the tails). log p sums over pixels."""

    params_per_channel = 2
    is_discrete_image_likelihood = True
    bins = 256

    def _split(self, params: torch.Tensor):
        loc, log_scale = params.float().chunk(2, dim=1)
        return torch.tanh(loc), log_scale.clamp(min=-7.0, max=5.0)

    def log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        loc, log_scale = self._split(params)
        # x is k/255 for integer k; map to [-1, 1]; the bin half-width is 1/255 there
        xc = x * 2.0 - 1.0
        inv_s = torch.exp(-log_scale)
        half = 1.0 / (self.bins - 1)
        plus = inv_s * (xc - loc + half)
        minus = inv_s * (xc - loc - half)
        cdf_delta = torch.sigmoid(plus) - torch.sigmoid(minus)
        log_cdf_plus = plus - F.softplus(plus)  # log sigmoid(plus), for the bottom bin
        log_one_minus_cdf_min = -F.softplus(minus)  # log(1 - sigmoid(minus)), for the top bin
        mid = inv_s * (xc - loc)
        log_pdf_mid = mid - log_scale - 2.0 * F.softplus(mid)  # fallback when the bin mass underflows
        inner = torch.where(
            cdf_delta > 1e-5,
            torch.log(cdf_delta.clamp(min=1e-12)),
            log_pdf_mid + math.log(2 * half),
        )
        out = torch.where(xc < -0.999, log_cdf_plus, torch.where(xc > 0.999, log_one_minus_cdf_min, inner))
        return _sum_pixels(out)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        loc, _ = self._split(params)
        return ((loc + 1.0) / 2.0).clamp(0, 1)

    def sample(self, params: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        loc, log_scale = self._split(params)
        u = torch.rand(loc.shape, generator=generator, device=loc.device).clamp(1e-5, 1 - 1e-5)
        x = loc + torch.exp(log_scale) * (torch.log(u) - torch.log1p(-u))
        return ((x.clamp(-1, 1) + 1.0) / 2.0 * 255).round() / 255


def gaussian_log_weights(model, x, y=None, k: int = 100, generator=None, max_decode: int = 256,
                         log_prior=standard_normal_log_prob, closed_form_kl: bool = True):
    """Importance weights of a family with a Gaussian posterior: K draws z_k ~ q(z|x) (``model.encode``),
    log p(x|z_k) (``model.decode_params`` + ``model.likelihood``) and log p(z_k) - log q(z_k|x), float64
    (K, B) on the CPU. ``log_prior``: z (..., D) -> log p(z) (...), N(0, I) by default; ``closed_form_kl``:
    whether KL(q || p) is q's closed form to N(0, I) (False for a learned prior such as the VampPrior,
    whose KL is then the Monte Carlo average of -log_ratio). At most ``max_decode`` images go through the
    decoder at once, whatever K and B are."""
    from medivae.models.family import LogWeights

    q = model.encode(x, y)
    b, d = q.mean.shape
    per_chunk = max(1, max_decode // b)
    log_px, log_ratio = [], []
    for start in range(0, k, per_chunk):
        n = min(per_chunk, k - start)
        eps = torch.randn((n, b, d), generator=generator).to(q.mean.device)
        z = q.mean + q.std * eps  # (n, B, D)
        params = model.decode_params(z.reshape(n * b, d), None if y is None else y.repeat(n))  # sample-major
        xr = x.expand(n, *x.shape).reshape(n * b, *x.shape[1:])
        log_px.append(model.likelihood.log_prob(params, xr).view(n, b).double().cpu())
        log_ratio.append((log_prior(z) - q.log_prob(z)).double().cpu())
    kl = q.kl().double().cpu() if closed_form_kl else None
    return LogWeights(torch.cat(log_px), torch.cat(log_ratio), kl)


def mixture_log_prob(z: torch.Tensor, means: torch.Tensor, logvars: torch.Tensor) -> torch.Tensor:
    """log (1/K) sum_k N(z; means_k, diag(exp(logvars_k))) for z (..., D), components (K, D) -> (...).
    The VampPrior's density (Tomczak & Welling 2018) when the components are q(z|u_k)."""
    zc = z.unsqueeze(-2)  # (..., 1, D) against (K, D)
    log_comp = gaussian_log_prob(zc, means, logvars)  # (..., K)
    return torch.logsumexp(log_comp, dim=-1) - math.log(means.shape[0])


@dataclass(frozen=True)
class MixturePrior:
    """A learned prior over a flat latent, p(z) = (1/K) sum_k N(means_k, diag(exp(logvars_k))), (K, D) each
    (e.g. the VampPrior); ``name`` says which, in reports."""

    name: str
    means: torch.Tensor
    logvars: torch.Tensor


def make_likelihood(name: str, gaussian_sigma: float = 0.1):
    if name == "bernoulli":
        return Bernoulli()
    if name == "gaussian":
        return Gaussian(gaussian_sigma)
    if name == "discretized_logistic":
        return DiscretizedLogistic()
    raise ValueError(f"unknown likelihood {name!r}")
