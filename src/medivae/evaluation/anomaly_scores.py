"""Anomaly scores beyond the pixel residual, each for the families that have what it needs.

Per-image scores, higher = more anomalous; maps (N, H, W) where the score has one:
  ``latent_gmm``     -log density of the posterior mean under a Gaussian mixture fitted to the normal
                     training codes, components chosen by BIC on validation normals ("gaussian_latent");
  ``feature_res``    distance between the reference extractor's features of x and of its reconstruction:
                     blur costs little in a feature space that was trained to ignore it (any family);
  ``restoration``    MAP restoration (Chen et al. 2020, "Unsupervised lesion detection via image restoration
                     with a normative prior"): a few Adam steps on the image that lower -ELBO + lambda TV(x_r - x),
                     the mean |x - x_r| as score and |x - x_r| as map ("likelihood");
  ``ssim_z``         the SSIM map read against normal variation (normative modelling, cf. Marquand et al. 2016):
                     per pixel, (1 - local SSIM of x and its reconstruction - mean) / std, mean and std over the
                     training normals' own maps; the mean of the positive part as score and that part as map.
                     A pixel where normals are always reconstructed well counts more than one where they vary;
  ``vq_healing``     prior-guided healing (Pinaya et al. 2022): codes unlikely under the VQ-VAE's code prior
                     are replaced by likely ones, decoded; the residual |x - healed| as map and score;
  ``ensemble``       mean of validation-standardised scores over ENSEMBLE_FROM (fixed in advance).
Trivial baselines (no model): PNG size, mean intensity, intensity standard deviation.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from tqdm import tqdm

from medivae.data.imageset import to_float
from medivae.evaluation.anomaly import calibrate, combined_score, png_nats, ssim_maps
from medivae.evaluation.localisation import pad_to
from medivae.models.family import has, labels_for
from medivae.runtime.device import full_precision

ENSEMBLE_FROM = ("ssim", "rec_error", "latent_gmm", "feature_res", "restoration", "vq_healing", "disc")


# --- latent density --------------------------------------------------------------------------------------------
def fit_latent_gmm(train_codes: np.ndarray, val_codes: np.ndarray, components=(1, 2, 4, 8), seed: int = 0):
    """A full-covariance Gaussian mixture of standardised normal training codes (N, D); the number of
    components minimises the BIC of the *validation* normals' codes. Returns (model, record)."""
    from sklearn.mixture import GaussianMixture

    mu, sd = train_codes.mean(0), train_codes.std(0) + 1e-6
    tr, va = (train_codes - mu) / sd, (val_codes - mu) / sd
    bic, best = {}, None
    for k in (c for c in components if c <= len(tr) // 2):
        # sklearn takes seeds below 2**32; the article's seed is larger
        g = GaussianMixture(k, covariance_type="full", reg_covar=1e-3, random_state=seed % 2**32, n_init=1).fit(tr)
        bic[k] = float(g.bic(va))
        if best is None or bic[k] < bic[best[0]]:
            best = (k, g)
    return (mu, sd, best[1]), {"components": best[0], "val_bic": bic}


def latent_gmm_score(codes: np.ndarray, fitted) -> np.ndarray:
    mu, sd, g = fitted
    return -g.score_samples((codes - mu) / sd)


# --- reconstructions and feature residual ---------------------------------------------------------------------
@torch.no_grad()
def reconstructions(model, images: np.ndarray, labels=None, batch_size: int = 128, device="cpu") -> torch.Tensor:
    """Deterministic reconstructions, float (N, C, H, W) in [0, 1] on the CPU."""
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = to_float(images[i : i + batch_size], device)
        y = labels_for(model, None if labels is None else labels[i : i + batch_size], device)
        out.append(model.reconstruct(x, y).float().cpu())
    return torch.cat(out)


def feature_residual(reference, images: np.ndarray, recon: torch.Tensor) -> np.ndarray:
    """||f(x) - f(x_hat)||_2 / sqrt(D) in the reference network's own features (not the detail block, which a
    reconstruction's blur would fill for normal and anomalous images alike), (N,)."""
    fx, fr = reference.content_features(images), reference.content_features(recon)
    return np.linalg.norm(fx - fr, axis=1) / math.sqrt(fx.shape[1])


# --- SSIM map against normal variation ------------------------------------------------------------------------
# added to each pixel's std (SSIM units): a pixel every normal reconstructs alike keeps a finite z
NORM_STD_OFFSET = 1e-3


def dissimilarity_maps(images: np.ndarray, recon: torch.Tensor) -> torch.Tensor:
    """1 - local SSIM of uint8 images (N, C, H, W) and their reconstructions, (N, H - 6, W - 6)."""
    return 1.0 - ssim_maps(to_float(images, "cpu"), recon)  # ssim_maps computes in fp32 itself


def fit_ssim_norm(model, images: np.ndarray, labels=None, batch_size: int = 128,
                  device="cpu") -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel mean and standard deviation (+ NORM_STD_OFFSET), (h, w), of the dissimilarity maps of normal
    uint8 images (N >= 2) and their reconstructions by ``model``, accumulated batch by batch (float64 sums),
    so no set is held at full size in memory at once."""
    n, total, squares = 0, 0.0, 0.0
    for i in range(0, len(images), batch_size):
        part = images[i : i + batch_size]
        lab = None if labels is None else labels[i : i + batch_size]
        d = dissimilarity_maps(part, reconstructions(model, part, lab, batch_size, device)).double()
        n, total, squares = n + len(d), total + d.sum(0), squares + d.pow(2).sum(0)
    mean = total / n
    var = ((squares - n * mean.pow(2)) / (n - 1)).clamp_min(0.0)
    return mean.numpy(), var.sqrt().numpy() + NORM_STD_OFFSET


def normative_ssim(images: np.ndarray, recon: torch.Tensor, norm) -> tuple[np.ndarray, np.ndarray]:
    """``ssim_z`` score (N,) and map (N, H, W): the positive part of the per-pixel z-score of the dissimilarity
    map under ``norm`` (from :func:`fit_ssim_norm`), its mean as score, edge-padded to the image size as map."""
    mean, std = norm
    z = np.clip((dissimilarity_maps(images, recon).double().numpy() - mean) / std, 0.0, None)
    return z.reshape(len(z), -1).mean(1), pad_to(z.astype(np.float32), images.shape[-1])


# --- MAP restoration (Chen et al. 2020) ----------------------------------------------------------------------
def total_variation(d: torch.Tensor) -> torch.Tensor:
    """Anisotropic TV of (B, C, H, W) -> (B,): sum of |vertical| + |horizontal| differences."""
    return (d[..., 1:, :] - d[..., :-1, :]).abs().flatten(1).sum(1) + (d[..., 1:] - d[..., :-1]).abs().flatten(1).sum(1)


def map_restore(model, x: torch.Tensor, y=None, steps: int = 20, lr: float = 0.02, tv: float = 1.0,
                seed: int = 0) -> torch.Tensor:
    """Restore float images (B, C, H, W) in [0, 1]: Adam on x_r from x, minimising
    -ELBO(x_r) + tv * TV(x_r - x), both in nats per image (the TV weight per pixel difference). One posterior
    draw with the same noise at every step, so the objective is deterministic. Each image's loss depends
    on that image only, so a batch restores its images independently. -> x_r (B, C, H, W)."""
    xr = x.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([xr], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            nll = model.log_weights(xr, y, 1, torch.Generator().manual_seed(seed)).neg_elbo()  # (B,)
            loss = nll.to(xr.device).float() + tv * total_variation(xr - x)
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            opt.step()
            with torch.no_grad():
                xr.clamp_(0.0, 1.0)
    return xr.detach()


def restoration_scores(model, images: np.ndarray, labels=None, steps: int = 20, lr: float = 0.02,
                       tv: float = 1.0, batch_size: int = 64, seed: int = 0, device="cpu",
                       progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """MAP-restoration score (N,) (mean |x - x_r|) and map (N, H, W) (channel mean of |x - x_r|), batched.
    Always fp32: with the network in bf16 the image gradients are rounded, Adam's normalised steps follow
    their noise: on 24 lesion phantoms (the test suite's phantom model, tv 0.1) the scores came out 1.57x
    larger and in another order (Spearman correlation with fp32 -0.42), so `--precision auto` leaves this
    score exact, also when called inside an autocast region."""
    model.eval()
    scores, maps = [], []
    for i in tqdm(range(0, len(images), batch_size), desc=f"MAP restoration (tv {tv:g})", disable=not progress,
                  leave=False):
        x = to_float(images[i : i + batch_size], device)
        y = labels_for(model, None if labels is None else labels[i : i + batch_size], device)
        with full_precision(x.device.type):
            m = (x - map_restore(model, x, y, steps, lr, tv, seed)).abs().mean(1)
        maps.append(m.float().cpu())
        scores.append(m.flatten(1).mean(1).double().cpu())
    return torch.cat(scores).numpy(), torch.cat(maps).numpy()


def can_heal(model) -> bool:
    """A VQ-VAE with a trained autoregressive code prior."""
    return hasattr(model, "decode_indices") and getattr(model, "prior", None) is not None


@torch.no_grad()
def vq_heal(model, x: torch.Tensor, y=None, threshold: float = 0.01) -> torch.Tensor:
    """Prior-guided healing (Pinaya et al. 2022, "Unsupervised brain imaging 3D anomaly detection and
    segmentation with transformers"): in raster order, a code whose probability under the prior, given the
    healed codes before it, is below ``threshold`` is replaced by the prior's most likely code there (the mode,
    not a draw, so a score is reproducible). x (B, C, H, W) -> the decoded healed codes (B, C, H, W).
    One prior pass per position: position i's logits depend on codes < i only (the prior is causal)."""
    idx = model.encode(x, y).indices  # (B, h, w)
    codes = idx.flatten(1).clone()  # (B, L) raster order, as the prior reads them
    for i in range(codes.shape[1]):
        p = torch.softmax(model.prior(codes, y)[:, i].float(), dim=-1)  # (B, K)
        low = p.gather(1, codes[:, i : i + 1])[:, 0] < threshold
        codes[low, i] = p[low].argmax(1)
    return model.decode_indices(codes.view_as(idx)).float()


def healing_scores(model, images: np.ndarray, labels=None, threshold: float = 0.01, batch_size: int = 64,
                   device="cpu", progress: bool = False, precision: str = "fp32") -> tuple[np.ndarray, np.ndarray]:
    """VQ healing score (N,) (mean |x - healed|) and map (N, H, W), batched. ``precision="auto"``: encoder,
    prior and decoder in bf16 where native (the prior's probabilities are compared in fp32); "fp32" is exact."""
    from medivae.models.inference import fast_inference

    model.eval()
    scores, maps = [], []
    with fast_inference(model, precision):
        for i in tqdm(range(0, len(images), batch_size), desc=f"VQ healing (threshold {threshold:g})",
                      disable=not progress, leave=False):
            x = to_float(images[i : i + batch_size], device)
            y = labels_for(model, None if labels is None else labels[i : i + batch_size], device)
            m = (x - vq_heal(model, x, y, threshold)).abs().mean(1)
            maps.append(m.float().cpu())
            scores.append(m.flatten(1).mean(1).double().cpu())
    return torch.cat(scores).numpy(), torch.cat(maps).numpy()


# --- ensemble and trivial baselines -------------------------------------------------------------------------
def ensemble(val_scores: dict, scores: dict, names=ENSEMBLE_FROM) -> tuple[np.ndarray, list[str]]:
    """Mean of validation-standardised scores over the ``names`` both dicts have; -> (scores (N,), names used)."""
    calib = calibrate(val_scores, tuple(n for n in names if n in scores))
    return combined_score(scores, calib), list(calib)


def trivial_scores(images: np.ndarray, png: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """No-model scores of uint8 images (N, C, H, W), "higher = anomalous" in the direction named."""
    x = np.asarray(images, dtype=np.float64).reshape(len(images), -1)
    png = png_nats(images) if png is None else png
    return {"png_size": png, "mean_intensity": x.mean(1), "intensity_std": x.std(1)}


def capable(model) -> dict[str, bool]:
    """Which of the new scores this family supports."""
    return {"latent_gmm": has(model, "gaussian_latent"), "feature_res": True, "ssim_z": True,
            "restoration": has(model, "likelihood"), "vq_healing": can_heal(model)}
