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


def summarize(cfg, preview: Path | None = None, progress: bool = True,
              force: bool = False) -> dict[str, Any]:
    """Counts, shapes, labels and intensities of every split; a preview grid written to ``preview`` (.png or
    .jpg; an existing file is replaced only with ``force``), checked before the source is read."""
    from medivae.runtime.images import IMAGE_FORMATS, save_grid
    from medivae.runtime.paths import check_output_file

    if preview is not None:
        preview = check_output_file(preview, force=force, suffixes=tuple(IMAGE_FORMATS))
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


def native_side(source: str) -> int | None:
    """The longer image side of a source when it can be read without decoding the images: ``medmnist:NAME@S``
    (S, 28 by default), MedMNIST-layout ``.npz`` files (the header of ``train_images``) and folders of 2D
    images or DICOM files (``folder_side``); None otherwise."""
    import zipfile

    if Path(source).is_dir():
        return folder_side(Path(source))
    if source.startswith("medmnist:"):
        from medivae.data.medmnist import parse_spec

        return parse_spec(source)[1]
    if not source.lower().endswith(".npz"):
        return None
    try:
        with zipfile.ZipFile(source) as z, z.open("train_images.npy") as f:
            fmt = np.lib.format
            read = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(fmt.read_magic(f))
            shape = read(f)[0] if read else ()
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None  # the loader reports what is wrong with the file
    return int(max(shape[1:3])) if len(shape) >= 3 else None


def folder_side(root: Path, sample: int = 32) -> int | None:
    """The longest side among up to ``sample`` files spread over a folder, from their headers only (PIL opens
    lazily; pydicom stops before the pixels). None when the folder holds no such file or other kinds (NIfTI
    volumes, whose slice size depends on --nifti-axis)."""
    from medivae.data.folder import list_folder

    files, kinds, _ = list_folder(root)
    if not files or set(kinds) - {"image", "dicom"}:
        return None
    step = max(1, len(files) // sample)
    sides = []
    for path, kind in list(zip(files, kinds, strict=True))[::step][:sample]:
        try:
            if kind == "image":
                from PIL import Image

                with Image.open(path) as im:
                    sides.append(max(im.size))
            else:
                import pydicom

                ds = pydicom.dcmread(path, stop_before_pixels=True)
                sides.append(max(int(ds.Rows), int(ds.Columns)))
        except Exception:  # noqa: BLE001  (an unreadable file is the loader's to report)
            continue
    return max(sides) if sides else None
