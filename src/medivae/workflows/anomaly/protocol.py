"""What ``medivae anomaly score`` computes before it reads a test label: every score of every set, the
default chosen on validation data, the standardisation of ``combined``, localisation.

1. What normal looks like, from the training normals (:mod:`medivae.evaluation.anomaly.normative`).
2. Every kind of synthetic anomaly made from the validation normals (:mod:`medivae.evaluation.anomaly.synthetic`),
   the normals split in two halves, each anomaly with the normal it was made from.
3. The tuned scorers' hyperparameters on the first half; every score on the second, and the default by its
   mean rank over kinds there, with the leave-one-kind-out check (:mod:`medivae.evaluation.anomaly.selection`).
4. Every score and map of the scored split; the threshold's score on the calibration normals; ``combined`` and
   ``ensemble`` as z-scores of training normals.
The test split is only scored: nothing here reads its labels.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from medivae.data.phantoms import phantom_with_mask
from medivae.evaluation.anomaly import normative as nm
from medivae.evaluation.anomaly import selection as sel
from medivae.evaluation.anomaly.calibration import calibrate, combined_score
from medivae.evaluation.anomaly.detection import baseline_directions, trivial_scores
from medivae.evaluation.anomaly.localisation import blurred_residual_baseline, pixel_metrics
from medivae.evaluation.anomaly.maps import gradient_maps
from medivae.evaluation.anomaly.passes import ImagePass, Scoring
from medivae.evaluation.anomaly.restoration import LR, STEPS
from medivae.evaluation.anomaly.scorers import COMBINED_FROM, ENSEMBLE_FROM, SCORERS, available, score_pass
from medivae.evaluation.anomaly.synthetic import KINDS, suite
from medivae.models.family import has
from medivae.runtime.seeding import numpy_rng

N_PHANTOM_LESIONS = 48
TRAIN_CHUNK = 1024  # training normals are read this many at a time (statistics summed, never all held)
MAX_STANDARDISATION = 256  # training normals scored by every scorer to put the scores on one scale


@dataclass
class Protocol:
    """scores: set name -> {score name: (N,)} for "val" (the selection half of the validation normals),
    "scored", "val_all" (every validation normal: combined and its parts), "calibration" (the normals the
    threshold is set on: the same) and each kind of synthetic anomaly ("synthetic/<kind>", the selection half);
    maps: "scored" -> {map name: (N, H, W)}; png: PNG sizes (N,) in nats of the scored split; record:
    results.json["anomaly"]["protocol"]; z_score: the standardisation of ``combined``, from n_standardisation
    training normals; localisation."""

    scores: dict[str, dict[str, np.ndarray]]
    maps: dict[str, dict[str, np.ndarray]]
    png: np.ndarray
    record: dict
    z_score: dict
    n_standardisation: int
    localisation: dict = field(default_factory=dict)


@dataclass
class Half:
    """One half of the validation normals as passes: the normals and each kind of synthetic anomaly made
    from them (anomaly i from normal i)."""

    val: ImagePass
    synthetic: dict[str, ImagePass]
    masks: dict[str, np.ndarray]


def validation_halves(ctx: Scoring, val_images: np.ndarray, kinds=tuple(KINDS)) -> tuple[Half, Half]:
    """The validation normals and their synthetic anomalies in two halves (:func:`selection.split_halves`):
    (tuning, selection)."""
    made = suite(val_images, ctx.seed, kinds)
    halves = []
    for name, idx in zip(("tuning", "selection"), sel.split_halves(len(val_images), ctx.seed), strict=True):
        synthetic = {k: ImagePass(ctx, s.images[idx], f"{k} anomalies ({name})") for k, s in made.items()}
        halves.append(Half(ImagePass(ctx, val_images[idx], f"validation normals ({name})"), synthetic,
                           {k: s.masks[idx] for k, s in made.items()}))
    return halves[0], halves[1]


def fit_normals(ctx: Scoring, train, val: ImagePass, reference) -> nm.Normals:
    """The training normals' statistics (:class:`~medivae.evaluation.anomaly.normative.Normals`), read
    TRAIN_CHUNK images at a time: codes, and the SSIM maps' per-pixel mean and std when there are >= 2; the
    mixture's components by the BIC of ``val``'s codes. ``reference``: the extractor of ``feature_res`` (None:
    no such score)."""
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


def tune_scorers(normals: nm.Normals, half: Half) -> tuple[dict, dict]:
    """Each available scorer with a hyperparameter, at every value of its grid on the tuning half; the best by
    the mean AUROC over kinds. -> ({scorer: value}, {scorer: its record})."""
    params, records = {}, {}
    for s in available(half.val.ctx.model, normals, half.val.ctx.diffusion):
        if not s.grid:
            continue
        t0 = time.perf_counter()
        def run(v, s=s):
            return s.fn(half.val, normals, v)[0], {k: s.fn(p, normals, v)[0] for k, p in half.synthetic.items()}

        best, aurocs = sel.tune(s.grid, run)
        params[s.name] = best
        n = len(s.grid) * (len(half.val) + sum(len(p) for p in half.synthetic.values()))
        records[s.name] = {s.param: best, f"tuning_auroc_by_{s.param}": {str(v): a for v, a in aurocs.items()},
                           "tuned_on": f"{len(half.val)} validation normals and the anomalies made from them, "
                                       "not those the default is chosen on",
                           "images_per_s": n / (time.perf_counter() - t0)}
    if "restoration" in records:
        records["restoration"].update(steps=STEPS, lr=LR)
    if "diffusion_healing" in records:
        prior = half.val.ctx.diffusion
        frac = records["diffusion_healing"]["t_start_fraction"]
        records["diffusion_healing"].update(prior=prior.source, timesteps=prior.schedule.timesteps,
                                            t_start=prior.t_start(frac), ddim_steps=prior.heal_steps(frac))
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


def run_protocol(ctx: Scoring, sets: dict, reference, phantoms: bool = False) -> Protocol:
    """Everything of :mod:`this module <medivae.workflows.anomaly.protocol>` for ``sets``
    (``sets.scoring_sets``, with "calibration" when the threshold is set on other normals than the validation
    ones)."""
    tuning, selection = validation_halves(ctx, sets["val"].images)
    normals = fit_normals(ctx, sets["train"], tuning.val, reference)
    params, tuned = tune_scorers(normals, tuning)
    scored = ImagePass(ctx, sets["scored"].images, "scored images")
    scores, maps = {}, {}
    for name, p in {"val": selection.val, "scored": scored,
                    **{f"synthetic/{k}": q for k, q in selection.synthetic.items()}}.items():
        scores[name], maps[name] = score_pass(p, normals, params)
    scores["val_all"] = both_halves(tuning, normals, params, scores["val"])
    scores["calibration"] = scores["val_all"] if "calibration" not in sets else score_pass(
        ImagePass(ctx, sets["calibration"].images, "calibration normals"), normals, params, only=COMBINED_FROM,
        maps=False)[0]
    std_images = standardisation_normals(sets["train"], ctx.seed)
    on = score_pass(ImagePass(ctx, std_images, "standardisation normals"), normals, params, maps=False)[0]
    z_score = calibrate(on, COMBINED_FROM)
    standardise(scores, on, COMBINED_FROM, "combined")
    used = standardise({k: s for k, s in scores.items() if k not in ("calibration", "val_all")}, on, ENSEMBLE_FROM,
                       "ensemble")
    record = protocol_record(ctx, normals, tuned, scores, selection, used)
    if has(ctx.model, "likelihood"):
        maps["scored"]["gradient"] = gradient_maps(scored)
    localisation = synthetic_localisation(selection, maps, sets["train"].images)
    if phantoms:
        localisation["phantoms"] = phantom_localisation(ctx, normals, params, sets["train"].images)
    return Protocol(scores, {"scored": maps["scored"]}, scored.png_nats, record, z_score, len(std_images),
                    localisation)


def both_halves(tuning: Half, normals: nm.Normals, params: dict, selection_val: dict) -> dict:
    """The scores ``combined`` needs, of every validation normal (both halves): the default calibration set."""
    first = score_pass(tuning.val, normals, params, only=COMBINED_FROM, maps=False)[0]
    return {n: np.r_[first[n], selection_val[n]] for n in first}


def protocol_record(ctx: Scoring, normals: nm.Normals, tuned: dict, scores: dict, selection: Half,
                    ensemble: list) -> dict:
    """results.json["anomaly"]["protocol"]: what each scorer could do, its fitted statistics and tuning, the
    default, how it was chosen and how that choice fares on a kind of anomaly it did not see."""
    capable = {s.name: s.available(ctx.model, normals, ctx.diffusion) for s in SCORERS if s.name in
               ("latent_gmm", "feature_res", "ssim_z", "restoration", "vq_healing", "diffusion_healing")}
    capable["ssim_z"] = normals.ssim_norm is not None  # the family can, but not without >= 2 training normals
    synthetic = {k: scores[f"synthetic/{k}"] for k in selection.synthetic}
    val_trivial = trivial_scores(selection.val.images, selection.val.png_nats)
    syn_trivial = {k: trivial_scores(p.images, p.png_nats) for k, p in selection.synthetic.items()}
    return {"capable": capable, **normals.records, **tuned,
            "ensemble": {"components": ensemble, "definition": "mean over components of (score - mean) / std, "
                         "mean and std of training normals; components fixed in advance"},
            # every score's validation-normal mean and std: runs of other seeds and families can be put on one
            # scale (z-scores) and averaged without reading a test label
            "val_normal_stats": calibrate(scores["val"], tuple(scores["val"])),
            **sel.select_default(scores["val"], synthetic, seed=ctx.seed),
            "leave_one_kind_out": sel.leave_one_kind_out(scores["val"], synthetic, val_trivial, syn_trivial),
            "trivial_directions": synthetic_directions(val_trivial, syn_trivial),
            "selection": "the best mean rank over kinds of synthetic anomaly of the AUROC of validation normals "
                         "against the anomalies made from them, on the half of the validation normals no "
                         "hyperparameter was tuned on; no test image or label is read",
            "n_val": len(selection.val),
            "synthetic": {"kinds": list(selection.synthetic), "per_kind": len(selection.val),
                          "method": "medivae.evaluation.anomaly.synthetic"}}


def synthetic_directions(val_trivial: dict, syn_trivial: dict[str, dict]) -> dict[str, str]:
    """Each trivial baseline's direction on validation normals against every kind of synthetic anomaly."""
    pooled = {t: np.r_[v, *(s[t] for s in syn_trivial.values())] for t, v in val_trivial.items()}
    n = len(next(iter(val_trivial.values())))
    return baseline_directions(pooled, np.arange(len(next(iter(pooled.values())))) >= n)


def synthetic_localisation(selection: Half, maps: dict, normals: np.ndarray) -> dict:
    """Pixel metrics of every map (the gradient too, where the family has a likelihood) on the selection half's
    synthetic anomalies: pooled over kinds ("synthetic") and per kind, beside the model-free blurred-residual
    maps on the same masks."""
    kinds = list(selection.synthetic)
    by_kind = {k: dict(maps[f"synthetic/{k}"]) for k in kinds}
    if has(selection.val.ctx.model, "likelihood"):
        for k in kinds:
            by_kind[k]["gradient"] = gradient_maps(selection.synthetic[k])
    pooled = {m: np.concatenate([by_kind[k][m] for k in kinds]) for m in by_kind[kinds[0]]}
    masks = np.concatenate([selection.masks[k] for k in kinds])
    images = np.concatenate([selection.synthetic[k].images for k in kinds])
    return {"synthetic": localise(pooled, masks),
            "synthetic_baseline": blurred_residual_baseline(images, masks, normals),
            "synthetic_by_kind": {k: localise(by_kind[k], selection.masks[k]) for k in kinds}}


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
