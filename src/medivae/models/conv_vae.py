"""The seed article's convolutional VAE (Kingma & Welling 2014), generalised in size and width, and its
conditional form (Sohn, Lee & Yan 2015): one family, three registry entries (conv_vae, beta_vae, cvae).

At 64x64, base width 32, latent 32 it is the article's network layer for layer: four 4x4 stride-2
convolutions 32-64-128-256 with BatchNorm + ReLU, linear heads to mu and log sigma^2, a linear layer back
to 256x4x4 and the mirrored transposed convolutions. The sigmoid sits in the likelihood (BCE-with-logits
is the numerically stable form of the article's sigmoid + BCE).

Conditional (``num_classes`` > 0): q(z|x, y) and p(x|z, y) with the prior p(z) = N(0, I) independent of
y, as in Kingma et al. 2014 (M2). The label enters as a one-hot vector, broadcast to constant planes
beside the image channels for the encoder and concatenated to z for the decoder. Conditioning the encoder
too lets z give up the class information the decoder already has, so ``decode(z, y)`` draws class y for
any z from the prior.

VampPrior (Tomczak & Welling 2018; ``prior="vamp"``, registry entry ``vamp_vae``): p(z) = (1/K) sum_k
q(z|u_k), the encoder's posteriors at K learned pseudo-inputs u_k = sigmoid(pseudo_logits_k) in [0, 1].
The KL has no closed form, so training and validation use the one-sample Monte Carlo estimate
log q(z|x) - log p(z) at the reparameterised z; IWAE and bits/dim use the mixture density. The
pseudo-inputs pass the encoder with BatchNorm on its running statistics (never the pseudo-inputs' own
batch statistics, which would also leak into the running averages), so the prior is the same function
in training and evaluation. A conditional model would need a class per pseudo-input; vamp is refused for
conditional configs (use a post-hoc sampler, ``medivae fit-sampler``, for a cvae). With
``prior="normal"`` the model has exactly the parameters of earlier versions, so old checkpoints load.
What it needs: the learned prior pays off with data and epochs. On PneumoniaMNIST at 32 px (4,708 training
images) over the default epochs its validation bits/dim stay behind conv_vae's with the same likelihood, and
fewer pseudo-inputs (10 or 50) did not close the gap (benchmarks/results/defaults.json); use it on larger
data sets or longer runs, or fit a post-hoc sampler to a plain conv_vae.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medivae.models.blocks import decoder_trunk, encoder_trunk, running_batchnorm, widths_for
from medivae.models.distributions import (
    DiagonalGaussian,
    MixturePrior,
    gaussian_log_weights,
    make_likelihood,
    mixture_log_prob,
    standard_normal_log_prob,
)
from medivae.models.family import Family, LogWeights, StepContext, StepOutput, TrainStep, adam, classes_for_data
from medivae.models.losses import KL_FLAGS, check_kl_settings, kl_weight, neg_elbo
from medivae.models.outputs import VAEOutput, encode_decode
from medivae.runtime.constants import IMAGE_SIZES, LIKELIHOODS
from medivae.runtime.errors import UserError
from medivae.runtime.schema import check_fields

LABELS_FROM_DATA = -1  # num_classes placeholder: one class per label of the training data
PRIORS = ("normal", "vamp")


@dataclass(frozen=True)
class ConvVAEConfig:
    name: str = "conv_vae"
    image_size: int = 64
    channels: int = 1
    latent_dim: int = 32
    base_width: int = 32
    max_width: int = 512
    likelihood: str = "bernoulli"
    gaussian_sigma: float = 0.1  # fixed decoder std for the "gaussian" likelihood (intensity in [0, 1])
    num_classes: int = 0  # > 0: conditional on that many classes; -1: as many as the data has labels
    beta: float = 1.0
    prior: str = "normal"  # "normal": N(0, I); "vamp": VampPrior over ``pseudo_inputs`` learned inputs
    pseudo_inputs: int = 500  # K of the VampPrior (ignored for prior="normal")
    kl_schedule: str = "constant"  # β over training: constant, linear warm-up or cyclical (losses.kl_weight)
    warmup_epochs: float = 0.0  # linear: ramp length; cyclical: cycle length (in epochs)
    free_bits: float = 0.0  # nats per latent dimension (Kingma et al. 2016); N(0, I) prior only

    def __post_init__(self):
        check_fields(self, "model")
        if self.image_size not in IMAGE_SIZES:
            raise UserError(f"image size {self.image_size} is not supported; use one of {list(IMAGE_SIZES)}")
        if self.channels not in (1, 3):
            raise UserError(f"channels must be 1 or 3, not {self.channels}")
        if self.latent_dim < 1:
            raise UserError(f"latent dim must be >= 1, not {self.latent_dim}")
        if self.base_width < 1:
            raise UserError(f"base width must be >= 1, not {self.base_width}")
        if self.max_width < 1:
            raise UserError(f"max width must be >= 1, not {self.max_width}")
        if self.likelihood not in LIKELIHOODS:
            raise UserError(f"unknown likelihood {self.likelihood!r}; choose one of {list(LIKELIHOODS)}")
        if self.gaussian_sigma <= 0:
            raise UserError(f"gaussian sigma must be > 0, not {self.gaussian_sigma}")
        if self.beta < 0:
            raise UserError(f"beta must be >= 0, not {self.beta}")
        if self.num_classes < LABELS_FROM_DATA:
            raise UserError(f"num classes must be >= 0 (or -1: from the data), not {self.num_classes}")
        if self.prior not in PRIORS:
            raise UserError(f"unknown prior {self.prior!r}; choose one of {list(PRIORS)}")
        if self.pseudo_inputs < 1:
            raise UserError(f"pseudo inputs must be >= 1, not {self.pseudo_inputs}")
        if self.prior == "vamp" and self.num_classes != 0:
            raise UserError(f"{self.name}: --prior vamp is for unconditional models; for a conditional one "
                            "fit a post-hoc sampler (medivae fit-sampler RUN --sampler gmm)")
        check_kl_settings(self.kl_schedule, self.warmup_epochs, self.free_bits)
        if self.prior == "vamp" and self.free_bits > 0:
            raise UserError(f"{self.name}: --free-bits needs the per-dimension KL of the N(0, I) prior; "
                            "drop it for --prior vamp")

    @classmethod
    def cli_flags(cls) -> dict[str, str]:
        """Command-line shorthands of this config's fields (models/family.py: ``Family.cli_flags``)."""
        return {
            "latent_dim": "latent dimensions (default 32)",
            "base_width": "first conv width (default 32)",
            "likelihood": "bernoulli (default), gaussian, discretized_logistic",
            "beta": "KL weight β (default 1: the plain ELBO)",
            "prior": "normal (default: N(0, I)) or vamp (VampPrior, unconditional only)",
            "pseudo_inputs": "VampPrior: learned pseudo-inputs (default 500)",
            **KL_FLAGS,
            "free_bits": "free bits per latent dimension, nats (default 0; N(0, I) prior only)",
        }

    def for_data(self, label_names: tuple[str, ...], source: str) -> ConvVAEConfig:
        """The config for a data set: a conditional model gets one class per label."""
        return classes_for_data(self, label_names, source)


class ConvVAE(nn.Module):
    def __init__(self, cfg: ConvVAEConfig):
        super().__init__()
        if cfg.num_classes < 0:
            raise ValueError(f"{cfg.name}: set num_classes from the data first (ConvVAEConfig.for_data)")
        self.cfg = cfg
        self.latent_dim = cfg.latent_dim
        self.num_classes = cfg.num_classes
        self.capabilities = frozenset(
            {"sample", "latent", "gaussian_latent", "likelihood"} | ({"conditional"} if cfg.num_classes else set())
        )
        self.likelihood = make_likelihood(cfg.likelihood, cfg.gaussian_sigma)
        widths = widths_for(cfg.image_size, cfg.base_width, cfg.max_width)
        feat = widths[-1] * 16
        self.encoder = encoder_trunk(cfg.channels + cfg.num_classes, widths)
        self.fc_mu = nn.Linear(feat, cfg.latent_dim)
        self.fc_logvar = nn.Linear(feat, cfg.latent_dim)
        self.decoder_input = nn.Linear(cfg.latent_dim + cfg.num_classes, feat)
        self.decoder = decoder_trunk(cfg.channels * self.likelihood.params_per_channel, widths)
        self.vamp = cfg.prior == "vamp"
        if self.vamp:  # pre-sigmoid pseudo-inputs (K, C, H, W); sigmoid(0.5 N(0, 1)): varied greys around 0.5
            shape = (cfg.pseudo_inputs, cfg.channels, cfg.image_size, cfg.image_size)
            self.pseudo_logits = nn.Parameter(0.5 * torch.randn(shape))

    # --- the networks ------------------------------------------------------------------------------------
    def _one_hot(self, y: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        """y: int (B,) class indices -> (B, K) one-hot in ``like``'s dtype and device."""
        if y is None:
            raise ValueError(f"{self.cfg.name} is conditional: pass class indices y (B,)")
        return F.one_hot(y.long(), self.num_classes).to(device=like.device, dtype=like.dtype)

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> DiagonalGaussian:
        """x: float (B, C, H, W) in [0, 1] (y: int (B,) when conditional) -> q(z|x) with mean/logvar (B, D)."""
        if self.num_classes:
            planes = self._one_hot(y, x)[:, :, None, None].expand(-1, -1, *x.shape[2:])  # (B, K, H, W)
            x = torch.cat([x, planes], dim=1)
        h = self.encoder(x)
        return DiagonalGaussian(self.fc_mu(h).float(), self.fc_logvar(h).float())

    def decode_params(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """z: (B, D) -> decoder parameters (B, C * k, H, W), k = likelihood.params_per_channel."""
        if self.num_classes:
            z = torch.cat([z, self._one_hot(y, z)], dim=1)
        return self.decoder(self.decoder_input(z))

    def forward(self, x, y=None, sample: bool = True, generator: torch.Generator | None = None) -> VAEOutput:
        """Encode, take z (a reparameterised sample, or the posterior mean if ``sample=False``), decode;
        with a VampPrior also log p(z) (B,), computed here so that DDP sees the pseudo-inputs used."""
        out = encode_decode(self, x, y, sample, generator)
        if self.vamp:
            out.log_pz = self.prior_log_prob(out.z)
        return out

    # --- the prior -------------------------------------------------------------------------------------
    def pseudo_images(self) -> torch.Tensor:
        """The VampPrior's pseudo-inputs as images, float (K, C, H, W) in [0, 1]."""
        return torch.sigmoid(self.pseudo_logits)

    def prior_components(self) -> tuple[torch.Tensor, torch.Tensor]:
        """VampPrior components q(z|u_k): means and log-variances (K, D), BatchNorm on running statistics."""
        with running_batchnorm(self.encoder):
            q = self.encode(self.pseudo_images())
        return q.mean, q.logvar

    def latent_prior(self) -> MixturePrior | None:
        """The prior when it is not N(0, I): the VampPrior's components (K, D), detached, on the CPU."""
        if not self.vamp:
            return None
        with torch.no_grad():
            means, logvars = (t.float().cpu() for t in self.prior_components())
        return MixturePrior("VampPrior", means, logvars)

    def log_prior(self):
        """z (..., D) -> log p(z) (...): N(0, I), or the VampPrior with its components computed once."""
        if not self.vamp:
            return standard_normal_log_prob
        means, logvars = self.prior_components()
        return lambda z: mixture_log_prob(z, means, logvars)

    def prior_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z) for z (..., D) -> (...)."""
        return self.log_prior()(z)

    def images(self, params: torch.Tensor) -> torch.Tensor:
        """Decoder parameters -> displayable mean images (B, C, H, W) in [0, 1]."""
        return self.likelihood.mean(params)

    # --- the family contract (models/family.py) ----------------------------------------------------------
    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """z: (B, D) -> mean images float (B, C, H, W) in [0, 1]."""
        return self.images(self.decode_params(z, y)).float()

    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Decoded posterior means: float (B, C, H, W) in [0, 1]."""
        return self.decode(self.encode(x, y).mode(), y)

    def prior_latents(self, n: int, generator=None, temperature: float = 1.0) -> torch.Tensor:
        """n draws of z ~ N(0, T^2 I), (n, D), on the CPU (the same numbers on every device). VampPrior:
        a uniformly chosen component k, then z ~ N(mean_k, T^2 var_k)."""
        if not self.vamp:
            return temperature * torch.randn(n, self.latent_dim, generator=generator)
        with torch.no_grad():
            means, logvars = (t.float().cpu() for t in self.prior_components())
        k = torch.randint(len(means), (n,), generator=generator)
        eps = torch.randn(n, self.latent_dim, generator=generator)
        return means[k] + temperature * torch.exp(0.5 * logvars[k]) * eps

    def sample(self, n: int, label=None, generator=None, temperature: float = 1.0) -> torch.Tensor:
        """n images decoded from the prior: float (n, C, H, W) in [0, 1]. ``label``: int or (n,) indices."""
        device = next(self.parameters()).device
        z = self.prior_latents(n, generator, temperature).to(device)
        return self.decode(z, _label_tensor(label, n, device))

    def log_weights(self, x, y=None, k: int = 100, generator=None, max_decode: int = 256) -> LogWeights:
        """K draws z_k ~ q(z|x): log p(x|z_k), log p(z_k) - log q(z_k|x) (float64 (K, B), CPU) and the
        closed-form KL (None for the VampPrior). At most ``max_decode`` images go through the decoder at once."""
        return gaussian_log_weights(self, x, y, k, generator, max_decode, self.log_prior(), not self.vamp)

    def figures(self) -> dict[str, torch.Tensor]:
        """Images the run folder shows after training: the VampPrior's pseudo-inputs (K, C, H, W)."""
        return {"pseudo_inputs": self.pseudo_images().detach().float().cpu()} if self.vamp else {}

    def optimizers(self, train_cfg, device) -> dict[str, torch.optim.Optimizer]:
        return {"model": adam(self.parameters(), train_cfg, device)}

    def trained_modules(self) -> dict[str, nn.Module]:
        return {"vae": self}

    def training_steps(self) -> list[TrainStep]:
        return [TrainStep("elbo", "model", self._elbo_step)]

    def _elbo_step(self, nets, x, y, ctx: StepContext) -> StepOutput:
        """Forward with a reparameterised sample; minimise rec + β·KL (KL schedule and free bits applied)."""
        cfg = self.cfg
        beta = kl_weight(cfg.kl_schedule, cfg.beta, ctx.progress, cfg.warmup_epochs)
        out = nets["vae"](x, y, sample=True, generator=ctx.generator)
        terms = neg_elbo(self.likelihood, out, x, beta=beta, free_bits=cfg.free_bits)
        loss_terms = {"loss": _honest(terms), "rec": terms.rec, "kl": terms.kl, "beta": torch.tensor(beta)}
        return StepOutput(terms.loss.mean(), loss_terms)

    def validation_terms(self, x, y, generator) -> dict[str, torch.Tensor]:
        """Single-sample negative ELBO ("loss") and its two terms, per image (B,)."""
        terms = neg_elbo(self.likelihood, self(x, y, sample=True, generator=generator), x)
        return {"loss": _honest(terms), "rec": terms.rec, "kl": terms.kl}


def _honest(terms) -> torch.Tensor:
    """The negative ELBO rec + KL whatever β or free bits were, in float64 so that its batch sums
    equal the sums of the two terms exactly as metrics.jsonl reports them."""
    dtype = torch.float32 if terms.rec.device.type == "mps" else torch.float64  # MPS has no float64
    return terms.rec.detach().to(dtype) + terms.kl.detach().to(dtype)


def _label_tensor(label, n: int, device) -> torch.Tensor | None:
    if label is None:
        return None
    if isinstance(label, int):
        return torch.full((n,), label, dtype=torch.long, device=device)
    return torch.as_tensor(label, dtype=torch.long).to(device)


FAMILIES = (
    Family("conv_vae", ConvVAEConfig, ConvVAE, "the article's convolutional VAE"),
    # Higgins et al. 2017: the same network with the KL weighted by β
    Family("beta_vae", ConvVAEConfig, ConvVAE, "β-VAE (β = 4)", preset={"beta": 4.0}),
    # Sohn et al. 2015: one class per label of the data
    Family("cvae", ConvVAEConfig, ConvVAE, "conditional VAE", preset={"num_classes": LABELS_FROM_DATA}),
    # Tomczak & Welling 2018: the prior is a mixture of the posteriors at learned pseudo-inputs
    Family("vamp_vae", ConvVAEConfig, ConvVAE, "VAE with a VampPrior (whether its defaults beat conv_vae's "
           "bits/dim depends on the data: see the defaults results)", preset={"prior": "vamp"}),
)
