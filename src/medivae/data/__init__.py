"""Data sources. Every source returns uint8 ``ImageSet`` splits; see :func:`load_dataset`."""

from __future__ import annotations

import math
import warnings

import numpy as np

from medivae.data.cache import load_cached, take
from medivae.data.collect import MemorySink
from medivae.data.imageset import ImageSet, label_code, to_float
from medivae.data.phantoms import LABEL_NAMES as PHANTOM_LABELS
from medivae.data.phantoms import make_phantoms
from medivae.data.preprocess import prepare
from medivae.data.sources import SOURCE_HELP, build, resolve
from medivae.data.split import split_indices
from medivae.runtime.constants import MAX_PHANTOMS
from medivae.runtime.errors import UserError

__all__ = ["ImageSet", "to_float", "load_dataset", "load_source", "SOURCE_HELP"]


def load_source(cfg, *, progress: bool = True) -> dict[str, ImageSet]:
    """Read ``cfg.source`` at the model size, with the splits it provides itself ("all" if none).
    File sources go through the decoded cache (``cfg.cache``), so their images are memmaps; the phantoms
    are drawn from ``cfg.split_seed``."""
    spec = cfg.source
    if _is_phantoms(spec):
        return {"all": _phantoms(spec, cfg, cfg.split_seed)}
    src = resolve(spec, progress)
    if cfg.cache:
        built = load_cached(src, cfg, lambda sink: build(src, cfg, sink, progress))
    else:
        built = build(src, cfg, MemorySink((cfg.channels, cfg.image_size, cfg.image_size)), progress)
        built.meta["cache"] = "off"
    _report(built.meta)
    return built.imagesets()


def _is_phantoms(spec: str) -> bool:
    return spec == "phantoms" or spec.startswith("phantoms:")


def _phantoms(spec: str, cfg, seed: int) -> ImageSet:
    n = 3000
    if ":" in spec:
        try:
            n = int(spec.split(":", 1)[1])
        except ValueError:
            raise UserError(f"bad source {spec!r}: write phantoms:N with N a whole number") from None
        if not 10 <= n <= MAX_PHANTOMS:
            raise UserError(f"bad source {spec!r}: phantoms:N takes 10 to {MAX_PHANTOMS} images (N x size^2 bytes "
                            "are made in memory)")
    full = make_phantoms(n, cfg.image_size, seed)
    full.images = prepare(full.images, cfg.image_size, cfg.channels)
    return full


def _report(meta: dict) -> None:
    """Warnings for what the user should know about their data, on every run (cached or not)."""
    src = meta.get("source", "data")
    if meta.get("n_skipped"):
        warnings.warn(f"{src}: skipped {meta['n_skipped']} of {meta['n_files']} files that could not be used "
                      f"(e.g. {meta['skipped'][0]}); see 'medivae data inspect'", stacklevel=3)
    if meta.get("n_native_sizes", 0) > 1:
        sizes = ", ".join(f"{k} ×{v}" for k, v in list(meta["native_sizes"].items())[:3])
        how = "zero-padded" if meta.get("resize_mode") == "pad" else "centre-cropped"
        size = meta["size"]
        warnings.warn(f"{src}: images come in {meta['n_native_sizes']} sizes ({sizes}, ...); each was {how} "
                      f"to a square and resized to {size}×{size} (--resize-mode)", stacklevel=3)


def _label_indices(s: ImageSet, wanted: tuple[str, ...]) -> np.ndarray:
    if not wanted:
        return np.arange(len(s))
    unknown = [w for w in wanted if label_code(s.label_names, w) is None]
    if unknown:
        raise UserError(f"unknown label(s) {unknown}; this source has {list(s.label_names) or 'no labels'}")
    codes = [label_code(s.label_names, w) for w in wanted]
    return np.flatnonzero(np.isin(s.labels, codes))


def _split(s: ImageSet, idx: np.ndarray, val: float, test: float, seed: int) -> dict[str, np.ndarray]:
    groups = None if s.groups is None else s.groups[idx]
    return {k: idx[v] for k, v in split_indices(s.labels[idx], val, test, seed, groups).items()}


def _take(s: ImageSet, idx: np.ndarray, tag: str) -> ImageSet:
    """A split of ``s``: a view when it is all of ``s``; on disk when ``s`` is a cached memmap."""
    if len(idx) == len(s) and np.array_equal(idx, np.arange(len(s))):
        return ImageSet(s.images, s.labels, s.label_names, s.groups, dict(s.meta))
    if isinstance(s.images, np.memmap):
        groups = None if s.groups is None else s.groups[idx]
        return ImageSet(take(s.images, idx, tag), s.labels[idx], s.label_names, groups, dict(s.meta))
    return s.subset(idx)


def load_dataset(cfg, *, progress: bool = True) -> dict[str, ImageSet]:
    """train/val/test splits at the model size; a source without its own splits gets a stratified split,
    seeded with ``cfg.split_seed`` (never the training seed), in which a group (patient, volume) never
    straddles two splits."""
    if _is_phantoms(cfg.source):  # their class names are known before thousands of them are drawn
        _label_indices(ImageSet(np.zeros((0, 1, 1, 1), np.uint8), np.zeros(0), PHANTOM_LABELS), cfg.labels)
    raw = load_source(cfg, progress=progress)
    seed = cfg.split_seed
    keep = {k: _label_indices(v, cfg.labels) for k, v in raw.items()}
    if "all" in raw:
        parts = _split(raw["all"], keep["all"], cfg.val_fraction, cfg.test_fraction, seed)
        plan = {name: ("all", idx) for name, idx in parts.items()}
    else:
        plan = {name: (name, idx) for name, idx in keep.items()}
        if "val" not in raw or "test" not in raw:
            frac_v = cfg.val_fraction if "val" not in raw else 0.0
            frac_t = cfg.test_fraction if "test" not in raw else 0.0
            parts = _split(raw["train"], keep["train"], frac_v, frac_t, seed)
            plan["train"] = ("train", parts["train"])
            plan.setdefault("val", ("train", parts["val"]))
            plan.setdefault("test", ("train", parts["test"]))
    out = {name: _take(raw[src], idx, src) for name, (src, idx) in plan.items()}
    for name, s in out.items():
        s.meta = {**s.meta, "split": name, "n": len(s)}
    if len(out["train"]) == 0:
        raise UserError(f"{cfg.source}: no training images left after filtering/splitting")
    _check_carved(cfg, raw, out)
    return out


def _check_carved(cfg, raw: dict[str, ImageSet], out: dict[str, ImageSet]) -> None:
    """A validation or test split carved out of the source's images by a fraction > 0 must not come out empty:
    a run would pick its best checkpoint on nothing ("val loss nan") and commands that need held-out images
    would fail later. Splits the source brings itself are taken as they are."""
    for name, fraction in (("val", cfg.val_fraction), ("test", cfg.test_fraction)):
        if name not in raw and fraction > 0 and len(out[name]) == 0:
            n = sum(len(s) for s in out.values())
            flag = f"--{name}-fraction"
            raise UserError(f"{cfg.source}: {n} image{' is' if n == 1 else 's are'} too few for the splits: {flag} "
                            f"{fraction:g} leaves the {'validation' if name == 'val' else 'test'} split empty; "
                            f"give more images (about {math.ceil(0.5 / fraction) + 1} per class), a larger "
                            f"{flag}, or {flag} 0")
