"""Is the synthetic data useful? Train on synthetic, test on real (TSTR; Esteban et al. 2017).

The small reference classifier (``classifier.py``) is trained three times with the same budget and
seed: on synthetic images only, on real + synthetic, and on real only; each is scored on the same
real test set. TSTR close to real-only means the synthetic set carries the class information of
the real one; real + synthetic above real-only means it is worth adding as augmentation.
"""

from __future__ import annotations

import numpy as np

from medivae.data.imageset import ImageSet


def classification_metrics(proba: np.ndarray, labels: np.ndarray, names: tuple[str, ...]) -> dict:
    """proba (N, K), labels (N,) -> AUC (one-vs-rest macro for K > 2), accuracy, recall per class."""
    from sklearn.metrics import accuracy_score, recall_score, roc_auc_score

    k = len(names)
    pred = proba.argmax(1)
    present = np.unique(labels)
    if len(present) < 2:
        auc = None
    elif k == 2:
        auc = float(roc_auc_score(labels, proba[:, 1]))
    else:
        p = proba[:, present] / np.clip(proba[:, present].sum(1, keepdims=True), 1e-12, None)
        auc = float(roc_auc_score(labels, p, multi_class="ovr", labels=present)) if len(present) > 2 else None
    recall = recall_score(labels, pred, labels=np.arange(k), average=None, zero_division=0)
    return {
        "auc": auc,
        "accuracy": float(accuracy_score(labels, pred)),
        "recall": {names[c]: float(recall[c]) for c in range(k) if c in present},
        "n_test": int(len(labels)),
    }


def classification_ci(proba: np.ndarray, labels: np.ndarray, names: tuple[str, ...], n_boot: int,
                      seed: int) -> dict:
    """95 % bootstrap intervals of AUC and accuracy, resampling the real test images."""
    from medivae.evaluation.bootstrap import auroc, statistic_ci

    def auc(p, y):
        if len(np.unique(y)) < 2:
            return None
        return auroc(y == 1, p[:, 1]) if len(names) == 2 else classification_metrics(p, y, names)["auc"]

    return {
        "auc": statistic_ci(auc, proba, labels, n_boot=n_boot, seed=seed),
        "accuracy": statistic_ci(lambda p, y: float((p.argmax(1) == y).mean()), proba, labels,
                                 n_boot=n_boot, seed=seed),
    }


def train_and_score(
    train: ImageSet,
    test: ImageSet,
    names: tuple[str, ...],
    epochs: int,
    seed: int,
    width: int,
    progress: bool,
    device,
    batch_size: int = 128,
    bootstrap: int = 0,
) -> dict:
    from medivae.evaluation.classifier import fit_classifier, predict_proba

    model = fit_classifier(
        train.images,
        train.labels,
        len(names),
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        width=width,
        progress=progress,
        device=device,
    )
    proba = predict_proba(model, test.images, device=device)
    out = classification_metrics(proba, test.labels, names)
    if bootstrap:
        out["ci95"] = classification_ci(proba, test.labels, names, bootstrap, seed)
    out["n_train"] = int(len(train))
    out["train_labels"] = {
        names[c]: int(m) for c, m in zip(*np.unique(train.labels, return_counts=True), strict=True)
    }
    return out


def tstr(
    real_train: ImageSet,
    synthetic: ImageSet,
    real_test: ImageSet,
    epochs: int = 10,
    seed: int = 0,
    width: int = 32,
    progress: bool = True,
    device="cpu",
    batch_size: int = 128,
    bootstrap: int = 0,
) -> dict:
    """{"synthetic_only", "real_plus_synthetic", "real_only"} -> metrics on ``real_test``.
    All three share label codes (``real_train.label_names``)."""
    names = real_train.label_names
    both = ImageSet(
        np.concatenate([real_train.images, synthetic.images]),
        np.concatenate([real_train.labels, synthetic.labels]),
        names,
    )
    sets = {"synthetic_only": synthetic, "real_plus_synthetic": both, "real_only": real_train}
    return {
        k: train_and_score(s, real_test, names, epochs, seed, width, progress, device, batch_size, bootstrap)
        for k, s in sets.items()
    }
