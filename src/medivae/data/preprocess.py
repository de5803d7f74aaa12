"""Preprocessing in one place: channel conversion and resizing to the model size, aspect kept."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def to_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """uint8 (N, C, H, W) with C in {1, 3, 4} -> uint8 (N, channels, H, W)."""
    c = images.shape[1]
    if c == channels:
        return images
    if c == 4:  # drop alpha
        images, c = images[:, :3], 3
        if channels == 3:
            return images
    if c == 3 and channels == 1:  # ITU-R 601-2 luma, as PIL's convert("L")
        w = np.array([0.299, 0.587, 0.114], dtype=np.float32).reshape(1, 3, 1, 1)
        return np.clip((images.astype(np.float32) * w).sum(1, keepdims=True) + 0.5, 0, 255).astype(np.uint8)
    if c == 1 and channels == 3:
        return np.repeat(images, 3, axis=1)
    raise ValueError(f"cannot convert {c} channels to {channels}")


def square(images: np.ndarray, mode: str = "pad") -> np.ndarray:
    """Make (N, C, H, W) square: zero-pad the short side ("pad") or centre-crop the long one ("crop")."""
    n, c, h, w = images.shape
    if h == w:
        return images
    if mode == "crop":
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        return images[:, :, top : top + s, left : left + s]
    s = max(h, w)
    out = np.zeros((n, c, s, s), dtype=images.dtype)
    top, left = (s - h) // 2, (s - w) // 2
    out[:, :, top : top + h, left : left + w] = images
    return out


def resize(images: np.ndarray, size: int, chunk: int = 2048) -> np.ndarray:
    """Square uint8 (N, C, S, S) -> (N, C, size, size); bilinear with antialiasing when shrinking."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return np.ascontiguousarray(images)
    out = np.empty((len(images), images.shape[1], size, size), dtype=np.uint8)
    for i in range(0, len(images), chunk):
        x = torch.tensor(images[i : i + chunk], dtype=torch.float32)  # a copy: PIL's arrays are read-only
        y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out[i : i + chunk] = y.round_().clamp_(0, 255).to(torch.uint8).numpy()
    return out


def prepare(images: np.ndarray, size: int, channels: int, mode: str = "pad") -> np.ndarray:
    """Any uint8 (N, C, H, W) -> model-ready uint8 (N, channels, size, size)."""
    return resize(square(to_channels(images, channels), mode), size)
