"""A small CNN classifier trained on the user's own real images.

It serves twice: as the reference feature extractor for sample-quality metrics (its penultimate
layer; no Inception weights need downloading) and as the classifier of train-on-synthetic /
test-on-real utility checks. Saved as JSON config + safetensors weights.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save
from torch import nn
from tqdm import tqdm

from medivae.data.imageset import as_tensor, to_float
from medivae.runtime.errors import UserError
from medivae.runtime.seeding import torch_generator


@dataclass(frozen=True)
class ClassifierConfig:
    in_channels: int = 1
    num_classes: int = 2
    width: int = 32
    feature_dim: int = 128


class SmallCNN(nn.Module):
    """Three conv stages (BN + ReLU + 2x2 max-pool), global average pooling, a feature layer, logits."""

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        layers: list[nn.Module] = []
        c = cfg.in_channels
        for out in (w, 2 * w, 4 * w):
            layers += [nn.Conv2d(c, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(inplace=True),
                       nn.Conv2d(out, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            c = out
        self.trunk = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.features = nn.Sequential(nn.Linear(c, cfg.feature_dim), nn.ReLU(inplace=True))
        self.head = nn.Linear(cfg.feature_dim, cfg.num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """x: float (B, C, H, W) in [0, 1] -> features (B, feature_dim)."""
        return self.features(self.trunk(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """-> logits (B, num_classes)."""
        return self.head(self.embed(x))


def fit_classifier(
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    width: int = 32,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> SmallCNN:
    """Train on uint8 (N, C, H, W) images with integer labels; class-balanced loss weights."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(images) == 0 or (labels < 0).any():
        raise UserError("the classifier needs labelled images (every label >= 0)")
    torch.manual_seed(seed)
    model = SmallCNN(ClassifierConfig(images.shape[1], num_classes, width)).to(device)
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    balanced = len(labels) / (num_classes * np.maximum(counts, 1))
    weight = torch.tensor(balanced, dtype=torch.float32, device=device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
    x_all, y_all = as_tensor(images), as_tensor(labels)
    for epoch in tqdm(range(epochs), desc="reference classifier", disable=not progress, leave=False):
        model.train()
        order = torch.randperm(len(x_all), generator=torch_generator(seed, "classifier", epoch))
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            x = to_float(x_all[idx], device)
            if torch.rand(1, generator=torch_generator(seed, "flip", epoch, i)).item() < 0.5:
                x = x.flip(-1)  # left-right flips: cheap augmentation that keeps anatomy plausible
            loss = nn.functional.cross_entropy(model(x), y_all[idx].to(device), weight=weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def predict_proba(model: SmallCNN, images: np.ndarray, batch_size: int = 512, device="cpu") -> np.ndarray:
    """uint8 (N, C, H, W) -> class probabilities (N, num_classes)."""
    model.eval()
    out = [torch.softmax(model(to_float(images[i : i + batch_size], device)), 1).cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, model.cfg.num_classes))


@torch.no_grad()
def embed(
    model: SmallCNN, images: np.ndarray | torch.Tensor, batch_size: int = 512, device="cpu"
) -> np.ndarray:
    """uint8 array or float tensor in [0, 1] (N, C, H, W) -> features (N, feature_dim) float64."""
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        x = to_float(chunk, device) if isinstance(chunk, np.ndarray) else chunk.float().to(device)
        out.append(model.embed(x).double().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, model.cfg.feature_dim))


def save_network(model, folder: str | Path) -> None:
    """A small network's weights.safetensors and config.json (its ``cfg`` dataclass), each written atomically:
    serialised in memory first, so a full disk is an OSError here and never a half-written file."""
    from medivae.runtime.io import atomic_write_bytes, atomic_write_text

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / "weights.safetensors", save({k: v.contiguous() for k, v in model.state_dict().items()}))
    atomic_write_text(folder / "config.json", json.dumps(asdict(model.cfg), indent=2))


def save_classifier(model: SmallCNN, folder: str | Path) -> None:
    save_network(model, folder)


def load_classifier(folder: str | Path) -> SmallCNN:
    folder = Path(folder)
    try:
        cfg = ClassifierConfig(**json.loads((folder / "config.json").read_text()))
        model = SmallCNN(cfg)
        model.load_state_dict(load_file(str(folder / "weights.safetensors")))
    except (OSError, ValueError, TypeError, RuntimeError) as e:
        raise UserError(f"{folder}: cannot load the reference classifier ({type(e).__name__}: {e})") from None
    return model.eval()
