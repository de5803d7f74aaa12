"""Likelihood bounds per image: the negative ELBO and the importance-weighted bound.

IWAE (Burda, Grosse & Salakhutdinov 2015): with z_1..z_K ~ q(z|x),
    log p(x) >= L_K = E[log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x)],
L_1 is the ELBO, L_K never decreases with K and tends to log p(x). From one draw of K samples we
also estimate L_k for every k that divides K by averaging over the K/k disjoint groups of k samples
(the same samples, so the curve over k costs nothing extra).

Units are nats per image. Bits per dimension (nats / (C*H*W * ln 2)) are only a likelihood of
8-bit images when the decoder is a probability over the 256 values of each pixel
(``likelihood.is_discrete_image_likelihood``, e.g. the discretised logistic); a Bernoulli on gray
intensities or a Gaussian density is not, and then no bits/dim are reported.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from medivae.models.family import describe

NOT_AN_IMAGE_LIKELIHOOD = (
    "the {name} likelihood is not a probability of 8-bit images: these nats are not an NLL "
    "and no bits/dim are reported (train with --likelihood discretized_logistic for a real NLL)"
)


def iwae_from_log_weights(log_w: torch.Tensor, k: int) -> torch.Tensor:
    """L_k per image (B,) from log_w (K, B), averaged over the K // k disjoint groups of k samples."""
    big_k = log_w.shape[0]
    if k < 1 or big_k % k:
        raise ValueError(f"k={k} must divide the number of samples {big_k}")
    groups = log_w.reshape(big_k // k, k, -1)  # (G, k, B)
    return (torch.logsumexp(groups, dim=1) - math.log(k)).mean(0)


def ks_for(k: int) -> list[int]:
    """The k reported on the curve: 1, 10, 100, ... that divide K, and K itself."""
    ks = {k}
    p = 1
    while p < k:
        if k % p == 0:
            ks.add(p)
        p *= 10
    return sorted(ks)


@torch.no_grad()
def batch_bounds(model, x, y=None, k: int = 100, generator=None, max_decode: int = 256) -> dict:
    """Per-image bounds of one batch in nats, numpy float64 (B,).

    ``neg_elbo``: -(log p(x|z) averaged over the K samples) + the family's KL (closed form where it has
    one: lower variance than the Monte Carlo KL); ``neg_iwae``: {k: -L_k} for every k in ``ks_for(K)``.
    """
    lw = model.log_weights(x, y, k, generator, max_decode)  # the family's importance weights (K, B)
    log_w = lw.log_w
    return {
        "neg_elbo": lw.neg_elbo().numpy(),
        "neg_iwae": {kk: (-iwae_from_log_weights(log_w, kk)).numpy() for kk in ks_for(k)},
        "ess": effective_sample_size(log_w).numpy(),
    }


def effective_sample_size(log_w: torch.Tensor) -> torch.Tensor:
    """Kish's effective sample size of the K importance weights of each image, (K, B) -> (B,) in [1, K]:
    near 1, one draw dominates and L_K is a loose bound whatever K is (Owen 2013, ch. 9)."""
    return torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0))


def bits_per_dim(nats: float, dims: int) -> float:
    return nats / (dims * math.log(2))


@torch.no_grad()
def likelihood_bounds(
    model, batches, k: int = 100, generator: torch.Generator | None = None, max_decode: int = 256
) -> dict:
    """Dataset summary over ``batches`` (an iterable of (x, y)); see the module docstring for units.

    Returns neg_elbo_nats, neg_iwae_nats (at K), iwae_k, neg_iwae_nats_by_k {str(k): nats},
    neg_elbo_bpd / neg_iwae_bpd (None unless the likelihood is discrete over 8-bit values),
    likelihood, discrete_image_likelihood, note, n_images.
    """
    elbo, iwae, ess, dims, conditional = [], {}, [], 0, False
    for x, y in batches:
        dims, conditional = x[0].numel(), y is not None
        b = batch_bounds(model, x, y, k, generator, max_decode)
        elbo.append(b["neg_elbo"])
        ess.append(b["ess"])
        for kk, v in b["neg_iwae"].items():
            iwae.setdefault(kk, []).append(v)
    by_k = {kk: float(np.concatenate(v).mean()) for kk, v in iwae.items()}
    neg_elbo = float(np.concatenate(elbo).mean())
    facts = describe(model)
    discrete, name = facts.discrete_likelihood, facts.likelihood
    ess_all = np.concatenate(ess)
    return {
        "n_images": int(sum(len(e) for e in elbo)),
        "quantity": "-log p(x | y)" if conditional else "-log p(x)",  # a conditional family's bound is on x given y
        "likelihood": name,
        "discrete_image_likelihood": discrete,
        "iwae_k": k,
        "neg_elbo_nats": neg_elbo,
        "neg_iwae_nats": by_k[k],
        "neg_iwae_nats_by_k": {str(kk): v for kk, v in sorted(by_k.items())},
        "neg_elbo_bpd": bits_per_dim(neg_elbo, dims) if discrete else None,
        "neg_iwae_bpd": bits_per_dim(by_k[k], dims) if discrete else None,
        "note": "" if discrete else NOT_AN_IMAGE_LIKELIHOOD.format(name=name),
        "iwae_ess": {"median": float(np.median(ess_all)), "mean": float(ess_all.mean()), "k": k,
                     "note": (f"median effective sample size {np.median(ess_all):.1f} of K={k}: a few draws "
                              "dominate, so the IWAE bound is loose; raise -k") if np.median(ess_all) < 2 else ""},
        # per-image values for intervals and paired comparisons; the caller pops them (not JSON)
        "per_image": {"neg_elbo": np.concatenate(elbo), "neg_iwae": np.concatenate(iwae[k])},
    }
