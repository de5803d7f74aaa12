"""Data-parallel training with torch.distributed, launched by torchrun. Every distributed detail lives here.

Driven by the environment torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT), as in
nanoGPT; without it every function is a no-op, so the single-process path is untouched::

    torchrun --standalone --nproc_per_node 2 -m medivae train --data phantoms --out runs/ddp
    torchrun --nnodes 2 --nproc_per_node 4 --rdzv-id vae1 --rdzv-backend c10d \
        --rdzv-endpoint HOST:29500 -m medivae train --data ... --out /shared/runs/ddp

Design (what the trainer relies on):

- Backend NCCL for CUDA devices (one GPU per process, ``cuda:LOCAL_RANK``), gloo otherwise.
- Sharding: each epoch's shuffled order depends only on (seed, epoch), so every rank computes the same
  permutation and takes ``order[rank::world]`` after padding it to a multiple of ``world`` with its own
  head: exactly ``DistributedSampler(shuffle=True)`` with ``set_epoch``. Every rank then runs the same
  number of steps, which DDP needs. ``--batch-size`` is per rank (global batch = world x batch size).
- BatchNorm stays per rank (statistics of the local batch; running stats are broadcast from rank 0
  at every forward by DDP). ``wrap(..., sync_bn=True)`` converts to SyncBatchNorm, which PyTorch
  supports on GPUs only.
- Reparameterisation noise: rank ``r`` draws from a generator seeded with
  ``derive_seed(seed, "rank", r, "epoch", e)`` so ranks are independent and a resumed run replays
  exactly, without saving every rank's RNG state.
- Rank 0 alone writes (checkpoints, metrics.jsonl, figures, reports, progress bars); the others wait
  at a barrier. Validation and evaluation shard the samples without padding and combine results:
  sums and counts with :func:`all_reduce_sum`, per-sample scores with :func:`gather_per_sample`.
- Resume: every rank loads ``last/``, so on several nodes the run folder must be on a shared
  filesystem; :func:`assert_same` stops the run if the ranks disagree about the epoch.

Room for the later model families:

- Codebook statistics (VQ-VAE with EMA updates): sum the per-rank cluster counts and embedding sums
  with :func:`all_reduce_sum` before the EMA update, so every replica keeps the same codebook
  (as vector-quantize-pytorch does). The codebook lives in buffers, which DDP would otherwise
  overwrite from rank 0.
- Two optimizers (VAE-GAN): wrap generator and discriminator separately with :func:`wrap`, one DDP
  module each, so each optimizer's gradients are reduced on their own. In the discriminator step,
  run the generator under ``torch.no_grad()`` (or its ``no_sync()``) so no half-finished reduction
  is left pending.
- A non-finite loss on one rank must stop all of them together: decide with :func:`any_rank`.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from medivae.runtime.errors import UserError
from medivae.runtime.seeding import torch_generator


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_info() -> DistInfo:
    """Rank, local rank and world size from torchrun's environment (single process when absent)."""
    try:
        env = DistInfo(
            rank=int(os.environ.get("RANK", 0)),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
            world_size=int(os.environ.get("WORLD_SIZE", 1)),
        )
    except ValueError:
        raise UserError("RANK, LOCAL_RANK, WORLD_SIZE must be whole numbers (torchrun sets them)") from None
    # a RANK left over in the shell (or set by a scheduler) made a plain run a silent non-main rank: it trained,
    # wrote nothing and exited 0
    if env.world_size < 1 or not 0 <= env.rank < env.world_size or not 0 <= env.local_rank < env.world_size:
        raise UserError(f"RANK={env.rank}, LOCAL_RANK={env.local_rank}, WORLD_SIZE={env.world_size} do not fit "
                        "together (0 <= RANK, LOCAL_RANK < WORLD_SIZE); these are torchrun's: unset them, or "
                        "launch with torchrun")
    return env


def info() -> DistInfo:
    """The current process group's view (single process when none is initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(dist.get_rank(), env_info().local_rank, dist.get_world_size())


def is_main() -> bool:
    """Rank 0 (or a single process). Falls back to torchrun's RANK before/after the group exists."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return env_info().rank == 0


def local_device(device: torch.device) -> torch.device:
    """Under torchrun one CUDA device per process: ``cuda`` -> ``cuda:LOCAL_RANK``."""
    env = env_info()
    if device.type == "mps" and env.enabled:
        raise UserError("distributed training on MPS is not supported; pass --device cpu (or use CUDA GPUs)")
    if device.type == "cuda" and device.index is None and env.enabled:
        if env.local_rank >= torch.cuda.device_count():
            n = torch.cuda.device_count()
            raise UserError(f"LOCAL_RANK {env.local_rank} but only {n} GPU(s); lower --nproc_per_node")
        return torch.device("cuda", env.local_rank)
    return device


def setup(device: torch.device, timeout_minutes: float = 30.0) -> bool:
    """Join the process group torchrun prepared. Returns True if this call created it (then call
    :func:`cleanup`), False when not launched by torchrun, world size 1 or a group already exists."""
    env = env_info()
    if not env.enabled or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise UserError("this PyTorch build has no torch.distributed; run without torchrun")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:  # init_process_group's ValueError traceback otherwise
        raise UserError(f"WORLD_SIZE={env.world_size} but {' and '.join(missing)} not set; launch with torchrun "
                        "(it sets them), or unset WORLD_SIZE, RANK and LOCAL_RANK for a single process")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return True


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if info().enabled:
        dist.barrier()


def wrap(model: nn.Module, device: torch.device, sync_bn: bool = False) -> nn.Module:
    """DistributedDataParallel around ``model`` when distributed, else ``model`` itself.

    Call once per separately optimised network (generator, discriminator). DDP broadcasts rank 0's
    parameters and buffers at construction, so every replica starts identical.
    """
    if not info().enabled:
        return model
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)




def shard(order: torch.Tensor, pad: bool = True) -> torch.Tensor:
    """This rank's part of a global index order.

    pad=True (training): DistributedSampler's rule, ``order`` is extended with its own head to a
    multiple of the world size so that every rank gets the same count. pad=False (evaluation):
    ``order[rank::world]``, uneven but without duplicates.
    """
    d = info()
    return shard_for(order, d.rank, d.world_size, pad) if d.enabled else order


def shard_for(order: torch.Tensor, rank: int, world: int, pad: bool = True) -> torch.Tensor:
    if pad and len(order) % world:
        extra = world - len(order) % world
        reps = -(-extra // len(order))  # ceil: tiny sets may need the head more than once
        order = torch.cat([order, order.repeat(reps)[:extra]])
    return order[rank::world]


def rank_generator(seed: int, rank: int, epoch: int, device: str | torch.device = "cpu") -> torch.Generator:
    """Rank ``rank``'s noise generator for ``epoch``: independent across ranks, replayable on resume."""
    return torch_generator(seed, "rank", rank, "epoch", epoch, device=device)


def noise_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator | None:
    """This rank's reparameterisation-noise generator (None on a single process, which keeps using
    the global RNG that checkpoints save)."""
    d = info()
    return rank_generator(seed, d.rank, epoch, device) if d.enabled else None


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: dict[str, float]) -> dict[str, float]:
    """Sum float values over ranks (float64, so counts and nat sums stay exact enough)."""
    if not info().enabled:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return dict(zip(keys, t.tolist(), strict=True))


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (codebook counts, EMA sums); no-op on a single process."""
    if info().enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any (e.g. a non-finite loss: all ranks must react)."""
    return all_reduce_sum({"flag": float(bool(flag))})["flag"] > 0


def assert_same(value: int, what: str) -> None:
    """Raise UserError on every rank if the ranks hold different ``value`` (e.g. the resumed epoch)."""
    if not info().enabled:
        return
    t = torch.tensor([value, -value], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    hi, lo = int(t[0]), -int(t[1])
    if hi != lo:
        raise UserError(f"ranks disagree on {what} ({lo} vs {hi}); is the run folder on a shared filesystem?")


def all_gather_uneven(values: np.ndarray) -> list[np.ndarray]:
    """Every rank's 1-D array (lengths may differ), in rank order, on every rank."""
    values = np.asarray(values)
    if not info().enabled:
        return [values]
    dev, world = _comm_device(), info().world_size
    n = torch.tensor([len(values)], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    # all_gather needs equal shapes: pad to the longest, trim after
    buf = torch.zeros(max(sizes), dtype=torch.float64, device=dev)
    buf[: len(values)] = torch.as_tensor(values, dtype=torch.float64)
    parts = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(parts, buf)
    return [p[:s].cpu().numpy().astype(values.dtype, copy=False) for p, s in zip(parts, sizes, strict=True)]


def gather_per_sample(scores: np.ndarray, index: np.ndarray, n: int) -> np.ndarray:
    """Per-sample scores computed on this rank's shard -> all ``n`` scores in dataset order, on every rank.

    scores: (k,) for the samples ``index`` (k,) of this rank (from ``shard(arange(n), pad=False)``).
    Call it before computing any metric (AUROC, FID...) so the metric sees the whole split.
    """
    scores, index = np.asarray(scores, dtype=np.float64), np.asarray(index, dtype=np.int64)
    if len(scores) != len(index):
        raise ValueError(f"{len(scores)} scores for {len(index)} indices")
    all_scores = np.concatenate(all_gather_uneven(scores))
    all_index = np.concatenate(all_gather_uneven(index)).astype(np.int64)
    out = np.full(n, np.nan)
    out[all_index] = all_scores
    if np.isnan(out).any() and not np.isnan(all_scores).any():
        raise ValueError(f"gathered scores cover {len(np.unique(all_index))} of {n} samples")
    return out
