"""Anomaly detection with a VAE trained on normal images only (An & Cho 2015; Baur et al. 2021).

Per-image scores, higher = more anomalous, from one batched pass:
  ``neg_elbo``        -log p(x|z) averaged over K posterior draws + the closed-form KL (nats);
  ``iwae``            the importance-weighted bound on -log p(x), same K draws (Burda et al. 2016);
  ``rec_error``       mean squared error between x and the decoded posterior mean;
  ``ssim``            1 - SSIM(x, reconstruction) (Wang et al. 2004): structure, not brightness;
  ``kl``              KL(q(z|x) || N(0, I));
  ``iwae_minus_png``  iwae minus the image's PNG size in nats: the input-complexity correction of
                      Serrà et al. 2020, since simple (smooth, low-contrast) images are likely under
                      any model, normal or not (Nalisnick et al. 2019);
  ``latent``          squared Mahalanobis distance of the posterior mean from the training normals' codes;
  ``combined``        the mean z-score (against validation normals) of ``ssim`` and ``iwae_minus_png``,
                      the two scores that do not reward an image merely for being simple.
Pixel maps: the reconstruction residual |x - x̂|, or the gradient of the negative ELBO with respect
to the input (Zimmerer et al. 2019), which points at the pixels that make the image unlikely.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medivae.data.imageset import label_code, to_float
from medivae.models.family import has, labels_for, require

SCORE_NAMES = ("neg_elbo", "iwae", "rec_error", "ssim", "kl", "iwae_minus_png", "latent")
COMBINED_FROM = ("ssim", "iwae_minus_png")


@dataclass
class AnomalyScores:
    """scores: name -> float64 (N,); maps: float32 (N, H, W) pixel maps; codes: (N, D) deterministic
    encodings (posterior means); png_nats: (N,) each image's lossless PNG size (the no-model baseline)."""

    scores: dict[str, np.ndarray]
    maps: np.ndarray
    codes: np.ndarray
    png_nats: np.ndarray | None = None


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
    return scores, (x - recon).abs().mean(1)


def ssim_maps(x: torch.Tensor, y: torch.Tensor, win: int = 7, data_range: float = 1.0) -> torch.Tensor:
    """Local SSIM (Wang et al. 2004) of image batches (B, C, H, W) -> (B, H - win + 1, W - win + 1).

    Uniform ``win`` x ``win`` window and sample covariances, as scikit-image's ``structural_similarity``
    defaults, so the mean over the map equals its score; batched instead of one image at a time.
    """
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ch = x.shape[1]
    kernel = torch.full((ch, 1, win, win), 1.0 / win**2, dtype=x.dtype, device=x.device)

    def mean(t):
        return torch.nn.functional.conv2d(t, kernel, groups=ch)

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
) -> AnomalyScores:
    """Score uint8 images (N, C, H, W); ``labels`` only for conditional models. Batched, no per-image loop.
    ``precision``: "fp32" (exact, the default for evaluation) or "auto" for generate.fast_inference's
    bf16 path where the hardware has it (scores keep fp32 sums; the networks run in bf16)."""
    from medivae.generate import fast_inference

    if k < 1:
        raise ValueError(f"k must be >= 1, not {k}")
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    parts: dict[str, list[torch.Tensor]] = {}
    maps = []
    with fast_inference(model, precision):
        for i in range(0, len(images), batch_size):
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
    if "iwae" in cat:  # a simple image is likely under any model; what counts is how much worse it does than PNG
        cat["iwae_minus_png"] = cat["iwae"] - png
    return AnomalyScores(cat, torch.cat(maps).numpy(), codes, png)


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


def threshold_at_fpr(normal_scores: np.ndarray, fpr: float) -> float:
    """The score above which at most ``fpr`` of the given normals fall."""
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"fpr must be in (0, 1), not {fpr}")
    return float(np.quantile(np.asarray(normal_scores, dtype=np.float64), 1.0 - fpr, method="higher"))


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


# --- rendering ----------------------------------------------------------------------------------------------
def plot_roc(scores: dict[str, np.ndarray], is_anomaly: np.ndarray, path: Path, title: str = "") -> Path:
    """One ROC curve per score in a PNG."""
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_auc_score, roc_curve

    fig = Figure(figsize=(4.5, 4.5), dpi=120)
    ax = fig.add_subplot()
    for name, s in scores.items():
        fpr, tpr, _ = roc_curve(is_anomaly, s)
        ax.plot(fpr, tpr, label=f"{name} (AUROC {roc_auc_score(is_anomaly, s):.3f})", lw=1.4)
    ax.plot([0, 1], [0, 1], color="0.7", ls="--", lw=1)
    ax.set(
        xlabel="false-positive rate", ylabel="true-positive rate", title=title, xlim=(0, 1), ylim=(0, 1.01)
    )
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return Path(path)


def plot_overlays(
    images: np.ndarray, maps: np.ndarray, titles: list[str], path: Path, per_row: int = 4
) -> Path:
    """(image, map over the image) pairs, ``per_row`` a row: images uint8 (N, C, H, W), maps (N, H, W)."""
    import matplotlib
    from matplotlib.figure import Figure

    n = len(images)
    cols = min(per_row, n)
    rows = -(-n // cols)
    fig = Figure(figsize=(2 * 1.7 * cols, 1.9 * rows), dpi=100)
    vmax = max(float(np.quantile(maps, 0.995)), 1e-12)  # one colour scale for every pair
    cmap = matplotlib.colormaps["inferno"]
    for i in range(n):
        gray = images[i].mean(0) / 255.0
        r, c = divmod(i, cols)
        a = fig.add_subplot(rows, 2 * cols, r * 2 * cols + 2 * c + 1)
        a.imshow(gray, cmap="gray", vmin=0, vmax=1)
        a.set_title(titles[i], fontsize=6)
        b = fig.add_subplot(rows, 2 * cols, r * 2 * cols + 2 * c + 2)
        b.imshow(gray, cmap="gray", vmin=0, vmax=1)
        level = np.clip(maps[i] / vmax, 0, 1)
        heat = cmap(level)
        heat[..., 3] = 0.85 * level  # opacity grows with the score: quiet pixels show the anatomy
        b.imshow(heat)
        b.set_title("anomaly map", fontsize=6)
        for ax in (a, b):
            ax.axis("off")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return Path(path)


# --- run-level: what ``api.anomaly_score`` calls ----------------------------------------------------------
def _concat(a, b):
    from medivae.data.imageset import ImageSet

    return ImageSet(
        np.concatenate([a.images, b.images]),
        np.concatenate([a.labels, b.labels]),
        a.label_names,
        meta={**a.meta, "n": len(a) + len(b)},
    )


def scoring_sets(cfg, normal_label: str, data: str | None, split: str) -> dict:
    """The images to score and the normals to calibrate on, without leaking training images.

    On the run's own source the scored split is that split's normals *as the run split them* plus
    the split's other-label images, so no normal the model trained on is ever scored as a test normal.
    Returns {"train", "val": normal ImageSets, "scored": ImageSet, "normal_code": int | None}.
    """
    import dataclasses

    from medivae.data import load_dataset
    from medivae.errors import UserError

    seed = cfg.train.seed
    own = load_dataset(cfg.data, seed, progress=False)
    names = own["train"].label_names
    code = label_code(names, normal_label)
    if code is None:
        raise UserError(f"normal label {normal_label!r} is not one of the run's labels {list(names)}")
    normals = {k: v.subset(np.flatnonzero(v.labels == code)) for k, v in own.items()}
    if len(normals["val"]) < 2:
        raise UserError(
            "the run has fewer than 2 validation normals to calibrate on; refit with --val-fraction > 0"
        )
    same = data is None or Path(data).expanduser().resolve() == Path(cfg.data.source).expanduser().resolve()
    full = load_dataset(dataclasses.replace(cfg.data, source=data or cfg.data.source, labels=()), seed, False)
    if split not in full:
        raise UserError(f"unknown split {split!r}; choose train, val or test")
    s = full[split]
    if same:
        others = s.subset(np.flatnonzero((s.labels != code) & (s.labels >= 0)))
        scored = _concat(normals[split], others)
    else:
        scored = s
    scored_code = label_code(scored.label_names, normal_label)
    if len(scored) == 0:
        raise UserError(f"split {split!r} of {data or cfg.data.source} is empty")
    return {"train": normals["train"], "val": normals["val"], "scored": scored, "normal_code": scored_code}


def write_scores_csv(path: Path, scored, scores: dict[str, np.ndarray], is_anomaly, flagged) -> None:
    import csv
    import io as _io

    from medivae.io import atomic_write_text

    names = scored.label_names
    buf = _io.StringIO()
    w = csv.writer(buf)
    w.writerow(["index", "label", "is_anomaly", *scores, "flagged"])
    for i in range(len(scored)):
        lab = int(scored.labels[i])
        w.writerow(
            [
                i,
                names[lab] if 0 <= lab < len(names) else "",
                "" if is_anomaly is None else int(is_anomaly[i]),
                *(f"{v[i]:.6g}" for v in scores.values()),
                int(flagged[i]),
            ]
        )
    atomic_write_text(path, buf.getvalue())


def score_run(run_dir, data=None, split="test", out=None, normal_label=None, fpr=0.05, k=16,
              gradient=False, n_maps=16, batch_size=128, device="auto", precision="fp32") -> dict:  # fmt: skip
    """Score a split with a run fitted on normals; write scores.csv, maps, ROC and results.json["anomaly"]."""
    from medivae.errors import UserError
    from medivae.results import merge_results, read_results
    from medivae.run import load_run

    read_results(Path(run_dir) / "results.json")  # fail now, not after the scoring, if it cannot be merged into
    run = load_run(run_dir, device=device)
    model, cfg, dev = run.model, run.config, run.device
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "anomaly"
    normal_label = normal_label or (cfg.data.labels[0] if len(cfg.data.labels) == 1 else None)
    if normal_label is None:
        raise UserError(
            "this run was not fitted on one label; pass --normal-label or use 'medivae anomaly fit'"
        )
    if not 0 < fpr < 1 or k < 1 or n_maps < 0:
        raise UserError(f"need 0 < --fpr < 1, --iwae-samples >= 1, --n-maps >= 0 (got {fpr}, {k}, {n_maps})")
    if gradient:
        require(model, "likelihood", "anomaly score --gradient")
    sets = scoring_sets(cfg, normal_label, data, split)

    def run(s, grad=False, draws=k):
        return score_images(model, s.images, s.labels, draws, batch_size, cfg.train.seed, dev, grad, precision)

    # the normal codes' Gaussian needs only the posterior means, so one draw is enough there
    codes = run(sets["train"], draws=1).codes if len(sets["train"]) > 1 else None
    val, scored = run(sets["val"]), run(sets["scored"], gradient)
    gauss = fit_latent_gaussian(codes if codes is not None else val.codes)
    for r in (val, scored):
        r.scores["latent"] = mahalanobis(r.codes, gauss)
    calib = calibrate(val.scores)
    for r in (val, scored):
        r.scores["combined"] = combined_score(r.scores, calib)
    thr = threshold_at_fpr(val.scores["combined"], fpr)
    result = {
        "normal_label": normal_label, "data": data or cfg.data.source, "split": split, "iwae_samples": k,
        "map": "gradient" if gradient else "residual", "n_scored": len(sets["scored"]),
        "calibration": {"normals": len(val.maps), "z_score": calib},
        "threshold": {"score": "combined", "target_fpr": fpr, "value": thr,
                      "val_fpr": float((val.scores["combined"] > thr).mean())},
    }  # fmt: skip
    result.update(_write_outputs(out, sets, scored, thr, n_maps, f"normal = {normal_label!r}, {split} split"))
    result["threshold"].update(n_flagged=result.pop("n_flagged"), **result.pop("threshold_rates", {}))
    merge_results(run_dir / "results.json", "anomaly", result)
    return result


def _write_outputs(out: Path, sets: dict, scored: AnomalyScores, thr: float, n_maps: int, title: str) -> dict:
    """scores.csv, maps.npz, overlays.png and (with labels) roc.png; returns the metric/file entries."""
    s, code = sets["scored"], sets["normal_code"]
    is_anomaly = None if code is None else (s.labels != code)
    combined = scored.scores["combined"]
    out.mkdir(parents=True, exist_ok=True)
    write_scores_csv(out / "scores.csv", s, scored.scores, is_anomaly, combined > thr)
    np.savez_compressed(out / "maps.npz", maps=scored.maps.astype(np.float16))
    files = {"scores": str(out / "scores.csv"), "maps": str(out / "maps.npz")}
    order = np.argsort(-combined)  # the most anomalous half of the panel first, then the most normal
    pick = np.concatenate([order[: (n_maps + 1) // 2], order[::-1][: n_maps // 2]]) if n_maps else order[:0]
    if len(pick):
        names = [s.label_names[c] if c >= 0 else "?" for c in s.labels[pick]]
        titles = [f"#{i} {n} score {combined[i]:.2f}" for i, n in zip(pick, names, strict=True)]
        files["overlays"] = str(
            plot_overlays(s.images[pick], scored.maps[pick], titles, out / "overlays.png")
        )
    entry: dict = {"n_flagged": int((combined > thr).sum()), "files": files}
    if is_anomaly is None:
        return entry
    labelled = s.labels >= 0
    y = is_anomaly[labelled]
    entry.update(n_normal=int((~y).sum()), n_anomalous=int(y.sum()))
    metrics = {n: detection_metrics(v[labelled], y) for n, v in scored.scores.items()}
    if any(m is None for m in metrics.values()):
        return entry
    # no model at all: "simpler image = anomaly"; a score that does not beat it learned little
    simplicity = -scored.png_nats
    entry.update(metrics=metrics, baselines={"png_simplicity": detection_metrics(simplicity[labelled], y)},
                 threshold_rates=rates_at(combined[labelled], y, thr))  # fmt: skip
    files["roc"] = str(
        plot_roc({n: v[labelled] for n, v in scored.scores.items()}, y, out / "roc.png", title)
    )
    return entry
