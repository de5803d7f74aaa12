"""Seeded percentile bootstrap intervals (Efron & Tibshirani 1993, ch. 13) for evaluation numbers.

Every interval resamples *images* with replacement: the mean of a per-image metric (PSNR, -ELBO...),
a detection metric (AUROC / AUPRC, resampling anomalous and normal images separately so the
prevalence of the test set is kept), or a paired difference between two runs scored on the same
images (Koehn 2004's paired bootstrap). Pure NumPy; the same seed gives the same interval.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from medivae.runtime.constants import BOOTSTRAP_RESAMPLES
from medivae.runtime.seeding import numpy_rng

LEVEL = 0.95


def _indices(rng: np.random.Generator, n: int, n_boot: int) -> np.ndarray:
    return rng.integers(0, n, size=(n_boot, n))  # (B, n)


def _percentiles(stats: np.ndarray, level: float) -> list[float] | None:
    stats = stats[np.isfinite(stats)]
    if len(stats) == 0:
        return None
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(stats, [a, 1.0 - a])
    return [float(lo), float(hi)]


def percentile_interval(stats, level: float = LEVEL) -> list[float] | None:
    """[lo, hi]: the central ``level`` percentile interval of bootstrap statistics (non-finite ones dropped)."""
    return _percentiles(np.asarray(stats, dtype=np.float64), level)


def mean_ci(values, n_boot: int = BOOTSTRAP_RESAMPLES, seed: int = 0, level: float = LEVEL) -> list[float] | None:
    """[lo, hi] of the mean of per-image ``values`` (N,); None when off (n_boot 0) or fewer than 2 values."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if n_boot < 1 or len(v) < 2:
        return None
    rng = numpy_rng(seed, "bootstrap")
    stats = np.concatenate([v[_indices(rng, len(v), c)].mean(1) for c in _chunks(n_boot)])
    return _percentiles(stats, level)


def _chunks(n_boot: int, size: int = 256):
    for a in range(0, n_boot, size):
        yield min(size, n_boot - a)


def auroc(y: np.ndarray, s: np.ndarray) -> float:
    """Mann-Whitney AUROC with ties counted half; y bool (N,), s float (N,)."""
    from scipy.stats import rankdata

    y = np.asarray(y, dtype=bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = rankdata(s)
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def average_precision(y: np.ndarray, s: np.ndarray) -> float:
    """AUPRC as scikit-learn's ``average_precision_score`` (step-wise, tied scores one threshold)."""
    y = np.asarray(y, dtype=bool)
    if not y.any():
        return float("nan")
    order = np.argsort(-np.asarray(s, dtype=np.float64), kind="mergesort")
    s_sorted, y_sorted = np.asarray(s)[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), len(s_sorted) - 1]  # the last index of each tie block
    tps = np.cumsum(y_sorted)[last]
    precision = tps / (last + 1)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def detection_ci(is_anomaly, scores, n_boot: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                 level: float = LEVEL) -> dict[str, list[float]] | None:
    """{"auroc": [lo, hi], "auprc": [lo, hi]}: anomalous and normal images resampled separately."""
    y = np.asarray(is_anomaly, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    if n_boot < 1 or len(pos) < 1 or len(neg) < 1:
        return None
    rng = numpy_rng(seed, "bootstrap")
    roc, prc = np.empty(n_boot), np.empty(n_boot)
    for b in range(n_boot):
        idx = np.concatenate([pos[rng.integers(0, len(pos), len(pos))], neg[rng.integers(0, len(neg), len(neg))]])
        roc[b], prc[b] = auroc(y[idx], s[idx]), average_precision(y[idx], s[idx])
    return {"auroc": _percentiles(roc, level), "auprc": _percentiles(prc, level)}


def statistic_ci(fn: Callable[..., float | None], *arrays, n_boot: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                 level: float = LEVEL) -> list[float] | None:
    """[lo, hi] of ``fn(*arrays)`` with the rows of every array resampled together; a resample on which
    ``fn`` returns None (e.g. one class only) is skipped."""
    n = len(arrays[0])
    if n_boot < 1 or n < 2:
        return None
    rng = numpy_rng(seed, "bootstrap")
    stats = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        v = fn(*(np.asarray(a)[idx] for a in arrays))
        stats.append(np.nan if v is None else v)
    return _percentiles(np.asarray(stats, dtype=np.float64), level)


def ratio_of_means_ci(a, b, n_boot: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                      level: float = LEVEL) -> list[float] | None:
    """[lo, hi] of mean(a) / mean(b) for two independent samples a (N,) and b (M,), each resampled with
    replacement on its own; None when off or a sample has fewer than 2 values."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if n_boot < 1 or len(a) < 2 or len(b) < 2:
        return None
    rng = numpy_rng(seed, "bootstrap", "ratio")
    stats = np.concatenate([a[_indices(rng, len(a), c)].mean(1) / b[_indices(rng, len(b), c)].mean(1)
                            for c in _chunks(n_boot)])
    return _percentiles(stats, level)


def paired_difference(a, b, n_boot: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                      level: float = LEVEL) -> dict | None:
    """Paired bootstrap of mean(a - b) over the same images (N,): {"mean_difference", "ci95", "p_value",
    "n_boot"}, p two-sided (twice the smaller tail of the resampled differences around 0, at most 1; 0 means
    below 2 / n_boot, the resolution of n_boot resamples)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    d = d[np.isfinite(d)]
    if n_boot < 1 or len(d) < 2:
        return None
    rng = numpy_rng(seed, "bootstrap")
    stats = np.concatenate([d[_indices(rng, len(d), c)].mean(1) for c in _chunks(n_boot)])
    p = min(1.0, 2.0 * min((stats <= 0).mean(), (stats >= 0).mean()))
    return {"mean_difference": float(d.mean()), "ci95": _percentiles(stats, level), "p_value": float(p),
            "n_boot": int(n_boot)}


def fmt_ci(ci, digits: int = 3) -> str:
    """" [lo, hi]" for a CLI table, "" when there is no interval."""
    return "" if not ci else f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
