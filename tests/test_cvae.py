"""Conditional VAE (Sohn et al. 2015): contract, conditioning, and `sample --label` end to end."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from medivae import api
from medivae.cli import main
from medivae.models import REGISTRY, build_model, model_config
from medivae.models.conv_vae import ConvVAE as CVAE
from medivae.models.losses import neg_elbo
from medivae.workflows.generate import path_ends

from tiny import tiny_model, tiny_run


def tiny_cvae(**kw) -> CVAE:
    return build_model(tiny_model(name="cvae", num_classes=3, **kw))


def test_shapes_and_api_match_conv_vae():
    model = tiny_cvae(latent_dim=5)
    x, y = torch.rand(4, 1, 32, 32), torch.tensor([0, 1, 2, 1])
    out = model(x, y)
    assert out.recon_params.shape == (4, 1, 32, 32)
    assert out.posterior.mean.shape == (4, 5) and out.z.shape == (4, 5)
    assert model.encode(x, y).mean.shape == (4, 5)
    assert model.decode(out.z, y).shape == (4, 1, 32, 32)
    imgs = model.images(out.recon_params)
    assert imgs.min() >= 0 and imgs.max() <= 1
    assert model.latent_dim == 5 and neg_elbo(model.likelihood, out, x).loss.shape == (4,)


def test_missing_label_is_refused():
    with pytest.raises(ValueError, match="conditional"):
        tiny_cvae()(torch.rand(2, 1, 32, 32))


def test_label_changes_both_encoder_and_decoder():
    torch.manual_seed(0)
    model = tiny_cvae().eval()
    x = torch.rand(2, 1, 32, 32).repeat(2, 1, 1, 1)  # same images under two labels
    y = torch.tensor([0, 0, 2, 2])
    with torch.no_grad():
        q = model.encode(x, y)
        z = torch.randn(1, model.latent_dim).repeat(4, 1)
        dec = model.decode(z, y)
    assert not torch.allclose(q.mean[:2], q.mean[2:])
    assert not torch.allclose(dec[:2], dec[2:])
    torch.testing.assert_close(dec[0], dec[1])  # same z, same label: same image


def test_every_parameter_gets_a_gradient_and_only_a_step_changes_weights():
    torch.manual_seed(0)
    model = tiny_cvae()
    x, y = torch.rand(4, 1, 32, 32), torch.tensor([0, 1, 2, 0])
    neg_elbo(model.likelihood, model(x, y), x).loss.mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.optim.Adam(model.parameters(), lr=1e-2).step()
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.eval()
    stepped = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model(x, y, sample=False)
    assert all(torch.equal(stepped[k], v) for k, v in model.state_dict().items())


def test_trained_cvae_generates_the_requested_class():
    """Class 1 images are bright, class 0 dark: after a short fit, prior samples follow the label."""
    torch.manual_seed(0)
    model = build_model(tiny_model(name="cvae", num_classes=2))
    y = torch.arange(32) % 2
    x = (0.15 + 0.7 * y.float())[:, None, None, None] + 0.05 * torch.rand(32, 1, 32, 32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(25):
        opt.zero_grad()
        neg_elbo(model.likelihood, model(x, y), x).loss.mean().backward()
        opt.step()
    model.eval()
    z = torch.randn(16, model.latent_dim)
    with torch.no_grad():
        dark = model.decode(z, torch.zeros(16, dtype=torch.long)).mean()
        bright = model.decode(z, torch.ones(16, dtype=torch.long)).mean()
    assert bright - dark > 0.2  # the data's gap is 0.7; an unconditioned decoder would give 0


def test_registry_presets():
    assert REGISTRY["beta_vae"].build is REGISTRY["conv_vae"].build  # a preset, not a new class
    assert model_config("beta_vae").beta == 4.0
    assert model_config("beta_vae", beta=2.0).beta == 2.0  # the user's value wins
    assert model_config("conv_vae").beta == 1.0
    assert model_config("cvae").num_classes == -1  # one class per label of the data, set when training starts
    assert model_config("cvae").for_data(("a", "b", "c"), "x").num_classes == 3


def test_unknown_model_on_the_command_line_lists_valid_ones(capsys):
    assert main(["train", "--data", "phantoms:20", "--out", "/nonexistent/x", "--model", "vq"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("medivae: error: unknown model 'vq'") and len(err.splitlines()) == 1
    for name in ("conv_vae", "beta_vae", "cvae"):
        assert name in err


@pytest.fixture(scope="module")
def cvae_run(tmp_path_factory):
    # the preset's class count is a placeholder: training takes it from the data (phantoms: 2 classes)
    cfg = tiny_run("phantoms:80", epochs=1)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name="cvae", num_classes=5))
    return api.train(cfg, tmp_path_factory.mktemp("cvae") / "run", progress=False)


def test_training_takes_classes_from_the_data(cvae_run):
    saved = json.loads((cvae_run / "config.json").read_text())
    assert saved["model"]["num_classes"] == 2
    assert saved["label_names"] == ["normal", "lesion"]


def test_sample_with_label_end_to_end(cvae_run, tmp_path):
    out = {}
    for label in ("normal", "lesion"):
        out[label] = tmp_path / f"{label}.png"
        assert main(["sample", str(cvae_run), "--label", label, "-n", "4", "--seed", "3",
                     "--out", str(out[label])]) == 0
        assert Image.open(out[label]).size == (2 * 34 + 2, 2 * 34 + 2)
    # same seed, same z: only the label differs, and it changes the picture
    a, b = (np.asarray(Image.open(p)) for p in out.values())
    assert not np.array_equal(a, b)


def test_sample_with_unknown_label_lists_valid_names(cvae_run, tmp_path, capsys):
    assert main(["sample", str(cvae_run), "--label", "tumour", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "tumour" in err and "normal" in err and "lesion" in err
    assert not (tmp_path / "x.png").exists()


def test_interpolate_on_a_conditional_run_needs_a_label(cvae_run, tmp_path, capsys):
    assert main(["interpolate", str(cvae_run), "--out", str(tmp_path / "i.png")]) == 2
    assert "--label" in capsys.readouterr().err
    assert main(["interpolate", str(cvae_run), "--label", "lesion", "--out", str(tmp_path / "i.png")]) == 0


def test_interpolate_between_draws_of_a_per_class_sampler(cvae_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(cvae_run, run)
    assert main(["fit-sampler", str(run), "--sampler", "gmm", "--max-components", "2", "--device", "cpu",
                 "--no-progress"]) == 0
    assert main(["interpolate", str(run), "--sampler", "gmm", "--out", str(tmp_path / "i.png")]) == 2
    assert "--label" in capsys.readouterr().err and not (tmp_path / "i.png").exists()
    out = tmp_path / "lesion.png"
    assert main(["interpolate", str(run), "--sampler", "gmm", "--label", "lesion", "--seed", "3", "--steps", "3",
                 "--device", "cpu", "--out", str(out)]) == 0
    opened = api.load_run(run, device="cpu")
    gmm = opened.latent_sampler("gmm")
    ends = path_ends(opened, gmm, seed=3, label=1)  # drawn from the lesion class's mixture
    assert not torch.allclose(ends, path_ends(opened, gmm, seed=3, label=0))
    img = np.asarray(Image.open(out)).astype(float)
    assert img.shape == (34 + 2, 3 * 34 + 2)
    want = np.round(opened.decode(ends, label="lesion")[:, 0].numpy() * 255)  # decoded as the lesion class
    assert np.abs(img[2:34, 2:34] - want[0]).max() <= 1 and np.abs(img[2:34, -34:-2] - want[1]).max() <= 1


def test_traverse_on_a_conditional_run(cvae_run, tmp_path):
    out = tmp_path / "t.png"
    assert main(["traverse", str(cvae_run), "--out", str(out), "--steps", "3", "--label", "lesion"]) == 0
    assert Image.open(out).size == (3 * 34 + 2, 4 * 34 + 2)
