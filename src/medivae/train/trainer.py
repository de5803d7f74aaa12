"""The training loop: reads top to bottom. Everything a family decides -- its optimizers, its step(s) and
the loss terms they report -- comes from the family contract (models/family.py)."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from medivae.data import ImageSet, to_float
from medivae.models import family
from medivae.models.family import Diverged, StepContext, labels_for
from medivae.runtime import distributed
from medivae.runtime.device import autocast, autocast_dtype, configure_threads, keep_freed_memory
from medivae.runtime.errors import UserError
from medivae.runtime.io import atomic_write_text
from medivae.runtime.seeding import derive_seed, torch_generator
from medivae.train import checkpoint as ckpt
from medivae.train.augment import augment, parse_augment
from medivae.train.budget import plan_stages, scaled_epoch_costs
from medivae.train.metrics import METRICS_FILE, read_metrics


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    best_val: float = math.inf
    best_epoch: int = 0
    lr: float = 0.0
    nan_events: int = 0
    seconds: float = 0.0  # training time so far, for --time-budget (train/budget.py)
    planned_epochs: int = 0  # > 0: the epochs a time budget planned (train.epochs of the run from then on)
    planned_second_stage: int = 0  # the second stage's epochs in that plan (two-stage families)


def train_state(state: dict, folder) -> TrainState:
    """A checkpoint's state.json as a TrainState, each value checked: an edited file whose manifest was hashed
    again ({"epoch": "x"}) is one line, not a TypeError deep in the loop. Unknown keys (rng) are left out."""
    def bad(key):
        return UserError(f"{folder}/state.json: {key} = {state[key]!r} is not valid; the checkpoint is damaged "
                         "or was edited")

    out = TrainState()
    for key in ("epoch", "best_epoch", "nan_events", "planned_epochs", "planned_second_stage"):
        if key in state:
            v = state[key]
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise bad(key)
            setattr(out, key, v)
    for key in ("best_val", "lr", "seconds"):  # best_val is +inf until a validation loss improves on it
        if key in state:
            v = state[key]
            if not isinstance(v, int | float) or isinstance(v, bool) or math.isnan(v) or v == -math.inf:
                raise bad(key)
            if key in ("lr", "seconds") and not (math.isfinite(v) and v >= 0):
                raise bad(key)
            setattr(out, key, float(v))
    return out


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of epoch ``epoch``: depends on (seed, epoch) only, so resuming is exact."""
    return torch.randperm(n, generator=torch_generator(seed, "shuffle", epoch))


def batch_indices(order: torch.Tensor, batch_size: int):
    for i in range(0, len(order), batch_size):
        yield order[i : i + batch_size]


def batch_source(images: np.ndarray | torch.Tensor) -> torch.Tensor | np.ndarray:
    """What ``gather`` reads from: a zero-copy tensor over an in-memory array or a memmap (then only the
    pages of each batch are read). A read-only memmap stays NumPy, since torch cannot wrap it."""
    if isinstance(images, np.ndarray) and images.flags.writeable:
        return torch.from_numpy(images)
    return images


def gather(images: np.ndarray | torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """uint8 batch ``images[idx]``, in the order of ``idx``, from a tensor or a (read-only) memmap."""
    if isinstance(images, torch.Tensor):
        return images.index_select(0, idx)
    order = np.argsort(idx.numpy(), kind="stable")  # sorted reads are sequential on disk
    out = np.empty((len(idx), *images.shape[1:]), dtype=images.dtype)
    out[order] = images[idx.numpy()[order]]
    return torch.from_numpy(out)


def redundant_biases(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Biases of convolutions that feed straight into a BatchNorm (within an nn.Sequential).

    BatchNorm in training mode subtracts the batch mean of every channel, so the network's output, and
    the loss, do not depend on such a bias: its exact gradient is zero. What a backward pass computes is
    bf16 rounding noise, which Adam would turn into a random walk of the bias that changes nothing else.
    The trainer freezes them (they keep their initial values, and stay in the checkpoint), which also
    spares oneDNN a reduction over every activation: +5 to +11 % training images/s on 2 CPU cores in two
    runs of benchmarks/speed_ablation.py (benchmarks/README.md).
    """
    convs = (torch.nn.Conv2d, torch.nn.ConvTranspose2d)
    found = []
    for seq in model.modules():
        if isinstance(seq, torch.nn.Sequential):
            layers = list(seq)
            for a, b in zip(layers[:-1], layers[1:], strict=True):
                if isinstance(a, convs) and a.bias is not None and isinstance(b, torch.nn.BatchNorm2d):
                    found.append(a.bias)
    return found


class NonFiniteError(Diverged):
    """A NaN/Inf loss or gradient; the trainer rolls back and retries (see ``_train_epoch_guarded``)."""


class Trainer:
    """Fits one model on one ImageSet train/val pair, writing ``last/``, ``best/`` and ``metrics.jsonl``.
    ``cfg`` is a run's config (:class:`medivae.runfolder.config.RunConfig`: the trainer reads its ``train``,
    ``data`` and ``seed`` and saves ``to_dict()`` with each checkpoint; it is not imported here, a layer up)."""

    def __init__(self, cfg, model, device: torch.device, run_dir: Path, progress: bool = True):
        self.cfg, self.model, self.device, self.run_dir = cfg, model, device, Path(run_dir)
        self.progress = progress  # progress bars
        self.verbose = True  # one summary line per epoch, even without bars
        t = cfg.train
        self.threads = configure_threads(t.num_threads, device)  # 0: the idle cores (see device.py)
        if device.type == "cpu":
            keep_freed_memory()  # no page faults for each step's activations (see device.py)
        self.amp_dtype = autocast_dtype(device, t.precision)
        self.memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
        self.model.to(device=device, memory_format=self.memory_format)
        for p in redundant_biases(model):  # exact gradient 0 (see redundant_biases); computing it costs ~5 %
            p.requires_grad_(False)
        self.optimizers = model.optimizers(t, device)  # {name: optimizer}, each checkpointed and resumed
        _set_base_lrs(self.optimizers)
        self.scalers = {
            k: torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16) for k in self.optimizers
        }
        self.steps = model.training_steps()
        self.state = TrainState(lr=t.lr)
        # static shapes (one more compile for a short last batch): randn(shape) does not trace with a dynamic one
        self.nets = {
            k: distributed.wrap(torch.compile(m, dynamic=False) if t.compile else m, device)  # DDP under torchrun
            for k, m in model.trained_modules().items()
        }
        self.main = distributed.is_main()  # only rank 0 writes files, logs and shows progress
        self.tensorboard = _tensorboard_writer(self.run_dir) if t.tensorboard and self.main else None

    # --- data -------------------------------------------------------------------------------------
    def _to_device(self, xb: torch.Tensor) -> torch.Tensor:
        return to_float(xb, self.device).contiguous(memory_format=self.memory_format)

    def _labels(self, split: ImageSet, idx: torch.Tensor):
        return labels_for(self.model, split.labels[idx.numpy()], self.device)

    # --- loop ---------------------------------------------------------------------------------
    def fit(self, train: ImageSet, val: ImageSet) -> TrainState:
        images = batch_source(train.images)
        distributed.assert_same(self.state.epoch, "the epoch to resume from")
        first_best = family.first_best_epoch(self.model, self.cfg.train)
        while self.state.epoch < self.cfg.train.epochs:  # a time budget may change the epochs (_spend_budget)
            epoch = self.state.epoch + 1
            start = time.perf_counter()
            tr = self._train_epoch_guarded(train, images, epoch)
            seconds = time.perf_counter() - start
            va = self.evaluate(val)
            self.state.epoch = epoch
            improved = epoch >= first_best and va["loss"] < self.state.best_val
            if improved:
                self.state.best_val, self.state.best_epoch = va["loss"], epoch
            if self.cfg.train.time_budget:
                self._spend_budget(epoch, time.perf_counter() - start, seconds, train, images)
            if self.main:
                self._log(epoch, tr, va, seconds, len(train))
                self.save("last")
                if improved:  # a kill before this is repaired on resume (see resume: _repair_best)
                    ckpt.link_copy(self.run_dir / "last", self.run_dir / "best")
        distributed.barrier()  # nobody returns before rank 0 has written the last checkpoint
        return self.state

    def train_epoch(self, train: ImageSet, images, epoch: int) -> dict[str, float]:
        t, model = self.cfg.train, self.model
        model.train()
        order = distributed.shard(epoch_order(len(train), t.seed, epoch))  # DistributedSampler + set_epoch
        n = len(order)
        steps_per_epoch = math.ceil(n / t.batch_size)
        noise = distributed.noise_generator(t.seed, epoch, self.device)  # per-rank; None: global RNG
        changes = parse_augment(t.augment)  # {} when off: no draws, the run as without augmentation
        augment_rng = torch_generator(t.seed, "augment", distributed.info().rank, epoch) if changes else None
        sums: dict[str, float] = {}
        bar = tqdm(
            total=n, desc=f"epoch {epoch}/{t.epochs}", unit="img", disable=not (self.progress and self.main),
            leave=False,
        )
        for step, idx in enumerate(batch_indices(order, t.batch_size)):
            ctx = StepContext(epoch, step, epoch - 1 + step / steps_per_epoch, t, noise)
            x = self._to_device(gather(images, idx))
            if changes:
                x = augment(x, changes, augment_rng).contiguous(memory_format=self.memory_format)
            y = self._labels(train, idx)
            terms: dict[str, torch.Tensor] = {}
            for train_step in self.steps:
                if train_step.runs(ctx):
                    terms.update(self._optimise(train_step, x, y, ctx))
            b = len(idx)
            batch = _batch_sums(terms, b)  # one host sync per batch
            for k, v in batch.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.update(b)
            bar.set_postfix({k: f"{v / b:.4g}" for k, v in batch.items()})
        bar.close()
        sums = distributed.all_reduce_sum({**sums, "n": n})
        out = {k: v / sums["n"] for k, v in sums.items() if k != "n"}
        out.update(family.epoch_end(model, ctx))  # e.g. codebook usage: statistics of the whole epoch
        return out

    def _optimise(self, train_step, x, y, ctx: StepContext) -> dict[str, torch.Tensor]:
        """One of the family's steps: its loss, backward, (clipping,) the finiteness check, its optimizer."""
        optimizer, scaler = self.optimizers[train_step.optimizer], self.scalers[train_step.optimizer]
        if ctx.train.lr_schedule != "constant":
            factor = lr_factor(ctx.train.lr_schedule, train_step.progress(ctx))
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
        with autocast(self.device, self.amp_dtype):
            out = train_step.run(self.nets, x, y, ctx)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(out.loss).backward()
        params = [p for g in optimizer.param_groups for p in g["params"]]
        norm = None
        if ctx.train.grad_clip > 0:
            scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(params, ctx.train.grad_clip)
        elif train_step.skip_above > 0:
            scaler.unscale_(optimizer)
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        self._check_finite(out.loss, params, scaler, ctx.epoch, ctx.step)
        terms = out.terms
        if train_step.skip_above > 0:  # VDVAE: skip the update when the (pre-clipping) gradient norm explodes;
            skip = bool(norm > train_step.skip_above)  # DDP's gradients are all-reduced, so all ranks agree
            terms = {**terms, "grad_norm": norm.detach().float(), "grad_skipped": torch.tensor(float(skip))}
            if skip:
                scaler.update()
                return terms
        scaler.step(optimizer)
        scaler.update()
        return terms

    @torch.no_grad()
    def evaluate(self, split: ImageSet, batch_size: int = 256) -> dict[str, float]:
        """Mean per-image validation terms of the family (single sample, fixed noise so epochs compare)."""
        self.model.eval()
        n = len(split)
        if n == 0:
            return {"loss": float("nan")}
        gen = torch_generator(self.cfg.train.seed, "validation", device=self.device)
        images = batch_source(split.images)
        sums: dict[str, float] = {}
        for idx in batch_indices(distributed.shard(torch.arange(n), pad=False), batch_size):
            x = self._to_device(gather(images, idx))
            with autocast(self.device, self.amp_dtype):
                terms = self.model.validation_terms(x, self._labels(split, idx), gen)
            for k, v in _batch_sums(terms, len(idx)).items():
                sums[k] = sums.get(k, 0.0) + v
        sums = distributed.all_reduce_sum(sums)  # each rank saw its shard; all agree on the totals
        return {**{k: v / n for k, v in sums.items()}, **family.validation_end(self.model)}

    # --- time budget (train/budget.py) ------------------------------------------------------------
    def _spend_budget(self, epoch: int, wall: float, epoch_seconds: float, train: ImageSet, images) -> None:
        """Count an epoch's seconds against --time-budget: after the first epoch of a two-stage family, plan
        both stages; a one-stage run ends with this epoch once the budget is spent, but not before the first epoch
        that may become best/ (a VAE-GAN's first adversarial one). The ranks agree (means)."""
        world = distributed.info().world_size
        means = distributed.all_reduce_sum({"wall": wall, "epoch": epoch_seconds})
        wall, epoch_seconds = means["wall"] / world, means["epoch"] / world
        self.state.seconds += wall
        second = family.second_stage_epochs(self.model)
        if second and epoch == 1 and not self.state.planned_epochs:
            start = time.perf_counter()
            first = self.cfg.train.epochs - second
            x, y = self._pilot_batch(train, images)
            times: dict[int, float] = {}
            for e in (1, first, self.cfg.train.epochs):  # stage one now, at its end (a later discriminator), two
                times[e] = times.get(e) or self._pilot_seconds(e, x, y)
            costs = scaled_epoch_costs(epoch_seconds, wall, {"now": times[1], "one": times[first],
                                                             "two": times[self.cfg.train.epochs]})
            costs["pilot"] = time.perf_counter() - start
            costs = {k: v / world for k, v in distributed.all_reduce_sum(costs).items()}
            self.state.seconds += costs["pilot"]
            one, two = plan_stages(self.cfg.train.time_budget, self.state.seconds, costs["one"], costs["two"],
                                   first, second)
            self._apply_plan(one + two, two)
        elif (not second and self.state.seconds >= self.cfg.train.time_budget
              and epoch >= family.first_best_epoch(self.model, self.cfg.train)):  # a run ends with a best/
            self._apply_plan(epoch, 0)

    def _apply_plan(self, epochs: int, second: int) -> None:
        """Train ``epochs`` epochs in all, the last ``second`` of them the second stage; kept in state.json."""
        self.state.planned_epochs, self.state.planned_second_stage = epochs, second
        if second:
            family.plan_second_stage(self.model, second)
        train = dataclasses.replace(self.cfg.train, epochs=epochs)
        self.cfg = dataclasses.replace(self.cfg, model=self.model.cfg if second else self.cfg.model, train=train)

    def _pilot_batch(self, train: ImageSet, images) -> tuple[torch.Tensor, torch.Tensor | None]:
        idx = torch.arange(min(self.cfg.train.batch_size, len(train)))
        return self._to_device(gather(images, idx)), self._labels(train, idx)

    def _pilot_seconds(self, epoch: int, x: torch.Tensor, y) -> float:
        """Seconds of one batch (forward and backward, no update) of the steps that run in ``epoch``, the
        faster of two passes (the first warms the kernels up). Buffers, gradients and the RNG are left as
        they were, so the run goes on as if it had not been timed."""
        t = self.cfg.train
        ctx = StepContext(epoch, 0, epoch - 1.0, t, torch_generator(t.seed, "pilot", device=self.device))
        steps = [s for s in self.steps if s.runs(ctx)]
        buffers = {k: v.clone() for k, v in self.model.named_buffers()}
        rng = torch.get_rng_state()
        best = math.inf
        for _ in range(2):
            start = time.perf_counter()
            for step in steps:
                with autocast(self.device, self.amp_dtype):
                    out = step.run(self.nets, x, y, ctx)
                out.loss.backward()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            best = min(best, time.perf_counter() - start)
        for p in self.model.parameters():
            p.grad = None
        with torch.no_grad():
            for k, v in self.model.named_buffers():
                v.copy_(buffers[k])
        torch.set_rng_state(rng)
        return best

    # --- non-finite recovery ------------------------------------------------------------------------
    def _train_epoch_guarded(self, train: ImageSet, images, epoch: int) -> dict[str, float]:
        """``train_epoch``; when the loss or a gradient stops being finite, roll model, optimizer and
        RNG back to the start of the epoch, halve the learning rate and run the epoch again."""
        start = self._snapshot()
        while True:
            try:
                return self.train_epoch(train, images, epoch)
            except Diverged as e:  # a NaN/Inf (NonFiniteError), or what a family's epoch_end reports
                self._restore(start)
                self._lower_lr(str(e))

    def _check_finite(self, loss: torch.Tensor, params, scaler, epoch: int, step: int) -> None:
        """Raise NonFiniteError before a step would write NaN/Inf into the weights. Under fp16 loss
        scaling, overflowing gradients are the scaler's job (it skips the step), so only the loss counts."""
        what = None
        if not torch.isfinite(loss.detach()):
            what = "loss"
        elif not scaler.is_enabled():
            # one sum per tensor: NaN and +-Inf propagate into the total, and it costs a tenth of an
            # element-wise isfinite (1.3 ms a step on 2 cores). A total that overflows needs gradients
            # of ~1e31, which counts as diverged too.
            grads = [p.grad for p in params if p.grad is not None]
            if grads and not torch.isfinite(torch.stack([g.sum(dtype=torch.float32) for g in grads]).sum()):
                what = "gradients"
        if distributed.any_rank(what is not None):  # every rank rolls back together
            raise NonFiniteError(f"non-finite {what or 'loss on another rank'} at epoch {epoch}, step {step}")

    def _snapshot(self) -> dict:
        """In-memory copy of everything a step changes (clones keep each tensor's memory layout)."""
        snap = {
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "optimizers": {k: copy.deepcopy(o.state_dict()) for k, o in self.optimizers.items()},
            "scalers": {k: s.state_dict() for k, s in self.scalers.items()},
            "rng": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            snap["cuda_rng"] = torch.cuda.get_rng_state_all()
        return snap

    def _restore(self, snap: dict) -> None:
        """Back to ``snap``, except the learning rates: each retry lowers them further."""
        self.model.load_state_dict(snap["model"])  # copies in place: parameters stay the same objects
        for k, opt in self.optimizers.items():
            lrs = [(g["lr"], g["base_lr"]) for g in opt.param_groups]
            # a fresh deep copy, since the optimizer adopts the tensors it is given and updates them in place
            opt.load_state_dict(copy.deepcopy(snap["optimizers"][k]))
            for group, (lr, base) in zip(opt.param_groups, lrs, strict=True):
                group["lr"], group["base_lr"] = lr, base
            if snap["scalers"][k]:
                self.scalers[k].load_state_dict(snap["scalers"][k])
        torch.set_rng_state(snap["rng"])
        if "cuda_rng" in snap:
            torch.cuda.set_rng_state_all(snap["cuda_rng"])

    def _lower_lr(self, why: str) -> None:
        """Halve the learning rate (kept in state.json and metrics.jsonl), or stop after too many tries."""
        t = self.cfg.train
        self.state.nan_events += 1
        if self.state.nan_events > t.max_nan_retries:
            raise UserError(
                f"training diverged: {why}, after {t.max_nan_retries} rollback(s) halving the learning "
                f"rate (now {self.state.lr:.3g}); {self.run_dir / 'last'} holds the last good epoch, if any. "
                "Try a lower --lr, --grad-clip 1, or --precision fp32"
            )
        for opt in self.optimizers.values():
            for group in opt.param_groups:
                group["lr"], group["base_lr"] = group["lr"] / 2, group["base_lr"] / 2
        self.state.lr = next(iter(self.optimizers.values())).param_groups[0]["base_lr"]
        if self.main:
            warnings.warn(
                f"{why}: rolled back to the start of the epoch, learning rate lowered to {self.state.lr:.3g} "
                f"(retry {self.state.nan_events} of {t.max_nan_retries})",
                stacklevel=2,
            )

    # --- bookkeeping ----------------------------------------------------------------------------
    def _lr(self) -> float:
        """The learning rate shown and logged: the first optimizer's (all are halved together)."""
        return next(iter(self.optimizers.values())).param_groups[0]["lr"]

    def _log(self, epoch, tr, va, seconds, n_train):
        rec = {
            "epoch": epoch,
            **{f"train_{k}": v for k, v in tr.items()},
            **{f"val_{k}": v for k, v in va.items()},
            "lr": self._lr(),
            "nan_events": self.state.nan_events,
            "seconds": seconds,
            "images_per_s": n_train / max(seconds, 1e-9),
        }
        path = self.run_dir / METRICS_FILE
        # a resumed run rewrites the epochs after the checkpoint it resumed from
        lines = [json.dumps(row) for row in read_metrics(path) if row["epoch"] < epoch]
        lines.append(json.dumps(rec))
        atomic_write_text(path, "\n".join(lines) + "\n")
        if self.tensorboard is not None:
            for key, value in rec.items():  # train_loss -> train/loss: TensorBoard groups by prefix
                tag = key.replace("_", "/", 1) if key.startswith(("train_", "val_")) else key
                if key != "epoch":
                    self.tensorboard.add_scalar(tag, value, epoch)
            self.tensorboard.flush()
        if self.verbose:
            def show(d):
                return ", ".join(f"{k} {v:.4g}" for k, v in d.items())

            tqdm.write(f"epoch {epoch}: train {show(tr)} | val {show(va)} | {rec['images_per_s']:.0f} img/s")

    def save(self, name: str) -> None:
        rng = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                rng[f"torch_cuda_{i}"] = s
        ckpt.save_checkpoint(
            self.run_dir / name,
            self.model,
            self.cfg.to_dict(),
            optimizer=self.optimizers,
            state=vars(self.state).copy(),
            extra_tensors=rng,
        )

    def _repair_best(self) -> None:
        """best/ is linked from last/ after last/ is written; a kill between the two leaves last/ saying its
        own epoch was the best while best/ holds an older one. Link it again, so best/ is never stale."""
        last = _state_epochs(self.run_dir / "last")
        if last is None or last[0] != last[1]:
            return
        best = _state_epochs(self.run_dir / "best")
        if best is None or best[0] != last[0]:
            ckpt.link_copy(self.run_dir / "last", self.run_dir / "best")

    def continue_from(self, folder: Path, more_epochs: int) -> None:
        """Go on from another run's checkpoint ``folder`` for ``more_epochs`` epochs (``medivae anomaly
        adapt``): its weights, optimizer moments, learning rate and epoch count, so warm-ups and staged
        schedules (KL warm-up, a VAE-GAN's adversarial start, a cosine rate) go on where they were instead
        of starting again; ``cfg.train.epochs`` becomes that epoch count + ``more_epochs``. The best-so-far
        starts afresh, and the random state is this run's own."""
        state = ckpt.load_checkpoint(folder, self.model, self.optimizers)
        state.pop("rng", None)
        for opt in self.optimizers.values():
            match_optimizer_layout(opt)
        _set_base_lrs(self.optimizers)
        saved = train_state(state, folder)
        done = saved.epoch
        self.state = TrainState(epoch=done, lr=saved.lr if "lr" in state else self.cfg.train.lr)
        train = dataclasses.replace(self.cfg.train, epochs=done + more_epochs)
        self.cfg = dataclasses.replace(self.cfg, train=train)
        self.model.to(device=self.device, memory_format=self.memory_format)

    def resume(self) -> None:
        if self.main:  # finish a checkpoint swap that a kill interrupted (also when no epoch is left to run)
            for name in ("last", "best"):
                ckpt.recover(self.run_dir / name)
            self._repair_best()
        distributed.barrier()
        state = ckpt.load_checkpoint(self.run_dir / "last", self.model, self.optimizers)
        rng = state.pop("rng", {})
        if "torch_cpu" in rng:
            torch.set_rng_state(rng["torch_cpu"])
        if torch.cuda.is_available():
            states = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
            if states:
                torch.cuda.set_rng_state_all(states)
        for opt in self.optimizers.values():
            match_optimizer_layout(opt)
        _set_base_lrs(self.optimizers)  # checkpoints before the schedule existed: the lr was the base
        self.state = train_state(state, self.run_dir / "last")
        if self.state.planned_epochs:  # a time budget's plan: the resumed run follows it
            self._apply_plan(self.state.planned_epochs, self.state.planned_second_stage)
        self.model.to(device=self.device, memory_format=self.memory_format)


def lr_factor(schedule: str, progress: float) -> float:
    """The learning rate over its base at ``progress`` in [0, 1] (fraction of the configured epochs done):
    1 for "constant"; (1 + cos(pi * progress)) / 2 for "cosine" (SGDR without restarts, Loshchilov & Hutter
    2017), which reaches 0 at the end. A pure function of the position, so a resumed run schedules exactly
    as the uninterrupted one (with the same --epochs)."""
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    raise ValueError(f"unknown learning-rate schedule {schedule!r}")


def _set_base_lrs(optimizers: dict) -> None:
    """Each param group's "base_lr": the rate the schedule scales (halved on divergence). Stored with the
    optimizer's param groups, so it is checkpointed and resumed with them."""
    for opt in optimizers.values():
        for group in opt.param_groups:
            group.setdefault("base_lr", group["lr"])


def _state_epochs(folder: Path) -> tuple[int, int] | None:
    """(epoch, best_epoch) of a checkpoint's state.json, or None when it has none (or no checkpoint)."""
    try:
        state = json.loads((ckpt.resolve(folder) / "state.json").read_text())
        return int(state["epoch"]), int(state["best_epoch"])
    except (UserError, OSError, ValueError, KeyError, TypeError):
        return None


def _batch_sums(terms: dict[str, torch.Tensor], b: int) -> dict[str, float]:
    """Batch totals of per-sample (B,) terms; a scalar term counts once per image. One host sync."""
    if not terms:
        return {}
    device = next(iter(terms.values())).device
    dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
    totals = [v.detach().to(dtype).sum() if v.dim() else v.detach().to(dtype) * b for v in terms.values()]
    return dict(zip(terms, torch.stack([t.to(device) for t in totals]).tolist(), strict=True))


def match_optimizer_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give loaded optimizer state the memory layout of its parameter: safetensors stores contiguous
    tensors, and fused Adam on channels_last weights would otherwise pair the wrong elements."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            for k, v in optimizer.state.get(p, {}).items():
                if isinstance(v, torch.Tensor) and v.shape == p.shape and v.stride() != p.stride():
                    optimizer.state[p][k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


def _tensorboard_writer(run_dir: Path):
    """A SummaryWriter on RUN/tensorboard, made before training so a missing package fails fast."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install 'medivae[tensorboard]'") \
            from None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def check_resumable(run_dir: Path) -> None:
    if not (Path(run_dir) / "config.json").exists():
        raise UserError(f"{run_dir}: nothing to resume (no config.json); drop --resume to start a new run")


__all__ = ["Trainer", "TrainState", "derive_seed", "check_resumable"]
