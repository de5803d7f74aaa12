"""Sample-quality metrics on feature vectors (N, F): pure NumPy/SciPy, no network here.

- Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017). In the
  feature space of medivae's own reference extractor it is reported as ``FD-<extractor>``; only the
  Inception network of Heusel et al. makes it an FID.
- Precision / recall (Kynkäänniemi et al. 2019): the fraction of generated points inside the
  real manifold (union of k-NN balls around real points, k = 3) and vice versa.
- Density / coverage (Naeem et al. 2020, k = 5): how many real k-NN balls hold each generated point
  (1 on average when the sets match), and the fraction of real balls that hold any generated point.
- 95 % bootstrap intervals of all five (``compare_ci``): real and generated rows resampled independently.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import pairwise_distances

from medivae.evaluation.bootstrap import LEVEL, percentile_interval
from medivae.runtime.constants import BOOTSTRAP_RESAMPLES
from medivae.runtime.seeding import numpy_rng

PR_K = 3
DC_K = 5


def _trace_sqrt_product(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """(Tr S_a, Tr S_b, Tr (S_a S_b)^(1/2)) for the covariances of a (N, F) and b (M, F).

    The eigenvalues of S_a S_b are those of the symmetric R S_b R with R = S_a^(1/2), and, when a set has
    fewer points than features, those of (A B^T)(A B^T)^T with A, B the centred, scaled rows (S = A^T A):
    the square roots of their eigenvalues (singular values) sum to the trace wanted. Both are symmetric
    problems, so the result is never complex and needs no diagonal offset for singular covariances."""
    ca = (a - a.mean(0)) / np.sqrt(len(a) - 1)
    cb = (b - b.mean(0)) / np.sqrt(len(b) - 1)
    if min(len(a), len(b)) <= a.shape[1]:  # fewer points than features: an (N, M) problem
        root = np.linalg.svd(ca @ cb.T, compute_uv=False).sum()
        return float((ca * ca).sum()), float((cb * cb).sum()), float(root)
    s_a, s_b = ca.T @ ca, cb.T @ cb
    w, v = np.linalg.eigh(s_a)
    r = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    eig = np.linalg.eigvalsh(r @ s_b @ r)
    return float(np.trace(s_a)), float(np.trace(s_b)), float(np.sqrt(np.clip(eig, 0.0, None)).sum())


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) for features a (N, F), b (M, F).

    Tr (S_a S_b)^(1/2) comes from symmetric eigenvalue problems (``_trace_sqrt_product``), not from
    scipy.linalg.sqrtm's Schur method on the non-symmetric product: exact for singular covariances (fewer
    points than features) without pytorch-fid's diagonal offset, never complex, and faster. The Schur
    method made the 2,000 distances of a bootstrap interval most of a small evaluation."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError("the Fréchet distance needs at least two points per set")
    tr_a, tr_b, tr_root = _trace_sqrt_product(a, b)
    diff = a.mean(0) - b.mean(0)
    return float(max(diff @ diff + tr_a + tr_b - 2.0 * tr_root, 0.0))


def knn_radii(x: np.ndarray, k: int) -> np.ndarray:
    """Distance from each point of x (N, F) to its k-th nearest other point, (N,)."""
    d = pairwise_distances(x, x)
    return np.partition(d, k, axis=1)[:, k]  # column 0 is the point itself (distance 0)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = PR_K) -> dict[str, float]:
    d = pairwise_distances(real, fake)  # (N_real, N_fake)
    # "<=": a ball of radius 0 (duplicates, e.g. blank slices) still holds the point on it
    precision = (d <= knn_radii(real, k)[:, None]).any(0).mean()
    recall = (d <= knn_radii(fake, k)[None, :]).any(1).mean()
    return {"precision": float(precision), "recall": float(recall)}


def density_coverage(real: np.ndarray, fake: np.ndarray, k: int = DC_K) -> dict[str, float]:
    r = knn_radii(real, k)[:, None]
    d = pairwise_distances(real, fake)
    density = (d <= r).sum(0).mean() / k
    coverage = (d.min(1) <= r[:, 0]).mean()
    return {"density": float(density), "coverage": float(coverage)}


def compare(real: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """Every metric of ``other`` against the reference set ``real``:
    fd, precision, recall, density, coverage."""
    real, other = np.asarray(real, np.float64), np.asarray(other, np.float64)
    if min(len(real), len(other)) <= max(PR_K, DC_K):
        raise ValueError(f"need more than {max(PR_K, DC_K)} points per set for k-NN metrics")
    return {
        "fd": frechet_distance(real, other),
        **precision_recall(real, other),
        **density_coverage(real, other),
    }


def with_floor(reference: np.ndarray, generated: np.ndarray, held_out: np.ndarray) -> dict:
    """{"model": generated vs reference, "floor": real held-out vs reference} (the best one can expect
    at these set sizes: two samples of the real distribution are not at distance 0)."""
    return {"model": compare(reference, generated), "floor": compare(reference, held_out)}


def per_point(real: np.ndarray, other: np.ndarray) -> dict[str, np.ndarray]:
    """What each point contributes to ``compare``'s k-NN metrics, given the k-NN balls of the full sets:
    per generated point (M,): inside the real manifold (precision), real balls holding it / k (density);
    per real point (N,): inside the generated manifold (recall), any generated point in its ball (coverage).
    The means of these vectors are exactly ``compare``'s numbers."""
    d = pairwise_distances(real, other)  # (N, M), once
    in_real_pr = d <= knn_radii(real, PR_K)[:, None]
    in_real_dc = d <= knn_radii(real, DC_K)[:, None]
    return {"precision": in_real_pr.any(0).astype(np.float64),
            "density": in_real_dc.sum(0) / DC_K,
            "recall": (d <= knn_radii(other, PR_K)[None, :]).any(1).astype(np.float64),
            "coverage": in_real_dc.any(1).astype(np.float64)}


def compare_ci(real: np.ndarray, other: np.ndarray, n_boot: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
               level: float = LEVEL) -> dict[str, list[float] | None]:
    """{fd, precision, recall, density, coverage: [lo, hi]}: 95 % bootstrap intervals of ``compare``, the
    rows of ``real`` (N, F) and ``other`` (M, F) resampled independently with replacement; {} when off.

    k-NN metrics: distances and k-NN balls are computed once on the full sets and each resample averages
    the per-point memberships (``per_point``) over the points it drew. Recomputing the balls on a
    resample is biased: it holds about 63 % distinct points, so the union of balls shrinks (duplicates
    give radius 0). The intervals therefore describe the sampling of the scored points given the full
    sets' manifolds, not the noise of the manifold estimate itself.
    FD: recomputed on every resample. FD is biased upward by O(1/n), and a resample's duplicates add to
    that bias, so the percentile interval is shifted by the bootstrap estimate of the bias (mean of the
    resampled FDs minus FD; Efron & Tibshirani 1993, ch. 10): the spread of FD at these set sizes,
    around the reported number.
    """
    real, other = np.asarray(real, np.float64), np.asarray(other, np.float64)
    if n_boot < 1 or min(len(real), len(other)) <= max(PR_K, DC_K):
        return {}
    point = per_point(real, other)
    rng = numpy_rng(seed, "bootstrap", "sample-quality")
    ir, jf = rng.integers(0, len(real), (n_boot, len(real))), rng.integers(0, len(other), (n_boot, len(other)))
    fd = np.array([frechet_distance(real[i], other[j]) for i, j in zip(ir, jf, strict=True)])
    out = {"fd": percentile_interval(fd - (fd.mean() - frechet_distance(real, other)), level)}
    for name, v in point.items():
        idx = jf if name in ("precision", "density") else ir  # generated-point vs real-point metrics
        out[name] = percentile_interval(v[idx].mean(1), level)
    return out
