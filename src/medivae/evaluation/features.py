"""The reference feature extractor for sample-quality metrics, trained on the user's own real images.

No downloaded weights: with labels (two or more classes) it is medivae's small CNN classifier
(``classifier.py``; features from its penultimate layer, name ``cnn``); without labels it is the
encoder of a small convolutional autoencoder (name ``ae``). It is trained once on the real
training split and kept in ``RUN/reference/<name>-<key>/`` (config.json, weights.safetensors,
info.json), where ``key`` hashes the data source, split settings, seed and training budget, so a
later call with the same data reuses it and a call with other data trains its own.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from tqdm import tqdm

from medivae.data.imageset import ImageSet, as_tensor, to_float
from medivae.evaluation import classifier as clf
from medivae.models.blocks import decoder_trunk, encoder_trunk, widths_for
from medivae.runtime.errors import UserError
from medivae.runtime.io import atomic_write_text
from medivae.runtime.seeding import numpy_rng, torch_generator

MAX_TRAIN_IMAGES = 20000  # a random subset above this: the extractor need not see every image


@dataclass(frozen=True)
class AEConfig:
    in_channels: int = 1
    image_size: int = 64
    width: int = 16
    feature_dim: int = 64


class SmallAE(nn.Module):
    """Deterministic conv autoencoder: the VAE trunks (``models.blocks``) around a linear bottleneck."""

    def __init__(self, cfg: AEConfig):
        super().__init__()
        self.cfg = cfg
        widths = widths_for(cfg.image_size, cfg.width, 8 * cfg.width)
        feat = widths[-1] * 16
        self.encoder = nn.Sequential(encoder_trunk(cfg.in_channels, widths), nn.Linear(feat, cfg.feature_dim))
        self.decoder = nn.Sequential(nn.Linear(cfg.feature_dim, feat), decoder_trunk(cfg.in_channels, widths))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """x: float (B, C, H, W) in [0, 1] -> features (B, feature_dim)."""
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """-> reconstruction (B, C, H, W) in [0, 1]."""
        return torch.sigmoid(self.decoder(self.embed(x)))


def fit_autoencoder(
    images: np.ndarray, epochs: int = 5, batch_size: int = 128, lr: float = 1e-3, seed: int = 0,
    width: int = 16, progress: bool = True, device: str | torch.device = "cpu",
) -> SmallAE:
    """Train on uint8 (N, C, H, W) images with a mean-squared reconstruction loss."""
    torch.manual_seed(seed)
    model = SmallAE(AEConfig(images.shape[1], images.shape[-1], width)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x_all = as_tensor(images)
    for epoch in tqdm(range(epochs), desc="reference autoencoder", disable=not progress, leave=False):
        model.train()
        order = torch.randperm(len(x_all), generator=torch_generator(seed, "reference-ae", epoch))
        for i in range(0, len(order), batch_size):
            x = to_float(x_all[order[i : i + batch_size]], device)
            loss = (model(x) - x).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


@dataclass
class Reference:
    """A trained extractor. ``name`` is "cnn" or "ae"; metrics in its space are called FD-<name>."""

    name: str
    net: nn.Module
    folder: Path
    device: str | torch.device = "cpu"

    def features(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """uint8 array or float tensor in [0, 1] (N, C, H, W) -> (N, feature_dim) float64."""
        return clf.embed(self.net.to(self.device), images, device=self.device)


def has_labels(s: ImageSet) -> bool:
    return len(s.label_names) >= 2 and bool((s.labels >= 0).all()) and len(np.unique(s.labels)) >= 2


def reference_key(description: dict) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _save_ae(model: SmallAE, folder: Path) -> None:
    clf.save_network(model, folder)


def _load_ae(folder: Path) -> SmallAE:
    try:
        model = SmallAE(AEConfig(**json.loads((folder / "config.json").read_text())))
        model.load_state_dict(load_file(str(folder / "weights.safetensors")))
    except (OSError, ValueError, TypeError, RuntimeError) as e:
        raise UserError(f"{folder}: cannot load the reference autoencoder ({type(e).__name__}: {e})") \
            from None
    return model.eval()


def _train_subset(train: ImageSet, seed: int) -> ImageSet:
    if len(train) <= MAX_TRAIN_IMAGES:
        return train
    keep = numpy_rng(seed, "reference-subset").permutation(len(train))[:MAX_TRAIN_IMAGES]
    return train.subset(np.sort(keep))


def load_or_fit_reference(
    root: Path, train: ImageSet, description: dict, seed: int, epochs: int = 5, width: int = 16,
    progress: bool = True, device: str | torch.device = "cpu",
) -> Reference:
    """The extractor for ``train`` under ``root``: loaded when a matching one was saved, else trained
    and saved. ``description`` (data source, split settings...) enters the cache key."""
    name = "cnn" if has_labels(train) else "ae"
    info = {**description, "extractor": name, "epochs": epochs, "width": width, "seed": seed}
    folder = Path(root) / f"{name}-{reference_key(info)}"
    if (folder / "info.json").exists():  # written last: its presence means the folder is complete
        net = clf.load_classifier(folder) if name == "cnn" else _load_ae(folder)
        return Reference(name, net, folder, device)
    sub = _train_subset(train, seed)
    if name == "cnn":
        net = clf.fit_classifier(sub.images, sub.labels, len(train.label_names), epochs=epochs, seed=seed,
                                 width=width, progress=progress, device=device)
        clf.save_classifier(net.cpu(), folder)
    else:
        net = fit_autoencoder(sub.images, epochs=epochs, seed=seed, width=width, progress=progress,
                              device=device)
        _save_ae(net.cpu(), folder)
    atomic_write_text(folder / "info.json", json.dumps({**info, "n_train": len(sub)}, indent=2, default=str))
    return Reference(name, net.eval(), folder, device)
