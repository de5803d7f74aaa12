"""Image-level detection metrics, and the trivial baselines a score must beat.

AUROC and AUPRC with the anomalies as the positive class; the false-positive and true-positive rates of a
threshold. Trivial baselines need no model: the PNG size of the image (its complexity), its mean intensity and
its intensity standard deviation. Each is "anomalous = higher" or "anomalous = lower"; that direction is fixed
on validation data before the scored split is looked at (:func:`baseline_directions`), since picking it on the
scored labels would flatter the baselines.
"""

from __future__ import annotations

import numpy as np

from medivae.evaluation.anomaly.passes import png_nats

TRIVIAL = ("png_size", "mean_intensity", "intensity_std")


def detection_metrics(scores: np.ndarray, is_anomaly: np.ndarray) -> dict[str, float] | None:
    """AUROC and AUPRC (anomaly = positive class); None when only one class is present."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    is_anomaly = np.asarray(is_anomaly, dtype=bool)
    if is_anomaly.all() or not is_anomaly.any():
        return None
    return {"auroc": float(roc_auc_score(is_anomaly, scores)),
            "auprc": float(average_precision_score(is_anomaly, scores))}


def rates_at(scores: np.ndarray, is_anomaly: np.ndarray, threshold: float) -> dict[str, float]:
    """False-positive and true-positive rates of ``score > threshold``."""
    flagged = np.asarray(scores) > threshold
    is_anomaly = np.asarray(is_anomaly, dtype=bool)
    fpr = float(flagged[~is_anomaly].mean()) if (~is_anomaly).any() else float("nan")
    tpr = float(flagged[is_anomaly].mean()) if is_anomaly.any() else float("nan")
    return {"fpr": fpr, "tpr": tpr}


def trivial_scores(images: np.ndarray, png: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """No-model scores of uint8 images (N, C, H, W), each "higher" as it comes (:func:`baseline_directions`)."""
    x = np.asarray(images, dtype=np.float64).reshape(len(images), -1)
    png = png_nats(images) if png is None else png
    return {"png_size": png, "mean_intensity": x.mean(1), "intensity_std": x.std(1)}


def baseline_directions(scores: dict[str, np.ndarray], is_anomaly: np.ndarray) -> dict[str, str]:
    """name -> "higher" or "lower": the direction in which each trivial score separates ``is_anomaly`` better
    (AUROC >= 0.5 as "higher": ties go to "higher")."""
    out = {}
    for name, v in scores.items():
        m = detection_metrics(v, is_anomaly)
        out[name] = "higher" if m is None or m["auroc"] >= 0.5 else "lower"
    return out


def signed(scores: np.ndarray, direction: str) -> np.ndarray:
    """A trivial score turned so that higher = anomalous."""
    return np.asarray(scores) if direction == "higher" else -np.asarray(scores)


def default_beaten_by(default_auroc: float, baselines: dict[str, dict]) -> dict[str, float]:
    """{baseline: its AUROC} for every trivial baseline whose AUROC is above the default score's."""
    return {n: b["auroc"] for n, b in baselines.items() if b.get("auroc") is not None and b["auroc"] > default_auroc}
