"""Posterior collapse diagnostics from the encoder's q(z|x) = N(mean, diag(exp(logvar))) over a data set.

- KL per latent dimension, averaged over images: a dimension with ~0 KL carries no information. To the
  model's prior: N(0, I) in closed form; a learned mixture prior (the VampPrior) by Monte Carlo, the total
  KL(q(z|x) || p(z)) and, per dimension, the KL to the prior's marginal p(z_j) (for a mixture the per-dimension
  KLs need not sum to the total). The KL to N(0, I) is then kept as a named diagnostic only.
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


def kl_to_mixture(mean: np.ndarray, logvar: np.ndarray, prior_means: np.ndarray, prior_logvars: np.ndarray,
                  generator: torch.Generator | None = None, samples: int = 16,
                  chunk: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Monte Carlo KL of each posterior N(mean, diag(exp(logvar))) (N, D) to the mixture prior
    (1/K) sum_k N(prior_means_k, diag(exp(prior_logvars_k))) (K, D): (total (N,), per dimension (N, D)) nats,
    per dimension against the mixture's marginal p(z_j). The same ``samples`` draws z ~ q(z|x) per image
    serve both; the estimate is unbiased, with a standard error that shrinks as 1/sqrt(samples * N)."""
    mu = torch.as_tensor(np.asarray(mean), dtype=torch.float64)
    lv = torch.as_tensor(np.asarray(logvar), dtype=torch.float64)
    pm = torch.as_tensor(np.asarray(prior_means), dtype=torch.float64)  # (K, D)
    plv = torch.as_tensor(np.asarray(prior_logvars), dtype=torch.float64)
    log_k = math.log(len(pm))
    totals, dims = [], []
    for i in range(0, len(mu), chunk):
        m, v = mu[i : i + chunk], lv[i : i + chunk]  # (c, D)
        eps = torch.randn((samples, *m.shape), generator=generator, dtype=torch.float64)
        z = m + torch.exp(0.5 * v) * eps  # (S, c, D)
        log_q = -0.5 * (eps.pow(2) + v + LOG_2PI)  # (S, c, D): log q(z_j | x), one term per dimension
        comp = -0.5 * ((z[:, :, None] - pm).pow(2) * torch.exp(-plv) + plv + LOG_2PI)  # (S, c, K, D)
        log_p_dim = torch.logsumexp(comp, dim=2) - log_k  # (S, c, D): the marginal p(z_j)
        log_p = torch.logsumexp(comp.sum(-1), dim=2) - log_k  # (S, c)
        totals.append((log_q.sum(-1) - log_p).mean(0))
        dims.append((log_q - log_p_dim).mean(0))
    return torch.cat(totals).numpy(), torch.cat(dims).numpy()


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
    mean: np.ndarray, logvar: np.ndarray, generator: torch.Generator | None = None, prior=None,
    prior_samples: int = 16,
) -> dict:
    """All three diagnostics; keys: latent_dim, kl_prior (what the KL is to, and how it is computed),
    kl_per_dim (list), kl_total_nats, active_units, active_threshold, mean_variance_per_dim (list),
    mutual_information_nats, mi_upper_bound_nats; with a learned ``prior`` (a MixturePrior: name, means and
    logvars (K, D)) also kl_to_standard_normal_nats, the KL to N(0, I), a diagnostic only."""
    kl = kl_per_dimension(mean, logvar)
    au, var = active_units(mean)
    n = len(mean)
    out = {"latent_dim": int(kl.shape[0]), "kl_prior": "N(0, I), closed form"}
    if prior is None:
        out.update(kl_per_dim=[float(v) for v in kl], kl_total_nats=float(kl.sum()))
    else:
        total, per_dim = kl_to_mixture(mean, logvar, prior.means.numpy(), prior.logvars.numpy(), generator,
                                       prior_samples)
        out.update(kl_prior=f"{prior.name}, Monte Carlo ({prior_samples} draws per image); per dimension "
                            "against its marginal", kl_per_dim=[float(v) for v in per_dim.mean(0)],
                   kl_total_nats=float(total.mean()), kl_to_standard_normal_nats=float(kl.sum()))
    return {
        **out,
        "active_units": au,
        "active_threshold": ACTIVE_UNIT_THRESHOLD,
        "mean_variance_per_dim": [float(v) for v in var],
        "mutual_information_nats": mutual_information(mean, logvar, generator),
        "mi_upper_bound_nats": float(math.log(n)) if n else 0.0,
    }
