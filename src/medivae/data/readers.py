"""One file (2D image, DICOM or NIfTI; on disk or as bytes from an archive) -> uint8 frames.

Frames keep their native size; resizing happens later, in batches, in ``preprocess.prepare``.
A file that cannot be used raises :class:`UnreadableFile` with a reason a person can act on.

This module is the dispatcher above the format decoders (``decode``, ``dicom``, ``nifti``); they
never import it back. ``UnreadableFile`` and ``IMAGE_SUFFIXES`` are defined in ``decode`` and
re-exported here, where callers have always imported them from.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medivae.data.decode import IMAGE_SUFFIXES, UnreadableFile, read_image
from medivae.data.dicom import DICOM_SUFFIXES, is_dicom_file, read_dicom
from medivae.data.nifti import is_nifti_file, read_nifti
from medivae.data.preprocess import prepare
from medivae.data.windowing import parse_normalize, parse_window

__all__ = ["IMAGE_SUFFIXES", "UnreadableFile", "ReadOptions", "Frames", "file_kind", "read_file", "read_prepared"]


@dataclass(frozen=True)
class ReadOptions:
    channels: int = 1
    window: object = None  # windowing.Window or None
    normalize: object = None  # windowing.Normalization
    nifti_axis: str = "axial"

    @classmethod
    def from_config(cls, cfg) -> ReadOptions:
        return cls(cfg.channels, parse_window(cfg.window), parse_normalize(cfg.normalize), cfg.nifti_axis)


@dataclass
class Frames:
    images: np.ndarray  # uint8 (F, C, H, W), native size
    group: str | None = None  # patient key (DICOM), in memory only
    window: str = ""  # intensity mapping used, "" for ordinary 8-bit images
    n_constant: int = 0  # uniform frames/slices dropped


def file_kind(path: Path, sniff: bool = True) -> str | None:
    """"image", "dicom", "nifti" or None (not an input file). ``sniff`` reads the DICOM preamble
    of files without a known suffix (PACS exports often have none)."""
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if is_nifti_file(path):
        return "nifti"
    if suffix in DICOM_SUFFIXES or (sniff and is_dicom_file(path)):
        return "dicom"
    return None


def read_file(src: Path | bytes, name: str, kind: str, opts: ReadOptions) -> Frames:
    if kind == "image":
        return Frames(read_image(_stream(src), opts.channels)[None])
    if kind == "dicom":
        d = read_dicom(_stream(src), opts.window, opts.normalize)
        return Frames(d.frames, d.group, d.window, d.n_constant)
    if kind == "nifti":
        n = read_nifti(src, name, opts.nifti_axis, opts.window, opts.normalize)
        return Frames(n.frames, None, n.window, n.n_constant)
    raise ValueError(f"unknown file kind {kind!r}")


def read_prepared(path: Path, size: int, opts: ReadOptions, resize_mode: str = "pad") -> np.ndarray:
    """One file of any kind a source folder may hold (image, DICOM with its windowing, NIfTI slices) ->
    model-ready uint8 (F, C, size, size), as a source of such files would load it. Raises UnreadableFile."""
    path = Path(path)
    kind = file_kind(path)
    if kind is None:
        raise UnreadableFile("not an image, DICOM or NIfTI file")
    return prepare(read_file(path, path.name, kind, opts).images, size, opts.channels, resize_mode)


def _stream(src: Path | bytes):
    return io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src
