"""The reference feature extractor for sample-quality metrics: one per dataset, trained on its real images.

A feature vector has two halves, each scaled to carry half of the real training images' feature variance
(``TOTAL_VARIANCE`` in all, so an FD of 100 is a shift as large as the real images' whole spread):

- **content**: a small network trained on the dataset's own real training images, no downloaded weights.
  With labels (two or more classes) it is medivae's small CNN classifier (``classifier.py``; features from
  its penultimate layer, name ``cnn``); without labels the encoder of a small convolutional autoencoder
  (name ``ae``). Both are trained to keep what tells images apart, and barely see blur: a Gaussian blur of
  one pixel moves MedNIST hands less in these features than two halves of the real images differ.
- **detail**: the local RMS amplitude of the three finest octaves of a Laplacian pyramid (Burt & Adelson
  1983; each level is the image minus its 5-tap binomial blur, then the blurred image halved) on a 4 x 4
  grid of cells. Blur removes exactly this. It is fixed, not learned: training a network to tell blurred
  from sharp images would teach it the very degradation the metric is checked with, and its sensitivity
  would depend on how long it trained.

The extractor is trained once per dataset, with a fixed seed, and kept in
``ROOT/<name>-<key>/`` (config.json, weights.safetensors, scales.json, info.json), where ``key`` hashes what
the caller says the data is (source, split, label filter, ...) and the extractor's own settings: never the
run's seed or family, so every run on the same data is scored in the same feature space.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from tqdm import tqdm

from medivae.data.imageset import ImageSet, as_tensor, to_float
from medivae.evaluation import classifier as clf
from medivae.models.blocks import decoder_trunk, encoder_trunk, widths_for
from medivae.runtime.device import one_thread
from medivae.runtime.errors import UserError
from medivae.runtime.io import atomic_write_text
from medivae.runtime.seeding import numpy_rng, torch_generator

VERSION = 2  # 1: content features only, trained with the run's seed
REFERENCE_SEED = 0  # the extractor's training seed: fixed, so it depends on the data alone
# Trained under one torch thread (runtime.device.one_thread): with 2 threads the same phantoms gave other
# weights (CPU kernels sum in another order), so the thread count would decide which extractor a machine gets.
FIT_THREADS = 1
MAX_TRAIN_IMAGES = 20000  # a random subset above this: the extractor need not see every image
MAX_SCALE_IMAGES = 5000  # training images the feature scales are measured on
DETAIL_LEVELS = 3  # octaves from the Nyquist limit down: 1/4-1/2, 1/8-1/4, 1/16-1/8 cycles/pixel
DETAIL_GRID = 4  # cells per side
TOTAL_VARIANCE = 100.0  # of the real training images' features: half content, half detail
_BINOMIAL = (1.0, 4.0, 6.0, 4.0, 1.0)


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
    images: np.ndarray, epochs: int = 5, batch_size: int = 128, lr: float = 1e-3, seed: int = REFERENCE_SEED,
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


def _binomial_blur(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) -> the same blurred by the separable 5-tap binomial kernel, reflected at the edges."""
    k = torch.tensor(_BINOMIAL, dtype=x.dtype, device=x.device) / 16.0
    x = F.pad(x, (2, 2, 2, 2), mode="reflect")
    return F.conv2d(F.conv2d(x, k.view(1, 1, 1, 5)), k.view(1, 1, 5, 1))


def detail_features(x: torch.Tensor, levels: int = DETAIL_LEVELS, grid: int = DETAIL_GRID) -> torch.Tensor:
    """x: float (B, C, H, W) in [0, 1] -> (B, levels * grid * grid): per octave (finest first) and cell,
    the RMS of the band-pass image. Channels are averaged first: blur takes detail from all of them."""
    g = x.float().mean(1, keepdim=True)  # (B, 1, H, W)
    out = []
    for _ in range(levels):
        low = _binomial_blur(g)
        band = g - low  # what this octave adds to the coarser image
        out.append(F.adaptive_avg_pool2d(band.square(), grid).sqrt().flatten(1))  # (B, grid * grid)
        g = low[..., ::2, ::2]
    return torch.cat(out, 1)


@dataclass
class Reference:
    """A trained extractor. ``name`` is "cnn" or "ae"; metrics in its space are called FD-<name>.
    ``scales``: one factor for the content block, then one per detail level (``fit_scales``)."""

    name: str
    net: nn.Module
    folder: Path
    scales: list[float]
    device: str | torch.device = "cpu"

    @torch.no_grad()
    def _blocks(self, images: np.ndarray | torch.Tensor, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
        """(content (N, F), detail (N, levels * cells)) float64, unscaled."""
        net = self.net.to(self.device).eval()
        content, detail = [], []
        for i in range(0, len(images), batch_size):
            chunk = images[i : i + batch_size]
            x = to_float(chunk, self.device) if isinstance(chunk, np.ndarray) else chunk.float().to(self.device)
            content.append(net.embed(x).double().cpu())
            detail.append(detail_features(x).double().cpu())
        if not content:
            return np.zeros((0, 0)), np.zeros((0, 0))
        return torch.cat(content).numpy(), torch.cat(detail).numpy()

    def features(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """uint8 array or float tensor in [0, 1] (N, C, H, W) -> (N, F + levels * cells) float64: the content
        and detail blocks, scaled."""
        content, detail = self._blocks(images)
        cells = detail.shape[1] // len(self.scales[1:]) if len(detail) else 0
        per_column = np.repeat(np.asarray(self.scales[1:]), cells)
        return np.concatenate([content * self.scales[0], detail * per_column], 1)

    def content_features(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """The network's own features (N, F), unscaled, without the detail block."""
        return self._blocks(images)[0]


def fit_scales(content: np.ndarray, detail: np.ndarray, levels: int = DETAIL_LEVELS) -> list[float]:
    """Factors that give the content block (N, F) half of ``TOTAL_VARIANCE`` and each detail level's columns
    (N, levels * cells) an equal share of the other half, measured on real training images."""
    def factor(block: np.ndarray, share: float) -> float:
        var = float(block.var(0).sum())
        return float(np.sqrt(share / var)) if var > 0 else 1.0  # a constant block carries nothing anyway

    half = TOTAL_VARIANCE / 2
    return [factor(content, half)] + [factor(b, half / levels) for b in np.split(detail, levels, axis=1)]


def has_labels(s: ImageSet) -> bool:
    return len(s.label_names) >= 2 and bool((s.labels >= 0).all()) and len(np.unique(s.labels)) >= 2


def reference_key(description: dict) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _save_ae(model: SmallAE, folder: Path) -> None:
    clf.save_network(model, folder)


def _load(name: str, folder: Path) -> tuple[nn.Module, list[float]]:
    if name == "cnn":
        net = clf.load_classifier(folder)
    else:
        try:
            net = SmallAE(AEConfig(**json.loads((folder / "config.json").read_text())))
            net.load_state_dict(load_file(str(folder / "weights.safetensors")))
        except (OSError, ValueError, TypeError, RuntimeError) as e:
            raise UserError(f"{folder}: cannot load the reference autoencoder ({type(e).__name__}: {e})") \
                from None
    try:
        scales = [float(s) for s in json.loads((folder / "scales.json").read_text())["scales"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{folder}: cannot read the feature scales ({type(e).__name__}: {e}); delete the folder "
                        "to train the extractor again") from None
    return net.eval(), scales


def _subset(train: ImageSet, n: int, purpose: str) -> ImageSet:
    if len(train) <= n:
        return train
    keep = numpy_rng(REFERENCE_SEED, purpose).permutation(len(train))[:n]
    return train.subset(np.sort(keep))


def _fit_net(name: str, sub: ImageSet, n_classes: int, epochs: int, width: int, progress: bool, device):
    if name == "cnn":
        return clf.fit_classifier(sub.images, sub.labels, n_classes, epochs=epochs, seed=REFERENCE_SEED,
                                  width=width, progress=progress, device=device)
    return fit_autoencoder(sub.images, epochs=epochs, seed=REFERENCE_SEED, width=width, progress=progress,
                           device=device)


def load_or_fit_reference(
    root: Path, train: ImageSet, description: dict, epochs: int = 5, width: int = 16,
    progress: bool = True, device: str | torch.device = "cpu",
) -> Reference:
    """The extractor for ``train`` under ``root``: loaded when a matching one was saved, else trained (seed
    ``REFERENCE_SEED``) and saved. ``description`` says what the data is and enters the cache key; it must
    not hold anything of a run (its seed, its family), or runs on the same data would not share features."""
    name = "cnn" if has_labels(train) else "ae"
    info = {**description, "extractor": name, "version": VERSION, "epochs": epochs, "width": width,
            "seed": REFERENCE_SEED, "fit_threads": FIT_THREADS,
            "detail": {"levels": DETAIL_LEVELS, "grid": DETAIL_GRID}}
    folder = Path(root) / f"{name}-{reference_key(info)}"
    if (folder / "info.json").exists():  # written last: its presence means the folder is complete
        net, scales = _load(name, folder)
        return Reference(name, net, folder, scales, device)
    with one_thread():  # FIT_THREADS: the same data gives the same weights on any machine's thread count
        net = _fit_net(name, _subset(train, MAX_TRAIN_IMAGES, "reference-subset"), len(train.label_names),
                       epochs, width, progress, device)
        if name == "cnn":
            clf.save_classifier(net.cpu(), folder)
        else:
            _save_ae(net.cpu(), folder)
        ref = Reference(name, net.eval(), folder, [1.0] * (1 + DETAIL_LEVELS), device)
        ref.scales = fit_scales(*ref._blocks(_subset(train, MAX_SCALE_IMAGES, "reference-scales").images))
    atomic_write_text(folder / "scales.json", json.dumps({"scales": ref.scales, "total_variance": TOTAL_VARIANCE,
                                                          "blocks": ["content", "detail levels finest first"]}))
    atomic_write_text(folder / "info.json", json.dumps({**info, "n_train": min(len(train), MAX_TRAIN_IMAGES)},
                                                       indent=2, default=str))
    return ref
