"""VQ-VAE (van den Oord, Vinyals & Kavukcuoglu 2017) with a learned prior over its code grid.

A convolutional encoder maps an image to a grid of D-dimensional vectors (``image_size / downsample``
on a side: 16x16 at 64 px), each replaced by its nearest codebook vector; a decoder maps the quantised
grid back to the image. Encoder and decoder have residual blocks (the paper's layout).

- Codebook: K vectors in buffers, updated by exponential moving averages of the encoder outputs
  assigned to them (the paper's appendix A.1, with Laplace smoothing of the counts). Under torchrun the
  per-batch counts and sums are summed over ranks before the update, so every replica keeps the same
  codebook (as vector-quantize-pytorch does). Distances are computed in fp32, also under bf16 autocast.
- Loss: ||x - x̂||^2 / N_pix + β ||z_e - sg(e)||^2 / N_lat per image (the paper's means; β = ``commitment``);
  the gradient reaches the encoder through the straight-through estimator.
- Dead codes: a code whose EMA count falls below ``dead_threshold`` assignments per step is restarted
  at a random encoder output of the current batch (Dhariwal et al. 2020, Jukebox). With zero initial
  counts, the first step therefore initialises the whole codebook from encoder outputs.
- Codebook usage (fraction of the K codes assigned at least once) and perplexity, over whole sets only (a
  batch's fraction says little about the codebook): ``train`` over the epoch's training assignments
  (:meth:`VQVAE.epoch_end`; restarted dead codes count as used) and ``val`` over the validation images
  (:meth:`VQVAE.validation_end`), the honest number for unseen data.

Two stages in one run (the prior is :mod:`medivae.models.vq_prior`): the autoencoder trains for the first
``epochs - prior_epochs`` epochs, then the prior fits the codes of the frozen encoder for the last
``prior_epochs`` (``prior_epochs = 0``: no prior, so no sampling). Each stage has its own optimizer and
step, chosen by the epoch, so a resumed run continues in the right stage.

Validation "loss" picks the best checkpoint across both stages, so it must be one quantity throughout:
it is the negative ELBO in nats per image, -log p(x | z_q) - log p(z_q), with a Gaussian p(x | z_q) of
fixed σ (``gaussian_sigma``; a density, not a probability) and the learned prior p(z_q). The posterior is
one-hot, so KL(q || p) = -log p(z_q), logged as "kl". The untrained prior is exactly uniform (its output
layer starts at zero), so in stage 1 "kl" is the paper's constant L·log K and "loss" falls with the
reconstruction error; in stage 2 the decoder is frozen and "loss" falls with the prior's NLL. The prior's
NLL is also logged in bits per code ("prior_bits_per_code").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medivae.models.blocks import residual_decoder, residual_encoder
from medivae.models.distributions import Gaussian
from medivae.models.family import (
    Family,
    PriorInLastEpochs,
    StepContext,
    StepOutput,
    TrainStep,
    adam,
    classes_for_data,
)
from medivae.models.vq_prior import CodePrior, code_nll
from medivae.runtime import distributed
from medivae.runtime.constants import IMAGE_SIZES
from medivae.runtime.device import full_precision
from medivae.runtime.errors import UserError
from medivae.runtime.schema import check_fields

LABELS_FROM_DATA = -1  # num_classes placeholder: one class per label of the training data
PRIORS = ("transformer",)


@dataclass(frozen=True)
class VQVAEConfig:
    name: str = "vq_vae"
    image_size: int = 64
    channels: int = 1
    codebook_size: int = 512  # K
    code_dim: int = 64  # D
    downsample: int = 4  # code grid = image_size / downsample on a side
    width: int = 64  # channels of the residual stack (the stride-2 stages halve it towards the image)
    res_blocks: int = 2
    res_width: int = 32  # hidden channels of a residual block
    commitment: float = 0.25  # β
    ema_decay: float = 0.99
    dead_threshold: float = 1.0  # EMA assignments per step below which a code is restarted; 0: never
    gaussian_sigma: float = 0.1  # σ of p(x | z_q) in the reported negative ELBO (training uses the MSE)
    prior: str = "transformer"
    prior_epochs: int = 3  # the last epochs train the prior; 0: no prior (no sampling)
    prior_width: int = 64
    prior_layers: int = 3
    prior_heads: int = 2  # head size prior_width / prior_heads: CPU flash attention is slow below 32
    num_classes: int = 0  # > 0: class-conditional prior; -1: as many classes as the data has labels

    def __post_init__(self):
        check_fields(self, "model")
        if self.image_size not in IMAGE_SIZES:
            raise UserError(f"image size {self.image_size} is not supported; use one of {list(IMAGE_SIZES)}")
        if self.channels not in (1, 3):
            raise UserError(f"channels must be 1 or 3, not {self.channels}")
        d, s = self.downsample, self.image_size
        if d < 2 or d & (d - 1) or s // d < 4:
            raise UserError(f"downsample {d} does not fit image size {s}: use a power of 2 from 2 to {s // 4} "
                            f"(a code grid of at least 4x4)")
        if not 2 <= self.codebook_size <= 65536:
            raise UserError(f"codebook size must be in [2, 65536], not {self.codebook_size}")
        for name in ("code_dim", "width", "res_width", "prior_width", "prior_layers", "prior_heads"):
            if getattr(self, name) < 1:
                raise UserError(f"{name.replace('_', ' ')} must be >= 1, not {getattr(self, name)}")
        if self.res_blocks < 0 or self.prior_epochs < 0 or self.commitment < 0 or self.dead_threshold < 0:
            raise UserError("res_blocks, prior_epochs, commitment and dead_threshold must be >= 0")
        if not 0 < self.ema_decay < 1:
            raise UserError(f"ema decay must be in (0, 1), not {self.ema_decay}")
        if self.gaussian_sigma <= 0:
            raise UserError(f"gaussian sigma must be > 0, not {self.gaussian_sigma}")
        if self.prior not in PRIORS:
            raise UserError(f"unknown prior {self.prior!r}; choose one of {list(PRIORS)}")
        if self.prior_width % self.prior_heads:
            raise UserError(f"prior width {self.prior_width} must be a multiple of prior heads {self.prior_heads}")
        if self.num_classes < LABELS_FROM_DATA:
            raise UserError(f"num classes must be >= 0 (or -1: from the data), not {self.num_classes}")
        if self.num_classes and not self.prior_epochs:
            raise UserError("num_classes conditions the prior, and prior_epochs=0 trains none; set prior_epochs")

    @property
    def grid(self) -> int:
        return self.image_size // self.downsample

    def for_data(self, label_names: tuple[str, ...], source: str) -> VQVAEConfig:
        """The config for a data set: a class-conditional prior gets one class per label."""
        return classes_for_data(self, label_names, source)


# --- the codebook ------------------------------------------------------------------------------------------
@dataclass
class Quantized:
    """quantized: (B, D, h, w) codebook vectors, with the straight-through gradient to the encoder output;
    indices: int64 (B, h, w); commitment: float (B,) mean of ||z_e - sg(e)||^2 over the latent elements;
    restarts: dead codes restarted by this step's update."""

    quantized: torch.Tensor
    indices: torch.Tensor
    commitment: torch.Tensor
    restarts: int = 0


def _rows(z: torch.Tensor) -> torch.Tensor:
    """(B, D, h, w) -> float32 (B*h*w, D), one row per grid position."""
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float()


class EMACodebook(nn.Module):
    """K code vectors of dimension D, in buffers (no gradient), updated by EMA when ``update=True``."""

    def __init__(self, size: int, dim: int, decay: float, dead_threshold: float, eps: float = 1e-5):
        super().__init__()
        self.size, self.decay, self.dead_threshold, self.eps = size, decay, dead_threshold, eps
        self.register_buffer("embedding", torch.randn(size, dim))  # (K, D)
        self.register_buffer("cluster_size", torch.zeros(size))  # EMA of assignments per step, (K,)
        self.register_buffer("embed_sum", self.embedding.clone())  # EMA of assigned vectors' sums, (K, D)
        # this epoch's training assignments and this validation pass's on this rank (summed over ranks when
        # read: epoch_stats / validation_stats); not part of a checkpoint
        self.register_buffer("epoch_counts", torch.zeros(size, dtype=torch.float64), persistent=False)
        self.register_buffer("val_counts", torch.zeros(size, dtype=torch.float64), persistent=False)

    def nearest(self, rows: torch.Tensor) -> torch.Tensor:
        """rows: float32 (N, D) -> int64 (N,) index of the nearest code (squared Euclidean, in fp32)."""
        with full_precision(rows.device.type):
            e = self.embedding
            dist = rows.pow(2).sum(1, keepdim=True) - 2 * rows @ e.t() + e.pow(2).sum(1)  # (N, K)
            return dist.argmin(1)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """int64 (B, h, w) -> float32 (B, D, h, w) codebook vectors."""
        return F.embedding(indices, self.embedding).permute(0, 3, 1, 2)

    def forward(self, z: torch.Tensor, update: bool = False) -> Quantized:
        """z: (B, D, h, w) encoder output. ``update`` (training): count this batch for the epoch statistics and
        move the codebook towards it."""
        b, _, h, w = z.shape
        rows = _rows(z)
        idx = self.nearest(rows.detach())
        counts = torch.bincount(idx, minlength=self.size).to(rows.dtype)  # this rank's assignments (K,)
        indices = idx.view(b, h, w)
        e = self.lookup(indices)  # (B, D, h, w) fp32: the chosen codes, before this step moves them
        restarts = 0
        if update:
            self.epoch_counts += counts.double()
            restarts = self._update(rows.detach(), idx, counts)
        commitment = (z.float() - e).pow(2).flatten(1).mean(1)
        quantized = e.to(z.dtype) + (z - z.detach())  # straight-through: exactly e forward, identity backward
        return Quantized(quantized, indices, commitment, restarts)

    @torch.no_grad()
    def _update(self, rows: torch.Tensor, idx: torch.Tensor, counts: torch.Tensor) -> int:
        """EMA step with the statistics of every rank; then restart dead codes. Returns how many."""
        sums = torch.zeros_like(self.embed_sum).index_add_(0, idx, rows)  # (K, D)
        stats = distributed.all_reduce_sum_(torch.cat([counts[:, None], sums], dim=1))  # one collective
        self.cluster_size.mul_(self.decay).add_(stats[:, 0], alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(stats[:, 1:], alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.size * self.eps) * n  # Laplace: no division by 0
        self.embedding.copy_(self.embed_sum / smoothed[:, None])
        return self._restart_dead(rows)

    def _restart_dead(self, rows: torch.Tensor) -> int:
        """Move codes with an EMA count below the threshold onto random encoder outputs of this batch.
        The counts are the same on every rank, so all agree on which codes; rank 0's choice of vectors is
        shared by a sum to which the other ranks add zeros."""
        dead = self.cluster_size < self.dead_threshold  # (K,)
        n_dead = int(dead.sum())  # one host sync per step
        if n_dead == 0:
            return 0
        pick = torch.randint(len(rows), (n_dead,), device=rows.device)  # global RNG: saved with checkpoints
        new = rows[pick]
        if distributed.info().rank != 0:
            new = torch.zeros_like(new)
        new = distributed.all_reduce_sum_(new)
        self.embedding[dead] = new
        self.embed_sum[dead] = new * self.dead_threshold
        self.cluster_size[dead] = self.dead_threshold
        return n_dead

    def epoch_stats(self) -> dict[str, float]:
        """Codebook usage and perplexity of the training assignments since the last call (then they restart)."""
        return self._usage(self.epoch_counts)

    def validation_stats(self) -> dict[str, float]:
        """Codebook usage and perplexity of the validation pass since the last call (then it restarts)."""
        return self._usage(self.val_counts)

    @staticmethod
    def _usage(buffer: torch.Tensor) -> dict[str, float]:
        """Codebook usage (fraction of codes assigned at least once) and perplexity (exp of the code entropy)
        of the assignments counted in ``buffer`` (K,), summed over ranks; then ``buffer`` is zeroed."""
        counts = distributed.all_reduce_sum_(buffer.clone())
        buffer.zero_()
        total = counts.sum()
        if total == 0:
            return {}
        p = counts / total
        perplexity = torch.exp(-(p * torch.log(p.clamp(min=1e-300))).sum())
        return {"codebook_usage": float((counts > 0).double().mean()), "codebook_perplexity": float(perplexity)}


# --- the networks --------------------------------------------------------------------------------------
@dataclass
class VQOutput:
    """What :meth:`VQAutoencoder.forward` returns. recon_params: logits (B, C, H, W) of the decoded image
    (sigmoid -> mean in [0, 1]); z: (B, D, h, w) encoder output before quantisation; vq: the quantisation."""

    recon_params: torch.Tensor
    z: torch.Tensor
    vq: Quantized


class VQAutoencoder(nn.Module):
    """Encoder, codebook and decoder: the module stage 1 trains (and DDP wraps)."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.encoder = residual_encoder(cfg.channels, cfg.code_dim, cfg.downsample, cfg.width, cfg.res_blocks,
                                        cfg.res_width)
        self.codebook = EMACodebook(cfg.codebook_size, cfg.code_dim, cfg.ema_decay, cfg.dead_threshold)
        self.decoder = residual_decoder(cfg.code_dim, cfg.channels, cfg.downsample, cfg.width, cfg.res_blocks,
                                        cfg.res_width)

    def forward(self, x: torch.Tensor, update: bool = False) -> VQOutput:
        """x: float (B, C, H, W) in [0, 1]. ``update``: EMA-update the codebook (the training step)."""
        z = self.encoder(x)
        vq = self.codebook(z, update)
        return VQOutput(self.decoder(vq.quantized), z, vq)


@dataclass
class VQEncoding:
    """``encode``'s result. z: (B, D, h, w) continuous pre-quantisation latent; indices: int64 (B, h, w);
    embeddings: (B, D, h, w) the codebook vectors of ``indices``."""

    z: torch.Tensor
    indices: torch.Tensor
    embeddings: torch.Tensor

    def mode(self) -> torch.Tensor:
        return self.z

    def arrays(self) -> dict[str, torch.Tensor]:
        """What ``medivae encode`` writes: code indices and their embeddings."""
        return {"indices": self.indices, "embeddings": self.embeddings}


# --- the family ------------------------------------------------------------------------------------------
class VQVAE(PriorInLastEpochs, nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        if cfg.num_classes < 0:
            raise ValueError(f"{cfg.name}: set num_classes from the data first (VQVAEConfig.for_data)")
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.grid = cfg.grid
        self.autoencoder = VQAutoencoder(cfg)
        self.prior = None
        if cfg.prior_epochs:
            self.prior = CodePrior(cfg.codebook_size, cfg.grid**2, cfg.prior_width, cfg.prior_layers,
                                   cfg.prior_heads, cfg.num_classes)
        caps = {"latent"} | ({"sample", "heal", "code_prior"} if self.prior else set())
        self.capabilities = frozenset(caps | ({"conditional"} if self.prior and cfg.num_classes else set()))
        self.likelihood = Gaussian(cfg.gaussian_sigma)  # of the reported negative ELBO only

    # --- the contract ----------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> VQEncoding:
        """x: float (B, C, H, W) in [0, 1] -> pre-quantisation latent, code indices, embeddings."""
        z = self.autoencoder.encoder(x)
        indices = self.autoencoder.codebook.nearest(_rows(z)).view(z.shape[0], *z.shape[2:])
        return VQEncoding(z.float(), indices, self.autoencoder.codebook.lookup(indices))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """int64 (B, h, w) codes -> images float (B, C, H, W) in [0, 1]."""
        e = self.autoencoder.codebook.lookup(indices)
        return self.likelihood.mean(self.autoencoder.decoder(e))

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """z: (B, D, h, w) continuous latent -> quantised to the nearest codes -> images (B, C, H, W) in [0, 1]."""
        indices = self.autoencoder.codebook.nearest(_rows(z)).view(z.shape[0], *z.shape[2:])
        return self.decode_indices(indices)

    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.likelihood.mean(self.autoencoder(x).recon_params)

    def sampler_latents(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """What a post-hoc sampler models: the continuous pre-quantisation grid (B, D, h, w)."""
        return self.encode(x, y).mode()

    def decode_sampler_latents(self, z, y=None, generator=None, temperature: float = 1.0) -> torch.Tensor:
        """A sampled pre-quantisation grid (B, D, h, w) -> its nearest codes -> images (B, C, H, W) in [0, 1]."""
        return self.decode(z, y)

    def _require_prior(self) -> CodePrior:
        if self.prior is None:
            raise UserError(f"{self.cfg.name} was trained with prior_epochs=0: it has no prior to sample from")
        return self.prior

    def sample_indices(self, n: int, label=None, generator=None, temperature: float = 1.0,
                       top_k: int = 0) -> torch.Tensor:
        """n code grids int64 (n, h, w) drawn from the prior (``label``: int or (n,) class indices; ``top_k`` > 0:
        each code from the ``top_k`` most likely at its position)."""
        prior = self._require_prior()
        y = None
        if self.num_classes and label is not None:
            y = torch.as_tensor(label, dtype=torch.long).expand(n) if isinstance(label, int) else \
                torch.as_tensor(label, dtype=torch.long)
        return prior.sample(n, y, generator, temperature, top_k).view(n, self.grid, self.grid)

    def prior_latents(self, n: int, generator=None, temperature: float = 1.0) -> torch.Tensor:
        """Embeddings (n, D, h, w) of n prior-drawn code grids: latents ``decode`` maps back to those codes."""
        return self.autoencoder.codebook.lookup(self.sample_indices(n, None, generator, temperature))

    def sample(self, n: int, label=None, generator=None, temperature: float = 1.0, top_k: int = 0) -> torch.Tensor:
        """n images float (n, C, H, W) in [0, 1] decoded from prior-drawn codes (``top_k``: see sample_indices)."""
        return self.decode_indices(self.sample_indices(n, label, generator, temperature, top_k)).float()

    @torch.no_grad()
    def heal(self, x: torch.Tensor, y: torch.Tensor | None = None, threshold: float = 0.01) -> torch.Tensor:
        """Prior-guided healing (Pinaya et al. 2022, "Unsupervised brain imaging 3D anomaly detection and
        segmentation with transformers"): in raster order, a code whose probability under the prior, given the
        healed codes before it, is below ``threshold`` is replaced by the prior's most likely code there (the
        mode, not a draw, so a score is reproducible). x (B, C, H, W) -> decoded healed codes, float (B, C, H, W).
        One prior pass per position: position i's logits depend on codes < i only (the prior is causal)."""
        prior = self._require_prior()
        idx = self.encode(x, y).indices  # (B, h, w)
        codes = idx.flatten(1).clone()  # (B, L) raster order, as the prior reads them
        for i in range(codes.shape[1]):
            p = torch.softmax(prior(codes, y)[:, i].float(), dim=-1)  # (B, K), compared in fp32
            low = p.gather(1, codes[:, i : i + 1])[:, 0] < threshold
            codes[low, i] = p[low].argmax(1)
        return self.decode_indices(codes.view_as(idx)).float()

    def prior_nll(self, indices: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """-log p(codes | y) in nats, float (B,); the uniform L·log K without a prior."""
        if self.prior is None:
            return torch.full((len(indices),), indices[0].numel() * math.log(self.cfg.codebook_size),
                              device=indices.device)
        return self.prior.nll(indices.flatten(1), y)

    # --- training ----------------------------------------------------------------------------------------
    def optimizers(self, train_cfg, device) -> dict[str, torch.optim.Optimizer]:
        if self.cfg.prior_epochs and train_cfg.epochs <= self.cfg.prior_epochs:
            raise UserError(f"vq_vae trains its prior in the last prior_epochs={self.cfg.prior_epochs} epochs, "
                            f"so --epochs must exceed that (or pass --model-arg prior_epochs=0)")
        opts = {"model": adam(self.autoencoder.parameters(), train_cfg, device)}
        if self.prior is not None:
            opts["prior"] = adam(self.prior.parameters(), train_cfg, device)
        return opts

    def trained_modules(self) -> dict[str, nn.Module]:
        return {"vqvae": self.autoencoder, **({"prior": self.prior} if self.prior is not None else {})}

    def training_steps(self) -> list[TrainStep]:
        def split(t) -> float:  # the stage boundary, in epochs: each stage's learning rate decays over its own
            return float(t.epochs - self.cfg.prior_epochs)

        steps = [TrainStep("vq", "model", self._vq_step, self._in_stage_one, span=lambda t: (0.0, split(t)))]
        if self.prior is not None:
            steps.append(TrainStep("prior", "prior", self._prior_step, lambda ctx: not self._in_stage_one(ctx),
                                   span=lambda t: (split(t), float(t.epochs))))
        return steps

    def _vq_step(self, nets, x, y, ctx: StepContext) -> StepOutput:
        """Stage 1: reconstruction MSE + β·commitment (paper's means), EMA codebook update."""
        out = nets["vqvae"](x, update=True)
        mse = (torch.sigmoid(out.recon_params.float()) - x).pow(2).flatten(1).mean(1)  # (B,)
        loss = mse + self.cfg.commitment * out.vq.commitment
        terms = {"mse": mse, "psnr": _psnr(mse), "commit": out.vq.commitment,
                 "restarts": torch.tensor(float(out.vq.restarts))}
        return StepOutput(loss.mean(), terms)

    def _prior_step(self, nets, x, y, ctx: StepContext) -> StepOutput:
        """Stage 2: the prior's NLL of the frozen encoder's codes (the codebook stays as it is)."""
        with torch.no_grad():
            indices = self.encode(x).indices  # (B, h, w)
            self.autoencoder.codebook.epoch_counts += torch.bincount(
                indices.flatten(), minlength=self.cfg.codebook_size).double()
        codes = indices.flatten(1)  # (B, L) raster order
        nll = code_nll(nets["prior"](codes, y), codes)
        terms = {"kl": nll, "prior_bits_per_code": nll / (codes.shape[1] * math.log(2))}
        return StepOutput(nll.mean() / codes.shape[1], terms)

    def epoch_end(self, ctx: StepContext) -> dict[str, float]:
        """Codebook usage and perplexity of the epoch's training assignments."""
        return self.autoencoder.codebook.epoch_stats()

    def validation_end(self) -> dict[str, float]:
        """Codebook usage and perplexity of the codes the validation images were given."""
        return self.autoencoder.codebook.validation_stats()

    def validation_terms(self, x, y, generator) -> dict[str, torch.Tensor]:
        """Per image (B,): "loss" = negative ELBO in nats = "rec" (Gaussian, σ fixed) + "kl" (-log p(codes));
        the prior's NLL in bits per code; reconstruction MSE and PSNR (dB)."""
        out = self.autoencoder(x)
        cb = self.autoencoder.codebook
        cb.val_counts += torch.bincount(out.vq.indices.flatten(), minlength=cb.size).double()  # validation_end
        rec = -self.likelihood.log_prob(out.recon_params, x)
        kl = self.prior_nll(out.vq.indices, y)
        mse = (torch.sigmoid(out.recon_params.float()) - x).pow(2).flatten(1).mean(1)
        bits = kl / (out.vq.indices[0].numel() * math.log(2))
        return {"loss": rec + kl, "rec": rec, "kl": kl, "prior_bits_per_code": bits, "mse": mse, "psnr": _psnr(mse)}


def _psnr(mse: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of images in [0, 1], per image (B,)."""
    return 10 * torch.log10(1.0 / mse.clamp(min=1e-10))


FAMILY = Family("vq_vae", VQVAEConfig, VQVAE, "VQ-VAE with an EMA codebook and a transformer prior over its codes")
