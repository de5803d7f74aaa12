"""The Python API: what the CLI and notebooks call. Nothing runs at import."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from medivae.config import DataConfig, RunConfig, TrainConfig
from medivae.data import ImageSet, load_dataset, to_float
from medivae.data.imageset import label_code
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
from medivae.train import distributed
from medivae.train.device import pick_device
from medivae.train.trainer import Trainer, check_resumable


def train(cfg: RunConfig, run_dir: str | Path, resume: bool = False, progress: bool = True) -> Path:
    """Train ``cfg`` into ``run_dir``; write checkpoints, metrics and sample/interpolation/reconstruction PNGs."""
    run_dir = Path(run_dir)
    if resume:
        check_resumable(run_dir)
        saved = RunConfig.load(run_dir / "config.json")
        cfg = dataclasses.replace(saved, train=dataclasses.replace(saved.train, epochs=cfg.train.epochs))
    elif ckpt.exists(run_dir / "last"):
        raise UserError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
    t = cfg.train
    progress = progress and distributed.is_main()  # under torchrun only rank 0 talks and writes
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
    device = distributed.local_device(pick_device(t.device))  # cuda:LOCAL_RANK under torchrun
    own_group = distributed.setup(device)  # joins torchrun's process group; False without torchrun
    model = build_model(cfg.model)
    trainer = Trainer(cfg, model, device, run_dir, progress)
    if distributed.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "config.json")
        _save_data_summary(run_dir, splits)
        _record_environment(run_dir, trainer)
    if resume and ckpt.exists(run_dir / "last"):  # also last.prev, left by a kill mid-swap
        trainer.resume()
    trainer.fit(splits["train"], splits["val"])
    if distributed.is_main():
        write_figures(run_dir, model, cfg, splits["test"] if len(splits["test"]) else splits["val"], device)
        write_run_report(run_dir)
    if own_group:
        distributed.barrier()  # the other ranks exit once rank 0's figures and report are written
        distributed.cleanup()
    return run_dir


def _record_environment(run_dir: Path, trainer: Trainer) -> None:
    from medivae.report.environment import write_environment

    dev = trainer.device
    write_environment(
        run_dir, device=str(dev), seed=trainer.cfg.train.seed, threads=torch.get_num_threads(),
        precision=str(trainer.amp_dtype).removeprefix("torch.") if trainer.amp_dtype else "fp32",
        gpu=torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
    )


def write_run_report(run_dir: Path) -> Path | None:
    """RUN/report.html; a broken report only warns, since the run itself is complete and saved."""
    import warnings

    from medivae.report import write_report

    try:
        return write_report(run_dir)
    except Exception as e:  # the report must never cost the user a finished run
        why = f"{type(e).__name__}: {e}"
        warnings.warn(f"report not written ({why}); retry with: medivae report {run_dir}", stacklevel=2)
        return None


def _save_data_summary(run_dir: Path, splits: dict[str, ImageSet]) -> None:
    from medivae.io import atomic_write_text

    summary = {k: {"n": len(v), "labels": v.label_counts(), "meta": _public_meta(v.meta)} for k, v in splits.items()}
    atomic_write_text(run_dir / "data.json", json.dumps(summary, indent=2, default=str) + "\n")


def _public_meta(meta: dict) -> dict:
    """Meta safe to write: drops anything that could identify a patient."""
    return {k: v for k, v in meta.items() if "patient" not in k.lower() and k not in ("groups", "series")}


def write_figures(run_dir: Path, model, cfg: RunConfig, split: ImageSet, device, n: int = 64) -> None:
    seed = cfg.train.seed
    samples = prior_samples(model, cfg, n, torch_generator(seed, "samples"), device)
    save_grid(samples, run_dir / "samples.png", nrow=8)
    g = torch_generator(seed, "interpolation")
    z = torch.randn(2, model.latent_dim, generator=g)
    first = 0 if cfg.model.num_classes > 0 else None  # a conditional model interpolates within class 0
    path = interpolate(model, z[0], z[1], 10, "slerp", device, first)
    save_grid(path, run_dir / "interpolation.png", nrow=10)
    if len(split):
        k = min(16, len(split))
        x = to_float(split.images[:k], device)
        y = _labels_for(model, cfg, split.labels[:k], device)
        both = torch.cat([x.cpu(), reconstruct(model, x, y)])
        save_grid(both, run_dir / "reconstructions.png", nrow=k)


def prior_samples(model, cfg: RunConfig, n: int, generator, device, label: int | None = None) -> torch.Tensor:
    """n prior samples (n, C, H, W); a conditional model without ``label`` gets an equal block of
    rows per class, in label order."""
    if cfg.model.num_classes <= 0 or label is not None:
        return sample_prior(model, n, generator, device, label)
    k = cfg.model.num_classes
    per = -(-n // k)  # ceil
    return torch.cat([sample_prior(model, per, generator, device, c) for c in range(k)])[:n]


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
    code = label_code(cfg.label_names, label)
    if code is None:
        raise UserError(f"unknown label {label!r}; this run knows {list(cfg.label_names)}")
    return code


def sample(run_dir, n: int, out, seed: int | None = None, label: str | None = None, device="auto") -> Path:
    model, cfg, dev = load_run(run_dir, device=device)
    if n < 1:
        raise UserError(f"-n must be >= 1, not {n}")
    g = torch_generator(cfg.train.seed if seed is None else seed, "sample")
    imgs = prior_samples(model, cfg, n, g, dev, label_index(cfg, label))
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


def interpolate_run(
    run_dir, out, steps: int = 8, mode: str = "linear", src=None, dst=None, seed=None, device="auto",
    label: str | None = None,
):
    model, cfg, dev = load_run(run_dir, device=device)
    if steps < 2:
        raise UserError(f"--steps must be >= 2, not {steps}")
    if (src is None) != (dst is None):
        raise UserError("give both --from and --to, or neither (then two prior draws are used)")
    k = label_index(cfg, label)
    if cfg.model.num_classes > 0 and k is None:
        raise UserError(f"this run is conditional: pass --label, one of {list(cfg.label_names)}")
    y = None if k is None else torch.tensor([k], device=dev)
    if src is not None:
        z0 = encode_mean(model, load_image(src, cfg).to(dev), y)[0]
        z1 = encode_mean(model, load_image(dst, cfg).to(dev), y)[0]
    else:
        g = torch_generator(cfg.train.seed if seed is None else seed, "interpolate")
        z0, z1 = torch.randn(2, model.latent_dim, generator=g)
    return save_grid(interpolate(model, z0, z1, steps, mode, dev, k), out, nrow=steps)


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


def demo_config(epochs: int = 15, n_images: int = 6000) -> RunConfig:
    """The demo: the article's model on built-in phantoms, sized for 1–3 minutes on 2 CPU cores."""
    return RunConfig(
        data=DataConfig(source=f"phantoms:{n_images}", image_size=64),
        train=TrainConfig(epochs=epochs, batch_size=128, lr=1e-3),
    )


def evaluate(run_dir, data: str | None = None, split: str = "test", k: int = 100, batch_size: int = 64,
             max_images: int = 0, n_samples: int = 0, reference_epochs: int = 5,
             inception_weights: str | None = None, checkpoint: str = "best", device: str = "auto",
             progress: bool = True) -> dict:
    """Likelihood bounds, reconstruction, posterior collapse and sample quality of a run on one split;
    merged into RUN/results.json under "evaluation" (keys: medivae.evaluation.suite) and returned."""
    from medivae.evaluation.suite import EvalOptions, evaluate_run

    opts = EvalOptions(split=split, k=k, batch_size=batch_size, max_images=max_images, n_samples=n_samples,
                       reference_epochs=reference_epochs, inception_weights=inception_weights,
                       checkpoint=checkpoint)
    return evaluate_run(run_dir, data, opts, device=device, progress=progress)


def anomaly_fit(cfg: RunConfig, run_dir: str | Path, progress: bool = True) -> Path:
    """Train on the normal images only: ``cfg.data.labels`` must name exactly one label (the normal one);
    train, validation and test splits then hold normals only. Score with :func:`anomaly_score`."""
    if len(cfg.data.labels) != 1:
        raise UserError(f"an anomaly model is fitted on one normal label, not {list(cfg.data.labels)}")
    return train(cfg, run_dir, progress=progress)


def anomaly_score(run_dir, data: str | None = None, split: str = "test", out=None,
                  normal_label: str | None = None, fpr: float = 0.05, k: int = 16, gradient: bool = False,
                  n_maps: int = 16, batch_size: int = 128, device: str = "auto", precision: str = "fp32") -> dict:
    """Per-image anomaly scores, maps, AUROC/AUPRC and a threshold at ``fpr`` on validation normals;
    files in ``out`` (default RUN/anomaly), summary merged into RUN/results.json["anomaly"].
    ``precision="auto"`` scores through the bf16 fast path where the CPU/GPU has it (fp32: exact)."""
    from medivae.evaluation.anomaly import score_run

    return score_run(
        run_dir, data, split, out, normal_label, fpr, k, gradient, n_maps, batch_size, device, precision
    )


def synthesize(run_dir, n: int, out, label: str | None = None, percentile: float = 1.0, fmt: str = "png",
               seed: int | None = None, n_pairs: int = 8, reference_epochs: int = 5, device: str = "auto",
               progress: bool = True) -> dict:
    """n synthetic images minus those nearer a training image than ``percentile`` % of real test images
    are; writes images + labels, memorisation.json and nearest-pair PNGs to ``out``."""
    from medivae.evaluation.privacy import synthesize_run

    return synthesize_run(run_dir, n, out, label, percentile, fmt, seed, n_pairs, reference_epochs, device,
                          progress)


def utility(real: str, synthetic, out=None, epochs: int = 10, seed: int | None = None, width: int = 32,
            val_fraction: float = 0.1, test_fraction: float = 0.1, device: str = "auto",
            progress: bool = True, batch_size: int = 128) -> dict:
    """TSTR (train on synthetic, test on real), real + synthetic and real-only, on ``real``'s test split."""
    from medivae.evaluation.utility import utility_run

    synthetic = [synthetic] if isinstance(synthetic, (str, Path)) else list(synthetic)
    return utility_run(real, synthetic, out, epochs, seed, width, val_fraction, test_fraction, device,
                       progress, batch_size)
