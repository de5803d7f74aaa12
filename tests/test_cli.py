"""The command line: generation commands write PNGs of the right size; bad input is one line + exit 2."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from medivae import api
from medivae.cli import main
from medivae.models.inference import reconstruct
from medivae.workflows.generate import path_ends

from tiny import tiny_run

PAD = 2


def grid_size(n: int, size: int, cols: int) -> tuple[int, int]:
    rows = -(-n // cols)
    return cols * (size + PAD) + PAD, rows * (size + PAD) + PAD  # (width, height)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return api.train(tiny_run("phantoms:80", epochs=1), tmp_path_factory.mktemp("r") / "run", progress=False)


def test_sample_writes_grid(run, tmp_path):
    out = tmp_path / "s.png"
    assert main(["sample", str(run), "-n", "6", "--out", str(out)]) == 0
    assert Image.open(out).size == grid_size(6, 32, 3)


def test_sample_is_reproducible_for_a_seed(run, tmp_path):
    for name in ("a", "b"):
        assert main(["sample", str(run), "-n", "4", "--seed", "5", "--out", str(tmp_path / f"{name}.png")]) == 0
    a, b = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in "ab")
    assert np.array_equal(a, b)


@pytest.mark.parametrize("mode", ["linear", "slerp"])
def test_interpolate_between_prior_draws(run, tmp_path, mode):
    out = tmp_path / "i.png"
    assert main(["interpolate", str(run), "--steps", "5", "--mode", mode, "--out", str(out)]) == 0
    assert Image.open(out).size == grid_size(5, 32, 5)


def test_interpolate_between_two_images(run, tmp_path):
    for name, value in (("a.png", 30), ("b.png", 220)):
        Image.fromarray(np.full((40, 50), value, dtype=np.uint8)).save(tmp_path / name)
    out = tmp_path / "i.png"
    args = ["interpolate", str(run), "--from", str(tmp_path / "a.png"), "--to", str(tmp_path / "b.png"),
            "--steps", "4", "--out", str(out)]
    assert main(args) == 0
    img = np.asarray(Image.open(out))
    assert img.shape == grid_size(4, 32, 4)[::-1]
    # the ends are the reconstructions of the two images through their posterior means
    opened = api.load_run(run, device="cpu")
    model, cfg = opened.model, opened.config
    for name, tile in (("a.png", img[PAD:PAD + 32, PAD:PAD + 32]), ("b.png", img[PAD:PAD + 32, -(PAD + 32):-PAD])):
        expected = reconstruct(model, api.load_image(tmp_path / name, cfg))[0, 0].numpy()
        assert np.abs(tile.astype(float) - np.round(expected * 255)).max() <= 1


@pytest.fixture(scope="module")
def gmm_run(run, tmp_path_factory):
    """A copy of ``run`` with a fitted gmm sampler (and no other)."""
    copy = tmp_path_factory.mktemp("gmm") / "run"
    shutil.copytree(run, copy)
    assert main(["fit-sampler", str(copy), "--sampler", "gmm", "--max-components", "2", "--device", "cpu",
                 "--no-progress"]) == 0
    return copy


def test_interpolate_between_sampler_draws(gmm_run, tmp_path):
    opened = api.load_run(gmm_run, device="cpu")
    gmm = opened.latent_sampler("gmm")
    ends = path_ends(opened, gmm, seed=5)
    assert ends.shape == (2, 4)
    assert torch.equal(ends, path_ends(opened, gmm, seed=5))  # reproducible for a seed
    assert not torch.allclose(ends, path_ends(opened, None, seed=5))  # not the prior's draws at that seed
    assert not torch.allclose(ends, path_ends(opened, gmm, seed=6))
    for name in ("a", "b"):
        argv = ["interpolate", str(gmm_run), "--sampler", "gmm", "--seed", "5", "--steps", "5", "--device", "cpu",
                "--out", str(tmp_path / f"{name}.png")]
        assert main(argv) == 0
    img = np.asarray(Image.open(tmp_path / "a.png"))
    assert img.shape == grid_size(5, 32, 5)[::-1]
    assert np.array_equal(img, np.asarray(Image.open(tmp_path / "b.png")))
    # the ends of the path are those two draws, decoded
    want = np.round(opened.decode(ends)[:, 0].numpy() * 255)
    for tile, end in ((img[PAD:PAD + 32, PAD:PAD + 32], want[0]), (img[PAD:PAD + 32, -(PAD + 32):-PAD], want[1])):
        assert np.abs(tile.astype(float) - end).max() <= 1


def test_interpolate_refuses_a_sampler_it_cannot_use(gmm_run, tmp_path, capsys):
    out = tmp_path / "i.png"
    err = _one_line_error(capsys, ["interpolate", str(gmm_run), "--sampler", "flow", "--out", str(out)])
    assert "no fitted flow sampler" in err and "medivae fit-sampler" in err
    Image.fromarray(np.full((32, 32), 90, dtype=np.uint8)).save(tmp_path / "a.png")
    err = _one_line_error(capsys, ["interpolate", str(gmm_run), "--sampler", "gmm", "--from", str(tmp_path / "a.png"),
                                   "--to", str(tmp_path / "a.png"), "--out", str(out)])
    assert "--sampler gmm" in err and "--from/--to" in err
    err = _one_line_error(capsys, ["interpolate", str(gmm_run), "--sampler", "gmm", "--guidance", "1",
                                   "--out", str(out)])
    assert "options of --sampler diffusion" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]  # nothing written


def test_reconstruct_writes_pairs(run, tmp_path):
    out = tmp_path / "r.png"
    assert main(["reconstruct", str(run), "--data", "phantoms:80", "--split", "test", "-n", "5",
                 "--out", str(out)]) == 0
    assert Image.open(out).size == grid_size(10, 32, 5)


def _one_line_error(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("medivae: error:") and "Traceback" not in err
    return err


def test_missing_file(capsys, tmp_path):
    err = _one_line_error(capsys, ["train", "--data", str(tmp_path / "nope.npz"), "--out", str(tmp_path / "r")])
    assert "no such file" in err


def test_npz_without_expected_keys(capsys, tmp_path):
    np.savez(tmp_path / "bad.npz", images=np.zeros((4, 8, 8), np.uint8))
    err = _one_line_error(capsys, ["train", "--data", str(tmp_path / "bad.npz"), "--out", str(tmp_path / "r")])
    assert "train_images" in err


def test_empty_folder(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    err = _one_line_error(capsys, ["train", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "r")])
    assert "no images" in err


def test_non_image_file(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    err = _one_line_error(capsys, ["train", "--data", str(tmp_path / "notes.txt"), "--out", str(tmp_path / "r")])
    assert "not a supported data source" in err


def test_unknown_option(capsys, tmp_path):
    _one_line_error(capsys, ["train", "--data", "phantoms", "--out", str(tmp_path / "r"), "--bogus", "1"])


def test_unsupported_image_size(capsys, tmp_path):
    err = _one_line_error(capsys, ["train", "--data", "phantoms", "--out", str(tmp_path / "r"), "--image-size", "48"])
    assert "48" in err and "64" in err


def test_failed_start_leaves_no_half_written_run(capsys, tmp_path):
    _one_line_error(capsys, ["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r")])
    assert not (tmp_path / "r" / "last").exists()


def test_sample_from_a_folder_that_is_not_a_run(capsys, tmp_path):
    _one_line_error(capsys, ["sample", str(tmp_path), "--out", str(tmp_path / "s.png")])


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "medivae", "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("medivae ")


def test_family_shorthand_flags_come_from_the_family(monkeypatch):
    """A family declares its own flags (its config's cli_flags()); one without declares none, and a
    shorthand the chosen family lacks is refused by name."""
    from dataclasses import dataclass

    from medivae.cli import build_parser
    from medivae.commands.train import model_flags, run_config
    from medivae.models.family import REGISTRY, Family
    from medivae.runtime.errors import UserError

    @dataclass(frozen=True)
    class WibbleConfig:
        name: str = "wibbler"
        image_size: int = 32
        channels: int = 1
        wibble: float = 1.0

        @classmethod
        def cli_flags(cls):
            return {"wibble": "how much it wibbles"}

    plain = Family("plain", WibbleConfig, lambda cfg: None)
    assert plain.cli_flags() == {"wibble": "how much it wibbles"}
    assert Family("bare", type("Bare", (), {}), lambda cfg: None).cli_flags() == {}
    monkeypatch.setitem(REGISTRY, "wibbler", Family("wibbler", WibbleConfig, lambda cfg: None))
    parser = build_parser()
    assert model_flags()["wibble"].families == ("wibbler",) and "conv_vae" in model_flags()["latent_dim"].families
    args = parser.parse_args(["train", "--data", "phantoms", "--out", "x", "--image-size", "32",
                              "--model", "wibbler", "--wibble", "3"])
    assert run_config(args).model.wibble == 3.0
    args = parser.parse_args(["train", "--data", "phantoms", "--out", "x", "--wibble", "3"])
    with pytest.raises(UserError, match="wibble"):
        run_config(args)  # conv_vae has no wibble
    with pytest.raises(UserError, match="latent_dim"):
        run_config(parser.parse_args(["train", "--data", "phantoms", "--out", "x", "--model", "wibbler",
                                      "--latent-dim", "3"]))
