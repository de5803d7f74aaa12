"""A memorisation filter for synthetic images, and a membership-inference test of the model.

A synthetic image is rejected when it lies closer to its nearest training image than all but
``percentile`` % of the model's *reconstructions of held-out images* lie to theirs, in pixel space or
in the reference feature space (the distance-to-closest-record test of synthetic-data privacy audits,
e.g. Yale et al. 2020; the feature space follows Meehan et al. 2020). The calibration set is
reconstructions, not the real held-out images: a model's outputs are smoother than real images, and
smooth images lie nearer to everything, so real images set a scale that flags blur as copying (41 % of
reconstructions of test images, which cannot be copies, were flagged that way). Reconstructions of
unseen images are as smooth as samples and cannot be copies, so a rate near ``percentile`` % means the
model copies no more than it reproduces images it never saw. This assumes the model reconstructs
about as well as it samples: reconstructions far from every training image (an undertrained model)
set a loose threshold, which the report's distance percentiles show.

Membership inference (Shokri et al. 2017; for generative models Hayes et al. 2019, Chen et al. 2020):
can training images be told from held-out ones by the model's ELBO, or by their distance to the
nearest synthetic image? AUROC 0.5 = no; towards 1 = the model (or its samples) remembers its
training images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from medivae.data.imageset import to_float


def pixel_vectors(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """uint8 (N, C, H, W) or float in [0, 1] -> float32 (N, C*H*W) scaled so distances are RMS per pixel."""
    x = to_float(images) if isinstance(images, np.ndarray) else images.float().cpu()
    flat = x.flatten(1)
    return (flat / np.sqrt(flat.shape[1])).numpy()


def nearest(query: np.ndarray, reference: np.ndarray, batch: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distance from each query row (N, F) to its nearest reference row (M, F), and its index."""
    ref = torch.as_tensor(reference, dtype=torch.float64)  # float64: a copy's distance stays ~1e-7, not 1e-3
    dist, idx = [], []
    for i in range(0, len(query), batch):
        q = torch.as_tensor(query[i : i + batch], dtype=torch.float64)
        d = torch.cdist(q, ref)
        m, j = d.min(1)
        dist.append(m)
        idx.append(j)
    if not dist:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    return torch.cat(dist).double().numpy(), torch.cat(idx).numpy()


@dataclass
class SpaceCheck:
    """Nearest-training-image distances in one space.

    synthetic: (N,) distances of synthetic images; neighbour: (N,) index of their nearest training image;
    real: (M,) distances of the calibration images (reconstructions of held-out images); threshold: the
    ``percentile`` of ``real``.
    """

    name: str
    synthetic: np.ndarray
    neighbour: np.ndarray
    real: np.ndarray
    threshold: float

    @property
    def rejected(self) -> np.ndarray:
        return self.synthetic <= self.threshold  # "<=": an exact copy is caught even when the threshold is 0

    def summary(self) -> dict:
        q = (1, 5, 50)
        return {
            "threshold": self.threshold,
            "n_rejected": int(self.rejected.sum()),
            "synthetic_distance_percentiles": {str(p): float(np.percentile(self.synthetic, p)) for p in q},
            "real_distance_percentiles": {str(p): float(np.percentile(self.real, p)) for p in q},
        }


def check_space(
    name: str, synthetic: np.ndarray, train: np.ndarray, held_out: np.ndarray, percentile: float
) -> SpaceCheck:
    """Vectors (N, F), (M, F), (K, F) of one space -> the distances and the percentile threshold.
    ``held_out``: the calibration images that cannot be copies (reconstructions of held-out images)."""
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], not {percentile}")
    if len(held_out) == 0:
        raise ValueError("need real held-out images to set the distance threshold")
    d_syn, nn_syn = nearest(synthetic, train)
    d_real, _ = nearest(held_out, train)
    return SpaceCheck(name, d_syn, nn_syn, d_real, float(np.percentile(d_real, percentile)))


def memorisation_report(checks: list[SpaceCheck], percentile: float) -> tuple[np.ndarray, dict]:
    """(rejected mask (N,): rejected in any space, JSON-able report)."""
    rejected = np.zeros(len(checks[0].synthetic), dtype=bool)
    for c in checks:
        rejected |= c.rejected
    n = len(rejected)
    report = {
        "n_synthetic": n,
        "percentile": percentile,
        "n_rejected": int(rejected.sum()),
        "memorisation_rate": float(rejected.mean()) if n else 0.0,
        "expected_rate_for_fresh_real_images": percentile / 100.0,  # per space; the union can be higher
        "spaces": {c.name: c.summary() for c in checks},
    }
    return rejected, report


def membership_auroc(member_scores, held_out_scores, n_boot: int = 0, seed: int = 0) -> dict:
    """AUROC of telling training images (``member_scores``, higher = "was trained on") from held-out
    ones; 0.5 = indistinguishable. {"auroc", "ci95", "n_members", "n_held_out"}."""
    from medivae.evaluation.bootstrap import auroc, detection_ci

    m, h = np.asarray(member_scores, dtype=np.float64), np.asarray(held_out_scores, dtype=np.float64)
    y = np.r_[np.ones(len(m), bool), np.zeros(len(h), bool)]
    s = np.r_[m, h]
    ci = detection_ci(y, s, n_boot, seed) if n_boot else None
    return {"auroc": auroc(y, s), "ci95": ci["auroc"] if ci else None, "n_members": len(m), "n_held_out": len(h)}
