"""``medivae anomaly score``: plan (which images, which normals), compute (:mod:`.protocol`), then write
(:mod:`.outputs`, ``results.json["anomaly"]``).

results.json["anomaly"] keys: normal_label, data, split, iwae_samples, map ("residual" or "gradient": what
maps.npz["maps"] is), n_scored, calibration {normals, z_score}, combined {components, candidates, definition},
threshold {score, target_fpr, value, val_fpr, calibrated_on, method, n_calibration, rank, expected_fpr_bound,
guarantee, n_flagged[, fpr, tpr]}, bootstrap, protocol, trivial_baselines, localisation, files, map_names,
normal_shift[, adaptation]; with labels also n_normal, n_anomalous, prevalence, metrics {score: {auroc, auprc}},
baselines, ci95, and default_beaten_by {trivial baseline: its AUROC} (every trivial baseline, its direction
fixed on validation data, whose AUROC is above the default score's; {} when none is).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medivae.data.imageset import label_code
from medivae.evaluation.anomaly.calibration import (
    conformal_guarantee,
    conformal_rank,
    min_calibration,
    threshold_at_fpr,
)
from medivae.evaluation.anomaly.detection import (
    baseline_directions,
    default_beaten_by,
    detection_metrics,
    rates_at,
    signed,
    trivial_scores,
)
from medivae.evaluation.anomaly.passes import ImagePass, Scoring
from medivae.evaluation.anomaly.scorers import COMBINED_FROM
from medivae.evaluation.bootstrap import detection_ci
from medivae.models.family import require
from medivae.runfolder.results import RESULTS_FILE, merge_results, read_results
from medivae.runfolder.run import Run, load_run
from medivae.runtime.constants import BOOTSTRAP_RESAMPLES
from medivae.runtime.errors import UserError
from medivae.runtime.io import relocated, staged_folder
from medivae.workflows.anomaly.outputs import MAX_GRID_ROWS, panel, write_files, write_map_grid
from medivae.workflows.anomaly.protocol import Protocol, run_protocol
from medivae.workflows.anomaly.sets import calibration_set, scoring_sets, shift_check, with_adaptation
from medivae.workflows.site import adaptation_sets


@dataclass(frozen=True)
class ScoreOptions:
    """What ``medivae anomaly score`` takes besides the run, the source and the device. ``out``: the folder of
    the files (default RUN/anomaly); ``normal_label``: default the label the run was fitted on; ``k``: posterior
    draws per image; ``gradient``: maps.npz["maps"] from |d(-ELBO)/dx| instead of residuals; ``n_maps``: images in
    overlays.png; ``precision``: "fp32" or "auto" (bf16 networks where native); ``bootstrap``: resamples for 95 %
    intervals (0: none); ``calibration``: a source of normals from the scored site to set the threshold on."""

    split: str = "test"
    out: Path | None = None
    normal_label: str | None = None
    fpr: float = 0.05
    k: int = 16
    gradient: bool = False
    n_maps: int = 16
    batch_size: int = 128
    precision: str = "fp32"
    bootstrap: int = BOOTSTRAP_RESAMPLES
    calibration: str | None = None

    def __post_init__(self):
        if not 0 < self.fpr < 1 or self.k < 1 or self.n_maps < 0 or self.bootstrap < 0:
            raise UserError(f"need 0 < --fpr < 1, --iwae-samples >= 1, --n-maps >= 0, --bootstrap >= 0 "
                            f"(got {self.fpr}, {self.k}, {self.n_maps}, {self.bootstrap})")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, not {self.batch_size}")


@dataclass
class ScoringPlan:
    """What is scored and against what: the opened run, the sets (``sets.scoring_sets``, "calibration" added
    when the threshold is set on other normals), the adaptation record, where the threshold is set."""

    run: Run
    out: Path
    normal_label: str
    data: str
    sets: dict
    site: dict | None
    calibrated_on: str | dict


def plan_scoring(run_dir: Path, data: str | None, opts: ScoreOptions, device: str) -> ScoringPlan:
    """Open the run and pick the sets; every refusal (one line) before any scoring."""
    read_results(run_dir / RESULTS_FILE)  # fail now, not after the scoring, if it cannot be merged into
    run = load_run(run_dir, device=device)
    cfg = run.config
    normal_label = opts.normal_label or (cfg.data.labels[0] if len(cfg.data.labels) == 1 else None)
    if normal_label is None:
        raise UserError("this run was not fitted on one label; pass --normal-label or use 'medivae anomaly fit'")
    if cfg.label_names and label_code(cfg.label_names, normal_label) is None:  # before any image is read
        raise UserError(f"normal label {normal_label!r} is not one of the run's labels {list(cfg.label_names)}")
    if opts.gradient:
        require(run.model, "likelihood", "anomaly score --gradient")
    sets = scoring_sets(cfg, normal_label, data, opts.split)
    site = adaptation_sets(run_dir, cfg)  # None unless `medivae anomaly adapt` wrote this run
    if site is not None:
        with_adaptation(sets, site)
    calibrated_on: str | dict = "validation normals"
    n_cal, what, fix = len(sets["val"]), "validation normals", "refit with a larger --val-fraction"
    if opts.calibration is not None:
        sets["calibration"] = calibration_set(cfg, normal_label, opts.calibration, data or cfg.data.source, sets)
        n_cal, what, fix = len(sets["calibration"]), f"normals in {opts.calibration}", "add normals to it"
        calibrated_on = {"source": str(opts.calibration), "normals": n_cal}
    elif site is not None and len(site["held_out"]):
        sets["calibration"], src = site["held_out"], site["record"]["normals"]
        n_cal, what, fix = len(sets["calibration"]), f"held-out normals of {src}", \
            "adapt again with a larger --hold-out"
        calibrated_on = {"source": src, "normals": n_cal, "held_out_at_adaptation": True}
    if conformal_rank(n_cal, opts.fpr) > n_cal:  # before the scoring, not after
        raise UserError(f"{n_cal} {what} cannot bound the false-positive rate at {opts.fpr:g}: need at least "
                        f"{min_calibration(opts.fpr)}; {fix} or pass a larger --fpr")
    out = Path(opts.out) if opts.out is not None else run_dir / "anomaly"
    return ScoringPlan(run, out, normal_label, str(data or cfg.data.source), sets, site, calibrated_on)


def compute(plan: ScoringPlan, opts: ScoreOptions, progress: bool) -> tuple[Protocol, Scoring]:
    """Every score of every set (:func:`.protocol.run_protocol`)."""
    from medivae.evaluation.features import load_or_fit_reference

    run, cfg = plan.run, plan.run.config
    ctx = Scoring(run.model, run.device, opts.batch_size, opts.precision, opts.k, cfg.train.seed, progress,
                  normal_class=label_code(cfg.label_names, plan.normal_label), diffusion=run.diffusion_prior())
    reference = load_or_fit_reference(run.folder / "reference", plan.sets["train"],
                                      {"purpose": "anomaly feature residual", "source": str(cfg.data.source),
                                       "image_size": cfg.data.image_size}, progress=progress,
                                      device=run.device)
    proto = run_protocol(ctx, plan.sets, reference, phantoms=str(cfg.data.source).startswith("phantoms"))
    return proto, ctx


def score_run(run_dir, data: str | None = None, opts: ScoreOptions | None = None, device: str = "auto",
              progress: bool = False) -> dict:
    """Score a split with a run fitted on normals; write the files (:mod:`.outputs`) and
    results.json["anomaly"] (module docstring), which is also returned."""
    opts = opts or ScoreOptions()
    run_dir = Path(run_dir)
    plan = plan_scoring(run_dir, data, opts, device)
    proto, ctx = compute(plan, opts, progress)
    result = summary(plan, opts, proto)
    with staged_folder(plan.out) as stage:  # the folder's files all together, or the earlier ones left as they were
        entry = write(dataclasses.replace(plan, out=stage), opts, proto, result["threshold"]["value"], ctx)
        result.update(entry, files=relocated(entry["files"], stage, plan.out))
        result["normal_shift"] = shift_check(plan.sets, opts.split, opts.bootstrap, ctx.seed)
    result["threshold"].update(n_flagged=result.pop("n_flagged"), **result.pop("threshold_rates", {}))
    merge_results(run_dir / RESULTS_FILE, "anomaly", result)
    return result


def summary(plan: ScoringPlan, opts: ScoreOptions, proto: Protocol) -> dict:
    """The results.json entries that need no labels: the settings, the threshold and how it was set."""
    val, cal = proto.scores["val_all"], proto.scores["calibration"]  # cal: the normals the threshold is set on
    thr = threshold_at_fpr(cal["combined"], opts.fpr)
    result = {
        "normal_label": plan.normal_label, "data": plan.data, "split": opts.split, "iwae_samples": opts.k,
        "map": "gradient" if opts.gradient else "residual", "n_scored": len(plan.sets["scored"]),
        "calibration": {"normals": proto.n_standardisation, "z_score": proto.z_score,
                        "standardised_on": "training normals"},
        "combined": {"components": list(proto.z_score), "candidates": list(COMBINED_FROM),
                     "definition": "mean over components of (score - mean) / std, mean and std of training normals "
                                   "(not of the normals the threshold is set on, so it stays conformal); components "
                                   "fixed in advance (iwae_minus_png only under a discrete image likelihood), never "
                                   "chosen on test labels"},
        "threshold": {"score": "combined", "target_fpr": opts.fpr, "value": thr,
                      "val_fpr": float((val["combined"] > thr).mean()), "calibrated_on": plan.calibrated_on,
                      **conformal_guarantee(len(cal["combined"]), opts.fpr)},
        "bootstrap": opts.bootstrap, "protocol": proto.record, "localisation": proto.localisation,
    }  # fmt: skip
    if plan.site is not None:
        r = plan.site["record"]
        result["adaptation"] = {"normals": r["normals"], "n_adapt": len(r["adapt"]), "n_held_out": len(r["held_out"]),
                                "epochs": r["epochs"], "from_run": r["from_run"]}
    return result


def write(plan: ScoringPlan, opts: ScoreOptions, proto: Protocol, thr: float, ctx: Scoring) -> dict:
    """The files of the scored split and the results.json entries that read its labels."""
    s, code = plan.sets["scored"], plan.sets["normal_code"]
    scores, maps = proto.scores["scored"], proto.maps["scored"]
    is_anomaly = None if code is None else (s.labels != code)
    combined = scores["combined"]
    title = f"normal = {plan.normal_label!r}, {opts.split} split"
    files = write_files(plan.out, s, scores, maps, "gradient" if opts.gradient else "residual", is_anomaly,
                        combined > thr, opts.n_maps, title)
    entry: dict = {"n_flagged": int((combined > thr).sum()), "files": files, "map_names": list(maps)}
    pick = panel(scores[proto.record["default"]], min(opts.n_maps, MAX_GRID_ROWS))
    if len(pick) and maps:
        recon = ImagePass(ctx, s.images[pick], "map figure").recon.numpy()
        files["map_grid"] = str(write_map_grid(plan.out / "maps.png", s, scores[proto.record["default"]],
                                               proto.record["default"], maps, pick, recon))
    entry["trivial_baselines"] = {}
    if is_anomaly is not None:
        entry.update(labelled_metrics(s.labels, is_anomaly, scores, proto.png, thr, opts.bootstrap, ctx.seed))
        entry["trivial_baselines"] = trivial_baselines(s, is_anomaly, proto.png, plan.sets, proto, opts.bootstrap,
                                                       ctx.seed)
        default = proto.record["default"]
        if default in entry.get("metrics", {}):  # the honest line: a baseline with no model does better
            entry["default_beaten_by"] = default_beaten_by(entry["metrics"][default]["auroc"],
                                                           entry["trivial_baselines"])
    return entry


def labelled_metrics(labels, is_anomaly, scores: dict, png: np.ndarray, thr: float, bootstrap: int,
                     seed: int) -> dict:
    """With labels: counts, prevalence, each score's AUROC / AUPRC (and bootstrap intervals), the rates of the
    threshold."""
    labelled = labels >= 0
    y = is_anomaly[labelled]
    entry = {"n_normal": int((~y).sum()), "n_anomalous": int(y.sum()),
             "prevalence": float(y.mean()) if len(y) else None}
    metrics = {n: detection_metrics(v[labelled], y) for n, v in scores.items()}
    if any(m is None for m in metrics.values()):
        return entry
    # no model at all: "simpler image = anomaly"; a score that does not beat it learned little
    entry.update(metrics=metrics, baselines={"png_simplicity": detection_metrics(-png[labelled], y)},
                 threshold_rates=rates_at(scores["combined"][labelled], y, thr))
    if bootstrap:  # anomalous and normal images resampled apart: the prevalence stays that of the split
        entry["ci95"] = {n: detection_ci(y, v[labelled], bootstrap, seed) for n, v in scores.items()}
    return entry


def trivial_baselines(s, is_anomaly, png: np.ndarray, sets: dict, proto: Protocol, bootstrap: int,
                      seed: int) -> dict:
    """name -> {"direction", "direction_fixed_on", "auroc", "auprc", "ci95"} of each trivial baseline on the
    labelled images of the scored split ``s``. The direction (anomalous = higher or lower) is fixed before these
    labels are read: on the scored source's labelled validation split when it has both classes, else on the
    validation normals against the synthetic anomalies."""
    if sets["val_labelled"] is not None:
        images, y_val = sets["val_labelled"]
        directions, fixed_on = baseline_directions(trivial_scores(images), y_val), "labelled validation images"
    else:
        directions, fixed_on = proto.record["trivial_directions"], "validation normals vs synthetic anomalies"
    keep = s.labels >= 0
    y = is_anomaly[keep]
    out = {}
    for name, v in trivial_scores(s.images[keep], png[keep]).items():
        v = signed(v, directions[name])
        m = detection_metrics(v, y)
        if m is not None:
            out[name] = {"direction": directions[name], "direction_fixed_on": fixed_on, **m,
                         "ci95": detection_ci(y, v, bootstrap, seed)}
    return out
