"""Seeding that works for 64-bit seeds such as the article's 1767661200070.

``np.random.seed`` only takes seeds below 2**32, so the legacy global NumPy state is seeded with a
32-bit value derived from the full seed; NumPy ``Generator`` objects and torch take the whole seed.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch

DEFAULT_SEED = 1767661200070
_MASK64 = (1 << 64) - 1


def derive_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed derived deterministically from ``seed`` and ``keys`` (epoch, rank, purpose)."""
    h = hashlib.sha256(repr((int(seed), *keys)).encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy's legacy global state and torch (CPU and CUDA) from one seed."""
    seed = int(seed) & _MASK64
    random.seed(seed)
    np.random.seed(derive_seed(seed, "numpy-legacy") % (2**32))
    torch.manual_seed(seed)  # also seeds every CUDA device


def numpy_rng(seed: int, *keys: int | str) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, *keys))


def torch_generator(seed: int, *keys: int | str, device: str | torch.device = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, *keys))
    return g
