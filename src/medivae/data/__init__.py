"""Data sources. Every source returns uint8 ``ImageSet`` splits; see :func:`load_dataset`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medivae.data.imageset import ImageSet, to_float
from medivae.data.preprocess import prepare
from medivae.data.split import split_indices
from medivae.errors import UserError

__all__ = ["ImageSet", "to_float", "load_dataset", "load_source", "SOURCE_HELP"]

SOURCE_HELP = (
    "'phantoms' (built in), 'phantoms:N', a MedMNIST-layout .npz file, "
    "a folder of PNG/JPEG/TIFF/BMP images (class subfolders optional), or a CSV of path,label"
)


def load_source(cfg, seed: int, progress: bool = True) -> dict[str, ImageSet]:
    """Read ``cfg.source`` as stored: splits it provides itself, at the model size. No split-making here."""
    spec = cfg.source
    if spec == "phantoms" or spec.startswith("phantoms:"):
        from medivae.data.phantoms import make_phantoms

        n = 3000
        if ":" in spec:
            try:
                n = int(spec.split(":", 1)[1])
            except ValueError:
                raise UserError(f"bad source {spec!r}: write phantoms:N with N a whole number") from None
            if n < 10:
                raise UserError(f"bad source {spec!r}: need at least 10 phantom images")
        full = make_phantoms(n, cfg.image_size, seed)
        full.images = prepare(full.images, cfg.image_size, cfg.channels)
        return {"all": full}
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"{spec}: no such file or folder; SOURCE is {SOURCE_HELP}")
    if path.suffix.lower() == ".npz":
        from medivae.data.npz import load_npz

        splits = load_npz(path)
        for s in splits.values():
            s.images = prepare(s.images, cfg.image_size, cfg.channels, cfg.resize_mode)
        return splits
    if path.is_dir() or path.suffix.lower() == ".csv":
        from medivae.data.folder import load_folder

        return {"all": load_folder(path, cfg.image_size, cfg.channels, cfg.resize_mode, progress)}
    raise UserError(f"{spec}: not a supported data source; SOURCE is {SOURCE_HELP}")


def _filter_labels(s: ImageSet, wanted: tuple[str, ...]) -> ImageSet:
    if not wanted:
        return s
    unknown = [w for w in wanted if w not in s.label_names]
    if unknown:
        raise UserError(f"unknown label(s) {unknown}; this source has {list(s.label_names) or 'no labels'}")
    codes = [s.label_names.index(w) for w in wanted]
    return s.subset(np.flatnonzero(np.isin(s.labels, codes)))


def load_dataset(cfg, seed: int, progress: bool = True) -> dict[str, ImageSet]:
    """train/val/test splits at the model size; a source without its own splits gets a seeded,
    stratified (and patient-grouped, when the source knows patients) split."""
    raw = load_source(cfg, seed, progress)
    raw = {k: _filter_labels(v, cfg.labels) for k, v in raw.items()}
    if "all" in raw:
        full = raw["all"]
        idx = split_indices(full.labels, cfg.val_fraction, cfg.test_fraction, seed, full.groups)
        out = {k: full.subset(v) for k, v in idx.items()}
    else:
        out = dict(raw)
        if "val" not in out or "test" not in out:
            frac_v = cfg.val_fraction if "val" not in out else 0.0
            frac_t = cfg.test_fraction if "test" not in out else 0.0
            tr = out["train"]
            idx = split_indices(tr.labels, frac_v, frac_t, seed, tr.groups)
            out["train"] = tr.subset(idx["train"])
            out.setdefault("val", tr.subset(idx["val"]))
            out.setdefault("test", tr.subset(idx["test"]))
    for name, s in out.items():
        s.meta = {**s.meta, "split": name, "n": len(s)}
    if len(out["train"]) == 0:
        raise UserError(f"{cfg.source}: no training images left after filtering/splitting")
    return out
