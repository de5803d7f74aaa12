"""Speed settings keep quality. Mixed precision is a default only where bf16 and fp32 agree on a fixed
batch; the biases the trainer freezes really cannot change the loss.

Tolerances. The tolerance is the claim: bf16 autocast is the default only where it keeps the negative ELBO
within 1 % of fp32's (QUALITY_BAR). Rounding analysis cannot promise it: bf16 keeps 8 significant bits
(unit roundoff 2**-8) and a network's worst-case bound adds that per layer (tests/tolerance.py: ~6 % for
this one); in practice oneDNN accumulates in fp32, the per-pixel errors have random signs and the loss
moves by ~1e-4. A CPU or kernel library whose bf16 path moves the loss by more than the bar fails here,
as it should: bf16 would then cost quality there. Compiled training is held to the same bar."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from medivae.data import to_float
from medivae.data.phantoms import make_phantoms
from medivae.models import build_model
from medivae.models.losses import neg_elbo
from medivae.runtime import device as device_mod
from medivae.runtime.device import autocast, autocast_dtype
from medivae.runtime.seeding import torch_generator
from medivae.train.trainer import Trainer, batch_source, redundant_biases

from tiny import tiny_run
from tolerance import network_bound

QUALITY_BAR = 0.01  # relative change of the negative ELBO that bf16 (or --compile) may cost

needs_bf16 = pytest.mark.skipif(
    not device_mod.cpu_has_native_bf16(), reason="this CPU has no native bf16 (AVX-512 BF16 / AMX)"
)
CPU = torch.device("cpu")


def _batch(n: int = 32):
    return make_phantoms(n, 32, seed=7)


def _loss(model, x, dtype) -> float:
    """Mean negative ELBO of x under ``dtype`` autocast (None: fp32), with the same posterior noise."""
    with torch.no_grad(), autocast(CPU, dtype):
        out = model(x, sample=True, generator=torch_generator(1, "precision-test"))
        return neg_elbo(model.likelihood, out, x).loss.mean().item()


@needs_bf16
def test_bf16_forward_loss_matches_fp32():
    cfg = tiny_run().model
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(cfg, base_width=8, latent_dim=8)).train()
    model.to(memory_format=torch.channels_last)
    x = to_float(_batch().images).contiguous(memory_format=torch.channels_last)
    fp32, bf16 = _loss(model, x, None), _loss(model, x, torch.bfloat16)
    assert bf16 == pytest.approx(fp32, rel=QUALITY_BAR)
    assert bf16 != fp32  # autocast really ran in bf16 (otherwise this test compares fp32 with itself)


def _train_losses(tmp_path, precision: str, epochs: int = 4) -> list[float]:
    """Per-epoch training loss of the tiny model on one fixed 64-image set, through the Trainer."""
    cfg = tiny_run(epochs=epochs, lr=3e-3, precision=precision)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, base_width=8, latent_dim=8))
    torch.manual_seed(0)  # same initial weights in both precisions
    trainer = Trainer(cfg, build_model(cfg.model), CPU, tmp_path / precision, progress=False)
    data = _batch(64)
    torch.manual_seed(1)  # same posterior noise
    return [trainer.train_epoch(data, batch_source(data.images), e)["loss"] for e in range(1, epochs + 1)]


@needs_bf16
def test_bf16_training_steps_track_fp32(tmp_path):
    fp32, bf16 = _train_losses(tmp_path, "fp32"), _train_losses(tmp_path, "bf16")
    assert fp32[-1] < fp32[0] and bf16[-1] < bf16[0]  # both learn
    assert bf16 == pytest.approx(fp32, rel=QUALITY_BAR)


def test_auto_precision_is_fp32_without_native_bf16(monkeypatch):
    monkeypatch.setattr(device_mod, "cpu_has_native_bf16", lambda: False)
    assert autocast_dtype(CPU, "auto") is None
    monkeypatch.setattr(device_mod, "cpu_has_native_bf16", lambda: True)
    assert autocast_dtype(CPU, "auto") == torch.bfloat16
    assert autocast_dtype(CPU, "fp32") is None


def test_frozen_biases_cannot_change_the_training_loss(tmp_path):
    """Biases feeding a BatchNorm: shifting them leaves the training-mode loss unchanged, and the trainer
    neither optimises nor moves them. A bias not followed by BatchNorm (the output layer's) does count."""
    cfg = tiny_run(epochs=1, lr=3e-3)
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    frozen = redundant_biases(model)
    assert len(frozen) == 5  # 32 px: 3 encoder convs + the 2 transposed convs that feed a BatchNorm
    x = to_float(_batch().images)
    before = _loss(model, x, None)
    with torch.no_grad():
        for b in frozen:
            b.add_(1.0)
    assert _loss(model, x, None) == pytest.approx(before, rel=network_bound(model))  # rounding only
    with torch.no_grad():
        model.decoder[-1].bias.add_(1.0)  # the output layer's bias: not redundant
    assert _loss(model, x, None) != pytest.approx(before, rel=1e-3)

    torch.manual_seed(0)
    model = build_model(cfg.model)
    trainer = Trainer(cfg, model, CPU, tmp_path, progress=False)
    frozen = redundant_biases(model)
    start = [b.detach().clone() for b in frozen]
    data = _batch(64)
    trainer.train_epoch(data, batch_source(data.images), 1)
    assert all(torch.equal(a, b) for a, b in zip(start, frozen, strict=True))
    assert all(b.grad is None and b not in trainer.optimizers["model"].state for b in frozen)
    assert all(p in trainer.optimizers["model"].state for p in model.parameters() if p.requires_grad)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compiled_training_matches_eager_with_a_partial_last_batch(tmp_path, precision):
    """--compile (torch.compile) trains the same model: 70 images in batches of 32 end with a batch of 6,
    a second shape, which once failed to trace (randn of a dynamic size). bf16 also traces the CPU
    convolution fast paths (models/cpu_conv.py)."""
    data = _batch(70)
    losses = {}
    for compiled in (False, True):
        cfg = tiny_run(epochs=1, compile=compiled, precision=precision)
        torch.manual_seed(0)
        trainer = Trainer(cfg, build_model(cfg.model), CPU, tmp_path / str(compiled), progress=False)
        torch.manual_seed(1)
        losses[compiled] = trainer.train_epoch(data, batch_source(data.images), 1)["loss"]
    assert losses[True] == pytest.approx(losses[False], rel=QUALITY_BAR)
