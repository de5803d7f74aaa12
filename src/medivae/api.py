"""The Python API: what the CLI and notebooks call. Nothing runs at import."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from medivae.config import DataConfig, RunConfig, TrainConfig
from medivae.data import ImageSet, load_dataset, to_float
from medivae.errors import UserError
from medivae.generate import (
    encode_mean,
    interpolate,
    reconstruct,
    sample_prior,
    save_grid,
)
from medivae.models import build_model
from medivae.seeding import seed_everything, torch_generator
from medivae.train import checkpoint as ckpt
from medivae.train.device import pick_device
from medivae.train.trainer import Trainer, check_resumable


def train(cfg: RunConfig, run_dir: str | Path, resume: bool = False, progress: bool = True) -> Path:
    """Train ``cfg`` into ``run_dir``; write checkpoints, metrics and sample/interpolation/reconstruction PNGs."""
    run_dir = Path(run_dir)
    if resume:
        check_resumable(run_dir)
        saved = RunConfig.load(run_dir / "config.json")
        cfg = dataclasses.replace(saved, train=dataclasses.replace(saved.train, epochs=cfg.train.epochs))
    elif (run_dir / "last").exists():
        raise UserError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
    t = cfg.train
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    seed_everything(t.seed)
    splits = load_dataset(cfg.data, t.seed, progress)
    names = splits["train"].label_names
    if cfg.model.num_classes > 0:
        if not names:
            raise UserError(f"model {cfg.model.name!r} is conditional but {cfg.data.source} has no labels")
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=len(names)))
    cfg = dataclasses.replace(cfg, label_names=tuple(names))
    device = pick_device(t.device)
    model = build_model(cfg.model)
    trainer = Trainer(cfg, model, device, run_dir, progress)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / "config.json")
    _save_data_summary(run_dir, splits)
    if resume and (run_dir / "last").exists():
        trainer.resume()
    trainer.fit(splits["train"], splits["val"])
    write_figures(run_dir, model, cfg, splits["test"] if len(splits["test"]) else splits["val"], device)
    return run_dir


def _save_data_summary(run_dir: Path, splits: dict[str, ImageSet]) -> None:
    from medivae.io import atomic_write_text

    summary = {k: {"n": len(v), "labels": v.label_counts(), "meta": _public_meta(v.meta)} for k, v in splits.items()}
    atomic_write_text(run_dir / "data.json", json.dumps(summary, indent=2, default=str) + "\n")


def _public_meta(meta: dict) -> dict:
    """Meta safe to write: drops anything that could identify a patient."""
    return {k: v for k, v in meta.items() if "patient" not in k.lower() and k not in ("groups", "series")}


def write_figures(run_dir: Path, model, cfg: RunConfig, split: ImageSet, device, n: int = 64) -> None:
    seed = cfg.train.seed
    save_grid(sample_prior(model, n, torch_generator(seed, "samples"), device), run_dir / "samples.png", nrow=8)
    g = torch_generator(seed, "interpolation")
    z = torch.randn(2, model.latent_dim, generator=g)
    save_grid(interpolate(model, z[0], z[1], 10, "slerp", device), run_dir / "interpolation.png", nrow=10)
    if len(split):
        k = min(16, len(split))
        x = to_float(split.images[:k], device)
        y = _labels_for(model, cfg, split.labels[:k], device)
        both = torch.cat([x.cpu(), reconstruct(model, x, y)])
        save_grid(both, run_dir / "reconstructions.png", nrow=k)


def _labels_for(model, cfg: RunConfig, labels: np.ndarray, device):
    if cfg.model.num_classes <= 0:
        return None
    return torch.as_tensor(labels).clamp(min=0).to(device)


def load_run(run_dir: str | Path, which: str = "best", device: str = "auto"):
    """(model in eval mode on device, RunConfig, device) from a run folder's ``best/`` or ``last/``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run folder")
    folder = run_dir / which
    if not (folder.exists() or folder.with_name(which + ".prev").exists()):
        folder = run_dir / "last"
    cfg = RunConfig.from_dict(ckpt.read_config(folder))
    dev = pick_device(device)
    model = build_model(cfg.model)
    ckpt.load_checkpoint(folder, model)
    return model.to(dev).eval(), cfg, dev


def label_index(cfg: RunConfig, label: str | None) -> int | None:
    if label is None:
        return None
    if cfg.model.num_classes <= 0:
        raise UserError(f"--label needs a conditional model (this run is {cfg.model.name!r}); train with --model cvae")
    if label not in cfg.label_names:
        raise UserError(f"unknown label {label!r}; this run knows {list(cfg.label_names)}")
    return cfg.label_names.index(label)


def sample(run_dir, n: int, out, seed: int | None = None, label: str | None = None, device="auto") -> Path:
    model, cfg, dev = load_run(run_dir, device=device)
    if n < 1:
        raise UserError(f"-n must be >= 1, not {n}")
    g = torch_generator(cfg.train.seed if seed is None else seed, "sample")
    imgs = sample_prior(model, n, g, dev, label_index(cfg, label))
    return save_grid(imgs, out)


def load_image(path: str | Path, cfg: RunConfig) -> torch.Tensor:
    """One image file (PNG/JPEG/...) -> float (1, C, S, S) at the run's size."""
    from medivae.data.folder import decode_image

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such image file")
    try:
        arr = decode_image(path, cfg.data.image_size, cfg.data.channels, cfg.data.resize_mode)
    except (OSError, ValueError, SyntaxError) as e:
        raise UserError(f"{path}: not a readable image ({type(e).__name__})") from None
    return to_float(arr[None])


def interpolate_run(run_dir, out, steps: int = 8, mode: str = "linear", src=None, dst=None, seed=None, device="auto"):
    model, cfg, dev = load_run(run_dir, device=device)
    if steps < 2:
        raise UserError(f"--steps must be >= 2, not {steps}")
    if (src is None) != (dst is None):
        raise UserError("give both --from and --to, or neither (then two prior draws are used)")
    if src is not None:
        z0 = encode_mean(model, load_image(src, cfg).to(dev))[0]
        z1 = encode_mean(model, load_image(dst, cfg).to(dev))[0]
    else:
        g = torch_generator(cfg.train.seed if seed is None else seed, "interpolate")
        z0, z1 = torch.randn(2, model.latent_dim, generator=g)
    return save_grid(interpolate(model, z0, z1, steps, mode, dev), out, nrow=steps)


def reconstruct_run(run_dir, data: str | None, out, split: str = "test", n: int = 16, device="auto") -> Path:
    model, cfg, dev = load_run(run_dir, device=device)
    data_cfg = cfg.data if data is None else dataclasses.replace(cfg.data, source=data, labels=())
    splits = load_dataset(data_cfg, cfg.train.seed, progress=False)
    if split not in splits:
        raise UserError(f"unknown split {split!r}; choose train, val or test")
    s = splits[split]
    if len(s) == 0:
        raise UserError(f"split {split!r} of {data_cfg.source} is empty")
    k = min(n, len(s))
    x = to_float(s.images[:k], dev)
    y = _labels_for(model, cfg, s.labels[:k], dev)
    return save_grid(torch.cat([x.cpu(), reconstruct(model, x, y)]), out, nrow=k)


def demo_config(epochs: int = 8, n_images: int = 3000) -> RunConfig:
    """The demo: the article's model on built-in phantoms, sized for 1–3 minutes on 2 CPU cores."""
    return RunConfig(
        data=DataConfig(source=f"phantoms:{n_images}", image_size=64),
        train=TrainConfig(epochs=epochs, batch_size=128, lr=1e-3),
    )
