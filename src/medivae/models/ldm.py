"""Latent diffusion (Rombach et al. 2022, "High-resolution image synthesis with latent diffusion models"),
sized for a CPU: an autoencoder with a small spatial latent, then a diffusion prior over its latents, both
trained by one ``medivae train`` run.

Stage 1, the autoencoder (the first ``epochs - prior_epochs`` epochs): Rombach et al.'s KL-regularised
autoencoder, on VQ-VAE's residual encoder and decoder (:mod:`medivae.models.blocks`).

- Latent: ``latent_channels`` x (S / d) x (S / d) for images of side S, d = ``downsample`` (default 4 at
  32 px, 8 above): 4 x 8 x 8 at 32 and 64 px, 4 x 16 x 16 at 128 px, 4 x 32 x 32 at 256 px. The prior's
  cost grows with the latent's area (a U-Net step on 16 x 16 latents costs about 4 times one on 8 x 8), and
  at 64 px 8 x 8 x 4 numbers still reconstruct well, so the default keeps the latent at 8 x 8 up to 64 px.
- q(z|x) = N(mean, diag(exp(logvar))) per latent element. Loss per image: the L1 error summed over pixels
  + ``kl_weight`` · KL(q || N(0, I)) summed over latent elements (per-element sums on both sides, the basis
  of Rombach et al.'s kl_weight = 1e-6). The KL term only keeps the latent from drifting; it is far too weak
  to make the latent N(0, I), which is why the prior is learned.
- The adversarial terms of VAE-GAN (:mod:`medivae.models.losses`) from epoch ``adv_start`` on: a spectral-norm
  PatchGAN on real images and reconstructions, the hinge loss, feature matching and VQGAN's adaptive weight
  (Esser et al. 2021), so that decoded latents are sharp. No perceptual (LPIPS) loss: it needs downloaded
  weights.

Stage 2, the prior (the last ``prior_epochs`` epochs): the autoencoder and discriminator stay as they are;
a diffusion U-Net (:mod:`medivae.models.diffusion`: DDPM's ε-loss with a cosine schedule, Ho et al. 2020;
Nichol & Dhariwal 2021) learns posterior draws of the training images' latents, standardised per channel
(the mean and std of the first stage-2 batch over every rank, kept in buffers so a checkpoint carries
them). Each batch's latents are split into ``prior_updates`` parts, one optimizer step each: a diffusion
model needs many more steps than the batches of a short run, and small batches give them at the same cost.
The weights sampled from are an exponential moving average of the trained ones (``diffusion.ema_model``:
decay ``prior_ema``, warmed up as (1 + n) / (10 + n) after n updates), which a short diffusion training
needs most. Sampling is
deterministic DDIM (Song et al. 2021) in ``sampling_steps`` steps, then the decoder.

Class-conditional when the data has two or more labels (``num_classes = -1``, the default; 0 turns it off):
only the prior is; the autoencoder ignores labels. Classifier-free guidance (Ho & Salimans 2022): a fraction
``p_uncond`` of the training labels is replaced by a null class, and samples of a class are guided with
weight ``guidance`` (0: the plain conditional model). Draws without a label (``prior_latents``, for
interpolation) are the prior's unconditional ones.

Validation "loss" picks the best checkpoint across both stages, so it is one quantity throughout: per image
L1 + kl_weight · KL + "prior", the prior's ε-MSE summed over latent elements (fixed noise and timesteps).
Before stage 2 the prior counts as one that predicts no noise (E ||ε||² = the number of latent elements);
in stage 2 the autoencoder terms are constant, so "loss" falls with the prior's error.

Temperature T draws DDIM's starting noise from N(0, T² I).

What it has not: an image likelihood (L1 and adversarial training define none, and the diffusion bound is
not computed): no "likelihood" capability. The latent is spatial and its prior learned, not N(0, I): no
"gaussian_latent" (no traversals, KL per dimension or post-hoc latent samplers).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch
from torch import nn

from medivae.models.blocks import PatchDiscriminator, residual_decoder, residual_encoder
from medivae.models.diffusion import (
    DiffusionSpec,
    LatentStandardiser,
    NoiseSchedule,
    build_denoiser,
    ddim_sample,
    diffusion_loss,
    ema_model,
)
from medivae.models.distributions import DiagonalGaussian
from medivae.models.family import (
    Family,
    ModelFacts,
    PriorInLastEpochs,
    StepContext,
    StepOutput,
    TrainStep,
    adam,
    classes_for_data,
)
from medivae.models.healing import LatentDiffusion
from medivae.models.losses import (
    ADV_LOSSES,
    DiscriminatorWatch,
    adaptive_weight,
    discriminator_accuracy,
    discriminator_loss,
    feature_matching,
    generator_adv_loss,
)
from medivae.runtime import distributed
from medivae.runtime.constants import IMAGE_SIZES
from medivae.runtime.device import full_precision
from medivae.runtime.errors import UserError

LABELS_FROM_DATA = -1  # num_classes: one class per label when the data has two or more, else unconditional


@dataclass(frozen=True)
class LDMConfig:
    name: str = "ldm"
    image_size: int = 64
    channels: int = 1
    # the autoencoder
    latent_channels: int = 4  # channels of the spatial latent
    downsample: int = 0  # latent side = image side / downsample (a power of 2); 0: 4 at 32 px, 8 above
    width: int = 64  # channels of the residual stack (the stride-2 stages halve it towards the image)
    res_blocks: int = 2  # residual blocks in the encoder and in the decoder
    res_width: int = 32  # hidden channels of a residual block
    kl_weight: float = 1e-6  # on per-element sums: L1 summed over pixels, KL summed over latent elements
    # the adversarial terms (as vae_gan's)
    disc_width: int = 32  # channels of the discriminator's first layer
    disc_layers: int = 3  # its stride-2 convolutions: 32 px -> 4x4 patches
    adv_loss: str = "hinge"  # or "lsgan"
    adv_weight: float = 0.5  # multiplies VQGAN's adaptive weight
    feature_weight: float = 1.0  # feature matching in the discriminator's layers
    adv_start: float = 2.0  # epochs of plain autoencoder training before the adversarial terms start
    disc_lr: float = 2e-4  # the discriminator's learning rate
    # the diffusion prior
    prior_epochs: int = 4  # the last epochs train the prior; 0: no prior (no sampling)
    prior_width: int = 64  # base channels of the U-Net
    prior_updates: int = 4  # optimizer steps of the prior per batch, each on 1/prior_updates of it
    prior_ema: float = 0.999  # decay of the moving average of the prior's weights that samples (0: none)
    timesteps: int = 1000  # diffusion steps T of the forward process
    sampling_steps: int = 50  # DDIM steps per sample
    guidance: float = 1.0  # classifier-free guidance weight w of class-conditional samples (0: none)
    p_uncond: float = 0.1  # fraction of training labels replaced by the null class
    num_classes: int = LABELS_FROM_DATA  # > 0: a class-conditional prior; -1: from the data; 0: unconditional

    def __post_init__(self):
        if self.image_size not in IMAGE_SIZES:
            raise UserError(f"image size {self.image_size} is not supported; use one of {list(IMAGE_SIZES)}")
        if self.channels not in (1, 3):
            raise UserError(f"channels must be 1 or 3, not {self.channels}")
        d, s = self.downsample, self.image_size
        if d and (d < 2 or d & (d - 1) or s // d < 4):
            raise UserError(f"downsample {d} does not fit image size {s}: use 0 (automatic) or a power of 2 "
                            f"from 2 to {s // 4} (a latent of at least 4x4)")
        for name in ("latent_channels", "width", "res_width", "disc_width", "prior_width", "prior_updates",
                     "sampling_steps"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, not {getattr(self, name)}")
        for name in ("res_blocks", "prior_epochs", "kl_weight", "adv_weight", "feature_weight", "adv_start",
                     "guidance"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be >= 0, not {getattr(self, name)}")
        if not self.disc_lr > 0:
            raise UserError(f"disc_lr must be > 0, not {self.disc_lr}")
        if self.adv_loss not in ADV_LOSSES:
            raise UserError(f"unknown adversarial loss {self.adv_loss!r}; choose one of {list(ADV_LOSSES)}")
        if not 1 <= self.disc_layers <= 6 or self.image_size >> self.disc_layers < 2:
            raise UserError(f"disc_layers must be 1..6 and leave patches of >= 2 px, not {self.disc_layers}")
        if self.timesteps < 2:
            raise UserError(f"timesteps must be >= 2, not {self.timesteps}")
        if not 0 <= self.prior_ema < 1:
            raise UserError(f"prior_ema must be in [0, 1), not {self.prior_ema}")
        if not 0 <= self.p_uncond < 1:
            raise UserError(f"p_uncond must be in [0, 1), not {self.p_uncond}")
        if self.num_classes < LABELS_FROM_DATA:
            raise UserError(f"num_classes must be >= 0 (or -1: from the data), not {self.num_classes}")
        if self.num_classes > 0 and not self.prior_epochs:
            raise UserError("num_classes conditions the prior, and prior_epochs=0 trains none; set prior_epochs")

    @property
    def factor(self) -> int:
        """The latent's downsampling factor: ``downsample``, or 4 at 32 px and 8 above."""
        return self.downsample or (4 if self.image_size <= 32 else 8)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.image_size // self.factor
        return self.latent_channels, side, side

    def diffusion_spec(self) -> DiffusionSpec:
        return DiffusionSpec(self.latent_shape, max(self.num_classes, 0), self.prior_width, self.timesteps)

    def for_data(self, label_names: tuple[str, ...], source: str) -> LDMConfig:
        """The config for a data set: one class per label when it has two or more (and a prior to condition)."""
        if self.num_classes == LABELS_FROM_DATA and (len(label_names) < 2 or not self.prior_epochs):
            return dataclasses.replace(self, num_classes=0)
        return classes_for_data(self, label_names, source)


class SpatialPosterior:
    """q(z|x) over a spatial latent: mean, logvar (B, C, h, w); the Gaussian itself is
    :class:`DiagonalGaussian` over the flattened latent."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        self.shape = mean.shape
        self.flat = DiagonalGaussian(mean.flatten(1), logvar.flatten(1))

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.flat.sample(generator).view(self.shape)

    def mode(self) -> torch.Tensor:
        return self.flat.mean.view(self.shape)

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over latent elements, (B,)."""
        return self.flat.kl()

    def arrays(self) -> dict[str, torch.Tensor]:
        """What ``medivae encode`` writes: posterior means and log-variances, (B, C, h, w) each."""
        return {"mean": self.mode(), "logvar": self.flat.logvar.view(self.shape)}


@dataclass
class AEOutput:
    """What :meth:`KLAutoencoder.forward` returns. logits: (B, C, H, W) pre-sigmoid reconstruction;
    posterior: q(z|x) over (B, c, h, w); z: the latent decoded (a posterior draw, or its mean)."""

    logits: torch.Tensor
    posterior: SpatialPosterior
    z: torch.Tensor


class KLAutoencoder(nn.Module):
    """Encoder to (mean, logvar) of the latent and decoder back to image logits: the module stage 1 trains."""

    def __init__(self, cfg: LDMConfig):
        super().__init__()
        c = cfg.latent_channels
        args = (cfg.factor, cfg.width, cfg.res_blocks, cfg.res_width)
        self.encoder = residual_encoder(cfg.channels, 2 * c, *args)
        self.decoder = residual_decoder(c, cfg.channels, *args)

    def posterior(self, x: torch.Tensor) -> SpatialPosterior:
        """x: float (B, C, H, W) in [0, 1] -> q(z|x) over (B, c, h, w), in float32."""
        mean, logvar = self.encoder(x).float().chunk(2, dim=1)
        return SpatialPosterior(mean, logvar)

    def forward(self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None) -> AEOutput:
        q = self.posterior(x)
        z = q.sample(generator) if sample else q.mode()
        return AEOutput(self.decoder(z.to(x.dtype)), q, z)


def _l1(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per image (B,): |recon - x| summed over pixels."""
    return (recon.float() - x.float()).abs().flatten(1).sum(1)


def _mse_psnr(recon: torch.Tensor, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per image (B,): mean squared error and PSNR in dB of images in [0, 1]."""
    mse = (recon.float() - x.float()).pow(2).flatten(1).mean(1)
    return {"mse": mse, "psnr": 10 * torch.log10(1.0 / mse.clamp(min=1e-10))}


class LDM(PriorInLastEpochs, nn.Module):
    def __init__(self, cfg: LDMConfig):
        super().__init__()
        if cfg.num_classes < 0:
            raise ValueError(f"{cfg.name}: set num_classes from the data first (LDMConfig.for_data)")
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.latent_shape = cfg.latent_shape
        self.autoencoder = KLAutoencoder(cfg)
        self.disc = PatchDiscriminator(cfg.channels, cfg.disc_width, cfg.disc_layers)
        self.prior = build_denoiser(cfg.diffusion_spec()) if cfg.prior_epochs else None
        self.prior_ema = None  # the moving average of the prior's weights: what samples
        if self.prior is not None and cfg.prior_ema:
            self.prior_ema = ema_model(self.prior, cfg.prior_ema).requires_grad_(False)
        self.schedule = NoiseSchedule(cfg.timesteps)
        c = cfg.latent_channels
        # per-channel standardisation of the latents the prior sees; set at the first stage-2 step
        self.register_buffer("latent_mean", torch.zeros(c, 1, 1))
        self.register_buffer("latent_std", torch.ones(c, 1, 1))
        self.register_buffer("prior_ready", torch.zeros(()))
        caps = {"latent"} | ({"sample"} if self.prior is not None else set())
        self.capabilities = frozenset(caps | ({"conditional"} if self.prior is not None and cfg.num_classes else set()))
        self._watch = DiscriminatorWatch()
        self._fakes: torch.Tensor | None = None  # the autoencoder step's reconstructions, for the disc step
        self._latents: torch.Tensor | None = None  # this batch's standardised latents, for every prior update
        self._prior_mse: list[torch.Tensor] = []  # this batch's per-image prior losses, logged by the last update

    # --- the contract ----------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> SpatialPosterior:
        """x: float (B, C, H, W) in [0, 1] -> q(z|x) over (B, c, h, w). Labels are the prior's only."""
        return self.autoencoder.posterior(x)

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """z: (B, c, h, w) latent -> images float (B, C, H, W) in [0, 1]."""
        w = self.autoencoder.decoder[0].weight
        return torch.sigmoid(self.autoencoder.decoder(z.to(w.device, w.dtype)).float())

    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The decoded posterior mean: float (B, C, H, W) in [0, 1]."""
        return self.decode(self.encode(x).mode())

    def describe(self) -> ModelFacts:
        """No image likelihood, no flat latent; the KL weight is ``kl_weight``."""
        return ModelFacts(beta=self.cfg.kl_weight)

    def standardiser(self) -> LatentStandardiser:
        """Latent (B, c, h, w) <-> the standardised latent the prior models."""
        return LatentStandardiser(self.latent_mean, self.latent_std)

    def _require_prior(self) -> nn.Module:
        """The denoiser that samples: the moving average of the prior's weights, when kept."""
        if self.prior is None:
            raise UserError(f"{self.cfg.name} was trained with prior_epochs=0: it has no prior to sample from")
        return self.prior_ema.module if self.prior_ema is not None else self.prior

    def diffusion_prior(self) -> LatentDiffusion | None:
        """The prior over the posterior means (B, c, h, w) (the moving average of its weights, when kept), for
        diffusion healing; None before stage 2 has trained one. Labels reach only the prior (the autoencoder
        ignores them)."""
        if self.prior is None or not self.prior_ready:
            return None
        return LatentDiffusion(self._require_prior(), self.schedule, self.standardiser(),
                               lambda x, y: self.encode(x).mode(), lambda z, y: self.decode(z),
                               self.cfg.sampling_steps, "ldm prior")

    def draw_latents(self, n: int, y: torch.Tensor | None = None, generator=None, temperature: float = 1.0,
                     progress: bool = False) -> torch.Tensor:
        """n latents (n, c, h, w) float32 on the model's device, drawn by DDIM from the prior (y: (n,) class
        indices, guided by ``cfg.guidance``; None: the unconditional prior) from noise N(0, T² I)."""
        prior = self._require_prior()
        guidance = self.cfg.guidance if y is not None else 0.0
        u = ddim_sample(prior, self.schedule, n, y, guidance, self.cfg.sampling_steps, generator, progress,
                        temperature=temperature)
        return self.standardiser().decode(u.float())

    def prior_latents(self, n: int, generator=None, temperature: float = 1.0) -> torch.Tensor:
        """n unconditional prior draws (n, c, h, w) on the CPU: latents ``decode`` takes (interpolation)."""
        return self.draw_latents(n, None, generator, temperature).cpu()

    def sample(self, n: int, label=None, generator=None, temperature: float = 1.0) -> torch.Tensor:
        """n images float (n, C, H, W) in [0, 1]; ``label``: int or (n,) class indices (conditional models)."""
        device = self.latent_mean.device
        y = None
        if self.num_classes and label is not None:
            y = torch.full((n,), label, dtype=torch.long) if isinstance(label, int) else \
                torch.as_tensor(label, dtype=torch.long)
            y = y.to(device)
        return self.decode(self.draw_latents(n, y, generator, temperature))

    # --- training ----------------------------------------------------------------------------------------
    def optimizers(self, train_cfg, device) -> dict[str, torch.optim.Optimizer]:
        if self.prior is not None and train_cfg.epochs <= self.cfg.prior_epochs:
            raise UserError(f"ldm trains its prior in the last prior_epochs={self.cfg.prior_epochs} epochs, so "
                            f"--epochs must exceed that (or pass --model-arg prior_epochs=N with N < --epochs)")
        disc = torch.optim.Adam(self.disc.parameters(), lr=self.cfg.disc_lr, betas=(0.5, 0.9),
                                fused=device.type in ("cuda", "cpu"))
        opts = {"model": adam(self.autoencoder.parameters(), train_cfg, device), "disc": disc}
        if self.prior is not None:
            opts["prior"] = adam(self.prior.parameters(), train_cfg, device)
        return opts

    def trained_modules(self) -> dict[str, nn.Module]:
        return {"ae": self.autoencoder, "disc": self.disc, **({"prior": self.prior} if self.prior is not None else {})}

    def _adversarial(self, ctx: StepContext) -> bool:
        return self._in_stage_one(ctx) and ctx.progress >= self.cfg.adv_start

    def training_steps(self) -> list[TrainStep]:
        def split(t) -> float:  # the stage boundary in epochs: each stage's learning rate decays over its own
            return float(t.epochs - self.cfg.prior_epochs)

        def stage_one(t):
            return 0.0, split(t)

        steps = [TrainStep("autoencoder", "model", self._ae_step, self._in_stage_one, span=stage_one),
                 TrainStep("discriminator", "disc", self._disc_step, self._adversarial, span=stage_one)]
        if self.prior is not None:
            for i in range(self.cfg.prior_updates):
                steps.append(TrainStep("prior" if i == 0 else f"prior_{i + 1}", "prior",
                                       functools.partial(self._prior_step, part=i),
                                       lambda ctx: not self._in_stage_one(ctx),
                                       span=lambda t: (split(t), float(t.epochs))))
        return steps

    def _ae_step(self, nets, x, y, ctx: StepContext) -> StepOutput:
        """Stage 1: L1 + kl_weight · KL, and from ``adv_start`` on the adversarial and feature-matching terms."""
        cfg = self.cfg
        out = nets["ae"](x, sample=True, generator=ctx.generator)
        recon = torch.sigmoid(out.logits.float())
        rec, kl = _l1(recon, x), out.posterior.kl()
        loss = rec + cfg.kl_weight * kl
        terms = {"rec": rec.detach(), "kl": kl.detach(), **_mse_psnr(recon.detach(), x)}
        if ctx.step == 0:  # also after a rollback mid-epoch, or a time budget's timing of a later epoch's steps
            self._watch.reset()
        if not self._adversarial(ctx):
            return StepOutput(loss.mean(), terms)
        nets["disc"].eval()  # no power-iteration update: this step leaves the discriminator as it was
        try:
            logits, feats = nets["disc"](torch.cat([x, recon.to(x.dtype)]))
        finally:
            nets["disc"].train()
        b = len(x)
        adv, fm = generator_adv_loss(logits[b:], cfg.adv_loss), feature_matching(feats, b)
        lam = adaptive_weight(rec.mean(), adv.mean(), self.autoencoder.decoder[-1].weight, cfg.adv_weight)
        self._fakes = recon.detach()
        terms.update(adv=adv.detach(), fm=fm.detach(), adv_weight=lam)
        return StepOutput((loss + lam * adv + cfg.feature_weight * fm).mean(), terms)

    def _disc_step(self, nets, x, y, ctx: StepContext) -> StepOutput:
        """The discriminator on real images and the autoencoder step's reconstructions."""
        b = len(x)
        logits, _ = nets["disc"](torch.cat([x, self._fakes.to(x.dtype)]))
        real, fake = logits[:b], logits[b:]
        loss_real, loss_fake = discriminator_loss(real, fake, self.cfg.adv_loss)
        acc = discriminator_accuracy(real, fake)
        self._watch.add(acc)
        return StepOutput((loss_real + loss_fake).mean(), {"disc": (loss_real + loss_fake).detach(), "disc_acc": acc})

    def _prior_step(self, nets, x, y, ctx: StepContext, part: int) -> StepOutput:
        """Stage 2: the prior's ε-MSE on part ``part`` of this batch's standardised latents (part 0 encodes the
        batch). The last part logs every image's loss: "prior" summed over latent elements, "prior_mse" averaged."""
        parts = min(self.cfg.prior_updates, len(x))  # a batch smaller than that repeats images
        if part == 0:
            with torch.no_grad():
                z = self.autoencoder.posterior(x).sample(ctx.generator)  # (B, c, h, w) float32
                if not self.prior_ready:
                    self._fit_standardiser(z)
                self._latents, self._prior_mse = self.standardiser().encode(z), []
        idx = torch.tensor_split(torch.arange(len(x), device=x.device), parts)[part % parts]
        self._update_ema()
        yi = None if y is None else y[idx]
        p_uncond = self.cfg.p_uncond if y is not None else 0.0
        mse = diffusion_loss(nets["prior"], self.schedule, self._latents[idx], yi, ctx.generator, p_uncond)  # (b,)
        if part < parts:
            self._prior_mse.append(mse.detach())
        terms = {}
        if part == self.cfg.prior_updates - 1:
            every = torch.cat(self._prior_mse)  # (B,)
            terms = {"prior": every * math.prod(self.latent_shape), "prior_mse": every}
        return StepOutput(mse.mean(), terms)

    @torch.no_grad()
    def _update_ema(self) -> None:
        """Move the moving average to the prior's current weights: those of the previous update, since the
        trainer steps the optimizer after a step returns (so the very last update is left out of it)."""
        if self.prior_ema is not None:
            self.prior_ema.update_parameters(self.prior)

    @torch.no_grad()
    def _fit_standardiser(self, z: torch.Tensor) -> None:
        """Per-channel mean and std of latents z (B, c, h, w), pooled over every rank's batch."""
        dtype = torch.float32 if z.device.type == "mps" else torch.float64
        with full_precision(z.device.type):
            zd = z.to(dtype)
            n = torch.full((zd.shape[1],), zd[:, 0].numel(), dtype=dtype, device=z.device)
            stats = torch.stack([n, zd.sum((0, 2, 3)), zd.pow(2).sum((0, 2, 3))])  # (3, c)
            n, s, sq = distributed.all_reduce_sum_(stats)
            mean = s / n
            var = (sq - n * mean.pow(2)) / (n - 1).clamp(min=1)
        self.latent_mean.copy_(mean.view(-1, 1, 1))
        self.latent_std.copy_(var.clamp(min=0).sqrt().clamp(min=1e-6).view(-1, 1, 1))
        self.prior_ready.fill_(1.0)

    def epoch_end(self, ctx: StepContext) -> dict[str, float]:
        """The discriminator's accuracy over an adversarial epoch (pinned at 100 % it raises Diverged); nothing for
        an epoch without adversarial steps, whatever a time budget's timing of such steps left in the watch."""
        if not self._adversarial(ctx):
            self._watch.reset()
            return {}
        return self._watch.epoch_end(ctx.epoch)

    def validation_terms(self, x, y, generator) -> dict[str, torch.Tensor]:
        """Per image (B,): "loss" = L1 + kl_weight · KL + "prior" (see the module docstring); "rec" (L1),
        "kl", reconstruction MSE and PSNR (dB) of the decoded posterior draw."""
        out = self.autoencoder(x, sample=True, generator=generator)
        recon = torch.sigmoid(out.logits.float())
        rec, kl = _l1(recon, x), out.posterior.kl()
        prior = self._prior_term(out.z, y, generator)
        return {"loss": rec + self.cfg.kl_weight * kl + prior, "rec": rec, "kl": kl, "prior": prior,
                **_mse_psnr(recon, x)}

    def _prior_term(self, z: torch.Tensor, y, generator) -> torch.Tensor:
        """The prior's ε-MSE summed over latent elements, (B,): that of a prior predicting no noise (the number
        of elements) until stage 2 starts; 0 without a prior."""
        elements = math.prod(self.latent_shape)
        if self.prior is None:
            return torch.zeros(len(z), device=z.device)
        if not self.prior_ready:
            return torch.full((len(z),), float(elements), device=z.device)
        u = self.standardiser().encode(z.float())
        return diffusion_loss(self._require_prior(), self.schedule, u, y, generator, p_uncond=0.0) * elements


FAMILY = Family("ldm", LDMConfig, LDM, "latent diffusion: a KL autoencoder with a PatchGAN + a diffusion U-Net prior "
                "(its samples gain from more than the default epochs: --epochs 20 --model-arg prior_epochs=10)")
