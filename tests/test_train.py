"""Training: loss goes down, same seed -> same numbers, resume == uninterrupted."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from medivae import api
from medivae.runtime.errors import UserError
from medivae.runtime.seeding import DEFAULT_SEED, seed_everything
from medivae.train.metrics import read_metrics

from tiny import tiny_run


def test_seed_everything_accepts_the_article_seed():
    assert DEFAULT_SEED > 2**32
    seed_everything(DEFAULT_SEED)
    a = torch.rand(3)
    seed_everything(DEFAULT_SEED)
    assert torch.equal(a, torch.rand(3))


def test_short_training_lowers_validation_loss(tmp_path):
    run = api.train(tiny_run("phantoms:200", epochs=4, lr=3e-3), tmp_path / "run", progress=False)
    m = read_metrics(run)
    assert [r["epoch"] for r in m] == [1, 2, 3, 4]
    assert m[-1]["val_loss"] < m[0]["val_loss"]
    for r in m:  # the two terms are reported separately and add up
        assert r["val_loss"] == pytest.approx(r["val_rec"] + r["val_kl"], rel=1e-9)
    for name in ("samples.png", "interpolation.png", "reconstructions.png", "config.json", "data.json"):
        assert (run / name).exists(), name
    for folder in ("last", "best"):
        files = {p.name for p in (run / folder).iterdir()}
        assert {"config.json", "model.safetensors", "optimizer.safetensors", "state.json",
                "manifest.json", "rng.safetensors"} <= files


def test_same_seed_gives_identical_losses(tmp_path):
    cfg = tiny_run("phantoms:100", epochs=2)
    a = read_metrics(api.train(cfg, tmp_path / "a", progress=False))
    b = read_metrics(api.train(cfg, tmp_path / "b", progress=False))
    keys = ("train_loss", "val_loss", "val_rec", "val_kl")
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]
    other = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=7))
    c = read_metrics(api.train(other, tmp_path / "c", progress=False))
    assert [r["train_loss"] for r in c] != [r["train_loss"] for r in a]


def test_resume_matches_uninterrupted_run(tmp_path):
    full = tiny_run("phantoms:100", epochs=3)
    api.train(full, tmp_path / "full", progress=False)
    short = dataclasses.replace(full, train=dataclasses.replace(full.train, epochs=1))
    api.train(short, tmp_path / "resumed", progress=False)
    api.train(full, tmp_path / "resumed", resume=True, progress=False)
    a = load_file(str(tmp_path / "full" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["epoch"] for r in read_metrics(tmp_path / "resumed")] == [1, 2, 3]
    state = json.loads((tmp_path / "resumed" / "last" / "state.json").read_text())
    assert state["epoch"] == 3


def test_training_into_an_existing_run_needs_resume(tmp_path):
    cfg = tiny_run("phantoms:60", epochs=1)
    api.train(cfg, tmp_path / "r", progress=False)
    with pytest.raises(UserError, match="--resume"):
        api.train(cfg, tmp_path / "r", progress=False)
