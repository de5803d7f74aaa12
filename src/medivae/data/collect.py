"""Collecting decoded frames into one uint8 array: batched preprocessing, labels, groups, skip counts.

Sources push frames in their native size; the collector preprocesses runs of same-sized frames in
batches (``preprocess.prepare``) and appends them to a sink: memory, or a ``.npy`` file that the
cache later maps from disk. Group keys (patient IDs, file paths) become anonymous integers here;
the keys themselves are dropped when the collector is.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib import format as npy_format

from medivae.data.imageset import ImageSet
from medivae.data.preprocess import prepare
from medivae.runtime.errors import UserError

BATCH = 512  # frames preprocessed together
MAX_LISTED = 20  # skipped files named in meta


@dataclass
class Built:
    """A decoded source: all splits in one array, each split a contiguous range."""

    images: np.ndarray  # uint8 (N, C, S, S); a memmap when read from the cache
    labels: np.ndarray  # int64 (N,), -1 = unlabelled
    groups: np.ndarray  # int64 (N,) anonymous group (patient/volume/file) codes
    label_names: tuple[str, ...]
    splits: dict[str, tuple[int, int]]
    meta: dict[str, Any] = field(default_factory=dict)

    def imagesets(self) -> dict[str, ImageSet]:
        out = {}
        for name, (a, b) in self.splits.items():
            meta = {**self.meta, "split": name}
            out[name] = ImageSet(self.images[a:b], self.labels[a:b], self.label_names, self.groups[a:b], meta)
        return out


class MemorySink:
    def __init__(self, tail: tuple[int, int, int]):
        self.tail, self.chunks = tail, []

    def append(self, batch: np.ndarray) -> None:
        self.chunks.append(batch)

    def finish(self) -> np.ndarray:
        return np.concatenate(self.chunks) if self.chunks else np.empty((0, *self.tail), np.uint8)


class NpyFileSink:
    """Appends batches to a ``.npy`` file whose header is rewritten with the final count at the end
    (NumPy pads the header so the first dimension can grow in place)."""

    def __init__(self, path: Path, tail: tuple[int, int, int]):
        self.path, self.tail, self.n = Path(path), tail, 0
        self.f = self.path.open("wb")
        self.header_len = self._write_header()

    def _write_header(self) -> int:
        self.f.seek(0)
        d = {"descr": "|u1", "fortran_order": False, "shape": (self.n, *self.tail)}
        npy_format.write_array_header_1_0(self.f, d)
        return self.f.tell()

    def append(self, batch: np.ndarray) -> None:
        self.f.write(np.ascontiguousarray(batch, dtype=np.uint8).tobytes())
        self.n += len(batch)

    def finish(self) -> np.ndarray:
        end = self.f.tell()
        if self._write_header() != self.header_len:  # never expected: NumPy reserves the room
            raise RuntimeError("npy header grew while appending")
        self.f.seek(end)
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        return np.load(self.path, mmap_mode="r")

    def close(self) -> None:
        self.f.close()


class Collector:
    def __init__(self, name: str, size: int, channels: int, mode: str, sink, label_names: Sequence[str] = ()):
        self.name, self.size, self.channels, self.mode, self.sink = name, size, channels, mode, sink
        self.fixed_names = tuple(label_names)
        self.pending: list[np.ndarray] = []
        self.labels: list[str] = []
        self.groups: list[int] = []
        self._group_codes: dict[object, int] = {}  # in memory only; dropped with the collector
        self._anonymous = 0
        self.splits: dict[str, list[int]] = {}
        self.current: str | None = None
        self.n = self.n_files = self.n_constant = 0
        self.skipped: list[str] = []
        self.windows: Counter = Counter()
        self.sizes: Counter = Counter()

    def add(self, frames: np.ndarray, labels: str | Sequence[str] = "", group=None, split: str = "all",
            window: str = "", n_constant: int = 0) -> None:
        """frames: uint8 (F, C, H, W) of one size. ``group`` None: every frame is its own group."""
        if split != self.current:
            self.start_split(split)
        if self.pending and (self.pending[0].shape[1:] != frames.shape[1:] or self._pending_len() >= BATCH):
            self._flush()
        self.pending.append(frames)
        f = len(frames)
        if isinstance(labels, str):
            self.labels.extend([labels] * f)
        else:
            if len(labels) != f:
                raise ValueError(f"{len(labels)} labels for {f} frames")
            self.labels.extend(labels)
        if group is None:  # negative codes never collide with named groups
            self.groups.extend(range(-self._anonymous - f, -self._anonymous))
            self._anonymous += f
        else:
            self.groups.extend([self._group_codes.setdefault(group, len(self._group_codes))] * f)
        self.n += f
        self.n_constant += n_constant
        self.sizes[f"{frames.shape[2]}x{frames.shape[3]}"] += f
        if window:
            self.windows[window] += f

    def skip(self, name: str, reason: str) -> None:
        self.skipped.append(f"{name}: {reason}")

    def _pending_len(self) -> int:
        return sum(len(p) for p in self.pending)

    def start_split(self, split: str) -> None:
        if split in self.splits:
            raise ValueError(f"split {split!r} added twice; sources must add each split in one run")
        self._flush()
        self.splits[split] = [self.n, self.n]
        self.current = split

    def _flush(self) -> None:
        if self.pending:
            batch = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
            self.sink.append(prepare(batch, self.size, self.channels, self.mode))
            self.pending = []
        if self.current is not None:
            self.splits[self.current][1] = self.n

    def finish(self, relabel: Callable[[list[str]], list[str]] | None = None) -> Built:
        """``relabel`` maps the per-image label keys to class names once all are known (archives)."""
        self._flush()
        if self.n == 0:
            raise UserError(self._nothing_message())
        images = self.sink.finish()
        keys = relabel(self.labels) if relabel else self.labels
        names = self.fixed_names or tuple(sorted({k for k in keys if k}))
        index = {n: i for i, n in enumerate(names)}
        labels = np.fromiter((index.get(k, -1) for k in keys), dtype=np.int64, count=len(keys))
        _, groups = np.unique(np.asarray(self.groups, dtype=np.int64), return_inverse=True)
        splits = {k: (a, b) for k, (a, b) in self.splits.items()}
        return Built(images, labels, groups.astype(np.int64).reshape(-1), names, splits, self._meta())

    def _nothing_message(self) -> str:
        if not self.skipped:
            return f"{self.name}: no usable images found"
        if self.n_files == 1:
            return f"{self.skipped[0]}"
        return f"{self.name}: none of the {self.n_files} files could be used (first: {self.skipped[0]})"

    def _meta(self) -> dict[str, Any]:
        return {
            "n_files": self.n_files,
            "n_images": self.n,
            "n_skipped": len(self.skipped),
            "skipped": self.skipped[:MAX_LISTED],
            "n_constant_skipped": self.n_constant,
            "native_sizes": dict(self.sizes.most_common(5)),
            "n_native_sizes": len(self.sizes),
            "windows": dict(self.windows.most_common(5)),
            "size": self.size,
            "channels": self.channels,
            "resize_mode": self.mode,
        }
