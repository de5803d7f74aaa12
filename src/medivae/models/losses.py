"""Losses as pure functions, one value per sample (summed over pixels and latent dimensions).

The caller averages over the batch. The same terms serve training, evaluation and anomaly scores.

The adversarial terms of the GAN-trained families (VAE-GAN, the LDM autoencoder): the hinge loss (Lim & Ye
2017) or least squares (Mao et al. 2017) on patch logits, feature matching (Larsen et al. 2016) and the
adaptive weight of VQGAN (Esser et al. 2021).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from medivae.runtime.errors import UserError

KL_SCHEDULES = ("constant", "linear", "cyclical")
# command-line shorthands of the KL schedule fields, for the families that have them (Family.cli_flags)
KL_FLAGS = {
    "kl_schedule": "constant, linear or cyclical KL weight over training (default: the family's; conv_vae constant)",
    "warmup_epochs": "KL warm-up length / cycle length in epochs",
}


@dataclass
class ELBOTerms:
    """Per-sample terms, each (B,) in nats. ``loss`` is what is minimised (β-weighted, free bits applied);
    ``neg_elbo`` = rec + kl is the honest negative ELBO whatever β or free bits were."""

    rec: torch.Tensor  # -log p(x|z)
    kl: torch.Tensor  # KL(q(z|x) || p(z)): closed form for N(0, I), one-sample Monte Carlo for a learned prior
    loss: torch.Tensor

    @property
    def neg_elbo(self) -> torch.Tensor:
        return self.rec + self.kl


def free_bits_kl(kl_per_dim: torch.Tensor, free_bits: float) -> torch.Tensor:
    """Per-sample KL with free bits (Kingma et al. 2016): a latent dimension whose batch-mean KL is
    below ``free_bits`` nats counts as exactly ``free_bits`` (no gradient pushes it further down).
    The batch mean of the result equals sum_j max(free_bits, mean_batch KL_j).  kl_per_dim: (B, D)."""
    if free_bits <= 0:
        return kl_per_dim.sum(1)
    mean_j = kl_per_dim.mean(0, keepdim=True)  # (1, D)
    floor = torch.full_like(kl_per_dim, free_bits)
    return torch.where(mean_j >= free_bits, kl_per_dim, floor).sum(1)


def neg_elbo(likelihood, out, x: torch.Tensor, beta: float = 1.0, free_bits: float = 0.0) -> ELBOTerms:
    """x: float (B, C, H, W) in [0, 1]; ``out``: a forward output with ``recon_params`` and a
    ``posterior`` (``models.outputs.VAEOutput``; not imported: models import losses). Per-sample terms.
    KL: closed form to N(0, I), or log q(z|x) - log p(z) at the sampled z when ``out.log_pz`` is set."""
    rec = -likelihood.log_prob(out.recon_params, x)
    log_pz = getattr(out, "log_pz", None)
    if log_pz is not None:  # a learned prior (VampPrior): one-sample Monte Carlo KL at the decoded z
        if free_bits > 0:
            raise ValueError("free bits need the per-dimension KL of the N(0, I) prior")
        kl = out.posterior.log_prob(out.z) - log_pz
        return ELBOTerms(rec=rec, kl=kl, loss=rec + beta * kl)
    kl_per_dim = out.posterior.kl_per_dim()
    kl = kl_per_dim.sum(1)
    loss = rec + beta * free_bits_kl(kl_per_dim, free_bits)
    return ELBOTerms(rec=rec, kl=kl, loss=loss)


def check_kl_settings(kl_schedule: str, warmup_epochs: float, free_bits: float = 0.0) -> None:
    """A one-line UserError for a KL schedule, warm-up or free-bits setting no run could use."""
    if kl_schedule not in KL_SCHEDULES:
        raise UserError(f"unknown KL schedule {kl_schedule!r}; choose one of {list(KL_SCHEDULES)}")
    if warmup_epochs < 0:
        raise UserError(f"warmup epochs must be >= 0, not {warmup_epochs}")
    if kl_schedule != "constant" and warmup_epochs <= 0:
        raise UserError(f"KL schedule {kl_schedule!r} needs --warmup-epochs > 0")
    if free_bits < 0:
        raise UserError(f"free bits must be >= 0, not {free_bits}")


def kl_weight(schedule: str, beta: float, progress_epochs: float, warmup_epochs: float) -> float:
    """β at a point of training (``progress_epochs`` = fractional epochs done).

    constant: β; linear: β·min(1, t/warmup); cyclical (Fu et al. 2019): within each cycle of length
    ``warmup_epochs`` β ramps linearly over the first half, then stays at β.
    """
    if schedule == "constant" or warmup_epochs <= 0:
        return beta
    if schedule == "linear":
        return beta * min(1.0, progress_epochs / warmup_epochs)
    if schedule == "cyclical":
        phase = math.fmod(progress_epochs, warmup_epochs) / warmup_epochs
        return beta * min(1.0, phase / 0.5)
    raise ValueError(f"unknown KL schedule {schedule!r}")


ADV_LOSSES = ("hinge", "lsgan")
MAX_ADAPTIVE = 1e4  # VQGAN's clamp of the adaptive weight


def generator_adv_loss(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """The generator's adversarial loss per image (N,) from the discriminator's patch logits of its fakes (N, h, w)."""
    per_patch = -logits if kind == "hinge" else (logits - 1.0).pow(2)
    return per_patch.flatten(1).mean(1)


def discriminator_loss(real: torch.Tensor, fake: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The discriminator's loss per image on real (B, h, w) and fake (N, h, w) patch logits: ((B,), (N,))."""
    if kind == "hinge":
        loss_real, loss_fake = torch.relu(1.0 - real), torch.relu(1.0 + fake)
    else:
        loss_real, loss_fake = (real - 1.0).pow(2), fake.pow(2)
    return loss_real.flatten(1).mean(1), loss_fake.flatten(1).mean(1)


def discriminator_accuracy(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """The fraction of patches the discriminator gets right, real and fake weighted alike (a scalar)."""
    return 0.5 * ((real > 0).float().mean() + (fake < 0).float().mean())


def feature_matching(feats: list[torch.Tensor], b: int) -> torch.Tensor:
    """Per image (B,): the mean squared distance between the discriminator's features of the real images
    (rows :b, detached) and of their reconstructions (rows b:2b), summed over layers (Larsen et al. 2016)."""
    return sum((f[:b].detach() - f[b : 2 * b]).float().pow(2).flatten(1).mean(1) for f in feats)


def adaptive_weight(rec: torch.Tensor, adv: torch.Tensor, last_layer: torch.Tensor, scale: float) -> torch.Tensor:
    """λ = scale · ||∇_w rec|| / ||∇_w adv|| at the decoder's last weight w (VQGAN), detached and clamped, so
    the adversarial term neither drowns nor vanishes whatever the reconstruction loss's scale. Scalars in."""
    g_rec = torch.autograd.grad(rec, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adv, last_layer, retain_graph=True)[0]
    lam = g_rec.float().norm() / (g_adv.float().norm() + 1e-4)
    return (scale * lam.clamp(0.0, MAX_ADAPTIVE)).detach()


class DiscriminatorWatch:
    """The discriminator's accuracy over an epoch. A discriminator right about every patch for a whole epoch
    gives the generator no useful gradient: :meth:`epoch_end` raises ``Diverged`` then, and the trainer rolls
    every network back to the start of the epoch at a lower learning rate."""

    def __init__(self):
        self.acc = torch.zeros(2, dtype=torch.float64)  # (sum of batch accuracies, batches) this epoch

    def add(self, acc: torch.Tensor) -> None:
        self.acc += torch.tensor([acc.item(), 1.0], dtype=torch.float64)

    def reset(self) -> None:
        self.acc.zero_()

    def epoch_end(self, epoch: int) -> dict[str, float]:
        from medivae.models.family import Diverged

        acc = self.acc.clone()
        self.acc.zero_()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(acc)  # every rank decides alike (gloo on CPU: float64 is fine)
        if acc[1] == 0:
            return {}
        mean = float(acc[0] / acc[1])
        if mean >= 0.9999:
            raise Diverged(f"discriminator accuracy pinned at 100 % over epoch {epoch}: the generator "
                           "gets no useful adversarial gradient")
        return {"disc_acc_epoch": mean}
