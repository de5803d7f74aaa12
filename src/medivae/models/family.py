"""The family contract: what every registered model family owns, and what everything else may ask of it.

A *family* is a registry entry (:class:`Family`): a name, a frozen config dataclass of the family's own
fields (saved as ``config.json["model"]``; an unknown key is an error) and a constructor. The constructed
model is an ``nn.Module`` that owns the family's probability model. Everything outside ``models/``
(trainer, checkpoints, generation, evaluation, anomaly scoring, synthesis, report) calls these and never
re-derives a prior, a loss or a likelihood. It is a structural contract (a ``Protocol``), not a base class:
a family inherits from ``nn.Module`` only.

Every model has
    cfg                                   its config (frozen dataclass with ``name``, ``image_size``, ``channels``)
    capabilities: frozenset[str]          which of CAPABILITIES it offers (may depend on its config)
    optimizers(train_cfg, device)         {name: optimizer}; the trainer checkpoints and resumes each
    trained_modules()                     {name: module}; the trainer wraps each for DDP under torchrun
    training_steps()                      [TrainStep]: run in order on every batch, each on one optimizer
    validation_terms(x, y, generator)     {name: (B,)} per-sample terms; "loss" picks the best checkpoint
    encode(x, y)                          an encoding: ``.mode()`` -> the continuous latent (or codes), and
                                          ``.arrays()`` -> {name: tensor (B, ...)} for ``medivae encode``
    decode(z, y)                          images float (B, C, H, W) in [0, 1]
    reconstruct(x, y)                     images of the deterministic encoding, float (B, C, H, W) in [0, 1]
and, by capability,
    "sample"       sample(n, label=None, generator=None, temperature=1.0) -> images (n, C, H, W) in [0, 1]
    "latent"       prior_latents(n, generator, temperature) -> z that ``decode`` takes (interpolation)
    "gaussian_latent"  ``encode`` returns a DiagonalGaussian over a flat (B, D) latent with KL to N(0, I),
                   ``latent_dim`` = D: traversals, active units, KL per dimension, I(x; z), slerp, post-hoc
                   latent samplers (``medivae fit-sampler``; the KL to N(0, I) is a diagnostic only
                   when the family learns its prior, e.g. the VampPrior)
    "likelihood"   log_weights(x, y, k, generator) -> LogWeights (IWAE, bits/dim, likelihood anomaly scores);
                   ``likelihood`` attribute with ``is_discrete_image_likelihood``
    "conditional"  every call takes class indices y (B,); ``sample(label=...)`` generates one class;
                   ``num_classes`` attribute
    "heal"         heal(x, y, threshold) -> images (B, C, H, W) in [0, 1]: the image with what its prior finds
                   unlikely replaced by what it finds likely (prior-guided healing, e.g. a VQ-VAE's code prior),
                   for anomaly maps; :func:`heal` is None for a family without it
    "code_prior"   ``sample(n, label, generator, temperature, top_k=K)``: each code is drawn from the K most
                   likely codes at its position (K = 0: all of them)
optional hooks, each asked through the function of the same name here, which gives the default for a family
that does not define it (nothing outside ``models/`` looks for a model's attributes):
    ``epoch_end(ctx) -> {name: float}`` (default {}): e.g. codebook usage, logged like the step terms; it may
        raise :class:`Diverged`, which the trainer handles like a NaN (roll back the epoch, lower the rate)
    ``validation_end() -> {name: float}`` (default {}): statistics of the whole validation pass the family
        gathered in ``validation_terms`` (e.g. codebook usage on unseen images), logged beside its terms
    ``anomaly_scores(x, y) -> {name: (B,)}`` (default {}): extra per-image anomaly scores (higher = more
        anomalous), e.g. a discriminator's
    ``figures() -> {name: images (N, C, H, W) in [0, 1]}`` (default {}): saved as RUN/<name>.png after
        training (e.g. the VampPrior's pseudo-inputs) and shown in the report
    ``describe() -> ModelFacts`` (default: read from the config and the capabilities): the likelihood's name
        and whether it is discrete, the flat latent size, the KL weight; what evaluation, results.json and
        the report say about a model.
    ``latent_prior() -> MixturePrior | None`` (default None: N(0, I)): a "gaussian_latent" family's prior when
        it learns one (the VampPrior), for the KL to the prior in evaluation
    ``first_best_epoch(train_cfg) -> int`` (default 1): the first epoch that may become ``best/`` (a VAE-GAN's
        epochs before its adversarial start cannot)
    ``second_stage_epochs() -> int`` (default 0: one stage) and ``plan_second_stage(epochs)``: a two-stage family
        (an autoencoder, then a prior over its latents) trains its second stage in the last
        ``second_stage_epochs()`` epochs; ``plan_second_stage`` moves the boundary (its ``cfg`` becomes the
        config with that many), which a time budget's plan does after the first epoch (train/budget.py)
    ``sampler_latents(x, y) -> (B, ...)`` and ``decode_sampler_latents(z, y, generator, temperature) -> images
        (B, C, H, W) in [0, 1]`` (default, for a "gaussian_latent" family: the posterior means and ``decode``):
        the continuous latent a post-hoc sampler (``medivae fit-sampler``, e.g. the diffusion sampler) models
        and how its draws become images; a family with neither hook nor Gaussian latent has no post-hoc
        sampler (:func:`require_sampler_latents`).
    ``diffusion_prior() -> LatentDiffusion | None`` (default None): the family's own diffusion prior over its
        latent (:mod:`medivae.models.healing`), e.g. ldm's once trained: diffusion healing (anomaly maps) and the
        diffusion-loss membership test. A run with a fitted diffusion sampler has one too, from the sampler
        (``DiffusionSampler.prior_of``).

A family added later (in ``models/``, or outside medivae through :func:`register` in a module named by
the ``MEDIVAE_PLUGINS`` environment variable or a ``medivae.families`` entry point) gets the trainer,
checkpoints, resume, DDP, every command and the contract test suite by registering.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from medivae.runtime.constants import DEFAULT_FAMILY
from medivae.runtime.errors import UserError

CAPABILITIES = {
    "sample": "draws new images",
    "latent": "has a continuous latent space to interpolate in",
    "gaussian_latent": "has a continuous Gaussian latent",
    "likelihood": "has an image likelihood (IWAE, bits/dim)",
    "conditional": "is class-conditional",
    "heal": "heals an image with its prior (prior-guided anomaly maps)",
    "code_prior": "draws from an autoregressive prior over discrete codes (top-k sampling)",
}

# what a command says when the run's family lacks what it needs: "medivae traverse: vq_vae has no ..."
MISSING = {
    "sample": "cannot draw samples",
    "latent": "has no continuous latent to interpolate in",
    "gaussian_latent": "has no continuous Gaussian latent to traverse",
    "likelihood": "defines no image likelihood",
    "conditional": "is not conditional, so it takes no --label",
    "heal": "has no prior to heal images with",
    "code_prior": "has no prior over discrete codes, so it takes no --top-k",
}


class Diverged(FloatingPointError):
    """Training went wrong in a way a family can tell (a NaN, a discriminator that wins outright): the
    trainer rolls every network and optimizer back to the start of the epoch and lowers the learning rate."""


@dataclass
class StepContext:
    """What a training step may need besides the batch. ``progress`` = fractional epochs done."""

    epoch: int
    step: int
    progress: float
    train: Any  # TrainConfig
    generator: torch.Generator | None = None


@dataclass
class StepOutput:
    """``loss``: the scalar the step's optimizer minimises. ``terms``: per-sample (B,) tensors (or scalars)
    under names the family chooses; they reach the progress bar, metrics.jsonl, TensorBoard and the report."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]


@dataclass(frozen=True)
class TrainStep:
    """One optimisation step on every batch: ``run(nets, x, y, ctx) -> StepOutput``; ``nets`` are the
    model's ``trained_modules()`` (DDP-wrapped under torchrun) and ``optimizer`` names the one that steps.
    ``active(ctx)``, when given, says whether the step runs at this point of training (a stage of a
    two-stage family, a discriminator that starts after a warm-up); resume replays it from the epoch.
    ``skip_above`` > 0: the trainer skips the update when the gradient norm exceeds it (VDVAE's guard
    against loss spikes) and adds the terms ``grad_norm`` and ``grad_skipped`` (1 on a skipped step).
    ``span(train_cfg) -> (first, last)``: the epochs (fractional, 0 = start) over which the step trains, for
    the learning-rate schedule (``--lr-schedule``); default the whole run. A stage of a two-stage family
    decays over its own stage."""

    name: str
    optimizer: str
    run: Callable[..., StepOutput]
    active: Callable[[StepContext], bool] | None = None
    skip_above: float = 0.0
    span: Callable[[Any], tuple[float, float]] | None = None

    def runs(self, ctx: StepContext) -> bool:
        return self.active is None or bool(self.active(ctx))

    def progress(self, ctx: StepContext) -> float:
        """The fraction of this step's span done at ``ctx`` (clipped to [0, 1])."""
        first, last = self.span(ctx.train) if self.span is not None else (0.0, float(ctx.train.epochs))
        return min(max((ctx.progress - first) / max(last - first, 1e-12), 0.0), 1.0)


@dataclass
class LogWeights:
    """Importance weights of K posterior draws per image, float64 (K, B) on the CPU.

    log_px: log p(x | z_k); log_ratio: log p(z_k) - log q(z_k | x); kl: (B,) KL(q || p) in closed form
    where the family has one (lower variance than the Monte Carlo average of -log_ratio), else None."""

    log_px: torch.Tensor
    log_ratio: torch.Tensor
    kl: torch.Tensor | None = None

    @property
    def log_w(self) -> torch.Tensor:
        return self.log_px + self.log_ratio

    def neg_elbo(self) -> torch.Tensor:
        """(B,) nats: -E log p(x|z) + KL (closed form when known)."""
        kl = self.kl.double() if self.kl is not None else -self.log_ratio.mean(0)
        return -self.log_px.mean(0) + kl


@dataclass(frozen=True)
class Family:
    """A registry entry: ``config`` is the family's frozen config dataclass (with a ``name`` field),
    ``build(cfg) -> nn.Module`` its constructor, ``preset`` the defaults that make this entry differ
    from another one of the same class (beta_vae = conv_vae with β = 4)."""

    name: str
    config: type
    build: Callable[[Any], nn.Module]
    summary: str = ""
    preset: dict = field(default_factory=dict)

    def cli_flags(self) -> dict[str, str]:
        """{config field: help}: the fields ``medivae train`` offers as flags of their own (``latent_dim`` ->
        ``--latent-dim``); the config class's optional ``cli_flags()``, else none (``--model-arg KEY=VALUE``
        sets any field of any family)."""
        hook = getattr(self.config, "cli_flags", None)
        return dict(hook()) if hook is not None else {}

    def upgrade(self, values: dict, legacy: dict) -> dict:
        """A config.json "model" section as this version reads it. ``legacy``: the settings older versions
        kept among every family's training settings (LEGACY_TRAIN_SETTINGS, e.g. ``train.kl_schedule``);
        each moves into the family's config when the family has that field (a value written in the model
        section wins) and is dropped when it has not (no such family ever used it). The config class's
        optional ``upgrade(values, legacy)`` then adjusts what else the move changes."""
        names = {f.name for f in dataclasses.fields(self.config)}
        values = {**{k: v for k, v in legacy.items() if k in names}, **values}
        hook = getattr(self.config, "upgrade", None)
        return hook(values, legacy) if hook is not None and legacy else values

    def make_config(self, **fields) -> Any:
        """The config for this entry: preset, then the caller's non-None fields; unknown ones are an error,
        and so is a ``name`` other than this entry's (the family is chosen by name, e.g. ``--model``)."""
        if fields.get("name") not in (None, self.name):
            raise UserError(f"model option name={fields['name']!r} would change the family of {self.name!r}; "
                            f"choose the family with --model {fields['name']} instead")
        values = {**self.preset, **{k: v for k, v in fields.items() if v is not None}, "name": self.name}
        return build_config(self.config, values, self.name)


def build_config(klass: type, values: dict, family: str) -> Any:
    """``klass(**values)`` through :func:`medivae.runtime.schema.build` (every value checked against its field's
    type); a key the family does not have is a one-line error naming it and the valid ones."""
    from medivae.runtime.schema import build

    def unknown(names: list[str], valid: list[str]) -> str:
        return f"model {family!r} has no option(s) {', '.join(names)}; its options: {', '.join(valid)}"

    return build(klass, values, "model", unknown)


# training settings of every family in older versions, now fields of the families that use them
LEGACY_TRAIN_SETTINGS = ("kl_schedule", "warmup_epochs", "free_bits")


@dataclass(frozen=True)
class CliFlag:
    """A family shorthand flag: the config field it sets, its value type, help, and the families having it."""

    field: str
    type: type
    help: str
    families: tuple[str, ...]


def cli_flags() -> dict[str, CliFlag]:
    """Every registered family's shorthand flags, {field: CliFlag}; the first family to declare a field gives
    its type and help. A flag the chosen family lacks is refused like any unknown option (build_config)."""
    flags: dict[str, CliFlag] = {}
    for fam in families().values():
        defaults = {f.name: f.default for f in dataclasses.fields(fam.config)}
        for name, text in fam.cli_flags().items():
            seen = flags.get(name)
            kind = type(defaults[name]) if seen is None else seen.type
            flags[name] = CliFlag(name, kind, text if seen is None else seen.help,
                                  (*(seen.families if seen else ()), fam.name))
    return flags


REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add (or replace) a family; returns it, so a module can write ``FAMILY = register(Family(...))``."""
    REGISTRY[family.name] = family
    return family


_plugins_loaded = False


def _load_plugins() -> None:
    """Families registered outside medivae: modules named in $MEDIVAE_PLUGINS (comma-separated) and
    ``medivae.families`` entry points. Each module calls :func:`register` when imported."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for name in filter(None, (s.strip() for s in os.environ.get("MEDIVAE_PLUGINS", "").split(","))):
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise UserError(f"MEDIVAE_PLUGINS names {name!r}, which cannot be imported ({e})") from None
    from importlib.metadata import entry_points

    for ep in entry_points(group="medivae.families"):
        ep.load()


def get_family(name: str, written_by: str | None = None) -> Family:
    _load_plugins()
    if name not in REGISTRY:
        origin = f" (this run was written by medivae {written_by})" if written_by else ""
        raise UserError(f"unknown model {name!r}{origin}; valid models: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def families() -> dict[str, Family]:
    get_family(next(iter(REGISTRY), DEFAULT_FAMILY))  # loads built-ins and plugins
    return dict(REGISTRY)


def build_model(cfg) -> nn.Module:
    """The model of a family config (``cfg.name`` picks the family)."""
    return get_family(cfg.name).build(cfg)


def require(model, capability: str, command: str) -> None:
    """A one-line UserError when ``model`` lacks ``capability``: ``medivae traverse: vq_vae has no ...``."""
    if capability not in model.capabilities:
        raise UserError(f"medivae {command}: {model.cfg.name} {MISSING[capability]}")


def has(model, capability: str) -> bool:
    return capability in model.capabilities


def latent_prior(model):
    """A "gaussian_latent" family's learned prior (its ``latent_prior`` hook: a
    :class:`medivae.models.distributions.MixturePrior`), or None for the standard normal N(0, I)."""
    hook = getattr(model, "latent_prior", None)
    return None if hook is None else hook()


def first_best_epoch(model, train_cfg) -> int:
    """The first epoch whose checkpoint may become best/: the optional ``first_best_epoch`` hook, else 1."""
    hook = getattr(model, "first_best_epoch", None)
    return 1 if hook is None else int(hook(train_cfg))


def heal(model, x: torch.Tensor, y=None, threshold: float = 0.01) -> torch.Tensor | None:
    """Prior-guided healing of images x (B, C, H, W) (the "heal" capability); None for a family without it."""
    return model.heal(x, y, threshold) if has(model, "heal") else None


def diffusion_prior(model):
    """The family's own diffusion prior (its ``diffusion_prior`` hook: a
    :class:`medivae.models.healing.LatentDiffusion`), or None for a family without one."""
    hook = getattr(model, "diffusion_prior", None)
    return None if hook is None else hook()


def labels_for(model, labels, device) -> torch.Tensor | None:
    """Class indices as the model takes them: a LongTensor (B,) for a conditional model, else None.
    Unlabelled images (-1) become class 0, which a conditional model needs some class for."""
    if not has(model, "conditional") or labels is None:
        return None
    return torch.as_tensor(labels).long().clamp(min=0).to(device)


def has_sampler_latents(model) -> bool:
    """Whether a post-hoc latent sampler can be fitted to ``model`` (see the module docstring)."""
    return hasattr(model, "sampler_latents") or has(model, "gaussian_latent")


def require_sampler_latents(model, command: str) -> None:
    if not has_sampler_latents(model):
        raise UserError(f"medivae {command}: {model.cfg.name} has no continuous latent to fit a sampler to")


def sampler_latents(model, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """The latent a post-hoc sampler models, for images x (B, C, H, W): the family's hook, else the
    posterior means (B, D) of a Gaussian-latent family."""
    hook = getattr(model, "sampler_latents", None)
    if hook is not None:
        return hook(x, y)
    require_sampler_latents(model, "fit-sampler")
    return model.encode(x, y).mode()


def decode_sampler_latents(model, z: torch.Tensor, y: torch.Tensor | None = None, generator=None,
                           temperature: float = 1.0) -> torch.Tensor:
    """Images float (B, C, H, W) in [0, 1] of latents a post-hoc sampler drew (:func:`sampler_latents`'s
    kind): the family's hook, else ``decode``. ``generator``/``temperature``: for whatever the family draws
    itself on the way (e.g. the lower groups of a hierarchy)."""
    hook = getattr(model, "decode_sampler_latents", None)
    if hook is not None:
        return hook(z, y, generator, temperature)
    return model.decode(z, y)


def config_for_data(cfg, label_names: tuple[str, ...], source: str):
    """A family config as it becomes when a run meets its data (its optional ``for_data`` hook, e.g. the class
    count of a conditional model); unchanged for a family without the hook."""
    hook = getattr(cfg, "for_data", None)
    return cfg if hook is None else hook(label_names, source)


def classes_for_data(cfg, label_names: tuple[str, ...], source: str):
    """``cfg`` for a data set, for configs with a ``num_classes`` field: 0 stays unconditional; otherwise
    (e.g. -1, "as many as the data has labels") one class per label, and a source without labels is an error."""
    if cfg.num_classes == 0:
        return cfg
    if not label_names:
        raise UserError(f"model {cfg.name!r} is conditional but {source} has no labels")
    return dataclasses.replace(cfg, num_classes=len(label_names))


def adam(params, train_cfg, device: torch.device) -> torch.optim.Adam:
    """Adam over ``params`` with the run's learning rate; fused on CPU and CUDA (one kernel for all
    tensors). Frozen parameters stay in the list so that a checkpoint keeps one layout; Adam skips
    them (their .grad is None)."""
    fused = device.type in ("cuda", "cpu")
    return torch.optim.Adam(list(params), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay, fused=fused)


@dataclass(frozen=True)
class ModelFacts:
    """What may be said about a model without knowing its family (results.json "model", the report).

    likelihood: the image likelihood's name ("bernoulli", "gaussian", ...), None without one;
    discrete_likelihood: a probability mass on 8-bit images, so -log p(x) is a code length (bits/dim honest);
    latent_dim: the size of a flat latent, None for spatial or discrete ones; beta: the KL weight, if any."""

    likelihood: str | None = None
    discrete_likelihood: bool = False
    latent_dim: int | None = None
    beta: float | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def describe(model) -> ModelFacts:
    """The model's ``describe()`` hook, or facts read from its config fields and capabilities."""
    hook = getattr(model, "describe", None)
    if hook is not None:
        return hook()
    cfg, likelihood = getattr(model, "cfg", None), getattr(model, "likelihood", None)
    name = getattr(cfg, "likelihood", None) or (type(likelihood).__name__.lower() if likelihood is not None else None)
    return ModelFacts(
        likelihood=name if has(model, "likelihood") else None,
        discrete_likelihood=has(model, "likelihood") and bool(getattr(likelihood, "is_discrete_image_likelihood",
                                                                      False)),
        latent_dim=getattr(model, "latent_dim", None) if has(model, "gaussian_latent") else None,
        beta=getattr(cfg, "beta", None),
    )


def second_stage_epochs(model) -> int:
    """The epochs at the end of training that a two-stage family spends on its second stage; 0 for one stage."""
    hook = getattr(model, "second_stage_epochs", None)
    return 0 if hook is None else int(hook())


def plan_second_stage(model, epochs: int) -> None:
    """Let a two-stage family train its second stage in the last ``epochs`` epochs (a time budget's plan)."""
    model.plan_second_stage(epochs)


def epoch_end(model, ctx: StepContext) -> dict[str, float]:
    """The family's whole-epoch statistics (its ``epoch_end`` hook), {} without one."""
    hook = getattr(model, "epoch_end", None)
    return {} if hook is None else hook(ctx)


def validation_end(model) -> dict[str, float]:
    """The family's whole-validation-pass statistics (its ``validation_end`` hook), {} without one."""
    hook = getattr(model, "validation_end", None)
    return {} if hook is None else hook()


def extra_anomaly_scores(model, x: torch.Tensor, y: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The family's own per-image anomaly scores (its ``anomaly_scores`` hook), {} without one."""
    hook = getattr(model, "anomaly_scores", None)
    return {} if hook is None else hook(x, y)


def figures(model) -> dict[str, torch.Tensor]:
    """The family's own figures (its ``figures`` hook), {} without one."""
    hook = getattr(model, "figures", None)
    return {} if hook is None else hook()


class PriorInLastEpochs:
    """For a family whose learned prior trains in the last ``cfg.prior_epochs`` epochs of the run (``vq_vae``,
    ``ldm``): the stage boundary the trainer and a time budget's plan (train/budget.py) ask about. The class
    mixing it in has ``cfg`` (a frozen config with ``name`` and ``prior_epochs``) and ``prior`` (None without)."""

    def second_stage_epochs(self) -> int:
        """The last epochs, which train the prior (0: no prior, one stage)."""
        return self.cfg.prior_epochs if self.prior is not None else 0

    def plan_second_stage(self, epochs: int) -> None:
        """Train the prior in the last ``epochs`` epochs (a time budget's plan): the config becomes the one with
        ``prior_epochs=epochs``; the networks stay as they are."""
        if self.prior is None or epochs < 1:
            raise ValueError(f"{self.cfg.name}: only a run with a prior can move its stage boundary, to >= 1 epoch")
        self.cfg = dataclasses.replace(self.cfg, prior_epochs=epochs)

    def _in_stage_one(self, ctx: StepContext) -> bool:
        return ctx.epoch <= ctx.train.epochs - self.cfg.prior_epochs
