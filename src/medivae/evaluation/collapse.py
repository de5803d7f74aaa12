"""Posterior collapse diagnostics from the encoder's q(z|x) = N(mean, diag(exp(logvar))) over a data set.

- KL per latent dimension, averaged over images: a dimension with ~0 KL carries no information.
- Active units (Burda, Grosse & Salakhutdinov 2015): dimension j is active when
  Var_x(E[z_j | x]) > 0.01.
- Mutual information I(x; z) under the encoder's joint q(x, z) = p_data(x) q(z|x), estimated as
  E_x[KL(q(z|x) || q(z))] with the aggregate posterior q(z) = mean_n q(z|x_n) over the same images
  (Hoffman & Johnson 2016; the estimator of He et al. 2019). In expectation it is a lower bound on
  I(x; z) (it has the InfoNCE form of van den Oord et al. 2018 with critic log q(z|x)) and it cannot
  exceed log N for N images: near log N it only says "at least this much".
"""

from __future__ import annotations

import math

import numpy as np
import torch

from medivae.models.distributions import LOG_2PI

ACTIVE_UNIT_THRESHOLD = 0.01


def kl_per_dimension(mean: np.ndarray, logvar: np.ndarray) -> np.ndarray:
    """mean, logvar (N, D) -> KL(q(z_j|x) || N(0, 1)) averaged over the N images, (D,) nats."""
    mean, logvar = np.asarray(mean, np.float64), np.asarray(logvar, np.float64)
    return (0.5 * (mean**2 + np.exp(logvar) - 1.0 - logvar)).mean(0)


def active_units(mean: np.ndarray, threshold: float = ACTIVE_UNIT_THRESHOLD) -> tuple[int, np.ndarray]:
    """(number of active dimensions, Var_x E[z_j|x] per dimension (D,))."""
    var = np.asarray(mean, np.float64).var(0)
    return int((var > threshold).sum()), var


def mutual_information(
    mean: np.ndarray, logvar: np.ndarray, generator: torch.Generator | None = None, samples: int = 10,
    chunk: int = 256,
) -> float:
    """Estimate of I(x; z) in nats from posterior parameters (N, D), ``samples`` z per image.

    I = E_x E_q(z|x)[log q(z|x) - log q(z)] with log q(z) = logsumexp_n log q(z | x_n) - log N.
    Both terms are evaluated at the same z (not the closed-form entropy for the first), so their
    noise cancels: identical posteriors give exactly 0.
    """
    mu = torch.as_tensor(np.asarray(mean), dtype=torch.float64)
    lv = torch.as_tensor(np.asarray(logvar), dtype=torch.float64)
    n, d = mu.shape
    eps = torch.randn((samples, n, d), generator=generator, dtype=torch.float64)
    z = (mu + torch.exp(0.5 * lv) * eps).reshape(samples * n, d)  # sample-major: row s*N + i is x_i
    inv_var = torch.exp(-lv)  # (N, D)
    log_norm = -0.5 * (d * LOG_2PI + lv.sum(1))  # (N,)
    terms = []
    for i in range(0, len(z), chunk):  # (chunk, N, D) at a time keeps memory bounded
        zi = z[i : i + chunk]
        log_q = log_norm[None] - 0.5 * ((zi[:, None, :] - mu[None]).pow(2) * inv_var[None]).sum(-1)  # (c, N)
        own = log_q[torch.arange(len(zi)), (torch.arange(i, i + len(zi)) % n)]  # log q(z | its own x)
        terms.append(own - (torch.logsumexp(log_q, dim=1) - math.log(n)))
    return float(torch.cat(terms).mean())


def collapse_metrics(
    mean: np.ndarray, logvar: np.ndarray, generator: torch.Generator | None = None
) -> dict:
    """All three diagnostics; keys: latent_dim, kl_per_dim (list), kl_total_nats, active_units,
    active_threshold, mean_variance_per_dim (list), mutual_information_nats, mi_upper_bound_nats."""
    kl = kl_per_dimension(mean, logvar)
    au, var = active_units(mean)
    n = len(mean)
    return {
        "latent_dim": int(kl.shape[0]),
        "kl_per_dim": [float(v) for v in kl],
        "kl_total_nats": float(kl.sum()),
        "active_units": au,
        "active_threshold": ACTIVE_UNIT_THRESHOLD,
        "mean_variance_per_dim": [float(v) for v in var],
        "mutual_information_nats": mutual_information(mean, logvar, generator),
        "mi_upper_bound_nats": float(math.log(n)) if n else 0.0,
    }
