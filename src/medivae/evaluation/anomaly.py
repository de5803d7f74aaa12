"""Anomaly detection with a VAE trained on normal images only (An & Cho 2015; Baur et al. 2021).

Per-image scores, higher = more anomalous, from one batched pass:
  ``neg_elbo``        -log p(x|z) averaged over K posterior draws + the closed-form KL (nats);
  ``iwae``            the importance-weighted bound on -log p(x), same K draws (Burda et al. 2016);
  ``rec_error``       mean squared error between x and the decoded posterior mean;
  ``ssim``            1 - SSIM(x, reconstruction) (Wang et al. 2004): structure, not brightness;
  ``kl``              KL(q(z|x) || N(0, I));
  ``iwae_minus_png``  iwae minus the image's PNG size in nats: the input-complexity correction of
                      Serrà et al. 2020, since simple (smooth, low-contrast) images are likely under
                      any model, normal or not (Nalisnick et al. 2019). Both terms must be code
                      lengths of the 8-bit image, so it is computed only under a discrete image
                      likelihood (``is_discrete_image_likelihood``): a Bernoulli "NLL" of a perfectly
                      reconstructed gray image grows with its brightness, and a Gaussian one moves
                      with the arbitrary sigma;
  ``latent``          squared Mahalanobis distance of the posterior mean from the training normals' codes;
  ``combined``        the pre-registered default: the mean over COMBINED_FROM (``ssim``, plus
                      ``iwae_minus_png`` where it exists) of (score - mean) / std, mean and std of the
                      validation normals only. Fixed before any test image is seen; never chosen on test.
The threshold is conformal (Vovk et al. 2005; Bates et al. 2023): the ceil((n+1)(1-alpha))-th smallest of
n validation-normal scores (or of normals from the scored site, ``anomaly score --calibration``), so a new
normal exchangeable with them is flagged with probability <= alpha.
Pixel maps: the reconstruction residual |x - x̂|, or the gradient of the negative ELBO with respect
to the input (Zimmerer et al. 2019), which points at the pixels that make the image unlikely.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from medivae.data.imageset import to_float
from medivae.models.family import describe, extra_anomaly_scores, has, labels_for
from medivae.runtime.device import full_precision

SCORE_NAMES = ("neg_elbo", "iwae", "rec_error", "ssim", "kl", "iwae_minus_png", "latent")
COMBINED_FROM = ("ssim", "iwae_minus_png")


@dataclass
class AnomalyScores:
    """scores: name -> float64 (N,); maps: float32 (N, H, W) pixel maps (residual, or gradient when asked);
    codes: (N, D) deterministic encodings (posterior means); png_nats: (N,) each image's lossless PNG size
    (the no-model baseline); named_maps: map name -> (N, H, W), every map the family has, filled by
    ``workflows.anomaly_protocol.extend_scores`` for the scored split."""

    scores: dict[str, np.ndarray]
    maps: np.ndarray
    codes: np.ndarray
    png_nats: np.ndarray | None = None
    named_maps: dict[str, np.ndarray] = field(default_factory=dict)


@torch.no_grad()
def _score_batch(
    model, x: torch.Tensor, y, k: int, generator
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """x: float (B, C, H, W) -> per-sample score tensors (B,), codes (B, D) and residual maps (B, H, W).
    The likelihood scores need a family with an image likelihood; the others work for every family."""
    recon = model.reconstruct(x, y).float()
    scores = {
        "rec_error": (x - recon).pow(2).flatten(1).mean(1),
        "ssim": 1.0 - ssim_maps(x, recon).flatten(1).mean(1),
        "code": model.encode(x, y).mode().flatten(1),
    }
    if has(model, "likelihood"):
        lw = model.log_weights(x, y, k, generator)  # the family's importance weights, (K, B) float64
        scores.update(neg_elbo=lw.neg_elbo(), iwae=-(torch.logsumexp(lw.log_w, 0) - math.log(k)))
        if lw.kl is not None:
            scores["kl"] = lw.kl
    scores.update(extra_anomaly_scores(model, x, y))  # the family's own (e.g. vae_gan's discriminator)
    return scores, (x - recon).abs().mean(1)


def ssim_maps(x: torch.Tensor, y: torch.Tensor, win: int = 7, data_range: float = 1.0) -> torch.Tensor:
    """Local SSIM (Wang et al. 2004) of image batches (B, C, H, W) -> (B, H - win + 1, W - win + 1).

    Uniform ``win`` x ``win`` window and sample covariances, as scikit-image's ``structural_similarity``
    defaults, so the mean over the map equals its score; batched instead of one image at a time.
    Always in fp32, also inside a bf16 autocast region (``score_images(precision="auto")``): the variances
    are differences of local means, which bf16's 8-bit mantissa cancels away (it cut the `ssim` test AUROC
    of a PneumoniaMNIST run from 0.877 to 0.795).
    """
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    x, y = x.float(), y.float()
    ch = x.shape[1]
    kernel = torch.full((ch, 1, win, win), 1.0 / win**2, dtype=x.dtype, device=x.device)

    def mean(t):
        return torch.nn.functional.conv2d(t, kernel, groups=ch)

    with full_precision(x.device.type):
        mx, my = mean(x), mean(y)
        unbias = win**2 / (win**2 - 1)
        vx, vy = unbias * (mean(x * x) - mx * mx), unbias * (mean(y * y) - my * my)
        vxy = unbias * (mean(x * y) - mx * my)
        s = (2 * mx * my + c1) * (2 * vxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean(1)


def gradient_maps(model, x: torch.Tensor, y=None, seed: int = 0) -> torch.Tensor:
    """|d(-ELBO)/dx| (one posterior draw, fixed noise), (B, H, W). Needs a family with a likelihood;
    the model is in eval mode, so samples do not mix."""
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        nll = model.log_weights(x, y, 1, torch.Generator().manual_seed(seed)).neg_elbo()
        (grad,) = torch.autograd.grad(nll.sum(), x)
    return grad.abs().mean(1)


def png_nats(images: np.ndarray) -> np.ndarray:
    """Input complexity (Serrà et al. 2020): each uint8 image's lossless PNG size, in nats, (N,).
    A generic compressor works one image at a time; at ~0.1 ms an image it is not the bottleneck."""
    import io

    from PIL import Image

    out = np.empty(len(images))
    for i, img in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)).save(
            buf, "PNG", compress_level=9
        )
        out[i] = len(buf.getvalue()) * 8 * math.log(2)
    return out


def score_images(
    model,
    images: np.ndarray,
    labels: np.ndarray | None = None,
    k: int = 16,
    batch_size: int = 128,
    seed: int = 0,
    device: str | torch.device = "cpu",
    gradient: bool = False,
    precision: str = "fp32",
    progress: bool = False,
    desc: str = "scoring",
) -> AnomalyScores:
    """Score uint8 images (N, C, H, W); ``labels`` only for conditional models. Batched, no per-image loop.
    ``precision``: "fp32" (exact, the default for evaluation) or "auto" for generate.fast_inference's
    bf16 path where the hardware has it (scores keep fp32 sums; the networks run in bf16). ``progress``: a
    bar over the batches, labelled ``desc``."""
    from medivae.models.inference import fast_inference

    if k < 1:
        raise ValueError(f"k must be >= 1, not {k}")
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    parts: dict[str, list[torch.Tensor]] = {}
    maps = []
    with fast_inference(model, precision):
        for i in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress, leave=False):
            x = to_float(images[i : i + batch_size], device).contiguous(memory_format=torch.channels_last)
            y = labels_for(model, None if labels is None else labels[i : i + batch_size], device)
            s, m = _score_batch(model, x, y, k, gen)
            if gradient:
                m = gradient_maps(model, x, y, seed)
            for name, v in s.items():
                parts.setdefault(name, []).append(v.double().cpu())
            maps.append(m.float().cpu())
    cat = {n: torch.cat(v).numpy() for n, v in parts.items()}
    codes = cat.pop("code")
    png = png_nats(images)
    if "iwae" in cat and is_code_length(model):  # a simple image is likely under any model: what counts
        cat["iwae_minus_png"] = cat["iwae"] - png  # is how much worse it does than PNG, both in nats of 8 bits
    return AnomalyScores(cat, torch.cat(maps).numpy(), codes, png)


def is_code_length(model) -> bool:
    """True when -log p(x) is a code length of the 8-bit image (a discrete image likelihood)."""
    return describe(model).discrete_likelihood


# --- calibration on normals --------------------------------------------------------------------------------
def fit_latent_gaussian(codes: np.ndarray, shrink: float = 1e-3) -> dict[str, np.ndarray]:
    """Mean and precision of normal codes (N, D); a little ridge keeps the precision finite."""
    mean = codes.mean(0)
    cov = np.cov(codes, rowvar=False).reshape(codes.shape[1], codes.shape[1])
    cov += shrink * np.trace(cov) / len(cov) * np.eye(len(cov)) + 1e-9 * np.eye(len(cov))
    return {"mean": mean, "precision": np.linalg.inv(cov)}


def mahalanobis(codes: np.ndarray, gauss: dict[str, np.ndarray]) -> np.ndarray:
    d = codes - gauss["mean"]
    return np.einsum("nd,de,ne->n", d, gauss["precision"], d)


def calibrate(val_scores: dict[str, np.ndarray], names=COMBINED_FROM) -> dict[str, tuple[float, float]]:
    """name -> (mean, std) of validation-normal scores, for z-scoring (the names the family has)."""
    out = {}
    for n in (n for n in names if n in val_scores):
        v = np.asarray(val_scores[n], dtype=np.float64)
        out[n] = (float(v.mean()), float(max(v.std(), 1e-12)))
    return out


def combined_score(scores: dict[str, np.ndarray], calibration: dict[str, tuple[float, float]]) -> np.ndarray:
    """Mean z-score over the calibrated components: puts nats, MSE and distances on one scale."""
    z = [(np.asarray(scores[n]) - mu) / sd for n, (mu, sd) in calibration.items()]
    return np.mean(z, axis=0)


def conformal_rank(n: int, alpha: float) -> int:
    """k = ceil((n+1)(1-alpha)): the rank of the conformal threshold among n calibration scores."""
    return math.ceil((n + 1) * (1.0 - alpha) - 1e-9)  # -1e-9: (n+1)(1-alpha) exact in reals, not in floats


def min_calibration(alpha: float) -> int:
    """The fewest calibration normals for which a threshold at false-positive rate ``alpha`` exists."""
    return math.ceil(1.0 / alpha - 1.0 - 1e-9)


def threshold_at_fpr(normal_scores: np.ndarray, fpr: float) -> float:
    """The conformal threshold (split-conformal outlier test; Vovk et al. 2005, Bates et al. 2023): the
    k-th smallest of the n calibration normals, k = ceil((n+1)(1-fpr)). A new normal exchangeable with
    them scores above it with probability (n+1-k)/(n+1) <= fpr (marginally over the calibration draw).
    Raises ValueError when n < 1/fpr - 1: then no calibration score is high enough."""
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"fpr must be in (0, 1), not {fpr}")
    s = np.sort(np.asarray(normal_scores, dtype=np.float64))
    k = conformal_rank(len(s), fpr)
    if k > len(s):
        raise ValueError(f"{len(s)} validation normals cannot bound the false-positive rate at {fpr:g}: "
                         f"need at least {min_calibration(fpr)} (raise --val-fraction or --fpr)")
    return float(s[k - 1])


def conformal_guarantee(n: int, fpr: float) -> dict:
    """What the conformal threshold promises, for results.json and the report."""
    k = conformal_rank(n, fpr)
    return {"method": "conformal", "n_calibration": n, "rank": k,
            "expected_fpr_bound": (n + 1 - k) / (n + 1),
            "guarantee": f"a new normal image exchangeable with the {n} validation normals is flagged with "
                         f"probability <= {fpr:g} (at most {(n + 1 - k) / (n + 1):.4f}; split-conformal, "
                         "averaged over the draw of the validation set)"}


def detection_metrics(scores: np.ndarray, is_anomaly: np.ndarray) -> dict[str, float] | None:
    """AUROC and AUPRC (anomaly = positive class); None when only one class is present."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    is_anomaly = np.asarray(is_anomaly, dtype=bool)
    if is_anomaly.all() or not is_anomaly.any():
        return None
    return {
        "auroc": float(roc_auc_score(is_anomaly, scores)),
        "auprc": float(average_precision_score(is_anomaly, scores)),
    }


def rates_at(scores: np.ndarray, is_anomaly: np.ndarray, threshold: float) -> dict[str, float]:
    """False-positive and true-positive rates of ``score > threshold``."""
    flagged = np.asarray(scores) > threshold
    is_anomaly = np.asarray(is_anomaly, dtype=bool)
    fpr = float(flagged[~is_anomaly].mean()) if (~is_anomaly).any() else float("nan")
    tpr = float(flagged[is_anomaly].mean()) if is_anomaly.any() else float("nan")
    return {"fpr": fpr, "tpr": tpr}


def map_contrast(amap: np.ndarray, mask: np.ndarray) -> float:
    """Mean map value inside ``mask`` divided by the mean outside it (> 1: the map points at the mask)."""
    mask = np.asarray(mask, dtype=bool)
    return float(amap[mask].mean() / max(amap[~mask].mean(), 1e-12))
