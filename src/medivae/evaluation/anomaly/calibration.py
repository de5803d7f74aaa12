"""Putting scores on one scale, and the threshold that bounds the false-positive rate.

Standardisation: each score as (score - mean) / std, mean and std of a set of normals; ``combined`` and
``ensemble`` average such z-scores over scores fixed in advance.

The threshold is conformal (split-conformal outlier test; Vovk et al. 2005, Bates et al. 2023): the
ceil((n+1)(1-alpha))-th smallest of n calibration-normal scores. A new normal exchangeable with them is flagged
with probability <= alpha, marginally over the draw of the calibration set. The bound needs the score to be a
fixed function of the image while the calibration set is drawn: a score standardised with statistics of the
calibration normals themselves is not, so those statistics come from other normals.
"""

from __future__ import annotations

import math

import numpy as np


def calibrate(scores: dict[str, np.ndarray], names) -> dict[str, tuple[float, float]]:
    """name -> (mean, std) over a set of normals, for the ``names`` that ``scores`` has."""
    out = {}
    for n in (n for n in names if n in scores):
        v = np.asarray(scores[n], dtype=np.float64)
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
    """The conformal threshold: the k-th smallest of the n calibration normals, k = ceil((n+1)(1-fpr)). A new
    normal exchangeable with them scores above it with probability (n+1-k)/(n+1) <= fpr (marginally over the
    calibration draw). Raises ValueError when n < 1/fpr - 1: then no calibration score is high enough."""
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
