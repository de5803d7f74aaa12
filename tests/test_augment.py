"""--augment: per-image shifts and intensity changes of training batches; reproducible, resumable, off by default."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from medivae import api
from medivae.cli import main
from medivae.runfolder.config import TrainConfig
from medivae.runtime.errors import UserError
from medivae.runtime.seeding import torch_generator
from medivae.train.augment import augment, parse_augment

from tiny import tiny_run, train_killed_after


def test_spec_parses_and_bad_specs_are_user_errors():
    assert parse_augment("") == {}
    assert parse_augment("shift=2, contrast=0.1,brightness=0.05") == {"shift": 2, "contrast": 0.1, "brightness": 0.05}
    for bad in ("flip", "shift", "shift=1.5", "rotate=3", "contrast=1", "brightness=-0.1"):
        with pytest.raises(UserError, match="--augment"):
            parse_augment(bad)
    with pytest.raises(UserError, match="--augment"):
        TrainConfig(augment="zoom=2")


def test_bad_spec_on_the_command_line_is_one_line_and_writes_nothing(tmp_path, capsys):
    code = main(["train", "--data", "phantoms:40", "--out", str(tmp_path / "run"), "--augment", "shift=x"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--augment shift needs a int value" in err
    assert not (tmp_path / "run").exists()


def _images(b=6, size=8) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(b, 1, size, size, generator=g)


def test_shift_moves_each_image_by_whole_pixels_with_edges_repeated():
    x = _images()
    y = augment(x, {"shift": 2}, torch_generator(1, "t"))
    padded = F.pad(x, (2, 2, 2, 2), mode="replicate")
    moved = 0
    for i in range(len(x)):  # each output is one of the 25 windows of its own padded input
        windows = [padded[i, :, dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)]
        hits = [k for k, w in enumerate(windows) if torch.equal(w, y[i])]
        assert hits, i
        moved += hits != [12]  # window 12: no shift
    assert moved >= 3  # 6 images, 1/25 chance each to stay put


def test_intensity_changes_keep_range_and_order_of_pixels():
    x = _images(b=64)
    y = augment(x, {"contrast": 0.2, "brightness": 0.1}, torch_generator(1, "t"))
    assert y.min() >= 0 and y.max() <= 1 and not torch.equal(x, y)
    inside = (y > 0) & (y < 1)
    # an affine map per image with a positive slope: the brightness order of unclipped pixels is kept
    for i in range(len(x)):
        xi, yi = x[i][inside[i]], y[i][inside[i]]
        assert torch.equal(torch.argsort(xi), torch.argsort(yi))
    means = (y - x).mean(dim=(1, 2, 3))
    assert means.abs().max() <= 0.1 + 0.05 and means.std() > 0.01  # brightness drawn per image


def test_same_seed_same_draws_and_empty_spec_is_the_identity():
    x = _images()
    spec = {"shift": 1, "contrast": 0.1}
    assert torch.equal(augment(x, spec, torch_generator(5, "a")), augment(x, spec, torch_generator(5, "a")))
    assert not torch.equal(augment(x, spec, torch_generator(5, "a")), augment(x, spec, torch_generator(6, "a")))
    assert augment(x, {}, torch_generator(5, "a")) is x


def test_augmented_training_differs_reproduces_and_resumes_bitwise(tmp_path, monkeypatch):
    cfg = tiny_run("phantoms:100", epochs=2, augment="shift=2,contrast=0.1,brightness=0.05")
    api.train(cfg, tmp_path / "a", progress=False)
    api.train(cfg, tmp_path / "b", progress=False)
    plain = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, augment=""))
    api.train(plain, tmp_path / "plain", progress=False)
    train_killed_after(cfg, tmp_path / "resumed", 1, monkeypatch)
    api.train(cfg, tmp_path / "resumed", resume=True, progress=False)

    def weights(name):
        return load_file(str(tmp_path / name / "last" / "model.safetensors"))

    a, b, plain_w, resumed = weights("a"), weights("b"), weights("plain"), weights("resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(a[k], resumed[k]) for k in a)
    assert any(not torch.equal(a[k], plain_w[k]) for k in a)
