"""A hierarchical VAE of the Ladder VAE / NVAE / VDVAE lineage (Sønderby et al. 2016; Vahdat & Kautz 2020;
Child 2021): latent groups at several scales, a bottom-up encoder and one top-down path that inference and
generation share.

- Bottom-up: a stem takes the image to ``image_size / stem_stride`` (4, or 2 for a finer bottom scale);
  residual cells (blocks) and a stride-2
  convolution per scale leave one activation per latent scale (e.g. 16x16, 8x8, 4x4 at 64 px).
- Top-down: from a learned state at the coarsest scale, ``groups_per_scale`` latent groups per scale,
  coarse to fine (upsampling x2 in between). Group g reads its prior p(z_g | z_<g) from the state; in
  inference its posterior is NVAE's residual one, q(z_g | x, z_<g) = N(mu_p + dmu, exp(logvar_p + dlv)),
  with the correction read from the state and the bottom-up activation of its scale. Either way z_g
  updates the state (VDVAE's decoder block). A head takes the finest state to the image's likelihood
  parameters. The networks that sample are exactly the ones inference trains (tests check it).
- KL per group in closed form between the two Gaussians (given the groups above, which were sampled);
  their sum is the KL of the whole hierarchy (a single-sample, Rao-Blackwellised-per-group estimate).
- KL warm-up (``kl_schedule``, ``warmup_epochs``; losses.kl_weight): none by default (β = 1 throughout:
  on PneumoniaMNIST at 32 px over the default epochs a one-epoch linear warm-up gave worse validation
  bits/dim, benchmarks/results/defaults.json); with one, NVAE's KL balancing (appendix A of the paper) weights each
  group by its share of the KL over its relative size during the warm-up, so that no group is switched off
  early (posterior collapse per group). ``kl_balance``: None (default) balances during a warm-up if there is
  one; True without a warm-up is refused, since it could not act.
- Stabilisers: log-variances are soft-clamped (5 tanh(x/5), NVAE); the optimised loss is per dimension
  (nats / (C H W), VDVAE) and updates whose gradient norm exceeds ``skip_threshold`` are skipped (VDVAE);
  the trainer counts them (``grad_skipped``, fraction of steps; ``grad_norm``). AdamW with β2 = 0.9
  (VDVAE's). KL and likelihood math run in fp32 under bf16 autocast.
- Likelihood: the discretized logistic by default, so bits/dim are a real NLL of 8-bit images.
- Sampling: every group from its prior with its standard deviation times ``temperature``.

The latent that ``decode`` takes (and ``encode(..).mode()``/``prior_latents`` return) is every group's z,
flattened and concatenated top to bottom: (B, D), D = sum_g c * r_g^2.

What it needs: epochs. With the default epochs on PneumoniaMNIST at 32 px (4,708 training images) its test
bits/dim are level with conv_vae's with the same likelihood, not better; a finer bottom scale
(``stem_stride=2``) gained little on validation at twice the CPU time (benchmarks/results/defaults.json). Its
lead comes with longer training: 60 epochs with ``--lr-schedule cosine``, ``stem_stride=2``, ``width=64``
(benchmarks/results/hvae_pneumonia32cos.json).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from medivae.models.cpu_conv import DownConv, UpConv
from medivae.models.distributions import make_likelihood
from medivae.models.family import Family, LogWeights, StepContext, StepOutput, TrainStep
from medivae.models.hierarchical_blocks import Gaussian, ResCell, TopDownGroup, upsample
from medivae.models.losses import KL_FLAGS, check_kl_settings, kl_weight
from medivae.runtime.constants import IMAGE_SIZES, LIKELIHOODS
from medivae.runtime.errors import UserError
from medivae.runtime.schema import check_fields


@dataclass(frozen=True)
class HierarchicalVAEConfig:
    name: str = "hierarchical_vae"
    image_size: int = 64
    channels: int = 1
    likelihood: str = "discretized_logistic"
    gaussian_sigma: float = 0.1  # fixed decoder std of the "gaussian" likelihood
    width: int = 32  # channels of the bottom-up and top-down paths
    z_channels: int = 8  # channels of each latent group
    num_scales: int = 3  # latent scales: image/4, image/8, ... (16, 8, 4 at 64 px)
    stem_stride: int = 4  # the finest latent scale is image/stem_stride: 4 (default) or 2 (finer, slower)
    groups_per_scale: int = 2
    enc_blocks: int = 1  # residual cells per scale in the bottom-up path
    kl_schedule: str = "constant"  # β over training: constant, linear (NVAE's warm-up) or cyclical (losses.kl_weight)
    warmup_epochs: float = 0.0  # linear: ramp length; cyclical: cycle length (in epochs)
    kl_balance: bool | None = None  # NVAE's per-group KL balancing while β < 1; None: during a warm-up if any
    skip_threshold: float = 400.0  # skip updates whose gradient norm (of the per-dim loss) exceeds this; 0: never

    def __post_init__(self):
        check_fields(self, "model")
        if self.image_size not in IMAGE_SIZES:
            raise UserError(f"image size {self.image_size} is not supported; use one of {list(IMAGE_SIZES)}")
        if self.channels not in (1, 3):
            raise UserError(f"channels must be 1 or 3, not {self.channels}")
        if self.likelihood not in LIKELIHOODS:
            raise UserError(f"unknown likelihood {self.likelihood!r}; choose one of {list(LIKELIHOODS)}")
        for name in ("width", "z_channels", "num_scales", "groups_per_scale"):
            if getattr(self, name) < 1:
                raise UserError(f"{name.replace('_', ' ')} must be >= 1, not {getattr(self, name)}")
        if self.enc_blocks < 0 or self.skip_threshold < 0 or self.gaussian_sigma <= 0:
            raise UserError("enc_blocks and skip_threshold must be >= 0 and gaussian_sigma > 0")
        if self.stem_stride not in (2, 4):
            raise UserError(f"stem stride must be 2 or 4, not {self.stem_stride}")
        if self.image_size // self.stem_stride >> (self.num_scales - 1) < 1:
            most = int(math.log2(self.image_size // self.stem_stride)) + 1
            raise UserError(f"num scales {self.num_scales} does not fit image size {self.image_size}: at most {most}")
        check_kl_settings(self.kl_schedule, self.warmup_epochs)
        if self.kl_balance and self.kl_schedule == "constant":
            raise UserError("hierarchical_vae: KL balancing acts only during a KL warm-up, and the constant "
                            "schedule has none: pass --kl-schedule linear --warmup-epochs E, or leave kl_balance "
                            "unset")

    @property
    def balances_kl(self) -> bool:
        """Whether the KL is balanced while β < 1: as set, or by default whenever there is a warm-up."""
        return self.kl_schedule != "constant" if self.kl_balance is None else self.kl_balance

    @classmethod
    def cli_flags(cls) -> dict[str, str]:
        """Command-line shorthands of this config's fields (models/family.py: ``Family.cli_flags``)."""
        return {"likelihood": "discretized_logistic (default), bernoulli, gaussian", **KL_FLAGS}

    @classmethod
    def upgrade(cls, values: dict, legacy: dict) -> dict:
        """A config.json of a version that kept the KL schedule in the training settings (``legacy``): its
        constant schedule never balanced the KL, so the run reproduces with kl_balance off."""
        if legacy.get("kl_schedule", "constant") == "constant":
            values = {**values, "kl_balance": False}
        return values

    @property
    def resolutions(self) -> list[int]:
        """Sides of the latent scales, coarse to fine: [4, 8, 16] at 64 px with 3 scales (stem stride 4)."""
        return [self.image_size // self.stem_stride >> i for i in reversed(range(self.num_scales))]


@dataclass
class GroupDraw:
    """One latent group of a top-down pass: z (B, c, r, r) fp32, its prior and (inference) posterior."""

    z: torch.Tensor
    p: Gaussian
    q: Gaussian | None


@dataclass
class HVAEOutput:
    """recon_params: (B, C * k, H, W) likelihood parameters; groups: the latent groups, top to bottom."""

    recon_params: torch.Tensor
    groups: list[GroupDraw]

    def kl(self) -> torch.Tensor:
        """Closed-form KL(q || p) of each group given the groups above: float32 (B, G)."""
        return torch.stack([g.q.kl(g.p) for g in self.groups], 1)

    def log_ratio(self) -> torch.Tensor:
        """log p(z) - log q(z | x) of the whole hierarchy at the drawn z: (B,)."""
        return sum(g.p.log_prob(g.z) - g.q.log_prob(g.z) for g in self.groups)


class HierarchicalEncoding:
    """``encode``'s result: the posterior of every group (means along the deterministic top-down pass)."""

    def __init__(self, groups: list[GroupDraw]):
        self.groups = groups

    def mode(self) -> torch.Tensor:
        """Every group's posterior mean, flattened and concatenated top to bottom: (B, D)."""
        return torch.cat([g.q.mean.flatten(1) for g in self.groups], 1)

    def arrays(self) -> dict[str, torch.Tensor]:
        """What ``medivae encode`` writes: group{i}_mean / group{i}_logvar, (B, c, r, r) each."""
        out = {}
        for i, g in enumerate(self.groups):
            out[f"group{i}_mean"], out[f"group{i}_logvar"] = g.q.mean, g.q.logvar
        return out


def balanced_kl(kl: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """NVAE's KL balancing: (B, G) per-group KLs -> (B,) sum with weights proportional to each group's
    batch-mean KL divided by its relative size ``alpha`` (G,), normalised to mean 1 (no gradient through
    the weights). Groups that carry little information get a smaller push towards the prior."""
    share = kl.detach().abs().mean(0) + 0.01  # (G,)
    coeff = share / alpha * share.sum()
    coeff = coeff / coeff.mean()
    return (kl * coeff).sum(1)


def _noise(shape, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Standard normal noise on ``device`` from ``generator`` (which may live on the CPU), fp32."""
    if generator is None or generator.device == device:
        return torch.randn(shape, generator=generator, device=device)
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


class HierarchicalVAE(nn.Module):
    def __init__(self, cfg: HierarchicalVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.capabilities = frozenset({"sample", "latent", "likelihood"})
        self.likelihood = make_likelihood(cfg.likelihood, cfg.gaussian_sigma)
        w, res = cfg.width, cfg.resolutions
        n_groups = len(res) * cfg.groups_per_scale
        scale = 1 / math.sqrt(n_groups)
        self.shapes = [(cfg.z_channels, r, r) for r in res for _ in range(cfg.groups_per_scale)]
        self.latent_size = sum(c * r * r for c, r, _ in self.shapes)
        # bottom-up: (B, C, S, S) -> (B, w, S/stride, S/stride), then one activation per scale, fine to coarse
        # (no full-resolution 3x3 convolutions: on 2 CPU cores they cost more than the whole hierarchy)
        half = max(w // 2, 1)
        out_channels = cfg.channels * self.likelihood.params_per_channel
        if cfg.stem_stride == 4:
            self.stem = nn.Sequential(DownConv(cfg.channels, half), nn.GELU(), DownConv(half, w))
            head = [UpConv(w, half), nn.GELU(), UpConv(half, out_channels)]
        else:
            self.stem = nn.Sequential(DownConv(cfg.channels, w))
            head = [UpConv(w, out_channels)]
        self.encoder = nn.ModuleList(
            nn.Sequential(*[ResCell(w, scale) for _ in range(cfg.enc_blocks)]) for _ in res
        )
        self.down = nn.ModuleList(DownConv(w, w) for _ in res[1:])
        # top-down: shared by inference and generation
        # random, not zeros (NVAE's prior_ftr0): GroupNorm of a constant map divides rounding noise by sqrt(eps),
        # which made the latents differ by 1e-4 between memory layouts
        self.h0 = nn.Parameter(torch.randn(1, w, res[0], res[0]))
        self.groups = nn.ModuleList(TopDownGroup(w, cfg.z_channels, scale) for _ in range(n_groups))
        self.head = nn.Sequential(ResCell(w), *head)
        # NVAE's alpha_i: a group's relative size (r^2 / groups at its scale), smallest = 1
        alpha = torch.tensor([r * r / cfg.groups_per_scale for _, r, _ in self.shapes])
        self.register_buffer("kl_alpha", alpha / alpha.min(), persistent=False)

    # --- the networks ------------------------------------------------------------------------------------
    def bottom_up(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: float (B, C, S, S) in [0, 1] -> one activation (B, w, r, r) per scale, coarse to fine."""
        h = self.stem(x * 2.0 - 1.0)
        acts = []
        for s, blocks in enumerate(self.encoder):  # fine to coarse
            if s:
                h = self.down[s - 1](h)
            h = blocks(h)
            acts.append(h)
        return acts[::-1]

    def top_down(self, n: int, acts=None, zs=None, sample: bool = True, temperature: float = 1.0,
                 generator=None, head: bool = True) -> HVAEOutput:
        """The shared top-down pass over n images. Each group's z is, in this order of precedence, the given
        ``zs[g]`` (``zs`` may stop early: the groups below it are then drawn); with ``acts`` (bottom-up
        activations: inference) a draw from q (``sample``) or its mean;
        else a draw from p with its std times ``temperature`` (``sample``) or its mean."""
        device = self.h0.device
        h = self.h0.expand(n, -1, -1, -1)
        draws, g = [], 0
        for s in range(self.cfg.num_scales):
            if s:
                h = upsample(h)
            for _ in range(self.cfg.groups_per_scale):
                block = self.groups[g]
                p, feature = block.prior_of(h)
                q = None if acts is None else block.posterior_of(h, acts[s], p)
                dist, t = (p, temperature) if q is None else (q, 1.0)
                if zs is not None and g < len(zs):
                    z = zs[g]
                elif sample:
                    z = dist.sample(_noise(p.mean.shape, generator, device), t)
                else:
                    z = dist.mean
                h = block.update(h, feature, z)
                draws.append(GroupDraw(z, p, q))
                g += 1
        return HVAEOutput(self.head(h) if head else None, draws)

    def forward(self, x, y=None, sample: bool = True, generator: torch.Generator | None = None) -> HVAEOutput:
        """Inference: bottom-up, then the top-down pass with z from q (a draw, or the means if not ``sample``)."""
        return self.top_down(len(x), self.bottom_up(x), sample=sample, generator=generator)

    def split_latent(self, z: torch.Tensor) -> list[torch.Tensor]:
        """(B, D) -> every group's z (B, c, r, r), top to bottom."""
        sizes = [c * r * r for c, r, _ in self.shapes]
        return [part.reshape(len(z), *shape) for part, shape in zip(z.split(sizes, 1), self.shapes, strict=True)]

    # --- the family contract (models/family.py) ----------------------------------------------------------
    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> HierarchicalEncoding:
        """x: float (B, C, H, W) in [0, 1] -> the posteriors of all groups along the posterior-mean pass."""
        return HierarchicalEncoding(self.top_down(len(x), self.bottom_up(x), sample=False, head=False).groups)

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """z: (B, D) every group's latent -> mean images float (B, C, H, W) in [0, 1]."""
        zs = self.split_latent(z.float())
        return self.likelihood.mean(self.top_down(len(z), zs=zs).recon_params).float()

    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Decoded posterior means (= decode(encode(x).mode())): float (B, C, H, W) in [0, 1]."""
        return self.likelihood.mean(self(x, sample=False).recon_params).float()

    def prior_latents(self, n: int, generator=None, temperature: float = 1.0) -> torch.Tensor:
        """n draws of the whole hierarchy from the prior (std times ``temperature``): (n, D) on the CPU."""
        draws = self.top_down(n, temperature=temperature, generator=generator, head=False).groups
        return torch.cat([d.z.flatten(1) for d in draws], 1).cpu()

    def sampler_latents(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """What a post-hoc sampler models: the posterior means of the coarsest scale's groups, stacked on the
        channel axis (B, groups_per_scale * z_channels, r0, r0). The finer groups come from the model's own
        conditional prior (:meth:`decode_sampler_latents`): the top carries the global layout that the prior
        N(0, I) gets wrong, the lower groups local detail that p(z_g | z_<g) already models given the top."""
        k = self.cfg.groups_per_scale
        return torch.cat([g.q.mean for g in self.encode(x, y).groups[:k]], 1)

    def decode_sampler_latents(self, z, y=None, generator=None, temperature: float = 1.0) -> torch.Tensor:
        """Top groups z (B, groups_per_scale * z_channels, r0, r0) -> images (B, C, H, W) in [0, 1]; the finer
        groups drawn from p(z_g | z_<g) with their std times ``temperature``."""
        zs = list(z.float().split(self.cfg.z_channels, dim=1))
        out = self.top_down(len(z), zs=zs, temperature=temperature, generator=generator)
        return self.likelihood.mean(out.recon_params).float()

    def sample(self, n: int, label=None, generator=None, temperature: float = 1.0) -> torch.Tensor:
        """n images from the prior: float (n, C, H, W) in [0, 1] (the likelihood's mean)."""
        out = self.top_down(n, temperature=temperature, generator=generator)
        return self.likelihood.mean(out.recon_params).float()

    def log_weights(self, x, y=None, k: int = 100, generator=None, max_decode: int = 256) -> LogWeights:
        """K draws of the whole hierarchy from q(z | x): log p(x | z_k) and sum over groups of log p(z_g | z_<g)
        - log q(z_g | x, z_<g), float64 (K, B) on the CPU; ``kl``: the per-group closed-form KLs summed and
        averaged over the K draws (an unbiased, lower-variance estimate of the hierarchy's KL)."""
        acts = self.bottom_up(x)
        b = len(x)
        per_chunk = max(1, max_decode // b)
        log_px, log_ratio, kl = [], [], []
        for start in range(0, k, per_chunk):
            n = min(per_chunk, k - start)
            rep = [a.repeat(n, 1, 1, 1) for a in acts]  # sample-major (n * B, ...)
            out = self.top_down(n * b, rep, sample=True, generator=generator)
            xr = x.repeat(n, 1, 1, 1)
            log_px.append(self.likelihood.log_prob(out.recon_params, xr).view(n, b).double().cpu())
            log_ratio.append(out.log_ratio().view(n, b).double().cpu())
            kl.append(out.kl().sum(1).view(n, b).double().cpu())
        return LogWeights(torch.cat(log_px), torch.cat(log_ratio), torch.cat(kl).mean(0))

    def optimizers(self, train_cfg, device) -> dict[str, torch.optim.Optimizer]:
        """AdamW with VDVAE's β2 = 0.9 (quicker to forget a gradient spike than 0.999)."""
        fused = device.type in ("cuda", "cpu")
        opt = torch.optim.AdamW(list(self.parameters()), lr=train_cfg.lr, betas=(0.9, 0.9),
                                weight_decay=train_cfg.weight_decay, fused=fused)
        return {"model": opt}

    def trained_modules(self) -> dict[str, nn.Module]:
        return {"hvae": self}

    def training_steps(self) -> list[TrainStep]:
        return [TrainStep("elbo", "model", self._elbo_step, skip_above=self.cfg.skip_threshold)]

    def _terms(self, out: HVAEOutput, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(rec (B,), per-group KL (B, G), the logged terms: loss = -ELBO in float64, rec, kl, kl_g{i})."""
        rec = -self.likelihood.log_prob(out.recon_params, x)
        kl = out.kl()
        dtype = torch.float32 if rec.device.type == "mps" else torch.float64
        terms = {"loss": rec.detach().to(dtype) + kl.detach().to(dtype).sum(1), "rec": rec.detach(),
                 "kl": kl.detach().sum(1)}
        terms.update({f"kl_g{i}": kl[:, i].detach() for i in range(kl.shape[1])})
        return rec, kl, terms

    def _elbo_step(self, nets, x, y, ctx: StepContext) -> StepOutput:
        """rec + β·KL per dimension (β from the KL schedule; KL balancing while β < 1)."""
        cfg = self.cfg
        beta = kl_weight(cfg.kl_schedule, 1.0, ctx.progress, cfg.warmup_epochs)
        out = nets["hvae"](x, sample=True, generator=ctx.generator)
        rec, kl, terms = self._terms(out, x)
        kl_total = balanced_kl(kl, self.kl_alpha) if cfg.balances_kl and beta < 1 else kl.sum(1)
        loss = (rec + beta * kl_total).mean() / x[0].numel()
        return StepOutput(loss, {**terms, "beta": torch.tensor(beta)})

    def validation_terms(self, x, y, generator) -> dict[str, torch.Tensor]:
        """Single-sample negative ELBO ("loss"), its likelihood term and the KL of every group, per image (B,)."""
        return self._terms(self(x, sample=True, generator=generator), x)[2]


FAMILY = Family("hierarchical_vae", HierarchicalVAEConfig, HierarchicalVAE,
                "hierarchical VAE (NVAE/VDVAE): latent groups at several scales, shared top-down path (whether "
                "its defaults beat conv_vae's bits/dim depends on the data: see the defaults results)")
