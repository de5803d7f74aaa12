"""What a data source holds, as the training run would see it: counts, shapes, labels, intensities."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medivae.data import load_dataset
from medivae.data.imageset import ImageSet


def intensity_stats(images: np.ndarray, chunk: int = 4096) -> dict[str, float]:
    """Exact statistics of uint8 values from a 256-bin histogram, read in chunks (memmaps stay on disk)."""
    hist = np.zeros(256, dtype=np.int64)
    for a in range(0, len(images), chunk):
        hist += np.bincount(np.asarray(images[a : a + chunk]).ravel(), minlength=256)
    n = int(hist.sum())
    if n == 0:
        return {}
    v = np.arange(256, dtype=np.float64)
    mean = float((hist * v).sum() / n)
    cdf = np.cumsum(hist) / n
    pct = {f"p{q}": int(np.searchsorted(cdf, q / 100.0)) for q in (1, 50, 99)}
    return {
        "mean": mean,
        "std": float(np.sqrt((hist * (v - mean) ** 2).sum() / n)),
        "min": int(np.flatnonzero(hist)[0]),
        "max": int(np.flatnonzero(hist)[-1]),
        **pct,
        "fraction_zero": float(hist[0] / n),
        "fraction_255": float(hist[255] / n),
    }


def preview_images(s: ImageSet, per_class: int = 8, max_classes: int = 8) -> np.ndarray:
    """Up to ``per_class`` images of each class (first ones), or 64 images when unlabelled."""
    classes = [c for c in np.unique(s.labels) if c >= 0][:max_classes]
    if not classes:
        idx = np.arange(min(64, len(s)))
    else:
        idx = np.concatenate([np.flatnonzero(s.labels == c)[:per_class] for c in classes])
    return np.asarray(s.images[idx])  # (n, C, H, W) uint8, grouped by class


def summarize(cfg, preview: Path | None = None, progress: bool = True) -> dict[str, Any]:
    from medivae.runtime.images import save_grid

    splits = load_dataset(cfg, progress=progress)
    first = splits["train"]
    meta = {k: v for k, v in first.meta.items() if k not in ("split", "n")}
    out: dict[str, Any] = {
        "source": cfg.source,
        "shape": list(first.images.shape[1:]),
        "dtype": str(first.images.dtype),
        "label_names": list(first.label_names),
        "splits": {},
        "meta": meta,
    }
    for name, s in splits.items():
        out["splits"][name] = {
            "n": len(s),
            "labels": s.label_counts() if len(s) else {},
            "groups": int(len(np.unique(s.groups))) if s.groups is not None and len(s) else None,
            "intensity": intensity_stats(s.images),
        }
    if preview is not None:
        nrow = 8 if first.label_names else None
        out["preview"] = str(save_grid(preview_images(first), preview, nrow=nrow))
    return out
