"""The bottom layer of file decoding: the error every decoder raises, and the 2D image decoder.

These live below ``readers`` (which dispatches to ``dicom``, ``nifti`` and the 2D reader here) and
below ``folder`` (which lists files using ``readers.file_kind``), so that imports among them flow
one way: decoders never import the dispatcher that calls them.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


class UnreadableFile(Exception):
    """One input file that cannot be used; the loader skips it, counts it and reports the reason."""


def read_image(src: Path | BinaryIO, channels: int) -> np.ndarray:
    """One PNG/JPEG/TIFF/BMP -> uint8 (C, H, W) at its own size; 16-bit and float images are
    rescaled min..max to 8 bits (they carry no display window)."""
    try:
        with Image.open(src) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                a = np.asarray(im, dtype=np.float64)
                if not np.isfinite(a).all():
                    raise UnreadableFile("holds NaN or infinite pixel values")
                lo, hi = float(a.min()), float(a.max())
                a = np.zeros_like(a) if hi <= lo else (a - lo) / (hi - lo) * 255.0
                return a.round().astype(np.uint8)[None]
            arr = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, EOFError,
            Image.DecompressionBombError) as e:
        raise UnreadableFile(f"not a readable image ({type(e).__name__}: {str(e)[:100]})") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
