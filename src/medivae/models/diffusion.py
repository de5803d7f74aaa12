"""A denoising diffusion model over latents: the shared core of the ``diffusion`` latent sampler and of
latent-diffusion families.

- Forward process and loss: DDPM (Ho, Jain & Abbeel 2020), ε-prediction with the simple MSE objective;
  z_t = sqrt(ᾱ_t) z_0 + sqrt(1 - ᾱ_t) ε, t in 1..T, t = 0 the clean latent.
- Schedule: the cosine ᾱ of improved DDPM (Nichol & Dhariwal 2021), betas clipped at 0.999.
- Sampling: deterministic DDIM (Song, Meng & Ermon 2021, η = 0) on an evenly spaced subsequence of
  ``steps`` timesteps.
- Conditioning: classifier-free guidance (Ho & Salimans 2022). A class-conditional denoiser has a learned
  null class (index ``num_classes``; pass y = -1 for it), used for a fraction ``p_uncond`` of the training
  draws. Guided noise, in the convention of Ho & Salimans: ε = ε_uncond + (1 + w)(ε_cond - ε_uncond), so
  w = 0 is the plain conditional model and w > 0 pushes further towards the class.
- Denoisers: an MLP with residual blocks for flat latents (D,); a small U-Net (residual blocks with
  GroupNorm, one self-attention block at the lowest resolution) for spatial latents (C, H, W). Both take
  a sinusoidal time embedding (Vaswani et al. 2017) plus the class embedding, and start with a zero
  output layer.
- Healing (:func:`heal`): noise a latent to t_start and run DDIM back to 0 (Pinaya et al. 2022 use the
  distance between an image and its healed version as an anomaly score).

Latents should be standardised first (:class:`LatentStandardiser`: per dimension for flat latents, per
channel for spatial ones) so that the schedule's signal-to-noise ratios mean the same for every model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medivae.runtime.errors import UserError

NULL_CLASS = -1  # the label a denoiser reads as "no class" (classifier-free guidance)


@dataclass(frozen=True)
class DiffusionSpec:
    """The denoiser's architecture; JSON-serialisable, saved beside its weights.

    latent_shape: (D,) flat latent -> MLP denoiser; (C, H, W) spatial -> small U-Net.
    num_classes: > 0 for a class-conditional denoiser (with a learned null class for guidance).
    width: hidden width (MLP) or base channels (U-Net); 0 = :meth:`resolved_width`'s default.
    timesteps: T of the forward process."""

    latent_shape: tuple[int, ...]
    num_classes: int = 0
    width: int = 0
    timesteps: int = 1000

    def __post_init__(self):
        shape = tuple(int(s) for s in self.latent_shape)
        object.__setattr__(self, "latent_shape", shape)
        if len(shape) not in (1, 3) or min(shape) < 1:
            raise UserError(f"diffusion latent_shape must be (D,) or (C, H, W) of positive sizes, not {shape}")
        if self.num_classes < 0:
            raise UserError(f"diffusion num_classes must be >= 0, not {self.num_classes}")
        if self.width < 0:
            raise UserError(f"diffusion width must be >= 0 (0 = default), not {self.width}")
        if self.timesteps < 2:
            raise UserError(f"diffusion timesteps must be >= 2, not {self.timesteps}")

    @property
    def spatial(self) -> bool:
        return len(self.latent_shape) == 3

    def resolved_width(self) -> int:
        """``width``, or the default: 4 D clipped to [128, 1024] for an MLP; 64 channels for a U-Net."""
        if self.width:
            return self.width
        return 64 if self.spatial else min(1024, max(128, 4 * self.latent_shape[0]))

    def to_dict(self) -> dict:
        return {"latent_shape": list(self.latent_shape), "num_classes": self.num_classes,
                "width": self.width, "timesteps": self.timesteps}

    @classmethod
    def from_dict(cls, d: dict) -> DiffusionSpec:
        known = {"latent_shape", "num_classes", "width", "timesteps"}
        if not isinstance(d, dict) or "latent_shape" not in d or set(d) - known:
            raise UserError(f"invalid diffusion spec {d!r}: expected keys {sorted(known)}")
        return cls(tuple(d["latent_shape"]), int(d.get("num_classes", 0)), int(d.get("width", 0)),
                   int(d.get("timesteps", 1000)))


# --- noise schedule ------------------------------------------------------------------------------------
class NoiseSchedule:
    """Cosine ᾱ over ``timesteps`` T: ``alpha_bar`` float64 (T + 1,), ``alpha_bar[0] = 1`` (clean),
    strictly decreasing, in (0, 1) for t >= 1."""

    def __init__(self, timesteps: int = 1000, s: float = 0.008):
        t = torch.arange(timesteps + 1, dtype=torch.float64)
        f = torch.cos((t / timesteps + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)  # Nichol & Dhariwal: no singularity at t = T
        self.timesteps = timesteps
        self.alpha_bar = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)])

    def coefficients(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(ᾱ_t), sqrt(1 - ᾱ_t)) for t long (B,), shaped to broadcast against ``like`` (B, ...)."""
        ab = self.alpha_bar[t.cpu()].to(like.device, torch.float32).view(-1, *([1] * (like.dim() - 1)))
        return ab.sqrt(), (1 - ab).sqrt()

    def q_sample(self, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """z_t = sqrt(ᾱ_t) z0 + sqrt(1 - ᾱ_t) noise; z0, noise (B, ...), t long (B,) in 0..T."""
        a, b = self.coefficients(t, z0)
        return a * z0 + b * noise


# --- denoisers -----------------------------------------------------------------------------------------
def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of timesteps t (B,) -> (B, dim) float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    emb = torch.cat([angles.cos(), angles.sin()], dim=1)
    return F.pad(emb, (0, dim - 2 * half))


class Conditioning(nn.Module):
    """Time + class embedding (B, dim): sinusoid -> MLP, plus a learned vector per class and the null class."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.dim, self.num_classes = dim, num_classes
        self.time = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.classes = nn.Embedding(num_classes + 1, dim) if num_classes else None

    def forward(self, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        emb = self.time(timestep_embedding(t, self.dim))
        if self.classes is None:
            if y is not None and bool((y != NULL_CLASS).any()):
                raise ValueError("this denoiser is unconditional: pass y=None")
            return emb
        if y is None:
            y = torch.full_like(t, NULL_CLASS)
        return emb + self.classes(torch.where(y < 0, self.num_classes, y).long())


def eps_from_v(alpha_bar: torch.Tensor, z: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """ε from the network's v-prediction (Salimans & Ho 2022): with z_t = a z0 + b ε (a² + b² = 1) and
    v = a ε - b z0, ε = a v + b z_t, and DDIM's ẑ0 = (z_t - b ε) / a = a z_t - b v.

    Why: a network that outputs ε directly must reproduce z_t to within sqrt(ᾱ_T) ≈ 5e-5 near t = T, or
    DDIM's first step amplifies its error by 1 / sqrt(ᾱ_T); through v, ẑ0 stays bounded at every t.
    The loss is still the ε-MSE (= ᾱ_t times the v-MSE); the samplers here read v itself (``velocity``),
    since ẑ0 from ε would cancel float32 digits at t = T. z, v (B, ...), t long (B,) -> (B, ...)."""
    ab = alpha_bar[t].view(-1, *([1] * (z.dim() - 1)))
    return ab.sqrt() * v + (1 - ab).sqrt() * z


class MLPBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)
        self.emb = nn.Linear(width, width)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(F.silu(self.fc1(F.silu(self.norm(h))) + self.emb(emb)))


class MLPDenoiser(nn.Module):
    """ε-prediction for flat latents: (B, D) -> (B, D), with ``blocks`` residual MLP blocks."""

    def __init__(self, spec: DiffusionSpec, blocks: int = 4):
        super().__init__()
        self.spec = spec
        d, w = spec.latent_shape[0], spec.resolved_width()
        self.cond = Conditioning(w, spec.num_classes)
        self.inp = nn.Linear(d, w)
        self.blocks = nn.ModuleList(MLPBlock(w) for _ in range(blocks))
        self.out = nn.Sequential(nn.LayerNorm(w), nn.SiLU(), nn.Linear(w, d))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)
        self.register_buffer("alpha_bar", NoiseSchedule(spec.timesteps).alpha_bar.float(), persistent=False)

    def velocity(self, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The network's v-prediction (B, D)."""
        emb = F.silu(self.cond(t, y))
        h = self.inp(z)
        for b in self.blocks:
            h = b(h, emb)
        return self.out(h)

    def forward(self, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return eps_from_v(self.alpha_bar, z, t, self.velocity(z, t, y))


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(8 if ch % 8 == 0 else 1, ch)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the embedding added in between; 1x1 skip when the width changes."""

    def __init__(self, cin: int, cout: int, emb_dim: int):
        super().__init__()
        self.n1, self.c1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.n2, self.c2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.c1(F.silu(self.n1(x))) + self.emb(emb)[:, :, None, None]
        return self.skip(x) + self.c2(F.silu(self.n2(h)))


class Attention(nn.Module):
    """Self-attention over the positions of a (B, C, H, W) map, residual; heads of about 32 channels (the most
    heads up to ch // 32 that divide ch, which multi-head attention needs: 100 channels get 2, not 3)."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = _norm(ch)
        heads = max(1, ch // 32)
        while ch % heads:
            heads -= 1
        self.attn = nn.MultiheadAttention(ch, num_heads=heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q = self.norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        out, _ = self.attn(q, q, q, need_weights=False)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


def unet_levels(h: int, w: int, max_down: int = 2) -> int:
    """How many times a (h, w) map halves in the U-Net: while both sides are even and at least 8."""
    n = 0
    while n < max_down and h % 2 == 0 and w % 2 == 0 and min(h, w) >= 8:
        h, w, n = h // 2, w // 2, n + 1
    return n


class UNetDenoiser(nn.Module):
    """ε-prediction for spatial latents: (B, C, H, W) -> (B, C, H, W). Channels ``width * 2**level``."""

    def __init__(self, spec: DiffusionSpec):
        super().__init__()
        self.spec = spec
        c, h, w = spec.latent_shape
        base = spec.resolved_width()
        widths = [base * 2**i for i in range(unet_levels(h, w) + 1)]
        emb = base * 4
        self.cond = Conditioning(emb, spec.num_classes)
        self.inp = nn.Conv2d(c, base, 3, padding=1)
        self.down = nn.ModuleList(ResBlock(a, b, emb) for a, b in zip([base] + widths[:-1], widths, strict=True))
        self.pool = nn.ModuleList(nn.Conv2d(ch, ch, 3, stride=2, padding=1) for ch in widths[:-1])
        self.mid1, self.mid_attn, self.mid2 = ResBlock(widths[-1], widths[-1], emb), Attention(widths[-1]), \
            ResBlock(widths[-1], widths[-1], emb)
        self.up = nn.ModuleList(ResBlock(2 * ch, ch, emb) for ch in reversed(widths))
        self.unpool = nn.ModuleList(nn.Conv2d(hi, lo, 3, padding=1) for hi, lo in
                                    zip(reversed(widths[1:]), reversed(widths[:-1]), strict=True))
        self.out = nn.Sequential(_norm(base), nn.SiLU(), nn.Conv2d(base, c, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)
        self.register_buffer("alpha_bar", NoiseSchedule(spec.timesteps).alpha_bar.float(), persistent=False)

    def forward(self, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return eps_from_v(self.alpha_bar, z, t, self.velocity(z, t, y))

    def velocity(self, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The network's v-prediction (B, C, H, W)."""
        emb = F.silu(self.cond(t, y))
        h, skips = self.inp(z), []
        for i, block in enumerate(self.down):
            h = block(h, emb)
            skips.append(h)
            if i < len(self.pool):
                h = self.pool[i](h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for i, block in enumerate(self.up):
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
            if i < len(self.unpool):
                h = self.unpool[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.out(h)


def build_denoiser(spec: DiffusionSpec) -> nn.Module:
    """The denoiser of ``spec``: forward(z_t, t long (B,), y long (B,) | None) -> predicted noise, z_t's shape;
    ``velocity(z_t, t, y)`` -> its v-prediction (what DDIM uses). y = -1 (or y=None) is the null class."""
    return UNetDenoiser(spec) if spec.spatial else MLPDenoiser(spec)


# --- standardisation ------------------------------------------------------------------------------------
class LatentStandardiser:
    """Per-dimension (flat (D,)) or per-channel (spatial (C, H, W)) mean and std of training latents.
    ``mean``/``std`` have the latent's shape with 1 for the pooled axes: (D,) or (C, 1, 1)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        self.mean, self.std = mean.float(), std.float()

    @classmethod
    def fit(cls, z: torch.Tensor) -> LatentStandardiser:
        """From latents z (N, D) or (N, C, H, W)."""
        z = z.double()
        dims = (0,) if z.dim() == 2 else (0, 2, 3)
        mean = z.mean(dims, keepdim=True)[0]
        std = z.std(dims, keepdim=True)[0] if z.numel() // z.shape[1] > 1 else torch.ones_like(mean)
        return cls(mean, std.clamp(min=1e-6))

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.mean.to(z.device)) / self.std.to(z.device)

    def decode(self, u: torch.Tensor) -> torch.Tensor:
        return u * self.std.to(u.device) + self.mean.to(u.device)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "std": self.std}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> LatentStandardiser:
        return cls(t["mean"], t["std"])


# --- training loss ------------------------------------------------------------------------------------
def _randn(shape, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device).to(device)


def diffusion_loss(denoiser: nn.Module, schedule: NoiseSchedule, z0: torch.Tensor, y: torch.Tensor | None = None,
                   generator: torch.Generator | None = None, p_uncond: float = 0.1) -> torch.Tensor:
    """Per-sample ε-MSE (B,), averaged over latent dimensions, at t ~ U{1..T}. z0 (B, ...) standardised;
    y long (B,) or None; with y, a fraction ``p_uncond`` of the labels is replaced by the null class."""
    b, device = len(z0), z0.device
    gen_device = generator.device if generator is not None else device
    t = torch.randint(1, schedule.timesteps + 1, (b,), generator=generator, device=gen_device).to(device)
    noise = _randn(z0.shape, generator, device)
    if y is not None and p_uncond > 0:
        drop = torch.rand(b, generator=generator, device=gen_device).to(device) < p_uncond
        y = torch.where(drop, torch.full_like(y, NULL_CLASS), y)
    pred = denoiser(schedule.q_sample(z0, t, noise), t, y)
    return (pred.float() - noise).pow(2).flatten(1).mean(1)


# --- sampling --------------------------------------------------------------------------------------------
def ddim_timesteps(t_start: int, steps: int) -> list[int]:
    """Evenly spaced timesteps from ``t_start`` down to 0, at most ``steps`` steps (``steps + 1`` points)."""
    pts = torch.linspace(t_start, 0, min(steps, t_start) + 1).round().long().tolist()
    return sorted(set(pts), reverse=True)


def _guided(fn, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, guidance: float) -> torch.Tensor:
    """fn(z, t, y) guided by w: out_u + (1 + w)(out_c - out_u), one batched call for both halves; float32."""
    if y is None or guidance == 0:
        return fn(z, t, y).float()
    both = fn(torch.cat([z, z]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, NULL_CLASS)])).float()
    cond, uncond = both.chunk(2)
    return uncond + (1 + guidance) * (cond - uncond)


def guided_noise(denoiser, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, guidance: float) -> torch.Tensor:
    """ε at (z, t): the conditional model, guided by w = ``guidance``: ε_u + (1 + w)(ε_c - ε_u); float32.
    (ε is affine in v with the same z, so guiding v, as DDIM here does, is the same guidance.)"""
    return _guided(denoiser, z, t, y, guidance)


def _ddim_loop(denoiser, schedule: NoiseSchedule, z: torch.Tensor, ts: list[int], y, guidance: float,
               bar=None) -> torch.Tensor:
    """DDIM (η = 0) along ``ts`` (descending): ẑ0 = a_t z - b_t v, ε = a_t v + b_t z, z_s = a_s ẑ0 + b_s ε
    (a = sqrt(ᾱ), b = sqrt(1 - ᾱ); the same as ẑ0 = (z - b_t ε) / a_t without its cancellation)."""
    ab = schedule.alpha_bar
    for t, s in zip(ts[:-1], ts[1:], strict=True):
        tt = torch.full((len(z),), t, dtype=torch.long, device=z.device)
        v = _guided(denoiser.velocity, z, tt, y, guidance)
        a_t, b_t, a_s, b_s = math.sqrt(ab[t]), math.sqrt(1 - ab[t]), math.sqrt(ab[s]), math.sqrt(1 - ab[s])
        z0, eps = a_t * z - b_t * v, a_t * v + b_t * z
        z = a_s * z0 + b_s * eps
        if bar is not None:
            bar.update(1)
    return z


def _check(schedule: NoiseSchedule, steps: int, y, guidance: float, spec: DiffusionSpec) -> None:
    if steps < 1:
        raise UserError(f"--sampling-steps must be >= 1, not {steps}")
    if guidance != 0 and (y is None or spec.num_classes == 0):
        raise UserError("--guidance needs a class-conditional diffusion model and a class")
    if y is not None and spec.num_classes == 0:
        raise UserError("this diffusion model is unconditional: it takes no class")
    if schedule.timesteps != spec.timesteps:
        raise ValueError(f"schedule has {schedule.timesteps} timesteps, the denoiser {spec.timesteps}")


@torch.no_grad()
def ddim_sample(denoiser: nn.Module, schedule: NoiseSchedule, n: int, y: torch.Tensor | None = None,
                guidance: float = 0.0, steps: int = 50, generator: torch.Generator | None = None,
                progress: bool = False, batch: int = 1024, temperature: float = 1.0) -> torch.Tensor:
    """n standardised latents (n, *latent_shape) float32 on the denoiser's device, by deterministic DDIM
    from z_T ~ N(0, temperature² I) drawn with ``generator``. y long (n,) or None; w = ``guidance`` (see
    the module doc). Runs in the caller's autocast, if any (the update itself is float32). Progress bar
    on stderr."""
    from tqdm import tqdm

    spec = denoiser.spec
    _check(schedule, steps, y, guidance, spec)
    device = next(denoiser.parameters()).device
    ts = ddim_timesteps(schedule.timesteps, steps)
    zs = temperature * _randn((n, *spec.latent_shape), generator, device)
    chunks = list(range(0, n, batch))
    out = []
    with tqdm(total=len(chunks) * (len(ts) - 1), desc="diffusion sampling", unit="step", disable=not progress,
              leave=False) as bar:
        for i in chunks:
            yi = None if y is None else torch.as_tensor(y).long().to(device)[i : i + batch]
            out.append(_ddim_loop(denoiser, schedule, zs[i : i + batch], ts, yi, guidance, bar))
    return torch.cat(out) if out else zs


@torch.no_grad()
def heal(denoiser: nn.Module, schedule: NoiseSchedule, z0: torch.Tensor, t_start: int, steps: int = 20,
         y: torch.Tensor | None = None, generator: torch.Generator | None = None,
         noise: torch.Tensor | None = None) -> torch.Tensor:
    """Noise standardised latents z0 (B, ...) to ``t_start`` (0..T) with ``noise`` (z0's shape; default drawn
    with ``generator``) and run DDIM back to 0 in at most ``steps`` steps; ``t_start = 0`` returns z0
    unchanged. Same shape as z0, float32."""
    if not 0 <= t_start <= schedule.timesteps:
        raise UserError(f"healing t_start must be in 0..{schedule.timesteps}, not {t_start}")
    _check(schedule, steps, y, 0.0, denoiser.spec)
    if t_start == 0:
        return z0.float().clone()
    t = torch.full((len(z0),), t_start, dtype=torch.long, device=z0.device)
    eps = _randn(z0.shape, generator, z0.device) if noise is None else noise.to(z0.device, torch.float32)
    zt = schedule.q_sample(z0.float(), t, eps)
    return _ddim_loop(denoiser, schedule, zt, ddim_timesteps(t_start, steps), y, 0.0)


def ema_model(denoiser: nn.Module, decay: float = 0.999) -> nn.Module:
    """An exponential moving average of ``denoiser``'s weights (torch.optim.swa_utils.AveragedModel); call
    ``.update_parameters(denoiser)`` after each optimiser step and use ``.module`` for sampling. The decay
    warms up as min(decay, (1 + n) / (10 + n)) after n updates (as TensorFlow's ExponentialMovingAverage
    with num_updates), so that a short fit is not dominated by its random initial weights. Buffers are not averaged:
    a denoiser's only one is the schedule's constant ᾱ, which an average would move by rounding at every update
    (and a checkpoint, which does not store it, would reset)."""
    from torch.optim.swa_utils import AveragedModel

    def average(avg: torch.Tensor, new: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        d = min(decay, (1 + float(n)) / (10 + float(n)))
        return d * avg + (1 - d) * new

    return AveragedModel(denoiser, avg_fn=average, use_buffers=False)
