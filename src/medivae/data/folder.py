"""Folders of 2D images (PNG/JPEG/TIFF/BMP): class subfolders, a flat folder, or a CSV of path,label."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from medivae.data.imageset import ImageSet
from medivae.data.preprocess import prepare
from medivae.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


def list_images(root: Path) -> tuple[list[Path], list[str], tuple[str, ...]]:
    """(files, label per file, class names). Class = first-level subfolder; flat folders get none."""
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    subdirs = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
    if subdirs and all(len(p.relative_to(root).parts) > 1 for p in files):
        return files, [p.relative_to(root).parts[0] for p in files], tuple(subdirs)
    return files, ["" for _ in files], ()


def read_csv_list(csv_path: Path) -> tuple[list[Path], list[str], tuple[str, ...]]:
    files, labels = [], []
    with csv_path.open(newline="") as f:
        for i, row in enumerate(csv.reader(f)):
            if not row or (i == 0 and row[0].strip().lower() == "path"):
                continue
            p = Path(row[0].strip())
            files.append(p if p.is_absolute() else csv_path.parent / p)
            labels.append(row[1].strip() if len(row) > 1 else "")
    names = tuple(sorted({lab for lab in labels if lab}))
    return files, labels, names


def decode_image(path: Path, size: int, channels: int, mode: str) -> np.ndarray:
    """One file -> uint8 (channels, size, size). Raises OSError/UnidentifiedImageError/ValueError if bad."""
    with Image.open(path) as im:
        im.load()
        if im.mode in ("I;16", "I;16B", "I", "F"):  # 16-bit/float grayscale: rescale to 8 bits
            a = np.asarray(im, dtype=np.float64)
            lo, hi = float(a.min()), float(a.max())
            a = np.zeros_like(a) if hi <= lo else (a - lo) / (hi - lo) * 255.0
            arr = a.round().astype(np.uint8)[None]
        else:
            im = im.convert("L" if channels == 1 else "RGB")
            arr = np.asarray(im, dtype=np.uint8)
            arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return prepare(arr[None], size, channels, mode)[0]


def load_folder(
    root: str | Path, size: int, channels: int, mode: str = "pad", progress: bool = True
) -> ImageSet:
    root = Path(root)
    if root.is_file() and root.suffix.lower() == ".csv":
        files, labels, names = read_csv_list(root)
    else:
        files, labels, names = list_images(root)
    if not files:
        raise UserError(f"{root}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    images = np.empty((len(files), channels, size, size), dtype=np.uint8)
    keep = np.zeros(len(files), dtype=bool)
    skipped: list[str] = []
    for i, f in enumerate(tqdm(files, desc=f"decoding {root.name}", unit="img", disable=not progress)):
        try:
            images[i] = decode_image(f, size, channels, mode)
            keep[i] = True
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
            skipped.append(f"{f.name}: {type(e).__name__}")
    if not keep.any():
        raise UserError(f"{root}: none of the {len(files)} image files could be decoded (first: {skipped[0]})")
    if skipped:
        warnings.warn(f"{root}: skipped {len(skipped)} unreadable file(s), e.g. {skipped[0]}", stacklevel=2)
    index = {n: i for i, n in enumerate(names)}
    lab = np.array([index.get(labels[i], -1) for i in range(len(files))], dtype=np.int64)
    meta = {"source": str(root), "n_files": len(files), "n_skipped": len(skipped), "skipped": skipped[:20]}
    return ImageSet(images[keep], lab[keep], names, meta=meta)
