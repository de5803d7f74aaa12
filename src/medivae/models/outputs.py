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
    log_pz: (B,) log p(z) under a learned prior (VampPrior), whose KL is then estimated by Monte Carlo;
        None for the N(0, I) prior (closed-form KL).
    """

    recon_params: torch.Tensor
    posterior: DiagonalGaussian
    z: torch.Tensor
    log_pz: torch.Tensor | None = None


def encode_decode(model, x: torch.Tensor, y: torch.Tensor | None, sample: bool, generator) -> VAEOutput:
    """The forward pass every VAE family shares: q(z|x), then z (a reparameterised sample, or the
    posterior mean when ``sample=False`` — chosen by the argument, never by ``model.training``), then decode."""
    posterior = model.encode(x, y)
    z = posterior.sample(generator) if sample else posterior.mode()
    return VAEOutput(model.decode_params(z, y), posterior, z)
