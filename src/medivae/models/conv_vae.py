"""The seed article's convolutional VAE (Kingma & Welling 2014), generalised in size and width.

At 64x64, base width 32, latent 32 it is the article's network layer for layer: four 4x4 stride-2
convolutions 32-64-128-256 with BatchNorm + ReLU, linear heads to mu and log sigma^2, a linear
layer back to 256x4x4 and the mirrored transposed convolutions. The sigmoid sits in the likelihood
(BCE-with-logits is the numerically stable form of the article's sigmoid + BCE).
"""

from __future__ import annotations

import torch
from torch import nn

from medivae.config import ModelConfig
from medivae.models.blocks import decoder_trunk, encoder_trunk, widths_for
from medivae.models.distributions import DiagonalGaussian, make_likelihood
from medivae.models.outputs import VAEOutput, encode_decode


class ConvVAE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.latent_dim = cfg.latent_dim
        self.likelihood = make_likelihood(cfg.likelihood, cfg.gaussian_sigma)
        widths = widths_for(cfg.image_size, cfg.base_width, cfg.max_width)
        feat = widths[-1] * 16
        self.encoder = encoder_trunk(cfg.channels, widths)
        self.fc_mu = nn.Linear(feat, cfg.latent_dim)
        self.fc_logvar = nn.Linear(feat, cfg.latent_dim)
        self.decoder_input = nn.Linear(cfg.latent_dim, feat)
        self.decoder = decoder_trunk(cfg.channels * self.likelihood.params_per_channel, widths)

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> DiagonalGaussian:
        """x: float (B, C, H, W) in [0, 1] -> q(z|x) with mean/logvar (B, D). ``y`` is ignored."""
        h = self.encoder(x)
        return DiagonalGaussian(self.fc_mu(h).float(), self.fc_logvar(h).float())

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """z: (B, D) -> decoder parameters (B, C * k, H, W)."""
        return self.decoder(self.decoder_input(z))

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None = None,
        sample: bool = True,
        generator: torch.Generator | None = None,
    ) -> VAEOutput:
        """Encode, take z (a reparameterised sample, or the posterior mean if ``sample=False``), decode."""
        return encode_decode(self, x, y, sample, generator)

    def images(self, params: torch.Tensor) -> torch.Tensor:
        """Decoder parameters -> displayable mean images (B, C, H, W) in [0, 1]."""
        return self.likelihood.mean(params)
