"""Typed model outputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from medivae.models.distributions import DiagonalGaussian


@dataclass
class VAEOutput:
    """What ``forward`` returns.

    recon_params: (B, C * k, H, W) decoder parameters (k = likelihood.params_per_channel), pre-activation.
    posterior: q(z|x) with mean/logvar (B, D).
    z: (B, D) the latent that was decoded (a sample, or the posterior mean when sample=False).
    """

    recon_params: torch.Tensor
    posterior: DiagonalGaussian
    z: torch.Tensor
