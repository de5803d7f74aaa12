"""Conditional VAE (Sohn, Lee & Yan 2015, "Learning structured output representation using deep
conditional generative models"): q(z|x, y) and p(x|z, y). The prior stays p(z) = N(0, I), independent
of y, as in the generative model of Kingma et al. 2014 (M2), so sampling a class is decode(z, y), z ~ N(0, I).

The label enters as a one-hot vector: broadcast to constant planes and concatenated to the image
channels for the encoder, and concatenated to z for the decoder. Conditioning the encoder as well
lets z give up the class information the decoder already has, so z codes style within a class and
``decode(z, y)`` produces class y for any z drawn from the prior.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medivae.config import ModelConfig
from medivae.models.blocks import decoder_trunk, encoder_trunk, widths_for
from medivae.models.distributions import DiagonalGaussian, make_likelihood
from medivae.models.outputs import VAEOutput, encode_decode


class CVAE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.num_classes < 1:
            raise ValueError(f"cvae needs num_classes >= 1, got {cfg.num_classes}")
        self.cfg = cfg
        self.latent_dim = cfg.latent_dim
        self.num_classes = cfg.num_classes
        self.likelihood = make_likelihood(cfg.likelihood, cfg.gaussian_sigma)
        widths = widths_for(cfg.image_size, cfg.base_width, cfg.max_width)
        feat = widths[-1] * 16
        self.encoder = encoder_trunk(cfg.channels + cfg.num_classes, widths)
        self.fc_mu = nn.Linear(feat, cfg.latent_dim)
        self.fc_logvar = nn.Linear(feat, cfg.latent_dim)
        self.decoder_input = nn.Linear(cfg.latent_dim + cfg.num_classes, feat)
        self.decoder = decoder_trunk(cfg.channels * self.likelihood.params_per_channel, widths)

    def _one_hot(self, y: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        """y: int (B,) class indices -> (B, K) one-hot in ``like``'s dtype and device."""
        if y is None:
            raise ValueError("cvae is conditional: pass class indices y (B,)")
        return F.one_hot(y.long(), self.num_classes).to(device=like.device, dtype=like.dtype)

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> DiagonalGaussian:
        """x: float (B, C, H, W) in [0, 1], y: int (B,) -> q(z|x, y) with mean/logvar (B, D)."""
        onehot = self._one_hot(y, x)  # (B, K)
        planes = onehot[:, :, None, None].expand(-1, -1, x.shape[2], x.shape[3])  # (B, K, H, W)
        h = self.encoder(torch.cat([x, planes], dim=1))
        return DiagonalGaussian(self.fc_mu(h).float(), self.fc_logvar(h).float())

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """z: (B, D), y: int (B,) -> decoder parameters (B, C * k, H, W)."""
        return self.decoder(self.decoder_input(torch.cat([z, self._one_hot(y, z)], dim=1)))

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

