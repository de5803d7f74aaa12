"""Choosing without test labels: the scorers' hyperparameters and the default score, on validation normals and
the synthetic anomalies made from them (:mod:`.synthetic`, image i of every kind made from normal i).

The validation normals are split in two halves by a seeded draw, and each synthetic anomaly goes with the
normal it was made from: hyperparameters (the restoration's TV weight, the healing threshold) are tuned on one
half, the default is chosen on the other, so the AUROCs the default is chosen by are not those a
hyperparameter was tuned to raise.

The default is the score with the best mean rank over the kinds of synthetic anomaly (rank 1: the highest
AUROC of validation normals against that kind; ties share their ranks): a score that wins on one kind and
fails on the others ranks behind one that does well on all. Intervals are paired bootstraps over source
images: a resample draws normal i together with every anomaly made from it. No test image or label is read.
"""

from __future__ import annotations

import numpy as np

from medivae.evaluation.anomaly.detection import baseline_directions, signed
from medivae.evaluation.bootstrap import auroc, percentile_interval
from medivae.runtime.constants import BOOTSTRAP_RESAMPLES
from medivae.runtime.seeding import numpy_rng


def split_halves(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted indices of n >= 2 validation normals in two seeded halves: (tuning, selection)."""
    order = numpy_rng(seed, "tune-select").permutation(n)
    return np.sort(order[: n // 2]), np.sort(order[n // 2 :])


def synthetic_auroc(val: np.ndarray, synthetic: np.ndarray) -> float:
    """AUROC of one score: validation normals (0) against synthetic anomalies made from them (1)."""
    y = np.r_[np.zeros(len(val)), np.ones(len(synthetic))].astype(bool)
    return auroc(y, np.r_[val, synthetic])


def kind_aurocs(val: dict, synthetic: dict[str, dict], names) -> dict[str, dict[str, float]]:
    """{kind: {score: AUROC of validation normals against that kind}} for the scores in ``names``."""
    return {kind: {n: synthetic_auroc(val[n], s[n]) for n in names} for kind, s in synthetic.items()}


def mean_ranks(by_kind: dict[str, dict[str, float]]) -> dict[str, float]:
    """{score: its rank averaged over kinds}, rank 1 = the highest AUROC of the kind, ties sharing their ranks."""
    from scipy.stats import rankdata

    names = list(next(iter(by_kind.values())))
    ranks = np.mean([rankdata([-a[n] for n in names]) for a in by_kind.values()], axis=0)
    return {n: float(r) for n, r in zip(names, ranks, strict=True)}


def ranked(by_kind: dict[str, dict[str, float]]) -> list[str]:
    """Scores best first: by mean rank over kinds, then by mean AUROC, then by name."""
    ranks = mean_ranks(by_kind)
    mean = {n: float(np.mean([a[n] for a in by_kind.values()])) for n in ranks}
    return sorted(ranks, key=lambda n: (ranks[n], -mean[n], n))


def paired_lead_ci(val: dict, synthetic: dict[str, dict], a: str, b: str, n_boot: int = BOOTSTRAP_RESAMPLES,
                   seed: int = 0) -> list[float] | None:
    """95 % interval of mean over kinds of AUROC(a) - AUROC(b), resampling source images: normal i is drawn
    together with every synthetic anomaly made from it (its pair)."""
    n = len(val[a])
    if n_boot < 1 or n < 2:
        return None
    rng = numpy_rng(seed, "paired-bootstrap")
    stats = np.empty(n_boot)
    for r in range(n_boot):
        i = rng.integers(0, n, n)
        stats[r] = np.mean([synthetic_auroc(val[a][i], s[a][i]) - synthetic_auroc(val[b][i], s[b][i])
                            for s in synthetic.values()])
    return percentile_interval(stats)


def select_default(val: dict, synthetic: dict[str, dict], exclude=(), n_boot: int = BOOTSTRAP_RESAMPLES,
                   seed: int = 0) -> dict:
    """The default score: the best mean rank over the kinds of ``synthetic`` ({kind: {score: (N,)}}, anomaly i
    made from validation normal i of ``val`` {score: (N,)}). Returns {"default", "val_auroc" (mean over kinds),
    "val_auroc_by_kind", "mean_rank", "runner_up", "lead_over_runner_up" {"auroc_difference", "ci95"}}."""
    names = [n for n in val if n not in exclude and all(n in s for s in synthetic.values())]
    by_kind = kind_aurocs(val, synthetic, names)
    order = ranked(by_kind)
    mean = {n: float(np.mean([a[n] for a in by_kind.values()])) for n in names}
    out = {"default": order[0], "val_auroc": mean, "val_auroc_by_kind": by_kind, "mean_rank": mean_ranks(by_kind)}
    if len(order) > 1:
        out["runner_up"] = order[1]
        out["lead_over_runner_up"] = {"auroc_difference": mean[order[0]] - mean[order[1]],
                                      "ci95": paired_lead_ci(val, synthetic, order[0], order[1], n_boot, seed)}
    return out


def leave_one_kind_out(val: dict, synthetic: dict[str, dict], val_trivial: dict,
                       synthetic_trivial: dict[str, dict], exclude=()) -> dict[str, dict]:
    """For each kind: the default chosen on the other kinds, its AUROC on the kind left out, and the best
    trivial baseline's there (each baseline's direction fixed on the other kinds): would the rule have
    chosen well for a kind of anomaly it never saw?"""
    names = [n for n in val if n not in exclude and all(n in s for s in synthetic.values())]
    by_kind = kind_aurocs(val, synthetic, names)
    out = {}
    for kind in synthetic:
        rest = [k for k in synthetic if k != kind]
        default = ranked({k: by_kind[k] for k in rest})[0]
        y = np.r_[np.zeros(len(next(iter(val_trivial.values())))), np.ones(len(rest) * len(val[default]))] > 0
        pooled = {t: np.r_[val_trivial[t], *(synthetic_trivial[k][t] for k in rest)] for t in val_trivial}
        directions = baseline_directions(pooled, y)
        base = {t: synthetic_auroc(signed(val_trivial[t], d), signed(synthetic_trivial[kind][t], d))
                for t, d in directions.items()}
        best = max(base, key=lambda t: (base[t], t))
        out[kind] = {"default": default, "auroc": by_kind[kind][default], "best_baseline": best,
                     "baseline_direction": directions[best], "baseline_auroc": base[best],
                     "margin": by_kind[kind][default] - base[best]}
    return out


def tune(grid, run) -> tuple[float, dict[float, float]]:
    """The value of ``grid`` whose scores best separate validation normals from synthetic anomalies, by the mean
    AUROC over kinds: ``run(value) -> (validation scores (N,), {kind: synthetic scores (N,)})``; ties go to the
    smaller value. -> (best, {value: mean AUROC})."""
    mean = {}
    for v in grid:
        val, synthetic = run(v)
        mean[v] = float(np.mean([synthetic_auroc(val, s) for s in synthetic.values()]))
    return max(mean, key=lambda v: (mean[v], -v)), mean
