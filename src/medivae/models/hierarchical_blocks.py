"""Building blocks of the hierarchical VAE (:mod:`medivae.models.hierarchical_vae`).

- ``ResCell``: NVAE's residual cell (Vahdat & Kautz 2020, fig. 3), GroupNorm/GELU variant: two 3x3
  convolutions and squeeze-and-excitation (Hu et al. 2018) on the residual branch. GroupNorm rather than
  BatchNorm, so that sampling (a batch of prior draws) and inference normalise alike.
- ``TopDownGroup``: one latent group of the top-down path, VDVAE's decoder block (Child 2021, fig. 3)
  with NVAE's residual posterior: the prior p(z_g | z_<g) and a feature are read from the top-down state
  h; the posterior q(z_g | x, z_<g) = N(mu_p + dmu, exp(logvar_p + dlogvar)) adds a correction read from
  h and the bottom-up activation. The same module serves inference and generation; only ``posterior``
  is inference-only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from medivae.models.distributions import gaussian_log_prob


def soft_clamp(x: torch.Tensor, bound: float = 5.0) -> torch.Tensor:
    """bound * tanh(x / bound): NVAE's smooth clamp of log-scales, so that exp() cannot overflow."""
    return bound * torch.tanh(x / bound)


def _norm(width: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, width), width)


class SqueezeExcite(nn.Module):
    """Channel gates from the global average: x * sigmoid(W2 relu(W1 mean_hw(x)))."""

    def __init__(self, width: int):
        super().__init__()
        hidden = max(width // 4, 4)
        self.fc = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, width), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc(x.mean((2, 3)))[:, :, None, None].to(x.dtype)


class ResCell(nn.Module):
    """x + SE(conv1x1(GELU(conv3x3(GELU(conv1x1(GELU(GN(x)))))))): NVAE's cell with VDVAE's bottleneck (hidden =
    width / 4; on 2 CPU cores two full-width 3x3 convolutions per cell made the model 10x slower than the
    single-level VAE). ``out_scale`` shrinks the branch at init (VDVAE scales each block's last layer by
    1/sqrt(depth)) so that a deep stack starts near the identity."""

    def __init__(self, width: int, out_scale: float = 1.0):
        super().__init__()
        hidden = max(width // 4, 4)
        self.body = nn.Sequential(
            _norm(width), nn.GELU(), nn.Conv2d(width, hidden, 1), nn.GELU(),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.GELU(), nn.Conv2d(hidden, width, 1), SqueezeExcite(width),
        )
        with torch.no_grad():
            self.body[6].weight.mul_(out_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Gaussian:
    """N(mean, exp(logvar)) over a latent group, float32 (B, c, h, w); log-densities sum to (B,)."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        self.mean, self.logvar = mean, logvar

    def sample(self, eps: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        return self.mean + temperature * torch.exp(0.5 * self.logvar) * eps

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return gaussian_log_prob(z, self.mean, self.logvar, dim=tuple(range(1, z.dim())))

    def kl(self, p: Gaussian) -> torch.Tensor:
        """KL(self || p) in closed form, summed over the group: (B,)."""
        d = 0.5 * (p.logvar - self.logvar + (self.logvar.exp() + (self.mean - p.mean).pow(2)) * torch.exp(-p.logvar)
                   - 1.0)
        return d.flatten(1).sum(1)


class TopDownGroup(nn.Module):
    """One latent group: c channels at the resolution of the top-down state h (B, w, r, r)."""

    def __init__(self, width: int, z_channels: int, out_scale: float):
        super().__init__()
        self.z_channels = z_channels
        self.prior = nn.Sequential(ResCell(width, out_scale), nn.Conv2d(width, 2 * z_channels + width, 1))
        self.posterior = nn.Sequential(
            nn.Conv2d(2 * width, width, 1), ResCell(width, out_scale), nn.Conv2d(width, 2 * z_channels, 1)
        )
        self.z_proj = nn.Conv2d(z_channels, width, 1)
        self.cell = ResCell(width, out_scale)
        with torch.no_grad():  # start with q = p (zero correction) and a small feature: KL 0 at step 0
            self.posterior[-1].weight.mul_(0.1)
            self.prior[-1].weight[2 * z_channels :].mul_(0.1)
            self.z_proj.weight.mul_(out_scale)

    def prior_of(self, h: torch.Tensor) -> tuple[Gaussian, torch.Tensor]:
        """h (B, w, r, r) -> (p(z | z_<g) in fp32, the feature added to h)."""
        out = self.prior(h)
        c = self.z_channels
        mean, logvar = out[:, :c].float(), soft_clamp(out[:, c : 2 * c].float())
        return Gaussian(mean, logvar), out[:, 2 * c :]

    def posterior_of(self, h: torch.Tensor, enc: torch.Tensor, p: Gaussian) -> Gaussian:
        """NVAE's residual posterior: q = N(mu_p + dmu, exp(logvar_p + dlogvar)), in fp32."""
        dmean, dlogvar = self.posterior(torch.cat([h, enc.to(h.dtype)], 1)).float().chunk(2, 1)
        return Gaussian(p.mean + dmean, p.logvar + soft_clamp(dlogvar))

    def update(self, h: torch.Tensor, feature: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The next top-down state: h + feature + proj(z), then a residual cell."""
        return self.cell(h + feature + self.z_proj(z.to(feature.dtype)))


def upsample(h: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour x2: (B, w, r, r) -> (B, w, 2r, 2r), as VDVAE's unpooling."""
    return F.interpolate(h, scale_factor=2.0, mode="nearest")
