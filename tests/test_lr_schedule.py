"""--lr-schedule cosine: the learning rate follows the position in training, resumes bitwise, is halved
with its base on divergence, and a two-stage family decays each stage over its own epochs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from medivae import api
from medivae.models import build_model, model_config
from medivae.models.family import StepContext
from medivae.runfolder.config import TrainConfig
from medivae.runtime.errors import UserError
from medivae.train.metrics import read_metrics
from medivae.train.trainer import Trainer, lr_factor

from tiny import tiny_run, train_killed_after


def test_cosine_factor_falls_from_one_to_zero_and_constant_stays_one():
    xs = [i / 20 for i in range(21)]
    f = [lr_factor("cosine", x) for x in xs]
    assert f[0] == 1.0 and f[-1] == pytest.approx(0.0, abs=1e-12) and f[10] == pytest.approx(0.5)
    assert all(a > b for a, b in zip(f, f[1:], strict=False))
    assert {lr_factor("constant", x) for x in xs} == {1.0}
    with pytest.raises(UserError, match="learning-rate schedule"):
        TrainConfig(lr_schedule="step")


def test_cosine_run_logs_falling_rates_and_resumes_bitwise(tmp_path, monkeypatch):
    full = tiny_run("phantoms:100", epochs=3, lr=2e-3, lr_schedule="cosine")
    api.train(full, tmp_path / "full", progress=False)
    lrs = [r["lr"] for r in read_metrics(tmp_path / "full")]  # the rate of each epoch's last step
    assert lrs[0] < 2e-3 and all(a > b for a, b in zip(lrs, lrs[1:], strict=False)) and lrs[-1] < 2e-3 * 0.05

    train_killed_after(full, tmp_path / "resumed", 1, monkeypatch)
    api.train(full, tmp_path / "resumed", resume=True, progress=False)
    a = load_file(str(tmp_path / "full" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "last" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["lr"] for r in read_metrics(tmp_path / "resumed")] == lrs

    constant = dataclasses.replace(full, train=dataclasses.replace(full.train, lr_schedule="constant"))
    api.train(constant, tmp_path / "constant", progress=False)
    c = load_file(str(tmp_path / "constant" / "last" / "model.safetensors"))
    assert any(not torch.equal(a[k], c[k]) for k in a)  # the schedule changed the training


def test_divergence_halves_the_scheduled_base_rate(tmp_path):
    cfg = tiny_run("phantoms:60", epochs=2, lr=1e-3, lr_schedule="cosine")
    t = Trainer(cfg, build_model(cfg.model), torch.device("cpu"), tmp_path / "run", progress=False)
    with pytest.warns(UserWarning, match="learning rate lowered"):
        t._lower_lr("non-finite loss")
    (group,) = t.optimizers["model"].param_groups
    assert group["base_lr"] == 5e-4 and t.state.lr == 5e-4


def test_each_stage_of_vq_vae_decays_over_its_own_epochs():
    model = build_model(model_config("vq_vae", image_size=32, prior_epochs=1))
    train = TrainConfig(epochs=4, lr_schedule="cosine")
    vq, prior = model.training_steps()

    def progress(step, at):
        return step.progress(StepContext(int(at) + 1, 0, at, train))

    assert progress(vq, 0.0) == 0.0 and progress(vq, 1.5) == pytest.approx(0.5) and progress(vq, 3.0) == 1.0
    assert progress(prior, 3.0) == 0.0 and progress(prior, 3.5) == pytest.approx(0.5)  # full rate at its start
