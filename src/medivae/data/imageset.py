"""The one type every data source returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class ImageSet:
    """Images of one split.

    images: uint8 (N, C, H, W) — an in-memory array or a read-only memmap.
    labels: int64 (N,), -1 where unknown.
    label_names: class names indexed by label.
    groups: optional (N,) patient/series keys, used only in memory for splitting; never saved.
    meta: JSON-able description (source, window, counts, skipped files).
    """

    images: np.ndarray
    labels: np.ndarray
    label_names: tuple[str, ...] = ()
    groups: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 (N, C, H, W), not {self.images.dtype}{self.images.shape}")
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if len(self.labels) != len(self.images):
            raise ValueError("images and labels differ in length")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, idx: np.ndarray) -> ImageSet:
        idx = np.asarray(idx, dtype=np.int64)
        return ImageSet(
            images=np.ascontiguousarray(self.images[idx]),
            labels=self.labels[idx],
            label_names=self.label_names,
            groups=None if self.groups is None else self.groups[idx],
            meta=dict(self.meta),
        )

    def label_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for lab, n in zip(*np.unique(self.labels, return_counts=True), strict=True):
            name = self.label_names[lab] if 0 <= lab < len(self.label_names) else "unlabelled"
            out[name] = int(n)
        return out


def concat(sets: list[ImageSet], names: tuple[str, ...] | None = None) -> ImageSet:
    """The images and labels of ``sets`` in order, under ``names`` (default: the first set's label names) and
    with the first set's meta; empty sets are left out (their placeholder shapes may differ)."""
    if names is None:
        names = sets[0].label_names if sets else ()
    meta = {**sets[0].meta} if sets else {}
    full = [s for s in sets if len(s)]
    if not full:
        return ImageSet(np.zeros((0, 1, 1, 1), np.uint8), np.zeros(0, np.int64), tuple(names), meta=meta)
    images = np.concatenate([np.asarray(s.images) for s in full])
    meta["n"] = len(images)
    return ImageSet(images, np.concatenate([s.labels for s in full]), tuple(names), meta=meta)


def image_hashes(images: np.ndarray) -> np.ndarray:
    """A content hash per uint8 image (N, C, H, W): equal pixels, equal hash."""
    import hashlib

    return np.array([hashlib.sha1(np.ascontiguousarray(im).tobytes()).hexdigest() for im in images])


def label_code(names: tuple[str, ...] | list[str], label: str) -> int | None:
    """The class index of ``label``: a class name, or the class's index written as a number
    (so ``--labels 0`` keeps working when a source names its classes, e.g. normal/pneumonia)."""
    names = list(names)
    if label in names:
        return names.index(label)
    text = str(label).strip()
    if text.isdigit() and int(text) < len(names):
        return int(text)
    return None


def as_tensor(array: np.ndarray) -> torch.Tensor:
    """A CPU tensor over ``array`` without a copy when torch can wrap it; a read-only memmap (the decoded
    cache) is copied, since torch cannot wrap read-only memory (and warns the user if asked to)."""
    a = np.ascontiguousarray(array)
    return torch.from_numpy(a if a.flags.writeable else a.copy())


def to_float(images: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 in [0, 1] on ``device``. The only place bytes become floats."""
    if isinstance(images, np.ndarray):
        t = as_tensor(images)
    else:
        t = images
    return t.to(device=device, non_blocking=True).float().div_(255.0)
