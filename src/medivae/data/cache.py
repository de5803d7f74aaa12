"""The decoded cache: each source, decoded and preprocessed once, kept as a uint8 ``.npy`` mapped from disk.

An entry is a folder ``<root>/decoded/<key>/`` (images.npy, labels.npy, groups.npy, info.json),
keyed by a hash of the source (every input file's path, size and mtime) and of the preprocessing
(size, channels, resize mode, window, normalisation, slice axis). It is built in a temporary
folder and published by one ``rename``: a crash or Ctrl-C leaves no half-written entry. Groups
are stored as anonymous integers; patient IDs never reach the disk. Deleting the root at any
time is safe: entries are rebuilt on demand.

This is a storage layer: it imports nothing that decodes sources (``sources``, ``medmnist`` import it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

from medivae.data.collect import Built, MemorySink, NpyFileSink
from medivae.runtime.errors import UserError
from medivae.runtime.io import atomic_write_text, fsync_dir

CACHE_VERSION = 2  # 2: float sources with NaN/inf or out-of-range values are refused, not stored
STALE_SECONDS = 24 * 3600  # temporary folders older than this were left by a killed process


def cache_root() -> Path:
    return Path(os.environ.get("MEDIVAE_CACHE") or "~/.cache/medivae").expanduser()


def preprocessing(cfg) -> dict:
    """Everything that changes the decoded bytes (label filters and split fractions do not)."""
    return {
        "image_size": cfg.image_size,
        "channels": cfg.channels,
        "resize_mode": cfg.resize_mode,
        "window": cfg.window,
        "normalize": cfg.normalize,
        "nifti_axis": cfg.nifti_axis,
    }


def entry_key(src, cfg) -> str:
    key = {"v": CACHE_VERSION, "source": src.fingerprint(), "prep": preprocessing(cfg)}
    blob = json.dumps(key, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def load_cached(src, cfg, decode: Callable[[MemorySink | NpyFileSink], Built]) -> Built:
    """The decoded source from the cache; on a miss ``decode(sink)`` fills a new entry, which is then
    published. ``decode`` is passed in (``sources.build`` bound to ``src``) because this storage layer
    sits below the decoders: importing them would close the cycle cache -> sources -> medmnist -> cache."""
    root = cache_root() / "decoded"
    entry = root / entry_key(src, cfg)
    if entry.is_dir():
        try:
            return _open(entry, "hit")
        except (OSError, ValueError, KeyError) as e:
            warnings.warn(f"cache entry {entry} is damaged ({e}); decoding again", stacklevel=2)
            shutil.rmtree(entry, ignore_errors=True)
    tail = (cfg.channels, cfg.image_size, cfg.image_size)
    try:
        tmp = _new_temp(root, entry.name)
    except OSError as e:
        warnings.warn(f"cannot write the cache in {root} ({e}); decoding in memory (set MEDIVAE_CACHE)",
                      stacklevel=2)
        return decode(MemorySink(tail))
    _build_entry(tmp, entry, decode, tail)
    return _open(entry, "built")


def _new_temp(root: Path, name: str) -> Path:
    """A fresh temporary folder in ``root`` to build entry ``name`` in (raises OSError if read-only)."""
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale(root)
    return Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))


def _build_entry(tmp: Path, entry: Path, decode: Callable[[NpyFileSink], Built], tail: tuple[int, ...]) -> None:
    """Decode into ``tmp`` and publish it as ``entry``; any failure leaves nothing half-written."""
    try:
        sink = NpyFileSink(tmp / "images.npy", tail)
        try:
            built = decode(sink)
        finally:
            sink.close()
        _write_entry(tmp, built)
        _publish(tmp, entry)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"could not write the decoded cache in {entry.parent} ({e}); free some space, "
                        "set MEDIVAE_CACHE to another folder, or pass --no-cache") from None
    except BaseException:  # Ctrl-C, bad input...: leave nothing half-written
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_entry(folder: Path, built: Built) -> None:
    np.save(folder / "labels.npy", built.labels)
    np.save(folder / "groups.npy", built.groups)
    info = {
        "version": CACHE_VERSION,
        "shape": list(built.images.shape),
        "label_names": list(built.label_names),
        "splits": {k: list(v) for k, v in built.splits.items()},
        "meta": built.meta,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    atomic_write_text(folder / "info.json", json.dumps(info, indent=1, default=str) + "\n")


def _publish(tmp: Path, entry: Path) -> None:
    try:
        os.rename(tmp, entry)
    except OSError:
        if not (entry / "info.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process published the same entry first
    fsync_dir(entry.parent)


def _open(entry: Path, status: str) -> Built:
    info = json.loads((entry / "info.json").read_text())
    # read-only: nothing can alter the entry, and the trainer gathers batches from it with sorted NumPy
    # reads (a copy-on-write map wrapped as a tensor measured ~10x slower; see benchmarks/bench_data.py)
    images = np.load(entry / "images.npy", mmap_mode="r")
    labels = np.load(entry / "labels.npy")
    groups = np.load(entry / "groups.npy")
    if list(images.shape) != info["shape"] or len(labels) != len(images) or len(groups) != len(images):
        raise ValueError("array shapes disagree with info.json")
    splits = {k: (int(a), int(b)) for k, (a, b) in info["splits"].items()}
    meta = {**info["meta"], "cache": status}
    return Built(images, labels, groups, tuple(info["label_names"]), splits, meta)


def _remove_stale(root: Path) -> None:
    now = time.time()
    for d in root.glob(".*"):
        try:
            if d.is_dir() and now - d.stat().st_mtime > STALE_SECONDS:
                shutil.rmtree(d, ignore_errors=True)
        except OSError:
            pass


def take(images: np.ndarray, idx: np.ndarray, tag: str, chunk: int = 4096) -> np.ndarray:
    """``images[idx]`` for a cached memmap, written once next to the entry and mapped from disk,
    so a split of a dataset larger than RAM never has to fit in RAM. ``tag`` names the range
    ``images`` covers inside the entry (e.g. its split), so equal indices of different ranges differ."""
    idx = np.asarray(idx, dtype=np.int64)
    entry = Path(images.filename).parent
    digest = hashlib.sha256(tag.encode() + str(images.shape).encode() + idx.tobytes()).hexdigest()[:24]
    path = entry / "subsets" / f"{digest}.npy"
    if path.is_file():
        out = np.load(path, mmap_mode="r")
        if out.shape == (len(idx), *images.shape[1:]):
            return out
    try:
        path.parent.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{digest}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError:
        return np.ascontiguousarray(images[idx])  # read-only cache: fall back to memory
    try:
        out = npy_format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(idx), *images.shape[1:]))
        for a in range(0, len(idx), chunk):  # sorted indices read the source almost sequentially
            out[a : a + chunk] = images[idx[a : a + chunk]]
        out.flush()
        del out
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return np.load(path, mmap_mode="r")
