"""MedMNIST-layout ``.npz`` files: ``{train,val,test}_images`` and ``{train,val,test}_labels``."""

from __future__ import annotations

import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np

from medivae.data.imageset import ImageSet
from medivae.runtime.errors import UserError

SPLITS = ("train", "val", "test")
MAX_CLASSES = 10_000  # a guard: a corrupt label column must not make us name 2**63 classes


def _as_nchw(arr: np.ndarray, path: Path, key: str) -> np.ndarray:
    if arr.ndim == 3:  # (N, H, W) gray
        arr = arr[:, None]
    elif arr.ndim == 4 and arr.shape[-1] in (1, 3, 4):  # (N, H, W, C)
        arr = arr.transpose(0, 3, 1, 2)
    else:
        raise UserError(f"{path}: {key} has shape {arr.shape}; expected (N, H, W) or (N, H, W, C) 2D images")
    if arr.dtype.kind not in "biuf" or 0 in arr.shape[2:]:
        raise UserError(f"{path}: {key} is {arr.dtype} {arr.shape}; expected numeric images, >= 1x1")
    return arr if arr.dtype == np.uint8 else _to_uint8(arr, path, key)


def _to_uint8(arr: np.ndarray, path: Path, key: str) -> np.ndarray:
    """Numeric images (N, C, H, W) -> uint8. Floats in [0, 1] are scaled by 255, floats and integers in [0, 255]
    are taken as they are; NaN/inf, or values outside both ranges, are refused: clipping them would train on
    images that are not the user's (a NaN pixel once made a [0, 1] file skip its scaling, all near-black)."""
    if arr.size == 0:
        return arr.astype(np.uint8)
    if arr.dtype.kind == "f":
        finite = np.isfinite(arr).reshape(len(arr), -1).all(1)
        if not finite.all():
            raise UserError(f"{path}: {key} holds NaN or infinite values in {int((~finite).sum())} of {len(arr)} "
                            "images; replace them (or drop those images) before using the file")
    lo, hi = float(arr.min()), float(arr.max())
    if arr.dtype.kind == "f" and lo >= 0 and hi <= 1.0:
        arr = arr * 255.0
    elif lo < 0 or hi > 255:
        kind = "float" if arr.dtype.kind == "f" else "integer"
        allowed = "[0, 1] or [0, 255]" if kind == "float" else "0..255"
        raise UserError(f"{path}: {key} holds {kind} values from {lo:g} to {hi:g}; medivae reads {kind} images in "
                        f"{allowed}: rescale them to that range first")
    return np.round(arr).astype(np.uint8)


def _read(data, key: str, path: Path) -> np.ndarray:
    try:
        arr = data[key]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise UserError(f"{path}: array {key!r} is damaged ({type(e).__name__}: {e})") from None
    if not isinstance(arr, np.ndarray):  # a zip member that is not .npy comes back as bytes
        raise UserError(f"{path}: {key!r} is not a NumPy array")
    return arr


def _label_table(raw: np.ndarray, n: int, path: Path, key: str) -> np.ndarray:
    """(n, columns) class indices; refuses text, a wrong count, and values no class count could reach."""
    if raw.dtype.kind not in "biuf" or ((raw.size % n or not raw.size) if n else raw.size):
        raise UserError(f"{path}: {key} is {raw.dtype} {raw.shape}; expected {n} whole-number class labels")
    if n == 0:
        return np.zeros((0, 1), dtype=np.int64)
    if not np.isfinite(raw).all() or raw.min() < -1 or raw.max() >= MAX_CLASSES:
        raise UserError(f"{path}: {key} holds values outside -1 (unlabelled) .. {MAX_CLASSES - 1}")
    return raw.reshape(n, -1)


def load_npz(path: str | Path, label_names: tuple[str, ...] = ()) -> dict[str, ImageSet]:
    """All splits present in the file, as stored (not resized)."""
    path = Path(path)
    try:
        data = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"{path}: not a readable .npz file ({e})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):  # a bare .npy renamed to .npz
        raise UserError(f"{path}: a single .npy array, not an .npz archive of train_images/... arrays")
    with data:
        keys = set(data.files)
        present = [s for s in SPLITS if f"{s}_images" in keys]
        if "train_images" not in keys:
            raise UserError(
                f"{path}: no 'train_images' array (found {sorted(keys)}); expected the MedMNIST layout "
                "train_images/val_images/test_images with matching *_labels"
            )
        out = {}
        for split in present:
            images = _as_nchw(_read(data, f"{split}_images", path), path, f"{split}_images")
            labels = np.full(len(images), -1, dtype=np.int64)
            if f"{split}_labels" in keys:
                raw = _label_table(_read(data, f"{split}_labels", path), len(images), path, f"{split}_labels")
                if raw.shape[1] == 1:
                    labels = raw[:, 0].astype(np.int64)
                elif split == "train":  # one label column per finding (ChestMNIST): no single class
                    warnings.warn(f"{path}: labels are multi-label ({raw.shape[1]} columns); images are "
                                  "used unlabelled", stacklevel=2)
            out[split] = ImageSet(images, labels, meta={"source": str(path), "split": split})
    n_classes = max((int(s.labels.max()) + 1 for s in out.values() if len(s)), default=0)
    names = tuple(label_names) or tuple(str(i) for i in range(n_classes))
    for s in out.values():
        s.label_names = names
    return out
