"""--time-budget: the plan of a two-stage run (both stages train, resume follows the plan), and a one-stage run
that stops once the budget is spent. Time is a fake clock: one second per reading, never the machine's."""

from __future__ import annotations

import dataclasses
import itertools
import json
import types

import pytest
import torch
from safetensors.torch import load_file

import medivae
from medivae import api
from medivae.cli import main
from medivae.models import model_config
from medivae.runfolder.config import DataConfig, RunConfig, TrainConfig
from medivae.train import trainer as trainer_module
from medivae.train.budget import plan_stages

from tiny import train_killed_after

VQ = dict(image_size=32, codebook_size=16, code_dim=8, width=16, res_width=8, res_blocks=1, prior_width=16,
          prior_layers=1, prior_heads=2, prior_epochs=2)


def run_config(budget: float, epochs: int = 8, family: str = "vq_vae", **model) -> RunConfig:
    fields = VQ if family == "vq_vae" else dict(image_size=32)
    return RunConfig(data=DataConfig(source="phantoms:60", image_size=32),
                     model=model_config(family, **{**fields, **model}),
                     train=TrainConfig(epochs=epochs, batch_size=16, precision="fp32", seed=1767661200070,
                                       num_threads=1, time_budget=budget))


@pytest.fixture
def fake_clock(monkeypatch):
    """The trainer's clock reads 1, 2, 3, ... seconds: every measured span is a whole number of readings."""
    ticks = itertools.count(1)
    monkeypatch.setattr(trainer_module, "time", types.SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    monkeypatch.setattr(api, "write_run_report", lambda run_dir: None)  # matplotlib time


def rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def state(run) -> dict:
    return json.loads((run / "last" / "state.json").read_text())


def test_plan_scales_both_stages_by_one_factor_and_keeps_one_epoch_each():
    assert plan_stages(100, 10, 10, 10, 8, 2) == (8, 2)  # the configured run fits: the epochs are the most
    # half the configured time is left after the first epoch: (s·8 - 1)·10 + s·2·10 = 100 - 10 -> s = 1/2
    assert plan_stages(100, 10, 10, 10, 16, 4) == (8, 2)
    assert plan_stages(100, 10, 5, 20, 16, 4) == (9, 2)  # a dear prior: s = 95 / 160
    assert plan_stages(1, 50, 10, 10, 8, 2) == (1, 1)  # spent already: one epoch of each stage
    with pytest.raises(ValueError):
        plan_stages(100, 10, 10, 10, 8, 0)


def test_a_tight_budget_still_trains_the_prior(tmp_path, fake_clock):
    run = api.train(run_config(budget=1.0), tmp_path / "r", progress=False)
    got = rows(run)
    assert len(got) == 2 and "train_mse" in got[0] and "train_kl" in got[1]  # one epoch of each stage
    assert state(run)["planned_epochs"] == 2 and state(run)["planned_second_stage"] == 1
    saved = json.loads((run / "last" / "config.json").read_text())  # the checkpoint holds the plan it ran
    assert saved["train"]["epochs"] == 2 and saved["model"]["prior_epochs"] == 1
    assert "sample" in medivae.load(run, device="cpu").model.capabilities


def test_resume_follows_the_plan_made_before_the_kill(tmp_path, fake_clock, monkeypatch):
    cfg = run_config(budget=23.0)  # with the fake clock: about five of the eight configured epochs
    straight = api.train(cfg, tmp_path / "straight", progress=False)
    plan = state(straight)["planned_epochs"], state(straight)["planned_second_stage"]
    assert 2 < plan[0] < 8 and plan[1] >= 1  # the budget cut the run, and both stages kept epochs
    assert sum("train_kl" in r for r in rows(straight)) == plan[1]

    train_killed_after(cfg, tmp_path / "resumed", 2, monkeypatch)
    # the clock runs on: a plan made again now would differ, the saved one does not
    api.train(cfg, tmp_path / "resumed", resume=True, progress=False)
    assert (state(tmp_path / "resumed")["planned_epochs"], state(tmp_path / "resumed")["planned_second_stage"]) \
        == plan
    assert len(rows(tmp_path / "resumed")) == plan[0]
    a = load_file(str(straight / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "last" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_one_stage_run_stops_after_the_epoch_that_spends_the_budget(tmp_path, fake_clock):
    cfg = run_config(budget=5.0, epochs=20, family="conv_vae")
    run = api.train(cfg, tmp_path / "r", progress=False)
    n = len(rows(run))
    assert 1 < n < 20 and state(run)["planned_epochs"] == n
    assert state(run)["seconds"] >= 5.0  # the last epoch spent the budget
    api.train(dataclasses.replace(cfg), run, resume=True, progress=False)  # nothing left to do
    assert len(rows(run)) == n


def test_the_flag_reaches_the_config_and_a_negative_budget_is_refused(tmp_path, capsys):
    base = ["train", "--data", "phantoms:40", "--image-size", "32", "--out", str(tmp_path / "x")]
    assert main([*base, "--time-budget", "-1"]) == 2
    assert "--time-budget" in capsys.readouterr().err and not (tmp_path / "x").exists()
    with pytest.raises(Exception, match="time_budget"):
        TrainConfig(time_budget=-1.0)


def test_a_budget_spent_before_a_vae_gans_first_adversarial_epoch_still_leaves_a_best_checkpoint(tmp_path, fake_clock):
    """vae_gan's epochs before its adversarial start never become best/: a budget spent in the first epoch goes
    on to the first epoch that may, so the run has a best/ checkpoint and loads."""
    run = api.train(run_config(budget=1.0, epochs=6, family="vae_gan"), tmp_path / "r", progress=False)
    assert len(rows(run)) == 2 and state(run)["planned_epochs"] == 2
    assert (run / "best").is_dir() and state(run)["best_epoch"] == 2
    assert "sample" in medivae.load(run, device="cpu").model.capabilities


def test_anomaly_adapt_trains_its_epochs_whatever_the_budget_the_run_was_trained_with(tmp_path, fake_clock):
    """A run fitted with --time-budget, adapted for 3 more epochs: the adaptation trains all 3 (its --epochs), not
    as many as the run's own, already spent budget leaves."""
    from medivae.data.phantoms import make_phantoms

    from tiny import TINY, png_folder

    run, out = tmp_path / "run", tmp_path / "adapted"
    fit = ["anomaly", "fit", "--data", "phantoms:200", "--normal-label", "normal", "--out", str(run)]
    assert main([*fit, "--epochs", "1", "--seed", "7", "--time-budget", "2", *TINY]) == 0
    site = png_folder(tmp_path / "site", make_phantoms(24, 32, seed=31, lesion_fraction=0.0).images)
    assert main(["anomaly", "adapt", str(run), "--normals", str(site), "--out", str(out), "--epochs", "3",
                 "--no-progress", "--device", "cpu"]) == 0
    assert state(out)["epoch"] == 1 + 3 and [r["epoch"] for r in rows(out)] == [2, 3, 4]


def test_timing_the_stages_leaves_an_ldm_run_as_it_would_be_without_a_budget(tmp_path, fake_clock):
    """The plan times one batch of each stage's steps, the discriminator's included; a budget that keeps every
    configured epoch must give the numbers of the run without one: no discriminator accuracy of the timing in
    epoch 2, which has no adversarial step (they start at epoch 3)."""
    ldm = dict(width=8, res_blocks=1, res_width=4, latent_channels=2, disc_width=4, disc_layers=2, prior_epochs=1,
               prior_width=8, prior_updates=2, sampling_steps=4, num_classes=0, adv_start=2.0)
    timed = api.train(run_config(1e6, epochs=4, family="ldm", **ldm), tmp_path / "timed", progress=False)
    plain = api.train(run_config(0.0, epochs=4, family="ldm", **ldm), tmp_path / "plain", progress=False)
    assert state(timed)["planned_epochs"] == 4 and state(timed)["planned_second_stage"] == 1

    def numbers(run):
        return [{k: v for k, v in r.items() if k.startswith(("train_", "val_"))} for r in rows(run)]

    assert "train_disc_acc_epoch" in numbers(plain)[2] and "train_disc_acc_epoch" not in numbers(plain)[1]
    assert numbers(timed) == numbers(plain)
