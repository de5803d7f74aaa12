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
    out = classification_metrics(predict_proba(model, test.images, device=device), test.labels, names)
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
        k: train_and_score(s, real_test, names, epochs, seed, width, progress, device, batch_size)
        for k, s in sets.items()
    }
