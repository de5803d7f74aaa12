"""What ``medivae anomaly score`` computes, test labels aside: every score of every set, the default chosen on
validation data, the threshold's standardisation, localisation.

1. What normal looks like, from the training normals (:mod:`medivae.evaluation.anomaly.normative`).
2. Synthetic anomalies made from the validation normals (:mod:`medivae.evaluation.anomaly.synthetic`).
3. The hyperparameters of the tuned scorers, then the default score, chosen on validation normals against
   those synthetic anomalies (:mod:`medivae.evaluation.anomaly.selection`).
4. Every score and map of the scored split (and of the calibration normals, what the threshold needs).
The test split is only scored: nothing here reads its labels.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from medivae.data.phantoms import phantom_with_mask
from medivae.evaluation.anomaly import normative as nm
from medivae.evaluation.anomaly.calibration import calibrate, combined_score
from medivae.evaluation.anomaly.localisation import blurred_residual_baseline, pixel_metrics
from medivae.evaluation.anomaly.maps import gradient_maps
from medivae.evaluation.anomaly.passes import ImagePass, Scoring
from medivae.evaluation.anomaly.restoration import LR, STEPS
from medivae.evaluation.anomaly.scorers import COMBINED_FROM, ENSEMBLE_FROM, SCORERS, available, score_pass
from medivae.evaluation.anomaly.selection import PRIOR_DEFAULT, select_default, tune
from medivae.evaluation.anomaly.synthetic import foreign_patch
from medivae.models.family import has
from medivae.runtime.seeding import numpy_rng

N_PHANTOM_LESIONS = 48
TRAIN_CHUNK = 1024  # training normals are read this many at a time (statistics summed, never all held)
MAX_STANDARDISATION = 256  # training normals scored by every scorer to put the scores on one scale


@dataclass
class Protocol:
    """scores: set name ("val", "synthetic", "scored"[, "calibration"]) -> {score name: (N,)}; maps: set name ->
    {map name: (N, H, W)} (scored and synthetic sets); png: set name -> PNG sizes (N,) in nats; record:
    results.json["anomaly"]["protocol"]; z_score: the standardisation of ``combined``, from n_standardisation
    training normals; localisation."""

    scores: dict[str, dict[str, np.ndarray]]
    maps: dict[str, dict[str, np.ndarray]]
    png: dict[str, np.ndarray]
    record: dict
    z_score: dict
    n_standardisation: int
    localisation: dict = field(default_factory=dict)


def fit_normals(ctx: Scoring, train, val: ImagePass, reference) -> nm.Normals:
    """The training normals' statistics (:class:`~medivae.evaluation.anomaly.normative.Normals`), read
    TRAIN_CHUNK images at a time: codes, and the SSIM maps' per-pixel mean and std when there are >= 2.
    ``reference``: the feature extractor of ``feature_res`` (None: no such score)."""
    codes, dissimilarity = [], []
    for i in range(0, len(train), TRAIN_CHUNK):
        p = ImagePass(ctx, train.images[i : i + TRAIN_CHUNK], "training normals")
        codes.append(p.codes)
        dissimilarity.append(p.ssim[1])
    codes = np.concatenate(codes) if codes else val.codes
    normals = nm.Normals(nm.fit_latent_gaussian(codes), reference=reference)
    if reference is not None:
        normals.records["feature_res"] = {"extractor": reference.name, "folder": str(reference.folder)}
    if has(ctx.model, "gaussian_latent"):
        normals.gmm, normals.records["latent_gmm"] = nm.fit_latent_gmm(codes, val.codes, seed=ctx.seed)
    if len(train) >= 2:
        normals.ssim_norm = nm.fit_ssim_norm(dissimilarity)
        normals.records["ssim_z"] = {"normals": len(train), "std_offset": nm.NORM_STD_OFFSET}
    return normals


def tune_scorers(normals: nm.Normals, val: ImagePass, synthetic: ImagePass) -> tuple[dict, dict]:
    """Each available scorer with a hyperparameter, at every value of its grid on validation normals and
    synthetic anomalies; the best by their AUROC. -> ({scorer: value}, {scorer: its record})."""
    params, records = {}, {}
    for s in available(val.ctx.model, normals):
        if not s.grid:
            continue
        t0 = time.perf_counter()
        best, aurocs = tune(s.grid, lambda v, s=s: {"val": s.fn(val, normals, v)[0],
                                                      "synthetic": s.fn(synthetic, normals, v)[0]})
        params[s.name] = best
        per_s = len(s.grid) * (len(val) + len(synthetic)) / (time.perf_counter() - t0)
        records[s.name] = {s.param: best, f"val_auroc_by_{s.param}": {str(v): a for v, a in aurocs.items()},
                           "images_per_s": per_s}
    if "restoration" in records:
        records["restoration"].update(steps=STEPS, lr=LR)
    return params, records


def standardisation_normals(train, seed: int) -> np.ndarray:
    """uint8 images of at most MAX_STANDARDISATION training normals (a seeded subset): the normals whose mean and
    std put the scores on one scale for ``combined`` and ``ensemble``. Not the calibration normals: a threshold
    set on scores standardised with the statistics of its own calibration set is no longer conformal."""
    if len(train) <= MAX_STANDARDISATION:
        return train.images
    return train.images[np.sort(numpy_rng(seed, "standardisation").choice(len(train), MAX_STANDARDISATION,
                                                                          replace=False))]


def standardise(scores: dict, on: dict, names, key: str) -> list[str]:
    """Add ``key`` (the mean z-score over ``names``, mean and std of the set ``on``) to every set of ``scores``
    in place; returns the names used."""
    calib = calibrate(on, names)
    for s in scores.values():
        s[key] = combined_score(s, calib)
    return list(calib)


def run_protocol(ctx: Scoring, sets: dict, reference, gradient: bool = False, phantoms: bool = False) -> Protocol:
    """Everything of :mod:`this module <medivae.workflows.anomaly.protocol>` for ``sets``
    (``sets.scoring_sets``, with "calibration" when the threshold is set on other normals)."""
    v = sets["val"]
    passes = {"val": ImagePass(ctx, v.images, "validation normals")}
    normals = fit_normals(ctx, sets["train"], passes["val"], reference)
    synth = foreign_patch(v.images, ctx.seed)
    passes["synthetic"] = ImagePass(ctx, synth.images, "synthetic anomalies")
    passes["scored"] = ImagePass(ctx, sets["scored"].images, "scored images")
    params, tuned = tune_scorers(normals, passes["val"], passes["synthetic"])
    scores, maps = {}, {}
    for name, p in passes.items():
        scores[name], maps[name] = score_pass(p, normals, params)
    if "calibration" in sets:
        c = sets["calibration"]
        passes["calibration"] = ImagePass(ctx, c.images, "calibration normals")
        scores["calibration"] = score_pass(passes["calibration"], normals, params, only=COMBINED_FROM, maps=False)[0]
    std_images = standardisation_normals(sets["train"], ctx.seed)
    on = score_pass(ImagePass(ctx, std_images, "standardisation normals"), normals, params, maps=False)[0]
    z_score = calibrate(on, COMBINED_FROM)
    standardise(scores, on, COMBINED_FROM, "combined")
    used = standardise({k: s for k, s in scores.items() if k != "calibration"}, on, ENSEMBLE_FROM, "ensemble")
    record = protocol_record(ctx, normals, tuned, scores, used, len(v))
    for name in ("synthetic", "scored"):
        if has(ctx.model, "likelihood"):
            maps[name]["gradient"] = gradient_maps(passes[name])
    localisation = {"synthetic": localise(maps["synthetic"], synth.masks),
                    "synthetic_baseline": blurred_residual_baseline(synth.images, synth.masks, sets["train"].images)}
    if phantoms:
        localisation["phantoms"] = phantom_localisation(ctx, normals, params, sets["train"].images)
    png = {name: p.png_nats for name, p in passes.items()}
    return Protocol(scores, maps, png, record, z_score, len(std_images), localisation)


def protocol_record(ctx: Scoring, normals: nm.Normals, tuned: dict, scores: dict, ensemble: list, n_val: int) -> dict:
    """results.json["anomaly"]["protocol"]: what each scorer could do, its fitted statistics and tuning, the
    default and how it was chosen."""
    capable = {s.name: s.available(ctx.model, normals) for s in SCORERS if s.name in
               ("latent_gmm", "feature_res", "ssim_z", "restoration", "vq_healing")}
    capable["ssim_z"] = normals.ssim_norm is not None  # the family can, but not without >= 2 training normals
    chosen = select_default(scores["val"], scores["synthetic"], seed=ctx.seed)
    return {"capable": capable, **normals.records, **tuned,
            "ensemble": {"components": ensemble, "definition": "mean over components of (score - mean) / std, "
                         "mean and std of training normals; components fixed in advance"},
            # every score's validation-normal mean and std: runs of other seeds and families can be put on one
            # scale (z-scores) and averaged without reading a test label
            "val_normal_stats": calibrate(scores["val"], tuple(scores["val"])), **chosen,
            "selection": "AUROC of validation normals vs foreign-patch anomalies made from them (Tan et al. 2020); "
                         f"{PRIOR_DEFAULT!r} unless the best beats it with a paired bootstrap 95 % interval above 0; "
                         "no test image or label is read", "n_val": n_val,
            "synthetic": {"method": "foreign_patch", "factor": [0.3, 1.0], "size_fraction": [0.15, 0.5]}}


def localise(maps: dict[str, np.ndarray], masks: np.ndarray) -> dict:
    return {n: pixel_metrics(m, masks) for n, m in maps.items()}


def phantom_localisation(ctx: Scoring, normals: nm.Normals, params: dict, train_images: np.ndarray) -> dict:
    """Pixel AUROC / AUPRC / best Dice of every map on lesion phantoms with known masks, and the best model-free
    blurred-residual map on the same masks."""
    size = train_images.shape[-1]
    pairs = [phantom_with_mask(size, ctx.seed, i) for i in range(N_PHANTOM_LESIONS)]
    images = np.stack([p[0] for p in pairs])[:, None]  # (N, 1, H, W)
    masks = np.stack([p[1] for p in pairs])
    p = ImagePass(ctx, images, "lesion phantoms")
    maps = score_pass(p, normals, params)[1]
    if has(ctx.model, "likelihood"):
        maps["gradient"] = gradient_maps(p)
    return {"maps": localise(maps, masks), "baseline": blurred_residual_baseline(images, masks, train_images),
            "n_images": len(images)}
