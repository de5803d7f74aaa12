"""Post-hoc latent samplers: a density fitted to a trained run's posterior means, drawn from instead of
the prior N(0, I).

Regions of N(0, I) that the aggregate posterior never covers decode to implausible images; a density
fitted after training to the codes of the training images avoids them (ex-post density estimation,
Ghosh et al. 2020; a GMM sampler improved most models in pythae's benchmark, Chadebec et al. 2022).

- ``gmm``: a full-covariance Gaussian mixture (scikit-learn), its number of components chosen by BIC on
  the validation means.
- ``flow``: RealNVP (Dinh et al. 2017), affine couplings with alternating masks on standardised
  latents, trained by maximum likelihood and early-stopped on the validation NLL.
- ``diffusion``: a denoising diffusion model over standardised latents (:mod:`medivae.models.diffusion`:
  an MLP for flat latents, a small U-Net for spatial ones), trained on the ε-MSE with an EMA of its
  weights, early-stopped on the validation ε-MSE, sampled by deterministic DDIM; one model for every class
  of a conditional run, with classifier-free guidance (``guidance``). It models the family's
  ``sampler_latents`` (models/family.py), so it also serves families without a flat Gaussian latent.

A :class:`LatentSampler` holds one density per class (key -1: the unconditional one); a
:class:`DiffusionSampler` one denoiser. On disk: ``<name>.safetensors`` (tensors) + ``<name>.json`` (kind,
classes, architecture, and the SHA-256 of the run checkpoint's manifest it was fitted to;
:func:`load_sampler` refuses a file fitted to other weights).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medivae.models.diffusion import (
    DiffusionSpec,
    LatentStandardiser,
    NoiseSchedule,
    build_denoiser,
    ddim_sample,
    diffusion_loss,
    ema_model,
)
from medivae.models.distributions import LOG_2PI, standard_normal_log_prob
from medivae.models.family import decode_sampler_latents, sampler_latents
from medivae.models.healing import LatentDiffusion
from medivae.runtime.device import one_thread
from medivae.runtime.errors import UserError
from medivae.runtime.io import atomic_write_bytes, atomic_write_text

KINDS = ("gmm", "flow", "diffusion")
DEFAULT_SAMPLING_STEPS = 50
UNCONDITIONAL = -1
FORMAT = 1


# --- Gaussian mixture --------------------------------------------------------------------------------
class GaussianMixture:
    """sum_k w_k N(means_k, L_k L_k^T): weights (K,), means (K, D), Cholesky factors chol (K, D, D)."""

    def __init__(self, weights: torch.Tensor, means: torch.Tensor, chol: torch.Tensor):
        self.weights, self.means, self.chol = weights.double(), means.double(), chol.double()

    def sample(self, n: int, generator=None, temperature: float = 1.0) -> torch.Tensor:
        """(n, D) float32: a component by its weight, then mean + T * L eps."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)
        z = self.means[k] + temperature * (self.chol[k] @ eps[:, :, None])[:, :, 0]
        return z.float()

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log density of z (N, D) -> (N,) float64."""
        z = z.double()
        diff = (z[:, None, :] - self.means)[..., None]  # (N, K, D, 1)
        sol = torch.linalg.solve_triangular(self.chol, diff, upper=False)[..., 0]  # L^-1 (z - mu): (N, K, D)
        log_det = torch.log(torch.diagonal(self.chol, dim1=-2, dim2=-1)).sum(-1)  # (K,)
        d = z.shape[1]
        log_comp = -0.5 * sol.pow(2).sum(-1) - log_det - 0.5 * d * LOG_2PI
        return torch.logsumexp(log_comp + torch.log(self.weights), dim=1)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"weights": self.weights, "means": self.means, "chol": self.chol}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], arch: dict) -> GaussianMixture:
        return cls(t["weights"], t["means"], t["chol"])


@one_thread()
def fit_gmm(train: np.ndarray, val: np.ndarray, max_components: int = 10, seed: int = 0):
    """A full-covariance mixture on ``train`` (N, D); K in 1..max_components by the lowest BIC on
    ``val`` (M, D). Returns (GaussianMixture, {"components", "bic_by_components"})."""
    from sklearn.mixture import GaussianMixture as SkGMM

    best, bics = None, {}
    for k in range(1, max(1, min(max_components, len(train))) + 1):
        gm = SkGMM(k, covariance_type="full", reg_covar=1e-5, random_state=seed % 2**32, max_iter=300).fit(train)
        bics[k] = float(gm.bic(val))
        if best is None or bics[k] < bics[best.n_components]:
            best = gm
    t = {"weights": torch.from_numpy(best.weights_), "means": torch.from_numpy(best.means_),
         "chol": torch.linalg.cholesky(torch.from_numpy(best.covariances_))}
    return GaussianMixture(**t), {"components": best.n_components, "bic_by_components": bics}


# --- RealNVP -------------------------------------------------------------------------------------------
class Coupling(nn.Module):
    """Affine coupling: the unmasked dims are scaled and shifted by functions of the masked ones."""

    def __init__(self, dim: int, mask: torch.Tensor, hidden: int):
        super().__init__()
        self.register_buffer("mask", mask)
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 2 * dim))
        nn.init.zeros_(self.net[-1].weight)  # starts as the identity
        nn.init.zeros_(self.net[-1].bias)

    def _st(self, kept: torch.Tensor):
        s, t = self.net(kept).chunk(2, dim=-1)
        free = 1 - self.mask
        return torch.tanh(s) * free, t * free

    def forward(self, x: torch.Tensor):
        """data side -> base side: (y, log |det dy/dx|) with y (N, D), log-det (N,)."""
        s, t = self._st(x * self.mask)
        return x * torch.exp(s) + t, s.sum(-1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        s, t = self._st(y * self.mask)  # the masked dims pass unchanged, so they are the same here
        return (y - t) * torch.exp(-s)


class RealNVP(nn.Module):
    """z = loc + scale * f^-1(eps), eps ~ N(0, I); ``loc``/``scale`` standardise the training latents."""

    def __init__(self, dim: int, layers: int = 6, hidden: int = 64):
        super().__init__()
        self.register_buffer("loc", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))
        parity = torch.arange(dim) % 2
        self.couplings = nn.ModuleList(
            Coupling(dim, (parity == i % 2).float(), hidden) for i in range(layers)
        )

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """z (N, D) -> (N,)."""
        x = (z - self.loc) / self.scale
        log_det = -torch.log(self.scale).sum().expand(len(z))
        for c in self.couplings:
            x, ld = c(x)
            log_det = log_det + ld
        return standard_normal_log_prob(x) + log_det

    @torch.no_grad()
    def sample(self, n: int, generator=None, temperature: float = 1.0) -> torch.Tensor:
        x = temperature * torch.randn(n, len(self.loc), generator=generator)
        for c in reversed(self.couplings):
            x = c.inverse(x)
        return x * self.scale + self.loc

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.state_dict())

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], arch: dict) -> RealNVP:
        flow = cls(len(t["loc"]), arch["layers"], arch["hidden"])
        flow.load_state_dict(t)
        return flow.eval()


@one_thread()
def fit_flow(train: np.ndarray, val: np.ndarray, seed: int = 0, layers: int = 6, hidden: int = 64,
             max_epochs: int = 200, patience: int = 15, batch: int = 256, lr: float = 1e-3):
    """RealNVP on ``train`` (N, D) by Adam, keeping the epoch with the lowest validation NLL (nats per
    latent vector); stops ``patience`` epochs after it. Returns (RealNVP, info)."""
    xt, xv = torch.as_tensor(train, dtype=torch.float32), torch.as_tensor(val, dtype=torch.float32)
    with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the caller's RNG
        torch.manual_seed(seed)
        flow = RealNVP(xt.shape[1], layers, hidden)
    flow.loc.copy_(xt.mean(0))
    flow.scale.copy_(xt.std(0).clamp(min=1e-6) if len(xt) > 1 else torch.ones(xt.shape[1]))
    opt = torch.optim.Adam(flow.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    best, best_nll, best_epoch, epoch = None, math.inf, 0, 0
    for epoch in range(1, max_epochs + 1):
        flow.train()
        for idx in torch.randperm(len(xt), generator=g).split(batch):
            loss = -flow.log_prob(xt[idx]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        flow.eval()
        with torch.no_grad():
            nll = float(-flow.log_prob(xv).mean())
        if nll < best_nll:
            best, best_nll, best_epoch = {k: v.clone() for k, v in flow.state_dict().items()}, nll, epoch
        elif epoch - best_epoch >= patience:
            break
    flow.load_state_dict(best)
    info = {"layers": layers, "hidden": hidden, "epochs": epoch, "best_epoch": best_epoch, "val_nll": best_nll}
    return flow.eval(), info


DENSITIES = {"gmm": GaussianMixture, "flow": RealNVP}


# --- one density per class, and its files ----------------------------------------------------------------
@dataclass
class LatentSampler:
    """kind ("gmm"/"flow"); densities: class index -> density (-1: unconditional); info: per class, JSON."""

    kind: str
    densities: dict[int, GaussianMixture | RealNVP]
    info: dict = field(default_factory=dict)

    def sample(self, n: int, generator=None, labels: torch.Tensor | None = None, temperature: float = 1.0,
               **diffusion_only) -> torch.Tensor:
        """(n, D) float32 on the CPU; ``labels`` (n,): the class of each draw (a per-class sampler).
        ``diffusion_only``: the diffusion sampler's options, ignored here (:func:`check_options` refuses them)."""
        if UNCONDITIONAL in self.densities:
            return self.densities[UNCONDITIONAL].sample(n, generator, temperature).float()
        if labels is None:
            raise ValueError("this sampler was fitted per class: pass the class of each draw")
        labels = torch.as_tensor(labels).long().cpu().expand(n)
        out = torch.empty(n, self.dim)
        for c in sorted(set(labels.tolist())):
            if c not in self.densities:
                raise UserError(f"the {self.kind} sampler has no class {c}; refit it with medivae fit-sampler")
            rows = (labels == c).nonzero()[:, 0]
            out[rows] = self.densities[c].sample(len(rows), generator, temperature).float()
        return out

    @property
    def dim(self) -> int:
        d = next(iter(self.densities.values()))
        return d.means.shape[1] if isinstance(d, GaussianMixture) else len(d.loc)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"class{c}.{k}": v for c, d in self.densities.items() for k, v in d.tensors().items()}

    def meta(self) -> dict:
        return {"classes": sorted(self.densities), "latent_dim": self.dim}

    @classmethod
    def from_tensors(cls, kind: str, tensors: dict[str, torch.Tensor], meta: dict) -> LatentSampler:
        densities = {}
        if not meta["classes"]:
            raise ValueError("no classes")
        for c in meta["classes"]:
            prefix = f"class{c}."
            part = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            densities[int(c)] = DENSITIES[kind].from_tensors(part, meta["fit"][str(c)])
        return cls(kind, densities, meta["fit"])


def fit(kind: str, train: np.ndarray, val: np.ndarray, train_labels=None, val_labels=None,
        max_components: int = 10, seed: int = 0) -> LatentSampler:
    """A gmm or flow sampler on posterior means (N, D); per class when labels (N,) are given
    (:func:`fit_diffusion` fits the diffusion sampler)."""
    if kind not in DENSITIES:
        raise UserError(f"unknown density sampler {kind!r}; choose one of {list(DENSITIES)}")
    if train_labels is None:
        groups = {UNCONDITIONAL: (train, val)}
    else:
        tl, vl = np.asarray(train_labels), np.asarray(val_labels)
        groups = {int(c): (train[tl == c], val[vl == c] if (vl == c).any() else train[tl == c])
                  for c in np.unique(tl)}
    densities, info = {}, {}
    for c, (tr, va) in groups.items():
        if len(tr) < 2:
            raise UserError(f"class {c} has {len(tr)} training image(s); a {kind} sampler needs at least 2")
        d, i = fit_gmm(tr, va, max_components, seed) if kind == "gmm" else fit_flow(tr, va, seed)
        densities[c], info[str(c)] = d, {**i, "n_train": len(tr), "n_val": len(va)}
    return LatentSampler(kind, densities, info)




def sampler_paths(folder: Path, name: str) -> tuple[Path, Path]:
    return Path(folder) / f"{name}.safetensors", Path(folder) / f"{name}.json"


def save_sampler(sampler: LatentSampler | DiffusionSampler, folder: Path, checkpoint_sha256: str,
                 extra: dict | None = None):
    """Write ``<kind>.safetensors`` + ``<kind>.json`` into ``folder``; returns (tensor file, JSON file)."""
    from safetensors.torch import save

    st, js = sampler_paths(folder, sampler.kind)
    blob = save({k: v.detach().cpu().contiguous() for k, v in sampler.tensors().items()})
    atomic_write_bytes(st, blob)
    meta = {"format": FORMAT, "sampler": sampler.kind, **sampler.meta(),
            "checkpoint_manifest_sha256": checkpoint_sha256, "tensors_sha256": hashlib.sha256(blob).hexdigest(),
            "fit": sampler.info, **(extra or {})}
    atomic_write_text(js, json.dumps(meta, indent=2) + "\n")
    return st, js


def load_sampler(folder: Path, name: str, checkpoint_sha256: str,
                 run_hint: str = "RUN") -> LatentSampler | DiffusionSampler:
    """The sampler ``name`` in ``folder``; a missing, corrupt or other-checkpoint file is a one-line UserError."""
    from safetensors.torch import load

    st, js = sampler_paths(folder, name)
    refit = f"medivae fit-sampler {run_hint} --sampler {name}"
    if not (st.is_file() and js.is_file()):
        raise UserError(f"{run_hint} has no fitted {name} sampler ({js}); fit one first: {refit}")
    try:
        meta = json.loads(js.read_text())
        blob = st.read_bytes()
    except (OSError, ValueError) as e:
        raise UserError(f"{js}: unreadable sampler file ({type(e).__name__}); refit: {refit}") from None
    if not isinstance(meta, dict):
        raise UserError(f"{js}: not a sampler description (a JSON {type(meta).__name__}); refit: {refit}")
    if meta.get("checkpoint_manifest_sha256") != checkpoint_sha256:
        raise UserError(f"{js} was fitted to other weights than {run_hint}'s checkpoint (manifest sha256 "
                        f"{str(meta.get('checkpoint_manifest_sha256'))[:12]}, run has {checkpoint_sha256[:12]}); "
                        f"refit: {refit}")
    if meta.get("tensors_sha256") != hashlib.sha256(blob).hexdigest() or meta.get("sampler") != name:
        raise UserError(f"{st} does not match {js.name} (corrupt or replaced); refit: {refit}")
    try:  # the hash covers the tensors, not the JSON's architecture and classes, which an edit may break
        if name == "diffusion":
            return DiffusionSampler.from_tensors(load(blob), meta)
        return LatentSampler.from_tensors(name, load(blob), meta)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{js} does not describe the tensors in {st.name} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120]}); refit: {refit}") from None


def check_options(kind: str, guidance: float = 0.0, steps: int | None = None, conditional: bool = False) -> None:
    """Refuse sampling options that do not apply: ``--guidance``/``--sampling-steps`` belong to the diffusion
    sampler, guidance needs a class-conditional run, and steps must be >= 1."""
    if kind != "diffusion" and (guidance != 0 or steps is not None):
        raise UserError("--guidance and --sampling-steps are options of --sampler diffusion")
    if steps is not None and steps < 1:
        raise UserError(f"--sampling-steps must be >= 1, not {steps}")
    if guidance != 0 and not conditional:
        raise UserError("--guidance needs a class-conditional run (classifier-free guidance); this run has no classes")
    if not math.isfinite(guidance):
        raise UserError(f"--guidance must be a finite number, not {guidance}")


# --- diffusion ---------------------------------------------------------------------------------------------
@dataclass
class DiffusionSampler:
    """A denoiser (its EMA weights) over latents standardised by ``standardiser``; ``info``: the fit, JSON."""

    spec: DiffusionSpec
    denoiser: nn.Module
    standardiser: LatentStandardiser
    info: dict = field(default_factory=dict)
    kind: str = "diffusion"

    def sample(self, n: int, generator=None, labels: torch.Tensor | None = None, temperature: float = 1.0,
               guidance: float = 0.0, steps: int | None = None, progress: bool = False,
               precision: str = "fp32", device=None) -> torch.Tensor:
        """(n, *latent_shape) float32 on the CPU, by DDIM in ``steps`` steps (default
        ``DEFAULT_SAMPLING_STEPS``) from z_T ~ N(0, temperature² I); ``labels`` (n,): the class of each draw of
        a class-conditional sampler (None: unconditional, the null class); ``guidance``: classifier-free
        guidance w. The denoiser runs on ``device`` in bf16 autocast where ``precision`` allows it."""
        from medivae.runtime.device import autocast, autocast_dtype

        device = torch.device(device or "cpu")
        den = self.denoiser.to(device).eval()
        y = None
        if labels is not None and self.spec.num_classes:
            y = torch.as_tensor(labels).long().expand(n).to(device)
        with autocast(device, autocast_dtype(device, precision)):
            u = ddim_sample(den, self.schedule, n, y, guidance, steps or DEFAULT_SAMPLING_STEPS, generator,
                            progress, temperature=temperature)
        return self.standardiser.decode(u.float().cpu())

    @property
    def schedule(self) -> NoiseSchedule:
        return NoiseSchedule(self.spec.timesteps)

    def prior_of(self, model) -> LatentDiffusion:
        """This sampler as a diffusion prior over ``model``'s sampler latents (models/family.py), for diffusion
        healing and the diffusion-loss membership test; the denoiser moves to the model's device. What the family
        draws itself when it decodes (a hierarchy's finer groups) is taken at its mean (temperature 0), so that a
        healed image does not depend on the batch it is healed in."""
        device = next(model.parameters()).device
        return LatentDiffusion(self.denoiser.to(device).eval(), self.schedule, self.standardiser,
                               lambda x, y: sampler_latents(model, x, y),
                               lambda z, y: decode_sampler_latents(model, z, y, temperature=0.0),
                               DEFAULT_SAMPLING_STEPS, "fitted diffusion sampler")

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**{f"denoiser.{k}": v for k, v in self.denoiser.state_dict().items()},
                **{f"standardiser.{k}": v for k, v in self.standardiser.tensors().items()}}

    def meta(self) -> dict:
        return {"classes": list(range(self.spec.num_classes)) or [UNCONDITIONAL], "spec": self.spec.to_dict(),
                "latent_shape": list(self.spec.latent_shape)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict) -> DiffusionSampler:
        spec = DiffusionSpec.from_dict(meta["spec"])
        den = build_denoiser(spec)
        den.load_state_dict({k[len("denoiser."):]: v for k, v in tensors.items() if k.startswith("denoiser.")})
        std = LatentStandardiser.from_tensors({k[len("standardiser."):]: v for k, v in tensors.items()
                                               if k.startswith("standardiser.")})
        return cls(spec, den.eval(), std, meta["fit"])


def _validation_loss(den: nn.Module, schedule: NoiseSchedule, u: torch.Tensor, y, seed: int, repeats: int = 4,
                     batch: int = 512) -> float:
    """Mean ε-MSE over ``repeats`` fixed (seeded) draws of t and noise per latent: the same draws at every
    epoch, so epochs are compared on the weights alone."""
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    with torch.no_grad():
        for _ in range(repeats):
            for i in range(0, len(u), batch):
                yi = None if y is None else y[i : i + batch]
                total += float(diffusion_loss(den, schedule, u[i : i + batch], yi, g, p_uncond=0.0).sum())
    return total / (repeats * len(u))


def _diffusion_epoch(den, ema, opt, schedule, train, val, g, opts, seed: int, state: dict) -> bool:
    """One epoch of :func:`fit_diffusion`; updates ``state`` (best EMA weights, ...); True: stop here."""
    (ut, yt), (uv, yv) = train, val
    den.train()
    for idx in torch.randperm(len(ut), generator=g).split(opts.batch):
        loss = diffusion_loss(den, schedule, ut[idx], None if yt is None else yt[idx], g, opts.p_uncond).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update_parameters(den)
    state["last_loss"] = val_loss = _validation_loss(ema.module.eval(), schedule, uv, yv, seed)
    epoch = state["epoch"]
    if val_loss < state["best_loss"]:
        state.update(best={k: v.clone() for k, v in ema.module.state_dict().items()}, best_loss=val_loss,
                     best_epoch=epoch)
    elif epoch - state["best_epoch"] >= opts.patience:
        return True
    return bool(opts.time_budget and time.perf_counter() - state["start"] > opts.time_budget)


@dataclass(frozen=True)
class DiffusionFit:
    """How :func:`fit_diffusion` trains: ``max_epochs``, stop ``patience`` epochs after the best validation
    loss (checked every epoch), or at ``time_budget`` seconds (0: none)."""

    width: int = 0
    timesteps: int = 1000
    max_epochs: int = 400
    patience: int = 40
    batch: int = 256
    lr: float = 1e-3
    ema_decay: float = 0.999
    p_uncond: float = 0.1
    time_budget: float = 0.0

    def __post_init__(self):
        for name in ("max_epochs", "patience", "batch"):
            if getattr(self, name) < 1:
                raise UserError(f"diffusion {name.replace('_', ' ')} must be >= 1, not {getattr(self, name)}")
        if self.time_budget < 0:
            raise UserError(f"--time-budget must be >= 0 seconds, not {self.time_budget}")


def fit_diffusion(train: torch.Tensor, val: torch.Tensor, train_labels=None, val_labels=None, num_classes: int = 0,
                  seed: int = 0, opts: DiffusionFit | None = None, progress: bool = False) -> DiffusionSampler:
    """A diffusion sampler on latents ``train`` (N, ...) (class-conditional on labels (N,) when
    ``num_classes`` > 0), keeping the EMA weights of the epoch with the lowest validation ε-MSE on ``val``."""
    from tqdm import tqdm

    opts = opts or DiffusionFit()
    xt, xv = torch.as_tensor(train).float(), torch.as_tensor(val).float()
    std = LatentStandardiser.fit(xt)
    ut, uv = std.encode(xt), std.encode(xv)
    yt = None if not num_classes else torch.as_tensor(np.asarray(train_labels)).long()
    yv = None if not num_classes else torch.as_tensor(np.asarray(val_labels)).long()
    spec = DiffusionSpec(tuple(xt.shape[1:]), num_classes, opts.width, opts.timesteps)
    with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the caller's RNG
        torch.manual_seed(seed)
        den = build_denoiser(spec)
    ema, schedule = ema_model(den, opts.ema_decay), NoiseSchedule(spec.timesteps)
    opt = torch.optim.Adam(den.parameters(), lr=opts.lr)
    g = torch.Generator().manual_seed(seed)
    state = {"best": None, "best_loss": math.inf, "best_epoch": 0, "epoch": 0, "start": time.perf_counter()}
    bar = tqdm(range(1, opts.max_epochs + 1), desc="diffusion sampler", unit="epoch", disable=not progress,
               leave=False)
    threads = contextlib.nullcontext() if spec.spatial else one_thread()  # convolutions gain from threads
    with threads:
        for epoch in bar:
            state["epoch"] = epoch
            if _diffusion_epoch(den, ema, opt, schedule, (ut, yt), (uv, yv), g, opts, seed, state):
                break
            bar.set_postfix(val_eps_mse=f"{state['last_loss']:.4f}", best_epoch=state["best_epoch"])
    bar.close()
    den.load_state_dict(state["best"])
    info = {**spec.to_dict(), "width": spec.resolved_width(), "epochs": state["epoch"],
            "best_epoch": state["best_epoch"], "val_eps_mse": state["best_loss"], "ema_decay": opts.ema_decay,
            "p_uncond": opts.p_uncond if num_classes else 0.0, "n_train": len(ut), "n_val": len(uv)}
    return DiffusionSampler(spec, den.eval(), std, info)
