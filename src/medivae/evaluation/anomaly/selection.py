"""Choosing without test labels: the default score and the scorers' hyperparameters, on validation normals and
synthetic anomalies made from them (:mod:`.synthetic`). No test image or label is read here.
"""

from __future__ import annotations

import numpy as np

from medivae.evaluation.anomaly.detection import detection_metrics

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
    ``prior`` stays: a lead inside the noise of a few hundred images is not a reason to switch."""
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


def tune(grid, run, val_key: str = "val", synth_key: str = "synthetic") -> tuple[float, dict[float, float]]:
    """The value of ``grid`` whose scores best separate validation normals from synthetic anomalies:
    ``run(value) -> {val_key: scores, synth_key: scores}``; ties go to the smaller value. -> (best, AUROC by
    value)."""
    aurocs = {}
    for v in grid:
        r = run(v)
        aurocs[v] = synthetic_auroc(r[val_key], r[synth_key])
    return max(aurocs, key=lambda v: (aurocs[v], -v)), aurocs
