"""A diffusion prior over some latent of a model, as anomaly scoring and membership inference use it.

:class:`LatentDiffusion` binds a denoiser (:mod:`medivae.models.diffusion`) to the model whose latents it
models: how images become latents, how the latents are standardised for the denoiser, and how latents become
images again. Two kinds of run have one: a family with its own diffusion prior (``ldm``, through its
``diffusion_prior`` hook, :func:`medivae.models.family.diffusion_prior`), and any run with a fitted diffusion
sampler (``medivae fit-sampler RUN --sampler diffusion``; :meth:`medivae.models.samplers.DiffusionSampler.prior_of`).

- Healing (Pinaya et al. 2022, "Fast unsupervised brain anomaly detection and segmentation with diffusion
  models"): encode, noise the standardised latent to t_start, run deterministic DDIM back to 0, decode. What
  the prior finds unlikely is replaced by what it finds likely, so |x - healed| is an anomaly map. t_start is
  a fraction of the schedule; the DDIM step count is that fraction of the prior's sampling steps, so a step
  spans as many timesteps as when the prior samples.
- The loss (:meth:`LatentDiffusion.loss`): the ε-MSE of an image's latent at fixed seeded draws of t and
  noise, a membership signal for diffusion models (the loss-threshold attack of Yeom et al. 2018 that
  Carlini et al. 2023 apply to diffusion models: training images have a lower loss).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from medivae.models.diffusion import LatentStandardiser, NoiseSchedule, diffusion_loss, heal
from medivae.runtime.errors import UserError

Encode = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
Decode = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


@dataclass
class LatentDiffusion:
    """A diffusion prior over a model's latent.

    encode(x (B, C, H, W) in [0, 1], y) -> latents (B, ...) (the posterior mean, or the family's sampler latent);
    decode(z, y) -> images (B, C, H, W) in [0, 1], deterministic (what the decoder would draw itself, e.g. a
    hierarchy's lower groups, at its mean: a draw would depend on the batch); ``standardiser`` maps latents to what
    the denoiser models; ``sampling_steps``: DDIM steps over the whole schedule; ``source``: where the prior comes
    from, for records ("ldm prior", "fitted diffusion sampler")."""

    denoiser: nn.Module
    schedule: NoiseSchedule
    standardiser: LatentStandardiser
    encode: Encode
    decode: Decode
    sampling_steps: int
    source: str

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.denoiser.spec.latent_shape)

    def labels(self, y: torch.Tensor | None) -> torch.Tensor | None:
        """The class the denoiser is given: y for a class-conditional denoiser, else None."""
        return y if y is not None and self.denoiser.spec.num_classes else None

    def t_start(self, fraction: float) -> int:
        """The timestep a fraction of the schedule (0..1) noises to: round(fraction * T)."""
        if not 0 <= fraction <= 1:
            raise UserError(f"healing t_start fraction must be in [0, 1], not {fraction}")
        return int(round(fraction * self.schedule.timesteps))

    def heal_steps(self, fraction: float) -> int:
        """DDIM steps from t_start back to 0: the fraction of ``sampling_steps``, at least 1."""
        return max(1, math.ceil(fraction * self.sampling_steps))

    def noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n standard normal draws of the latent's shape, float32 (n, ...) on the CPU: drawn once per set of
        images, so an image's noise does not depend on the batch it is healed in."""
        return torch.randn((n, *self.latent_shape), generator=generator)

    @torch.no_grad()
    def heal(self, x: torch.Tensor, y: torch.Tensor | None, fraction: float, noise: torch.Tensor) -> torch.Tensor:
        """Healed images float (B, C, H, W) in [0, 1] of x (B, C, H, W): the latent noised to
        ``t_start(fraction)`` with ``noise`` (B, ...), DDIM back to 0, decoded. Fraction 0 decodes the encoding
        unchanged."""
        dev = next(self.denoiser.parameters()).device
        u = self.standardiser.encode(self.encode(x, y).float().to(dev))
        healed = heal(self.denoiser, self.schedule, u, self.t_start(fraction), self.heal_steps(fraction),
                      self.labels(y), noise=noise.to(dev))
        return self.decode(self.standardiser.decode(healed.float()).to(x.device), y).float()

    @torch.no_grad()
    def loss(self, x: torch.Tensor, y: torch.Tensor | None, generator: torch.Generator,
             repeats: int = 8) -> torch.Tensor:
        """ε-MSE (B,) of the standardised latents of x, averaged over ``repeats`` draws of t ~ U{1..T} and noise
        from ``generator`` (seeded by the caller: reproducible); y: the class of a class-conditional denoiser."""
        dev = next(self.denoiser.parameters()).device
        u = self.standardiser.encode(self.encode(x, y).float().to(dev))
        yy = self.labels(y)
        total = sum(diffusion_loss(self.denoiser, self.schedule, u, yy, generator, p_uncond=0.0).double()
                    for _ in range(repeats))
        return total / repeats
