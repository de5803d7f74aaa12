"""VAE-GAN (Larsen et al. 2016, "Autoencoding beyond pixels using a learned similarity metric"), with the
parts later work made reliable, so that the defaults train on a laptop CPU.

- Generator: the article's VAE (:class:`medivae.models.conv_vae.ConvVAE`, the same network and ELBO).
- Discriminator: a PatchGAN (Isola et al. 2017) of 4x4 stride-2 convolutions with spectral normalisation
  (Miyato et al. 2018) and LeakyReLU, one logit per patch; no BatchNorm, so its statistics never mix real
  and fake batches.
- Losses: the hinge loss (Lim & Ye 2017; the default) or least squares (Mao et al. 2017). The generator
  minimises rec + β·KL + λ·(adversarial loss of its reconstructions and prior samples) + γ·feature
  matching, the L2 distance between the discriminator's features of x and of its reconstruction (Larsen
  et al.'s learned similarity, next to the pixel likelihood rather than instead of it).
- λ is balanced adaptively (Esser et al. 2021, VQGAN): ``adv_weight`` · ||∇_w rec|| / ||∇_w adv|| at the
  decoder's last layer w, clamped, so the adversarial term neither drowns nor vanishes whatever the pixel
  likelihood's scale. Adversarial terms start after ``adv_start`` epochs of plain VAE training (the
  discriminator trains from then on too); with ``adv_weight = 0`` and ``feature_weight = 0`` the family is
  the plain VAE, loss for loss.
- Two optimizers, "model" (the VAE) and "disc" (the discriminator, learning rate ``disc_lr``), and two
  steps: the generator's, then the discriminator's on the fakes the generator step made (detached).
  Prior samples pass the decoder with BatchNorm on its running statistics, as sampling decodes them.
- ``best/`` is chosen among the epochs trained adversarially throughout (from ``adv_start + 1`` on), so its
  discriminator, which the anomaly scores ``disc`` and ``disc_res`` use, has been trained.
- Divergence: a discriminator right about every real and fake patch for a whole epoch gives the
  generator no useful gradient; ``epoch_end`` raises :class:`medivae.models.family.Diverged`, and the
  trainer rolls both networks and both optimizers back to the start of the epoch at a lower learning rate,
  saying why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import nn

from medivae.models.blocks import PatchDiscriminator, running_batchnorm
from medivae.models.conv_vae import ConvVAE, ConvVAEConfig
from medivae.models.family import Family, StepContext, StepOutput, TrainStep, adam
from medivae.models.losses import (
    ADV_LOSSES,
    DiscriminatorWatch,
    adaptive_weight,
    discriminator_accuracy,
    discriminator_loss,
    feature_matching,
    generator_adv_loss,
    kl_weight,
    neg_elbo,
)
from medivae.runtime.errors import UserError


@dataclass(frozen=True)
class VAEGANConfig(ConvVAEConfig):
    name: str = "vae_gan"
    disc_width: int = 32
    disc_layers: int = 3  # stride-2 convolutions: 64 px -> 8x8 patches of 46 px receptive field
    adv_loss: str = "hinge"
    adv_weight: float = 1.0  # multiplies the adaptive λ (chosen on validation: benchmarks/results/defaults.json)
    adaptive: bool = True  # False: λ = adv_weight
    feature_weight: float = 1.0
    adv_start: float = 1.0  # epochs of plain VAE training before the adversarial terms start
    disc_lr: float = 2e-4

    def __post_init__(self):
        super().__post_init__()
        if self.adv_loss not in ADV_LOSSES:
            raise UserError(f"unknown adversarial loss {self.adv_loss!r}; choose one of {list(ADV_LOSSES)}")
        if not 1 <= self.disc_layers <= 6 or self.image_size >> self.disc_layers < 2:
            raise UserError(f"disc_layers must be 1..6 and leave patches of >= 2 px, not {self.disc_layers}")
        for name in ("disc_width", "disc_lr"):
            if not getattr(self, name) > 0:
                raise UserError(f"{name} must be > 0, not {getattr(self, name)}")
        for name in ("adv_weight", "feature_weight", "adv_start"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be >= 0, not {getattr(self, name)}")

    def vae_config(self) -> ConvVAEConfig:
        """The generator's own config: the conv_vae fields of this one."""
        return ConvVAEConfig(**{f.name: getattr(self, f.name) for f in fields(ConvVAEConfig)})


class VAEGAN(nn.Module):
    def __init__(self, cfg: VAEGANConfig):
        super().__init__()
        self.cfg = cfg
        self.vae = ConvVAE(cfg.vae_config())
        self.disc = PatchDiscriminator(cfg.channels, cfg.disc_width, cfg.disc_layers)
        self.latent_dim, self.num_classes, self.likelihood = cfg.latent_dim, cfg.num_classes, self.vae.likelihood
        self.capabilities = self.vae.capabilities
        self._fakes: torch.Tensor | None = None  # the generator step's images, for the discriminator step
        self._watch = DiscriminatorWatch()  # the discriminator's accuracy this epoch

    # --- the generative model is the VAE's --------------------------------------------------------------
    def encode(self, x, y=None):
        return self.vae.encode(x, y)

    def decode(self, z, y=None):
        return self.vae.decode(z, y)

    def reconstruct(self, x, y=None):
        return self.vae.reconstruct(x, y)

    def prior_latents(self, n, generator=None, temperature: float = 1.0):
        return self.vae.prior_latents(n, generator, temperature)

    def sample(self, n, label=None, generator=None, temperature: float = 1.0):
        return self.vae.sample(n, label, generator, temperature)

    def log_weights(self, x, y=None, k: int = 100, generator=None, max_decode: int = 256):
        return self.vae.log_weights(x, y, k, generator, max_decode)

    def latent_prior(self):
        return self.vae.latent_prior()

    def validation_terms(self, x, y, generator) -> dict[str, torch.Tensor]:
        return self.vae.validation_terms(x, y, generator)

    @torch.no_grad()
    def anomaly_scores(self, x, y=None) -> dict[str, torch.Tensor]:
        """Two anomaly scores (B,) from the discriminator: ``disc``, minus its mean patch logit on x ("less
        real"), and ``disc_res``, the feature-matching distance between x and its reconstruction in the
        discriminator's feature space, the distance the generator was trained to shrink (Larsen et al. 2016)."""
        recon = self.vae.reconstruct(x, y).to(x.dtype)
        logits, feats = self.disc(torch.cat([x, recon]))
        b = len(x)
        res = sum((f[:b] - f[b:]).float().pow(2).flatten(1).mean(1) for f in feats)
        return {"disc": -logits[:b].flatten(1).mean(1).double(), "disc_res": res.double()}

    # --- training ---------------------------------------------------------------------------------------
    def first_best_epoch(self, train_cfg) -> int:
        """The first epoch trained adversarially throughout: earlier ones never become best/ (their
        discriminator, whose scores anomaly detection uses, would be untrained or half-trained)."""
        return math.ceil(self.cfg.adv_start) + 1

    def optimizers(self, train_cfg, device) -> dict[str, torch.optim.Optimizer]:
        first = self.first_best_epoch(train_cfg)
        if train_cfg.epochs < first:
            raise UserError(f"vae_gan trains adversarially from epoch {self.cfg.adv_start:g} on, and best/ only "
                            f"holds epochs trained so throughout: --epochs must be at least {first} "
                            "(or pass --model-arg adv_start=0)")
        disc = torch.optim.Adam(self.disc.parameters(), lr=self.cfg.disc_lr, betas=(0.5, 0.9),
                                fused=device.type in ("cuda", "cpu"))
        return {"model": adam(self.vae.parameters(), train_cfg, device), "disc": disc}

    def trained_modules(self) -> dict[str, nn.Module]:
        return {"vae": self.vae, "disc": self.disc}

    def _adversarial(self, ctx: StepContext) -> bool:
        return ctx.progress >= self.cfg.adv_start

    def training_steps(self) -> list[TrainStep]:
        return [TrainStep("generator", "model", self._generator_step),
                TrainStep("discriminator", "disc", self._disc_step, self._adversarial)]

    def _generator_step(self, nets, x, y, ctx: StepContext) -> StepOutput:
        cfg = self.cfg
        out = nets["vae"](x, y, sample=True, generator=ctx.generator)
        beta = kl_weight(cfg.kl_schedule, cfg.beta, ctx.progress, cfg.warmup_epochs)
        elbo = neg_elbo(self.likelihood, out, x, beta=beta, free_bits=cfg.free_bits)
        terms = {"loss": elbo.rec.detach().double() + elbo.kl.detach().double(), "rec": elbo.rec, "kl": elbo.kl}
        if not self._adversarial(ctx):
            return StepOutput(elbo.loss.mean(), terms)
        if ctx.step == 0:
            self._watch.reset()  # also after a rollback mid-epoch
        z = self.prior_latents(len(x), ctx.generator).to(x.device)
        with running_batchnorm(self.vae):  # as sampling decodes them: no batch statistics of prior samples
            samples = self.vae.images(self.vae.decode_params(z, y))
        fakes = torch.cat([self.likelihood.mean(out.recon_params), samples])
        nets["disc"].eval()  # no power-iteration update: the generator step leaves the discriminator as it was
        try:
            logits, feats = nets["disc"](torch.cat([x, fakes]).to(x.dtype))
        finally:
            nets["disc"].train()
        b = len(x)
        adv = generator_adv_loss(logits[b:], cfg.adv_loss).view(2, b).mean(0)  # (B,): reconstructions, samples
        fm = feature_matching(feats, b)
        lam = self._adaptive_weight(elbo.loss.mean(), adv.mean())
        self._fakes = fakes.detach()
        loss = elbo.loss + lam * adv + cfg.feature_weight * fm
        terms.update(adv=adv, fm=fm, adv_weight=lam.detach())
        return StepOutput(loss.mean(), terms)

    def _adaptive_weight(self, rec: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
        """λ: adaptive (losses.adaptive_weight at the decoder's last layer), or ``adv_weight`` itself."""
        if not self.cfg.adaptive:
            return torch.tensor(self.cfg.adv_weight, device=rec.device)
        return adaptive_weight(rec, adv, self.vae.decoder[-1].weight, self.cfg.adv_weight)

    def _disc_step(self, nets, x, y, ctx: StepContext) -> StepOutput:
        """The discriminator on real images and the generator step's fakes (reconstructions, samples)."""
        fakes, b = self._fakes, len(x)
        logits, _ = nets["disc"](torch.cat([x, fakes]).to(x.dtype))
        real, fake = logits[:b], logits[b:]
        loss_real, loss_fake = discriminator_loss(real, fake, self.cfg.adv_loss)
        disc = loss_real + loss_fake.view(2, b).mean(0)  # (B,)
        acc = discriminator_accuracy(real, fake)
        self._watch.add(acc)
        return StepOutput(disc.mean(), {"disc": disc, "disc_acc": acc.detach()})

    def epoch_end(self, ctx: StepContext) -> dict[str, float]:
        """Discriminator accuracy over the epoch; pinned at 100 % it raises Diverged (losses.DiscriminatorWatch)."""
        return self._watch.epoch_end(ctx.epoch)


FAMILY = Family("vae_gan", VAEGANConfig, VAEGAN, "VAE-GAN: the article's VAE + a spectral-norm PatchGAN")
