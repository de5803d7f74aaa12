"""What normal looks like, fitted on the training normals: the statistics the latent and SSIM scores read.

- a Gaussian of the normal codes (the ``latent`` score: squared Mahalanobis distance of a code from it);
- a Gaussian mixture of the standardised normal codes, its number of components chosen by BIC on the
  validation normals (``latent_gmm``: -log density; the mixture of :func:`medivae.models.samplers.fit_gmm`);
- per pixel, the mean and standard deviation of the normals' SSIM dissimilarity maps (``ssim_z``: the SSIM map
  read against normal variation, cf. normative modelling, Marquand et al. 2016). A pixel where normals are
  always reconstructed well counts more than one where they vary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

# added to each pixel's std (SSIM units): a pixel every normal reconstructs alike keeps a finite z
NORM_STD_OFFSET = 1e-3
GMM_MAX_COMPONENTS = 8


@dataclass
class Normals:
    """Statistics of the training normals. gauss: {"mean" (D,), "precision" (D, D)}; gmm: (mean, std,
    GaussianMixture) of standardised codes or None; ssim_norm: per-pixel (mean, std) (H, W) or None;
    reference: the feature extractor of ``feature_res`` or None; records: what results.json says of them."""

    gauss: dict[str, np.ndarray]
    gmm: tuple | None = None
    ssim_norm: tuple[np.ndarray, np.ndarray] | None = None
    reference: object | None = None
    records: dict = field(default_factory=dict)


def fit_latent_gaussian(codes: np.ndarray, shrink: float = 1e-3) -> dict[str, np.ndarray]:
    """Mean and precision of normal codes (N, D); a little ridge keeps the precision finite."""
    mean = codes.mean(0)
    cov = np.cov(codes, rowvar=False).reshape(codes.shape[1], codes.shape[1])
    cov += shrink * np.trace(cov) / len(cov) * np.eye(len(cov)) + 1e-9 * np.eye(len(cov))
    return {"mean": mean, "precision": np.linalg.inv(cov)}


def mahalanobis(codes: np.ndarray, gauss: dict[str, np.ndarray]) -> np.ndarray:
    """Squared Mahalanobis distance (N,) of codes (N, D) from :func:`fit_latent_gaussian`'s Gaussian."""
    d = codes - gauss["mean"]
    return np.einsum("nd,de,ne->n", d, gauss["precision"], d)


def fit_latent_gmm(train_codes: np.ndarray, val_codes: np.ndarray, max_components: int = GMM_MAX_COMPONENTS,
                   seed: int = 0) -> tuple[tuple, dict]:
    """A full-covariance Gaussian mixture of the standardised normal training codes (N, D), its number of
    components chosen by the BIC of the standardised validation codes. Returns ((mean, std, mixture), record)."""
    from medivae.models.samplers import fit_gmm

    mu, sd = train_codes.mean(0), train_codes.std(0) + 1e-6
    gmm, record = fit_gmm((train_codes - mu) / sd, (val_codes - mu) / sd,
                          max(1, min(max_components, len(train_codes) // 2)), seed)
    return (mu, sd, gmm), record


def latent_gmm_score(codes: np.ndarray, fitted: tuple) -> np.ndarray:
    """-log density (N,) of codes (N, D) under :func:`fit_latent_gmm`'s mixture."""
    mu, sd, gmm = fitted
    return -gmm.log_prob(torch.from_numpy((codes - mu) / sd)).numpy()


def fit_ssim_norm(chunks) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel mean and standard deviation (+ NORM_STD_OFFSET), (H, W), of the SSIM dissimilarity maps of
    N >= 2 normal images and their reconstructions, given as an iterable of chunks (n, H, W): float64 sums, so
    no set is held at full size at once."""
    n, total, squares = 0, 0.0, 0.0
    for d in chunks:
        d = np.asarray(d, dtype=np.float64)
        n, total, squares = n + len(d), total + d.sum(0), squares + (d * d).sum(0)
    mean = total / n
    var = np.clip((squares - n * mean * mean) / (n - 1), 0.0, None)
    return mean, np.sqrt(var) + NORM_STD_OFFSET


def normative_ssim(dissimilarity: np.ndarray, norm: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``ssim_z`` score (N,) and map (N, H, W) of dissimilarity maps (N, H, W): the positive part of each pixel's
    z-score under ``norm`` (:func:`fit_ssim_norm`); its mean is the score."""
    mean, std = norm
    z = np.clip((np.asarray(dissimilarity, dtype=np.float64) - mean) / std, 0.0, None)
    return z.reshape(len(z), -1).mean(1), z.astype(np.float32)
