"""``medivae anomaly score``: score a split with a run fitted on normals, then save and render.

Opens the run (:mod:`medivae.runfolder.run`), picks the images to score and the normals to calibrate on,
calls the pure scores of :mod:`medivae.evaluation.anomaly`, and writes scores.csv, maps.npz (every map
the family has, one float16 array (N, H, W) per map name, plus the legacy "maps" key), overlays.png,
maps.png (input, reconstruction and every map of the most and least anomalous images), roc.png and
``results.json["anomaly"]``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from pathlib import Path

import numpy as np

from medivae.data import load_dataset
from medivae.data.imageset import ImageSet, concat, label_code
from medivae.data.sources import same_source
from medivae.evaluation.anomaly import (
    COMBINED_FROM,
    AnomalyScores,
    calibrate,
    combined_score,
    conformal_guarantee,
    conformal_rank,
    detection_metrics,
    fit_latent_gaussian,
    mahalanobis,
    min_calibration,
    rates_at,
    score_images,
    threshold_at_fpr,
)
from medivae.evaluation.anomaly_scores import reconstructions
from medivae.evaluation.bootstrap import detection_ci
from medivae.evaluation.shift import normal_shift, two_sample_test
from medivae.models.family import require
from medivae.runfolder.results import RESULTS_FILE, merge_results, read_results
from medivae.runfolder.run import load_run
from medivae.runtime.errors import UserError
from medivae.runtime.io import atomic_write_text
from medivae.workflows.anomaly_protocol import extend_scores
from medivae.workflows.site import adaptation_sets, shared_images, site_normals

MAX_GRID_ROWS = 8  # maps.png: a few of the most and least anomalous images, one row each


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


def colour_scale(maps: np.ndarray) -> float:
    """The 99.5th percentile of a map over every image: one colour scale, so rows compare."""
    return max(float(np.quantile(maps, 0.995)), 1e-12)


def _overlay(ax, gray: np.ndarray, amap: np.ndarray, vmax: float) -> None:
    """A map (H, W) in inferno over a gray image (H, W) in [0, 1]."""
    import matplotlib

    ax.imshow(gray, cmap="gray", vmin=0, vmax=1)
    level = np.clip(amap.astype(np.float32) / vmax, 0, 1)
    heat = matplotlib.colormaps["inferno"](level)
    heat[..., 3] = 0.85 * level  # opacity grows with the score: quiet pixels show the anatomy
    ax.imshow(heat)


def plot_overlays(
    images: np.ndarray, maps: np.ndarray, titles: list[str], path: Path, per_row: int = 4
) -> Path:
    """(image, map over the image) pairs, ``per_row`` a row: images uint8 (N, C, H, W), maps (N, H, W)."""
    from matplotlib.figure import Figure

    n = len(images)
    cols = min(per_row, n)
    rows = -(-n // cols)
    fig = Figure(figsize=(2 * 1.7 * cols, 1.9 * rows), dpi=100)
    vmax = colour_scale(maps)
    for i in range(n):
        gray = images[i].mean(0) / 255.0
        r, c = divmod(i, cols)
        a = fig.add_subplot(rows, 2 * cols, r * 2 * cols + 2 * c + 1)
        a.imshow(gray, cmap="gray", vmin=0, vmax=1)
        a.set_title(titles[i], fontsize=6)
        b = fig.add_subplot(rows, 2 * cols, r * 2 * cols + 2 * c + 2)
        _overlay(b, gray, maps[i], vmax)
        b.set_title("anomaly map", fontsize=6)
        for ax in (a, b):
            ax.axis("off")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return Path(path)


def plot_map_grid(images: np.ndarray, recon: np.ndarray, maps: dict[str, np.ndarray], scales: dict[str, float],
                  titles: list[str], path: Path) -> Path:
    """Rows = images; columns = input, reconstruction, then each map over the input. images uint8
    (n, C, H, W); recon float (n, C, H, W) in [0, 1]; maps name -> (n, H, W), each drawn on its own colour
    scale ``scales[name]`` (shared by the rows, so a column compares images)."""
    from matplotlib.figure import Figure

    rows, cols = len(images), 2 + len(maps)
    fig = Figure(figsize=(1.35 * cols + 0.9, 1.4 * rows + 0.3), dpi=100)
    axes = fig.subplots(rows, cols, squeeze=False)
    for i in range(rows):
        gray = images[i].mean(0) / 255.0
        axes[i, 0].imshow(gray, cmap="gray", vmin=0, vmax=1)
        axes[i, 1].imshow(np.asarray(recon[i]).mean(0), cmap="gray", vmin=0, vmax=1)
        for j, (name, m) in enumerate(maps.items()):
            _overlay(axes[i, 2 + j], gray, m[i], scales[name])
        axes[i, 0].set_ylabel(titles[i], fontsize=6)
    for j, head in enumerate(["input", "reconstruction", *maps]):
        axes[0, j].set_title(head, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return Path(path)


# --- run-level: what ``api.anomaly_score`` calls ----------------------------------------------------------
def scoring_sets(cfg, normal_label: str, data: str | None, split: str) -> dict:
    """The images to score and the normals to calibrate on, without leaking training images.

    On the run's own source the scored split is that split's normals *as the run split them* plus
    the split's other-label images, so no normal the model trained on is ever scored as a test normal.
    Returns {"train", "val": normal ImageSets, "scored": ImageSet, "normal_code": int | None}.
    """
    own = load_dataset(cfg.data, progress=False)
    names = own["train"].label_names
    code = label_code(names, normal_label)
    if code is None:
        raise UserError(f"normal label {normal_label!r} is not one of the run's labels {list(names)}")
    normals = {k: v.subset(np.flatnonzero(v.labels == code)) for k, v in own.items()}
    if len(normals["val"]) < 2:
        raise UserError(
            "the run has fewer than 2 validation normals to calibrate on; refit with --val-fraction > 0"
        )
    same = data is None or same_source(data, cfg.data.source)
    full = load_dataset(dataclasses.replace(cfg.data, source=data or cfg.data.source, labels=()), progress=False)
    if split not in full:
        raise UserError(f"unknown split {split!r}; choose train, val or test")
    s = full[split]
    if same:
        others = s.subset(np.flatnonzero((s.labels != code) & (s.labels >= 0)))
        scored = concat([normals[split], others])
    else:
        scored = s
    scored_code = label_code(scored.label_names, normal_label)
    if len(scored) == 0:
        raise UserError(f"split {split!r} of {data or cfg.data.source} is empty")
    return {"train": normals["train"], "val": normals["val"], "scored": scored, "normal_code": scored_code,
            "same_source": same}


def with_adaptation(sets: dict, site: dict) -> None:
    """Fold an adapted run's site normals into ``sets`` (``scoring_sets``), in place: the adaptation normals
    join the training normals (the latent and SSIM statistics of what the model was trained on). Refused
    with one line when a scored image is one of the site normals (adaptation or held-out)."""
    clash = shared_images(sets["scored"].images, [site["adapt"], site["held_out"]])
    if clash:
        raise UserError(f"{clash} of the {len(sets['scored'])} images to score are normals the run was adapted "
                        f"with ({site['record']['normals']}); score other images")
    sets["train"] = concat([sets["train"], site["adapt"]])


def calibration_set(cfg, normal_label: str, source: str, scored_source: str, sets: dict) -> ImageSet:
    """The normal images of ``source`` (``site.site_normals``) for the threshold. None of them may be a
    training (including adaptation), validation or scored image of ``sets`` (``scoring_sets``), compared
    pixel for pixel."""
    if same_source(source, cfg.data.source):  # its normals include the ones the model was fitted on
        raise UserError("--calibration must not be the run's own source (the model was fitted on its normals); "
                        "the run's validation normals are the default calibration")
    if same_source(source, scored_source):
        raise UserError("--calibration must hold normals that are not scored: pass other images than --data")
    cal = site_normals(cfg, normal_label, source, "--calibration")
    shared = shared_images(cal.images, [sets[key] for key in ("train", "val", "scored")])
    if shared:
        raise UserError(f"--calibration {source}: {shared} of its {len(cal)} normal images are also training, "
                        "validation or scored images; calibrate on other normals")
    return cal


def shift_check(sets: dict, split: str, bootstrap: int, seed: int) -> dict:
    """``evaluation.shift.normal_shift`` against the training normals of: the validation normals, the
    ``--calibration`` normals when given, and the scored split's normals (when its labels say which they are,
    and they are not the validation or training normals themselves); with both of the last two, also the
    scored normals against the calibration normals ("scored_vs_calibration")."""
    checked = {"val": sets["val"].images}
    if "calibration" in sets:
        checked["calibration"] = sets["calibration"].images
    s, code = sets["scored"], sets["normal_code"]
    if code is not None and not (sets["same_source"] and split in ("train", "val")):
        checked["scored"] = s.images[s.labels == code]
    out = {"scored_split": split, **normal_shift(sets["train"].images, checked, seed, bootstrap)}
    if "calibration" in checked and "scored" in checked:  # what the threshold's bound needs: these two alike
        test = two_sample_test(checked["calibration"], checked["scored"], seed, bootstrap)
        if test is not None:
            out["scored_vs_calibration"] = test
    return out


def write_scores_csv(path: Path, scored, scores: dict[str, np.ndarray], is_anomaly, flagged) -> None:
    names = scored.label_names
    buf = io.StringIO()
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
              gradient=False, n_maps=16, batch_size=128, device="auto", precision="fp32",
              bootstrap=1000, calibration=None, progress=False) -> dict:  # fmt: skip
    """Score a split with a run fitted on normals; write scores.csv, maps, ROC and results.json["anomaly"].
    ``calibration``: a source of normal images from where the scored images come (another site, scanner or
    framing) to set the threshold on, instead of the run's validation normals. ``progress``: bars (stderr)
    over every scoring pass, the iterative restoration / healing passes included."""
    read_results(Path(run_dir) / RESULTS_FILE)  # fail now, not after the scoring, if it cannot be merged into
    run = load_run(run_dir, device=device)
    model, cfg, dev = run.model, run.config, run.device
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "anomaly"
    normal_label = normal_label or (cfg.data.labels[0] if len(cfg.data.labels) == 1 else None)
    if normal_label is None:
        raise UserError(
            "this run was not fitted on one label; pass --normal-label or use 'medivae anomaly fit'"
        )
    if not 0 < fpr < 1 or k < 1 or n_maps < 0 or bootstrap < 0:
        raise UserError(f"need 0 < --fpr < 1, --iwae-samples >= 1, --n-maps >= 0, --bootstrap >= 0 "
                        f"(got {fpr}, {k}, {n_maps}, {bootstrap})")
    if gradient:
        require(model, "likelihood", "anomaly score --gradient")
    sets = scoring_sets(cfg, normal_label, data, split)
    site = adaptation_sets(run_dir, cfg)  # None unless `medivae anomaly adapt` wrote this run
    if site is not None:
        with_adaptation(sets, site)
    calibrated_on: str | dict = "validation normals"
    if calibration is not None:
        sets["calibration"] = calibration_set(cfg, normal_label, calibration, data or cfg.data.source, sets)
        n_cal, what, fix = len(sets["calibration"]), f"normals in {calibration}", "add normals to it"
        calibrated_on = {"source": str(calibration), "normals": n_cal}
    elif site is not None and len(site["held_out"]):
        sets["calibration"] = site["held_out"]
        src = site["record"]["normals"]
        n_cal, what, fix = len(site["held_out"]), f"held-out normals of {src}", "adapt again with a larger --hold-out"
        calibrated_on = {"source": src, "normals": n_cal, "held_out_at_adaptation": True}
    else:
        n_cal, what, fix = len(sets["val"]), "validation normals", "refit with a larger --val-fraction"
    if conformal_rank(n_cal, fpr) > n_cal:  # before the scoring, not after
        raise UserError(f"{n_cal} {what} cannot bound the false-positive rate at {fpr:g}: need at least "
                        f"{min_calibration(fpr)}; {fix} or pass a larger --fpr")

    def run(name, grad=False, draws=k):
        s = sets[name]
        return score_images(model, s.images, s.labels, draws, batch_size, cfg.train.seed, dev, grad, precision,
                            progress, f"scoring {name} images")

    # the normal codes' Gaussian needs only the posterior means, so one draw is enough there
    codes = run("train", draws=1).codes if len(sets["train"]) > 1 else None
    val, scored = run("val"), run("scored", gradient)
    cal = run("calibration") if "calibration" in sets else val  # the normals the threshold is set on
    every = (val, scored) if cal is val else (val, scored, cal)
    gauss = fit_latent_gaussian(codes if codes is not None else val.codes)
    for r in every:
        r.scores["latent"] = mahalanobis(r.codes, gauss)
    calib = calibrate(val.scores)
    for r in every:
        r.scores["combined"] = combined_score(r.scores, calib)
    thr = threshold_at_fpr(cal.scores["combined"], fpr)
    result = {
        "normal_label": normal_label, "data": data or cfg.data.source, "split": split, "iwae_samples": k,
        "map": "gradient" if gradient else "residual", "n_scored": len(sets["scored"]),
        "calibration": {"normals": len(val.maps), "z_score": calib},
        "combined": {"components": list(calib), "candidates": list(COMBINED_FROM),
                     "definition": "mean over components of (score - mean) / std, mean and std of the validation "
                                   "normals; components fixed in advance (iwae_minus_png only under a discrete "
                                   "image likelihood), never chosen on test labels"},
        "threshold": {"score": "combined", "target_fpr": fpr, "value": thr,
                      "val_fpr": float((val.scores["combined"] > thr).mean()),
                      "calibrated_on": calibrated_on,
                      **conformal_guarantee(len(cal.maps), fpr)},
        "bootstrap": bootstrap,
    }  # fmt: skip
    # issue 21: new scores, the default chosen on validation + synthetic anomalies, baselines, localisation
    result.update(extend_scores(model, cfg, sets, val, scored, codes, dev, run_dir, k, batch_size, precision,
                                bootstrap, gradient, progress))
    title = f"normal = {normal_label!r}, {split} split"
    if site is not None:
        r = site["record"]
        result["adaptation"] = {"normals": r["normals"], "n_adapt": len(r["adapt"]), "n_held_out": len(r["held_out"]),
                                "epochs": r["epochs"], "from_run": r["from_run"]}
    result.update(_write_outputs(out, sets, scored, thr, n_maps, title, bootstrap, cfg.train.seed))
    result["normal_shift"] = shift_check(sets, split, bootstrap, cfg.train.seed)
    rank_by = result["protocol"]["default"]
    pick = panel(scored.scores[rank_by], min(n_maps, MAX_GRID_ROWS))
    if len(pick) and scored.named_maps:
        s = sets["scored"]
        recon = reconstructions(model, s.images[pick], s.labels[pick], batch_size, dev).numpy()
        result["files"]["map_grid"] = str(write_map_grid(out / "maps.png", s, scored, rank_by, pick, recon))
    result["threshold"].update(n_flagged=result.pop("n_flagged"), **result.pop("threshold_rates", {}))
    merge_results(run_dir / RESULTS_FILE, "anomaly", result)
    return result


def _write_outputs(out: Path, sets: dict, scored: AnomalyScores, thr: float, n_maps: int, title: str,
                   bootstrap: int = 0, seed: int = 0) -> dict:
    """scores.csv, maps.npz, overlays.png and (with labels) roc.png; returns the metric/file entries."""
    s, code = sets["scored"], sets["normal_code"]
    is_anomaly = None if code is None else (s.labels != code)
    combined = scored.scores["combined"]
    out.mkdir(parents=True, exist_ok=True)
    write_scores_csv(out / "scores.csv", s, scored.scores, is_anomaly, combined > thr)
    # "maps": what result["map"] names (the key readers had before every map was saved), then one per map
    named = {n: _half(m) for n, m in scored.named_maps.items()}
    np.savez_compressed(out / "maps.npz", maps=_half(scored.maps), **named)
    files = {"scores": str(out / "scores.csv"), "maps": str(out / "maps.npz")}
    pick = panel(combined, n_maps)
    if len(pick):
        names = [s.label_names[c] if c >= 0 else "?" for c in s.labels[pick]]
        titles = [f"#{i} {n} score {combined[i]:.2f}" for i, n in zip(pick, names, strict=True)]
        files["overlays"] = str(
            plot_overlays(s.images[pick], scored.maps[pick], titles, out / "overlays.png")
        )
    entry: dict = {"n_flagged": int((combined > thr).sum()), "files": files, "map_names": list(scored.named_maps)}
    if is_anomaly is None:
        return entry
    labelled = s.labels >= 0
    y = is_anomaly[labelled]
    entry.update(n_normal=int((~y).sum()), n_anomalous=int(y.sum()), prevalence=float(y.mean()) if len(y) else None)
    metrics = {n: detection_metrics(v[labelled], y) for n, v in scored.scores.items()}
    if any(m is None for m in metrics.values()):
        return entry
    # no model at all: "simpler image = anomaly"; a score that does not beat it learned little
    simplicity = -scored.png_nats
    entry.update(metrics=metrics, baselines={"png_simplicity": detection_metrics(simplicity[labelled], y)},
                 threshold_rates=rates_at(combined[labelled], y, thr))  # fmt: skip
    if bootstrap:  # anomalous and normal images resampled apart: the prevalence stays that of the split
        entry["ci95"] = {n: detection_ci(y, v[labelled], bootstrap, seed) for n, v in scored.scores.items()}
    files["roc"] = str(
        plot_roc({n: v[labelled] for n, v in scored.scores.items()}, y, out / "roc.png", title)
    )
    return entry


def panel(ranking: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ceil(n / 2) highest of ``ranking`` (most anomalous first), then the floor(n / 2) lowest."""
    order = np.argsort(-ranking, kind="stable")
    return np.concatenate([order[: (n + 1) // 2], order[::-1][: n // 2]]) if n else order[:0]


def _half(maps: np.ndarray) -> np.ndarray:
    """float16 to keep maps.npz small; clipped so a large gradient stays finite."""
    big = float(np.finfo(np.float16).max)
    return np.clip(maps, -big, big).astype(np.float16)


def write_map_grid(path: Path, s: ImageSet, scored: AnomalyScores, rank_by: str, pick: np.ndarray,
                   recon: np.ndarray) -> Path:
    """maps.png: the ``pick`` images (most and least anomalous by ``rank_by``), their reconstructions
    ``recon`` (n, C, H, W) and every map of ``scored.named_maps``, each map on one colour scale over the split."""
    names = [s.label_names[c] if 0 <= c < len(s.label_names) else "?" for c in s.labels[pick]]
    v = scored.scores[rank_by]
    titles = [f"#{i} {n}\n{rank_by} {v[i]:.3g}" for i, n in zip(pick, names, strict=True)]
    maps = {n: m[pick] for n, m in scored.named_maps.items()}
    scales = {n: colour_scale(m) for n, m in scored.named_maps.items()}
    return plot_map_grid(s.images[pick], recon, maps, scales, titles, path)
