"""Are the scored normals like the normals the model trained on? A classifier two-sample test.

A model fitted on normal images calls anything unlike its training normals anomalous, so an anomaly AUROC
measures two things at once when the scored split's *normal* images differ from the training ones (another
scanner, another framing, another hospital): the anomalies, and that shift. This check says which case a
user is in. A linear classifier is fitted on a random stratified half of the two sets to tell them apart and
scored on the other half; the AUROC of those held-out predictions is about 0.5 when the sets are alike and
approaches 1 when it can tell them apart (the classifier two-sample test, Lopez-Paz & Oquab 2017, "Revisiting
classifier two-sample tests"). scikit-learn does the work; the images are area-averaged to at most 32 px a
side first, so the check sees framing, exposure and anatomy rather than pixel noise and stays cheap.

The p-value is the one-sided Mann-Whitney test of the held-out predictions: they come from a classifier that
never saw them, so under "alike" they are exchangeable and the test is exact (cross-validated predictions
share training images between folds, and a test on them rejects too often). It uses the labels of the scored
split only to know which images are normal, and it changes no score, default or threshold: it is a diagnosis,
reported beside them.
"""

from __future__ import annotations

import numpy as np

from medivae.runtime.constants import BOOTSTRAP_RESAMPLES
from medivae.runtime.seeding import numpy_rng

SIDE = 32  # images are area-averaged to at most this many pixels a side
MAX_REFERENCE = 5000  # a random subset of the training normals above this: the test needs no more
COMPONENTS = 50  # at most; fewer when the fitting half has fewer images
ALPHA = 0.01  # "the normals differ" when the test's p-value is below this


def _pooled(images: np.ndarray, side: int = SIDE, chunk: int = 512) -> np.ndarray:
    """uint8 or float images (N, C, H, W) -> float64 (N, C * h * w), area-averaged to at most ``side`` a side,
    ``chunk`` images at a time (a large set at a large size is never all in float at once)."""
    import torch

    hw = images.shape[-2:]
    size = tuple(max(1, round(s * side / max(hw))) for s in hw) if max(hw) > side else tuple(hw)
    out = []
    for i in range(0, len(images), chunk):
        x = torch.as_tensor(np.asarray(images[i : i + chunk]), dtype=torch.float32)
        if size != tuple(hw):
            x = torch.nn.functional.adaptive_avg_pool2d(x, size)
        out.append(x.flatten(1).double().numpy())
    return np.concatenate(out)


def two_sample_test(reference: np.ndarray, other: np.ndarray, seed: int = 0,
                    n_boot: int = BOOTSTRAP_RESAMPLES) -> dict | None:
    """Can a linear classifier tell ``other`` images (N, C, H, W) from ``reference`` ones? Returns
    {"auroc", "ci95" (bootstrap over images, or None), "p_value", "differ", "n_reference", "n_other"}, or
    None when either set has fewer than 2 images. Deterministic given ``seed``."""
    from scipy.stats import mannwhitneyu
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from medivae.evaluation.bootstrap import auroc, detection_ci

    if len(reference) < 2 or len(other) < 2:
        return None
    rng = numpy_rng(seed, "two-sample")
    if len(reference) > MAX_REFERENCE:
        reference = reference[np.sort(rng.choice(len(reference), MAX_REFERENCE, replace=False))]
    x = np.concatenate([_pooled(reference), _pooled(other)])
    y = np.r_[np.zeros(len(reference), bool), np.ones(len(other), bool)]
    state = int(rng.integers(2**31))  # scikit-learn takes seeds below 2**32; the article's seed is larger
    x_fit, x_test, y_fit, y_test = train_test_split(x, y, test_size=0.5, stratify=y, random_state=state)
    clf = make_pipeline(
        StandardScaler(),
        PCA(min(COMPONENTS, x.shape[1], len(x_fit) - 1), svd_solver="full"),
        LogisticRegression(C=0.1, class_weight="balanced", max_iter=5000),
    )
    p = clf.fit(x_fit, y_fit).decision_function(x_test)
    pv = float(mannwhitneyu(p[y_test], p[~y_test], alternative="greater").pvalue)
    ci = detection_ci(y_test, p, n_boot, seed)["auroc"] if n_boot else None
    return {"auroc": auroc(y_test, p), "ci95": ci, "p_value": pv, "differ": pv < ALPHA,
            "n_reference": int(len(reference)), "n_other": int(len(other)), "n_held_out": int(len(y_test))}


def normal_shift(train_normals: np.ndarray, checked: dict[str, np.ndarray], seed: int = 0,
                 n_boot: int = BOOTSTRAP_RESAMPLES) -> dict:
    """The two-sample test of each named set of normal images in ``checked`` (e.g. {"val": ..., "test": ...})
    against the training normals; names whose set is too small are left out."""
    out = {"reference": "training normals", "method": "classifier two-sample test (Lopez-Paz & Oquab 2017): "
           f"logistic regression on up to {COMPONENTS} principal components of the images area-averaged to at "
           f"most {SIDE} px, fitted on a random stratified half and scored on the other; AUROC 0.5 = alike; "
           f"p-value: one-sided Mann-Whitney test of the held-out predictions; 'differ' when p < {ALPHA:g}"}
    for name, images in checked.items():
        r = two_sample_test(train_normals, images, seed, n_boot)
        if r is not None:
            out[name] = r
    return out
