"""Are the scored normals like the normals the model trained on? A classifier two-sample test.

A model fitted on normal images calls anything unlike its training normals anomalous, so an anomaly AUROC
measures two things at once when the scored split's *normal* images differ from the training ones (another
scanner, another framing, another hospital): the anomalies, and that shift. This check says which case a
user is in. A linear classifier is trained, with stratified k-fold cross-validation, to tell the scored
normals from the training normals; the AUROC of its out-of-fold predictions is about 0.5 when they are
alike and approaches 1 when it can tell them apart (the classifier two-sample test, Lopez-Paz & Oquab 2017,
"Revisiting classifier two-sample tests"). scikit-learn does the work; the images are area-averaged to at
most 32 px a side first, so the check costs seconds at any image size and sees framing, exposure and
anatomy rather than pixel noise.

The p-value is the one-sided Mann-Whitney test of the out-of-fold predictions (the AUROC's own test); folds
share training images, so it is approximate. It uses the labels of the scored split only to know which
images are normal, and it changes no score, default or threshold: it is a diagnosis, reported beside them.
"""

from __future__ import annotations

import numpy as np

from medivae.seeding import numpy_rng

SIDE = 32  # images are area-averaged to at most this many pixels a side
MAX_REFERENCE = 5000  # a random subset of the training normals above this: the test needs no more
FOLDS = 5
COMPONENTS = 50
ALPHA = 0.01  # "the normals differ" when the test's p-value is below this


def _pooled(images: np.ndarray, side: int = SIDE) -> np.ndarray:
    """uint8 or float images (N, C, H, W) -> float64 (N, C * h * w), area-averaged to at most ``side`` a side."""
    import torch

    x = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    if max(x.shape[-2:]) > side:
        h, w = (max(1, round(s * side / max(x.shape[-2:]))) for s in x.shape[-2:])
        x = torch.nn.functional.adaptive_avg_pool2d(x, (h, w))
    return x.flatten(1).double().numpy()


def two_sample_test(reference: np.ndarray, other: np.ndarray, seed: int = 0, n_boot: int = 1000) -> dict | None:
    """Can a linear classifier tell ``other`` images (N, C, H, W) from ``reference`` ones? Returns
    {"auroc", "ci95" (bootstrap over images, or None), "p_value", "differ", "n_reference", "n_other"}, or
    None when either set has fewer than 2 images. Deterministic given ``seed``."""
    from scipy.stats import mannwhitneyu
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
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
    folds = min(FOLDS, len(reference), len(other))
    state = int(rng.integers(2**31))  # scikit-learn takes seeds below 2**32; the article's seed is larger
    components = min(COMPONENTS, x.shape[1], len(x) - len(x) // folds - 1)
    clf = make_pipeline(
        StandardScaler(),
        PCA(components, svd_solver="full"),
        LogisticRegression(C=0.1, class_weight="balanced", max_iter=5000),
    )
    cv = StratifiedKFold(folds, shuffle=True, random_state=state)
    p = cross_val_predict(clf, x, y, cv=cv, method="decision_function")
    pv = float(mannwhitneyu(p[y], p[~y], alternative="greater").pvalue)
    ci = detection_ci(y, p, n_boot, seed)["auroc"] if n_boot else None
    return {"auroc": auroc(y, p), "ci95": ci, "p_value": pv, "differ": pv < ALPHA,
            "n_reference": int(len(reference)), "n_other": int(len(other))}  # fmt: skip


def normal_shift(train_normals: np.ndarray, checked: dict[str, np.ndarray], seed: int = 0,
                 n_boot: int = 1000) -> dict:
    """The two-sample test of each named set of normal images in ``checked`` (e.g. {"val": ..., "test": ...})
    against the training normals; names whose set is too small are left out."""
    out = {"reference": "training normals", "method": "classifier two-sample test (Lopez-Paz & Oquab 2017): "
           f"{FOLDS}-fold cross-validated logistic regression on {COMPONENTS} principal components of the "
           f"images area-averaged to at most {SIDE} px; AUROC 0.5 = alike; p-value: one-sided Mann-Whitney "
           f"test of the out-of-fold predictions; 'differ' when p < {ALPHA:g}"}  # fmt: skip
    for name, images in checked.items():
        r = two_sample_test(train_normals, images, seed, n_boot)
        if r is not None:
            out[name] = r
    return out
