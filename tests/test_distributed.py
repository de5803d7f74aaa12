"""torch.distributed on CPU: 2 gloo processes on 127.0.0.1 (MONAI-style), plus one real torchrun launch.

The equivalence check (one DDP step with per-rank batch B == one step with batch 2B) uses the tiny
ConvVAE with its BatchNorm layers replaced by Identity: BatchNorm normalises with the statistics of
the local batch, so per-rank BN is *meant* to differ from BN over 2B, and SyncBatchNorm, which would
match, runs on GPUs only. Everything else (sharding, DDP gradient averaging, fused Adam, per-rank
noise) is the trainer's real code path. The single-process reference draws each sample's noise
from the generator of the rank that owned it, since per-rank noise is part of the design.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DistributedSampler

from medivae import api
from medivae.data import ImageSet, to_float
from medivae.models import build_model
from medivae.models.losses import neg_elbo
from medivae.models.outputs import VAEOutput
from medivae.runfolder.config import RunConfig
from medivae.runtime import distributed
from medivae.runtime.errors import UserError
from medivae.runtime.seeding import numpy_rng
from medivae.train.trainer import Trainer, epoch_order, gather
from medivae.workflows import train as train_workflow

from tiny import tiny_run

B = 8  # per-rank batch
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _no_batchnorm(model: nn.Module) -> nn.Module:
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(model, name, nn.Identity())
        else:
            _no_batchnorm(child)
    return model


def _step_setup(batch_size: int, run_dir: Path) -> tuple[RunConfig, Trainer, ImageSet]:
    cfg = tiny_run(epochs=1, batch_size=batch_size)
    torch.manual_seed(0)  # same initial weights in every process
    model = _no_batchnorm(build_model(cfg.model))
    images = numpy_rng(cfg.train.seed, "ddp-test").integers(0, 256, (WORLD * B, 1, 32, 32), dtype=np.uint8)
    trainer = Trainer(cfg, model, torch.device("cpu"), run_dir, progress=False)
    return cfg, trainer, ImageSet(images, np.zeros(WORLD * B))


def _save_weights(model: nn.Module, path: Path) -> None:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


# --- what each of the two processes runs --------------------------------------------------------------
def _ddp_step(rank: int, out: Path) -> None:
    _, trainer, train = _step_setup(B, out / "step")
    assert all(isinstance(m, nn.parallel.DistributedDataParallel) for m in trainer.nets.values())
    trainer.train_epoch(train, torch.from_numpy(train.images), epoch=1)  # 2B images: one step per rank
    if rank == 0:
        _save_weights(trainer.model, out / "ddp_step.safetensors")


def _collectives(rank: int, out: Path) -> None:
    n = 7  # shards of 4 and 3: uneven on purpose
    idx = distributed.shard(torch.arange(n), pad=False).numpy()
    scores = idx.astype(np.float64) ** 2
    result = {
        "gathered": distributed.gather_per_sample(scores, idx, n).tolist(),
        "any_rank": distributed.any_rank(rank == 1),
        "sum": distributed.all_reduce_sum({"x": rank + 1.0})["x"],
    }
    try:
        distributed.assert_same(rank, "the rank")
        result["disagreement_caught"] = False
    except UserError:
        result["disagreement_caught"] = True
    (out / f"collectives{rank}.json").write_text(json.dumps(result))


def _train_and_resume(out: Path) -> None:
    train_workflow.write_run_report = lambda run_dir: None  # matplotlib time; the torchrun test writes a real report
    api.train(tiny_run("phantoms:40", epochs=2, batch_size=8), out / "resumed", progress=False)
    api.train(tiny_run("phantoms:40", epochs=3, batch_size=8), out / "resumed", resume=True, progress=False)
    api.train(tiny_run("phantoms:40", epochs=3, batch_size=8), out / "straight", progress=False)


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        _ddp_step(rank, Path(out))
        _collectives(rank, Path(out))
        _train_and_resume(Path(out))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_out(tmp_path_factory) -> Path:
    """One spawn of two gloo processes runs every distributed scenario (process start-up dominates)."""
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return out


# --- the single-process reference ----------------------------------------------------------------
def _reference_step(ranks: list[int], run_dir: Path) -> dict[str, torch.Tensor]:
    """One single-process step on the samples of ``ranks`` together (batch len(ranks) * B)."""
    cfg, trainer, train = _step_setup(len(ranks) * B, run_dir)
    model, seed = trainer.model.train(), cfg.train.seed
    order = epoch_order(len(train), seed, 1)
    idx = torch.cat([distributed.shard_for(order, r, WORLD) for r in ranks])
    x = to_float(gather(torch.from_numpy(train.images), idx)).contiguous(memory_format=torch.channels_last)
    noise = [distributed.rank_generator(seed, r, 1) for r in ranks]
    eps = torch.cat([torch.randn(B, model.latent_dim, generator=g) for g in noise])
    posterior = model.encode(x)
    z = posterior.mean + posterior.std * eps  # the reparameterisation, with each rank's noise
    terms = neg_elbo(model.likelihood, VAEOutput(model.decode_params(z), posterior, z), x)
    trainer.optimizers["model"].zero_grad()
    terms.loss.mean().backward()
    trainer.optimizers["model"].step()
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_ddp_step_equals_single_step_on_double_batch(ddp_out, tmp_path):
    ddp = load_file(str(ddp_out / "ddp_step.safetensors"))
    both = _reference_step([0, 1], tmp_path / "both")
    half = _reference_step([0], tmp_path / "half")
    lr = tiny_run().train.lr  # Adam's first step moves every weight by about lr
    assert _max_diff(ddp, both) < 1e-2 * lr
    assert _max_diff(ddp, half) > 0.5 * lr  # the comparison can fail: rank 0's half alone is not enough


def test_collectives_agree_on_every_rank(ddp_out):
    for rank in range(WORLD):
        r = json.loads((ddp_out / f"collectives{rank}.json").read_text())
        assert r["gathered"] == [float(i * i) for i in range(7)]  # dataset order, from uneven shards
        assert r["any_rank"] is True
        assert r["sum"] == 3.0
        assert r["disagreement_caught"] is True


def test_interrupted_ddp_run_resumes_where_it_stopped(ddp_out):
    resumed, straight = ddp_out / "resumed", ddp_out / "straight"
    epochs = [json.loads(line)["epoch"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]  # rank 0 alone wrote, once per epoch, continuing at 3
    assert json.loads((resumed / "last" / "state.json").read_text())["epoch"] == 3
    # exact replay: shuffling and per-rank noise depend on (seed, rank, epoch), weights and Adam state load
    a, b = (load_file(str(run / "last" / "model.safetensors")) for run in (resumed, straight))
    assert _max_diff(a, b) == 0.0
    assert (resumed / "samples.png").exists() and (resumed / "config.json").exists()


def test_shard_matches_distributed_sampler():
    for n in (3, 7, 8):
        for world in (2, 3, 4):
            for rank in range(world):
                want = list(DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=False))
                assert distributed.shard_for(torch.arange(n), rank, world).tolist() == want


def test_single_process_is_untouched():
    order = torch.randperm(9)
    assert torch.equal(distributed.shard(order), order)
    assert distributed.noise_generator(1, 1, torch.device("cpu")) is None
    assert distributed.gather_per_sample(np.array([2.0, 1.0]), np.array([1, 0]), 2).tolist() == [1.0, 2.0]
    model = nn.Linear(2, 2)
    assert distributed.wrap(model, torch.device("cpu")) is model


def test_torchrun_launches_the_cli(tmp_path):
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(WORLD),
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}",
        "-m", "medivae", "train", "--data", "phantoms:40", "--out", str(tmp_path / "run"),
        "--image-size", "32", "--base-width", "4", "--latent-dim", "4", "--epochs", "1",
        "--batch-size", "8", "--precision", "fp32", "--threads", "1", "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("run written to") == 1  # said once, by rank 0
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1
    assert (tmp_path / "run" / "report.html").exists()
