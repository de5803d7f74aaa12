"""The selection protocol of ``medivae anomaly score`` (issue 21): new scores, a default chosen on
validation data only, trivial baselines and localisation, added to what :func:`workflows.anomaly.score_run`
computes.

Selection never reads a test label: every score (and the restoration's TV weight) is compared by its AUROC
of validation normals against foreign-patch anomalies made from those same normals
(:mod:`medivae.evaluation.synthetic_anomalies`); the highest is recorded as the run's default when it beats
``ssim`` clearly (see :func:`select_default`), else ``ssim`` is. The test split is then only scored.
Trivial baselines (PNG size, mean intensity, intensity std) are reported beside, with the direction that
does better *on test* (which favours them) and bootstrap intervals.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from medivae.evaluation import anomaly_scores as xs
from medivae.evaluation.anomaly import (
    AnomalyScores,
    calibrate,
    combined_score,
    detection_metrics,
    fit_latent_gaussian,
    gradient_maps,
    mahalanobis,
    score_images,
)
from medivae.evaluation.bootstrap import detection_ci
from medivae.evaluation.localisation import blurred_residual_baseline, pad_to, pixel_metrics
from medivae.evaluation.synthetic_anomalies import foreign_patch
from medivae.models.family import has, labels_for

RESTORATION = {"steps": 20, "lr": 0.02}
RESTORATION_TV = (0.02, 0.1, 0.5)  # candidates, chosen on validation normals + synthetic anomalies
HEALING_THRESHOLDS = (0.001, 0.01, 0.05)  # Pinaya et al. 2022 used 0.005
N_PHANTOM_LESIONS = 48


PRIOR_DEFAULT = "ssim"  # the score every family has, kept unless another one is clearly better
SELECTION_BOOT = 1000


def synthetic_auroc(val: np.ndarray, synthetic: np.ndarray) -> float:
    """AUROC of one score: validation normals (0) against the synthetic anomalies made from them (1)."""
    y = np.r_[np.zeros(len(val)), np.ones(len(synthetic))].astype(bool)
    return detection_metrics(np.r_[val, synthetic], y)["auroc"]


def select_default(val_scores: dict, synth_scores: dict, exclude=(), prior: str | None = PRIOR_DEFAULT,
                   n_boot: int = SELECTION_BOOT, seed: int = 0) -> dict:
    """{"default": name, "val_auroc": {name: AUROC}, ...}: the score that best separates validation normals
    from synthetic anomalies made from them, but only when it beats ``prior`` clearly: the lower end of the
    paired bootstrap 95 % interval of AUROC(best) - AUROC(prior) over those same images is above 0. Else
    ``prior`` stays: a lead inside the noise of a few hundred images is not a reason to switch. Uses no test
    data, so no test label can change it."""
    from medivae.evaluation.bootstrap import auroc, statistic_ci

    names = [n for n in val_scores if n in synth_scores and n not in exclude]
    y = np.r_[np.zeros(len(val_scores[names[0]])), np.ones(len(synth_scores[names[0]]))].astype(bool)
    joined = {n: np.r_[val_scores[n], synth_scores[n]] for n in names}
    aurocs = {n: synthetic_auroc(val_scores[n], synth_scores[n]) for n in names}
    best = max(aurocs, key=lambda n: (aurocs[n], n))
    out = {"default": best, "val_auroc": aurocs, "best": best}
    if prior in aurocs and best != prior and n_boot > 0:
        def lead(yy, a, b):
            return None if yy.all() or not yy.any() else auroc(yy, a) - auroc(yy, b)

        ci = statistic_ci(lead, y, joined[best], joined[prior], n_boot=n_boot, seed=seed)
        out["lead_over_prior"] = {"prior": prior, "auroc_difference": aurocs[best] - aurocs[prior], "ci95": ci}
        if ci is None or ci[0] <= 0:
            out["default"] = prior
    return out


def _maps(model, images, labels, recon, device, extra=None, seed=0) -> dict[str, np.ndarray]:
    """Every map the family has for uint8 images (N, C, H, W): name -> (N, H, W)."""
    x = torch.from_numpy(np.asarray(images, dtype=np.float32) / 255.0)
    out = {"residual": (x - recon).abs().mean(1).numpy(),
           "ssim": pad_to(xs.dissimilarity_maps(images, recon).numpy(), x.shape[-1])}
    out.update(extra or {})
    if has(model, "likelihood") and "gradient" not in out:  # not again when scoring already made them
        parts = []
        for i in range(0, len(x), 128):
            lab = None if labels is None else labels[i : i + 128]
            parts.append(gradient_maps(model, x[i : i + 128].to(device), labels_for(model, lab, device), seed))
        out["gradient"] = torch.cat(parts).float().cpu().numpy()
    return out


def _localise(maps: dict, masks: np.ndarray) -> dict:
    return {n: pixel_metrics(m, masks) for n, m in maps.items()}


def extend_scores(model, cfg, sets: dict, val: AnomalyScores, scored: AnomalyScores, train_codes, device,
                  run_dir, k: int = 16, batch_size: int = 128, precision: str = "fp32",
                  bootstrap: int = 0, gradient: bool = False, progress: bool = False) -> dict:
    """Add the new scores to ``val.scores`` and ``scored.scores`` in place, and every map of the scored split
    to ``scored.named_maps`` (the iterative ones reused, not recomputed); return results.json entries
    "protocol", "trivial_baselines" and "localisation". ``precision`` applies to ``score_images`` (the
    synthetic anomalies') and VQ healing; reconstructions, SSIM statistics, features and the MAP restoration
    are fp32. ``progress``: bars over the passes."""
    from medivae.evaluation.features import load_or_fit_reference

    seed = cfg.train.seed
    v, s = sets["val"], sets["scored"]
    synth = foreign_patch(v.images, seed)
    syn = score_images(model, synth.images, v.labels, k, batch_size, seed, device, False, precision, progress,
                       "scoring synthetic anomalies")
    codes = train_codes if train_codes is not None else val.codes
    syn.scores["latent"] = mahalanobis(syn.codes, fit_latent_gaussian(codes))
    syn.scores["combined"] = combined_score(syn.scores, calibrate(val.scores))
    sets3 = {"val": (v.images, v.labels, val), "synthetic": (synth.images, v.labels, syn),
             "scored": (s.images, s.labels, scored)}
    record: dict = {"capable": xs.capable(model)}
    if has(model, "gaussian_latent"):
        gmm, record["latent_gmm"] = xs.fit_latent_gmm(codes, val.codes, seed=seed)
        for _, _, r in sets3.values():
            r.scores["latent_gmm"] = xs.latent_gmm_score(r.codes, gmm)
    ref = load_or_fit_reference(run_dir / "reference", sets["train"], {"purpose": "anomaly feature residual",
                                "source": str(cfg.data.source), "image_size": cfg.data.image_size},
                                progress=progress, device=device)
    recon = {}
    for name, (imgs, labs, r) in sets3.items():
        recon[name] = xs.reconstructions(model, imgs, labs, batch_size, device)
        r.scores["feature_res"] = xs.feature_residual(ref, imgs, recon[name])
    record["feature_res"] = {"extractor": ref.name, "folder": str(ref.folder)}
    extra_maps: dict[str, dict] = {}
    train = sets["train"]
    norm = None
    if train is not None and len(train) >= 2:  # the training normals' own SSIM maps: what normal variation is
        norm = xs.fit_ssim_norm(model, train.images, train.labels, batch_size, device)
        extra_maps["ssim_z"] = {}
        for name, (imgs, _, r) in sets3.items():
            r.scores["ssim_z"], extra_maps["ssim_z"][name] = xs.normative_ssim(imgs, recon[name], norm)
        record["ssim_z"] = {"normals": len(train), "std_offset": xs.NORM_STD_OFFSET}
    record["capable"]["ssim_z"] = norm is not None  # the family can, but not without >= 2 training normals
    if has(model, "likelihood"):
        def restore(i, lab, tv):
            return xs.restoration_scores(model, i, lab, tv=tv, seed=seed, device=device, batch_size=batch_size,
                                         progress=progress, **RESTORATION)  # fp32 always: see there
        extra_maps["restoration"] = _tuned("restoration", "tv", RESTORATION_TV, restore, sets3, record)
        record["restoration"].update(RESTORATION)
    if xs.can_heal(model):
        extra_maps["vq_healing"] = _tuned("vq_healing", "threshold", HEALING_THRESHOLDS, lambda i, lab, t:
                                          xs.healing_scores(model, i, lab, t, batch_size, device, progress,
                                                            precision), sets3, record)
    for _, _, r in sets3.values():
        r.scores["ensemble"], used = xs.ensemble(val.scores, r.scores)
    record["ensemble"] = {"components": used, "definition": "mean over components of (score - mean) / std, "
                          "mean and std of the validation normals; components fixed in advance"}
    chosen = select_default(val.scores, syn.scores)
    # every score's validation-normal mean and std: lets runs of other seeds and families be put on one
    # scale (z-scores) and averaged without reading a test label
    record["val_normal_stats"] = calibrate(val.scores, tuple(val.scores))
    record.update(chosen, selection="AUROC of validation normals vs foreign-patch anomalies made from them "
                  f"(Tan et al. 2020); {PRIOR_DEFAULT!r} unless the best beats it with a paired bootstrap 95 % "
                  "interval above 0; no test image or label is read", n_val=len(v),
                  synthetic={"method": "foreign_patch", "factor": [0.3, 1.0], "size_fraction": [0.15, 0.5]})
    out = {"protocol": record,
           "trivial_baselines": trivial_baselines(s.images, s.labels, sets["normal_code"], scored.png_nats,
                                                  bootstrap, seed)}
    syn_maps = _maps(model, synth.images, v.labels, recon["synthetic"], device,
                     {k_: m["synthetic"] for k_, m in extra_maps.items()}, seed)
    out["localisation"] = {"synthetic": _localise(syn_maps, synth.masks),
                           "synthetic_baseline": blurred_residual_baseline(synth.images, synth.masks,
                                                                           (sets["train"] or v).images)}
    known = {k_: m["scored"] for k_, m in extra_maps.items()}
    if gradient:  # scored.maps are the gradient maps (score_images(gradient=True)): reuse them
        known["gradient"] = scored.maps
    scored.named_maps = _maps(model, s.images, s.labels, recon["scored"], device, known, seed)
    if str(cfg.data.source).startswith("phantoms"):
        out["localisation"]["phantoms"] = phantom_localisation(model, sets["train"].images, device, seed,
                                                               record.get("restoration"), batch_size,
                                                               record.get("vq_healing"), norm, precision,
                                                               progress)
    return out


def _tuned(name: str, key: str, grid, fn, sets3, record) -> dict:
    """A score with one hyperparameter ``key``: every value of ``grid`` on validation normals and synthetic
    anomalies, the best by their AUROC, then the scored split with it only. fn(images, labels, value) ->
    (scores (N,), maps (N, H, W)). Adds ``name`` to each set's scores; returns the maps per set."""
    t0, n = time.perf_counter(), 0
    runs = {}
    for h in grid:
        runs[h] = {n_: fn(imgs, labs, h) for n_, (imgs, labs, _) in sets3.items() if n_ != "scored"}
        n += sum(len(r[0]) for r in runs[h].values())
    val_auc = {h: synthetic_auroc(r["val"][0], r["synthetic"][0]) for h, r in runs.items()}
    best = max(val_auc, key=lambda h: (val_auc[h], -h))
    imgs, labs, _ = sets3["scored"]
    runs[best]["scored"] = fn(imgs, labs, best)
    for n_, (_, _, r) in sets3.items():
        r.scores[name] = runs[best][n_][0]
    record[name] = {key: best, f"val_auroc_by_{key}": {str(h): a for h, a in val_auc.items()},
                    "images_per_s": (n + len(imgs)) / (time.perf_counter() - t0)}
    return {n_: m for n_, (_, m) in runs[best].items()}


def trivial_baselines(images, labels, normal_code, png, bootstrap: int = 0, seed: int = 0) -> dict:
    """name -> {"direction", "auroc", "auprc", "ci95"} on the scored split; the direction (anomalous =
    higher or lower) is the better one on these very labels, so the baseline is never handicapped."""
    if normal_code is None:
        return {}
    keep = labels >= 0
    y = labels[keep] != normal_code
    out = {}
    for name, v in xs.trivial_scores(images[keep], png[keep]).items():
        best = None
        for direction, sign in (("higher", 1.0), ("lower", -1.0)):
            m = detection_metrics(sign * v, y)
            if m is not None and (best is None or m["auroc"] > best["auroc"]):
                best = {"direction": direction, **m, "ci95": detection_ci(y, sign * v, bootstrap, seed)}
        if best is not None:
            out[name] = best
    return out


def phantom_localisation(model, normals, device, seed: int, restoration: dict | None, batch_size: int,
                         healing: dict | None = None, ssim_norm=None, precision: str = "fp32",
                         progress: bool = False) -> dict:
    """Pixel AUROC / AUPRC / best Dice of every map on lesion phantoms with known masks, and the best
    model-free blurred-residual map on the same masks. ``ssim_norm``: the training normals' SSIM-map
    statistics (``anomaly_scores.fit_ssim_norm``), for the ``ssim_z`` map."""
    from medivae.data.phantoms import phantom_with_mask

    size = normals.shape[-1]
    pairs = [phantom_with_mask(size, seed, i) for i in range(N_PHANTOM_LESIONS)]
    images = np.stack([p[0] for p in pairs])[:, None]  # (N, 1, H, W)
    masks = np.stack([p[1] for p in pairs])
    labels = np.zeros(len(images), dtype=np.int64)  # a conditional model fitted on the normal label: class 0
    extra = {}
    if restoration is not None:
        extra["restoration"] = xs.restoration_scores(model, images, labels, restoration["steps"],
                                                     restoration["lr"], restoration["tv"], batch_size, seed,
                                                     device, progress)[1]
    if healing is not None:
        extra["vq_healing"] = xs.healing_scores(model, images, labels, healing["threshold"], batch_size, device,
                                                progress, precision)[1]
    recon = xs.reconstructions(model, images, labels, batch_size, device)
    if ssim_norm is not None:
        extra["ssim_z"] = xs.normative_ssim(images, recon, ssim_norm)[1]
    maps = _maps(model, images, labels, recon, device, extra, seed)
    return {"maps": _localise(maps, masks), "baseline": blurred_residual_baseline(images, masks, normals),
            "n_images": len(images)}
