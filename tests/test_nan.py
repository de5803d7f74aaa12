"""Non-finite losses and gradients: roll back to the start of the epoch, halve the learning rate, retry;
stop with one clear line when it keeps happening."""

from __future__ import annotations

import json
import math

import pytest
import torch

from medivae.cli import main
from medivae.data import load_dataset
from medivae.models import build_model
from medivae.models.conv_vae import ConvVAE
from medivae.runtime.seeding import seed_everything
from medivae.train.metrics import read_metrics
from medivae.train.trainer import Trainer

from tiny import tiny_run

LR = 1e-3


def _trainer(run_dir, klass=Trainer, **train_kw):
    cfg = tiny_run("phantoms:60", epochs=2, lr=LR, **train_kw)  # 48 training images: 2 steps per epoch
    seed_everything(cfg.train.seed)
    splits = load_dataset(cfg.data, progress=False)
    t = klass(cfg, build_model(cfg.model), torch.device("cpu"), run_dir, progress=False)
    t.verbose = False
    return t, splits


def _nan_on_training_calls(monkeypatch, bad_calls):
    """The family's ELBO step, with a NaN loss on the given training calls (0, 1: epoch 1; 2, 3: epoch 2...)."""
    real, calls = ConvVAE._elbo_step, []

    def step(self, nets, x, y, ctx):
        out = real(self, nets, x, y, ctx)
        calls.append(len(calls))
        if bad_calls(calls[-1]):
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(ConvVAE, "_elbo_step", step)
    return calls


class HalveAtEpoch2(Trainer):
    """What a rollback must amount to: epoch 2 run from its start at half the learning rate."""

    def train_epoch(self, train, images, epoch):
        if epoch == 2 and not getattr(self, "halved", False):
            self.halved = True
            for g in self.optimizers["model"].param_groups:
                g["lr"] /= 2
        return super().train_epoch(train, images, epoch)


def test_a_nan_mid_epoch_rolls_back_the_epoch_and_retries_at_half_the_learning_rate(tmp_path, monkeypatch):
    reference, splits = _trainer(tmp_path / "ref", HalveAtEpoch2)
    reference.fit(splits["train"], splits["val"])

    calls = _nan_on_training_calls(monkeypatch, lambda i: i == 3)  # epoch 2, after one good step
    t, splits = _trainer(tmp_path / "nan")
    with pytest.warns(UserWarning, match="non-finite loss at epoch 2, step 1: rolled back"):
        state = t.fit(splits["train"], splits["val"])
    assert len(calls) == 6  # 2 + 2 (the second one NaN) + 2 again
    assert state.nan_events == 1 and state.lr == LR / 2
    # the step taken before the NaN and its Adam moments were undone: bitwise the reference run
    for k, v in reference.model.state_dict().items():
        assert torch.equal(v, t.model.state_dict()[k]), k
    saved = json.loads((tmp_path / "nan" / "last" / "state.json").read_text())
    assert saved["nan_events"] == 1 and saved["lr"] == LR / 2
    assert [(m["lr"], m["nan_events"]) for m in read_metrics(tmp_path / "nan")] == [(LR, 0), (LR / 2, 1)]

    resumed, _ = _trainer(tmp_path / "nan")
    resumed.resume()  # a resumed run keeps the lowered rate and the count
    assert resumed.optimizers["model"].param_groups[0]["lr"] == LR / 2 and resumed.state.nan_events == 1


def test_a_nan_gradient_with_a_finite_loss_is_caught_too(tmp_path):
    t, splits = _trainer(tmp_path / "run", grad_clip=1.0)
    param = next(t.model.parameters())
    seen = []

    def poison_once(grad):
        seen.append(1)
        return grad * float("inf") if len(seen) == 2 else grad

    param.register_hook(poison_once)
    with pytest.warns(UserWarning, match="non-finite gradients at epoch 1, step 1"):
        state = t.fit(splits["train"], splits["val"])
    assert state.nan_events == 1 and state.epoch == 2
    assert all(torch.isfinite(p).all() for p in t.model.parameters())


def test_persistent_nans_stop_with_one_line_and_keep_the_last_good_epoch(tmp_path, monkeypatch, capsys):
    _nan_on_training_calls(monkeypatch, lambda i: i >= 2)  # epoch 1 is fine, then every step is NaN
    run = tmp_path / "run"
    code = main([
        "train", "--data", "phantoms:60", "--out", str(run), "--image-size", "32", "--latent-dim", "4",
        "--base-width", "4", "--precision", "fp32", "--epochs", "2", "--batch-size", "32", "--lr", str(LR),
        "--device", "cpu", "--no-progress",
    ])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("medivae: error: training diverged: non-finite loss at epoch 2, step 0")
    assert f"{run / 'last'} holds the last good epoch" in err[-1] and "after 3 rollback(s)" in err[-1]
    assert sum("rolled back" in line for line in err[:-1]) == 3
    assert f"now {LR / 8:.3g}" in err[-1]
    state = json.loads((run / "last" / "state.json").read_text())
    assert state["epoch"] == 1 and state["nan_events"] == 0 and math.isfinite(state["best_val"])


def test_zero_retries_stops_at_the_first_nan(tmp_path, monkeypatch):
    from medivae.runtime.errors import UserError

    _nan_on_training_calls(monkeypatch, lambda i: i == 0)
    t, splits = _trainer(tmp_path / "run", max_nan_retries=0)
    with pytest.raises(UserError, match="epoch 1, step 0, after 0 rollback"):
        t.fit(splits["train"], splits["val"])
    assert not (tmp_path / "run" / "last").exists()
