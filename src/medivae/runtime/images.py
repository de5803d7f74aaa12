"""PNG mosaics of image batches, written atomically."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medivae.runtime.io import atomic_write_bytes


def grid(images: torch.Tensor | np.ndarray, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """(N, C, H, W) float in [0, 1] -> uint8 (rows*H, cols*W[, 3]) mosaic with a white gutter."""
    a = images.detach().cpu().float().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if a.dtype != np.uint8:
        a = np.clip(np.round(a * 255), 0, 255).astype(np.uint8)
    n, c, h, w = a.shape
    cols = nrow or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    out = np.full((c, rows * (h + pad) + pad, cols * (w + pad) + pad), 255, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        out[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = a[i]
    return out[0] if c == 1 else out.transpose(1, 2, 0)


IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}  # what an image --out may be named


def save_png(array: np.ndarray, path: str | Path, min_side: int = 0) -> Path:
    """Write a uint8 image atomically, as JPEG when ``path`` ends in .jpg/.jpeg and as PNG otherwise; upscale
    (nearest) small mosaics so they are viewable."""
    import io

    img = Image.fromarray(array)
    if min_side and min(img.size) < min_side:
        k = int(math.ceil(min_side / min(img.size)))
        img = img.resize((img.width * k, img.height * k), Image.NEAREST)
    path = Path(path)
    fmt = IMAGE_FORMATS.get(path.suffix.lower(), "PNG")
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    atomic_write_bytes(path, buf.getvalue())
    return path


def save_grid(images, path: str | Path, nrow: int | None = None) -> Path:
    return save_png(grid(images, nrow), path)
