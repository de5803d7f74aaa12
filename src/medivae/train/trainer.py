"""The training loop: reads top to bottom. Per-family differences live in step functions."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from medivae.config import RunConfig
from medivae.data import ImageSet, to_float
from medivae.errors import UserError
from medivae.io import atomic_write_text
from medivae.losses import ELBOTerms, kl_weight, neg_elbo
from medivae.seeding import derive_seed, torch_generator
from medivae.train import checkpoint as ckpt
from medivae.train.device import autocast, autocast_dtype


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    best_val: float = math.inf
    best_epoch: int = 0
    lr: float = 0.0
    nan_events: int = 0


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of epoch ``epoch``: depends on (seed, epoch) only, so resuming is exact."""
    return torch.randperm(n, generator=torch_generator(seed, "shuffle", epoch))


def batch_indices(order: torch.Tensor, batch_size: int):
    for i in range(0, len(order), batch_size):
        yield order[i : i + batch_size]


def gather(images: np.ndarray | torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """uint8 batch from an in-memory tensor or a memmap (sorted reads are sequential on disk)."""
    if isinstance(images, torch.Tensor):
        return images.index_select(0, idx)
    return torch.from_numpy(np.ascontiguousarray(images[np.sort(idx.numpy())]))


def elbo_step(model, x, y, beta: float, free_bits: float, generator=None, sample=True) -> ELBOTerms:
    """The VAE family's step: forward with a reparameterised sample, per-sample negative ELBO terms."""
    out = model(x, y, sample=sample, generator=generator)
    return neg_elbo(model.likelihood, out, x, beta=beta, free_bits=free_bits)


class Trainer:
    """Fits one model on one ImageSet train/val pair, writing ``last/``, ``best/`` and ``metrics.jsonl``."""

    def __init__(self, cfg: RunConfig, model, device: torch.device, run_dir: Path, progress: bool = True):
        self.cfg, self.model, self.device, self.run_dir = cfg, model, device, Path(run_dir)
        self.progress = progress
        t = cfg.train
        self.amp_dtype = autocast_dtype(device, t.precision)
        self.memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
        self.model.to(device=device, memory_format=self.memory_format)
        fused = device.type in ("cuda", "cpu")
        self.optimizer = torch.optim.Adam(
            model.parameters(), lr=t.lr, weight_decay=t.weight_decay, fused=fused
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.state = TrainState(lr=t.lr)
        self.step_model = torch.compile(model) if t.compile else model

    # --- data -------------------------------------------------------------------------------------
    def _to_device(self, xb: torch.Tensor) -> torch.Tensor:
        return to_float(xb, self.device).contiguous(memory_format=self.memory_format)

    def _labels(self, split: ImageSet, idx: torch.Tensor):
        if self.cfg.model.num_classes <= 0:
            return None
        return torch.from_numpy(split.labels)[idx].clamp(min=0).to(self.device)

    # --- loop ---------------------------------------------------------------------------------
    def fit(self, train: ImageSet, val: ImageSet) -> TrainState:
        t = self.cfg.train
        images = torch.from_numpy(train.images) if isinstance(train.images, np.ndarray) else train.images
        for epoch in range(self.state.epoch + 1, t.epochs + 1):
            start = time.perf_counter()
            tr = self.train_epoch(train, images, epoch)
            seconds = time.perf_counter() - start
            va = self.evaluate(val)
            self.state.epoch = epoch
            improved = va["loss"] < self.state.best_val
            if improved:
                self.state.best_val, self.state.best_epoch = va["loss"], epoch
            self._log(epoch, tr, va, seconds, len(train))
            self.save("last")
            if improved:
                self.save("best")
        return self.state

    def train_epoch(self, train: ImageSet, images, epoch: int) -> dict[str, float]:
        t, model = self.cfg.train, self.model
        model.train()
        n = len(train)
        order = epoch_order(n, t.seed, epoch)
        steps_per_epoch = math.ceil(n / t.batch_size)
        sums = {"loss": 0.0, "rec": 0.0, "kl": 0.0}
        bar = tqdm(
            total=n, desc=f"epoch {epoch}/{t.epochs}", unit="img", disable=not self.progress, leave=False
        )
        for step, idx in enumerate(batch_indices(order, t.batch_size)):
            beta = kl_weight(t.kl_schedule, self.cfg.model.beta, epoch - 1 + step / steps_per_epoch, t.warmup_epochs)
            x = self._to_device(gather(images, idx))
            y = self._labels(train, idx)
            with autocast(self.device, self.amp_dtype):
                terms = elbo_step(self.step_model, x, y, beta, t.free_bits)
            loss = terms.loss.mean()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at epoch {epoch}, step {step}")
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if t.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            b = len(idx)
            rec, kl = terms.rec.detach().sum().item(), terms.kl.detach().sum().item()
            sums["loss"] += rec + kl
            sums["rec"] += rec
            sums["kl"] += kl
            bar.update(b)
            bar.set_postfix(loss=f"{(rec + kl) / b:.1f}", rec=f"{rec / b:.1f}", kl=f"{kl / b:.1f}", beta=f"{beta:.2f}")
        bar.close()
        return {k: v / n for k, v in sums.items()}

    @torch.no_grad()
    def evaluate(self, split: ImageSet, batch_size: int = 256) -> dict[str, float]:
        """Mean negative ELBO (single sample, fixed noise so epochs compare), reconstruction and KL."""
        self.model.eval()
        n = len(split)
        if n == 0:
            return {"loss": float("nan"), "rec": float("nan"), "kl": float("nan")}
        gen = torch_generator(self.cfg.train.seed, "validation", device=self.device)
        images = torch.from_numpy(split.images) if isinstance(split.images, np.ndarray) else split.images
        sums = {"loss": 0.0, "rec": 0.0, "kl": 0.0}
        for idx in batch_indices(torch.arange(n), batch_size):
            x = self._to_device(gather(images, idx))
            with autocast(self.device, self.amp_dtype):
                terms = elbo_step(self.model, x, self._labels(split, idx), 1.0, 0.0, generator=gen)
            sums["rec"] += terms.rec.sum().item()
            sums["kl"] += terms.kl.sum().item()
        sums["loss"] = sums["rec"] + sums["kl"]
        return {k: v / n for k, v in sums.items()}

    # --- bookkeeping ----------------------------------------------------------------------------
    def _log(self, epoch, tr, va, seconds, n_train):
        rec = {
            "epoch": epoch,
            **{f"train_{k}": v for k, v in tr.items()},
            **{f"val_{k}": v for k, v in va.items()},
            "lr": self.optimizer.param_groups[0]["lr"],
            "seconds": seconds,
            "images_per_s": n_train / max(seconds, 1e-9),
        }
        path = self.run_dir / "metrics.jsonl"
        lines = _read_metrics_lines(path, upto_epoch=epoch - 1)
        lines.append(json.dumps(rec))
        atomic_write_text(path, "\n".join(lines) + "\n")
        if self.progress:
            tqdm.write(
                f"epoch {epoch}: train -ELBO {tr['loss']:.2f} (rec {tr['rec']:.2f}, KL {tr['kl']:.2f}) | "
                f"val -ELBO {va['loss']:.2f} (rec {va['rec']:.2f}, KL {va['kl']:.2f}) | "
                f"{rec['images_per_s']:.0f} img/s"
            )

    def save(self, name: str) -> None:
        rng = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                rng[f"torch_cuda_{i}"] = s
        ckpt.save_checkpoint(
            self.run_dir / name,
            self.model,
            self.cfg.to_dict(),
            optimizer=self.optimizer,
            state=vars(self.state).copy(),
            extra_tensors=rng,
        )

    def resume(self) -> None:
        state = ckpt.load_checkpoint(self.run_dir / "last", self.model, self.optimizer)
        rng = state.pop("rng", {})
        if "torch_cpu" in rng:
            torch.set_rng_state(rng["torch_cpu"])
        if torch.cuda.is_available():
            states = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
            if states:
                torch.cuda.set_rng_state_all(states)
        known = set(vars(TrainState()))
        self.state = TrainState(**{k: v for k, v in state.items() if k in known})
        self.model.to(device=self.device, memory_format=self.memory_format)


def _read_metrics_lines(path: Path, upto_epoch: int) -> list[str]:
    """Existing metric lines up to ``upto_epoch`` (a resumed run rewrites what came after)."""
    if not path.exists():
        return []
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["epoch"] <= upto_epoch:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return keep


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_resumable(run_dir: Path) -> None:
    if not (Path(run_dir) / "config.json").exists():
        raise UserError(f"{run_dir}: nothing to resume (no config.json); drop --resume to start a new run")


__all__ = ["Trainer", "TrainState", "elbo_step", "read_metrics", "derive_seed", "check_resumable"]
