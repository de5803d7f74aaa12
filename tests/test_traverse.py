"""Latent traversals: KL ranking, aggregate-posterior scale, one dimension per row, the CLI's PNG."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from medivae import api
from medivae.cli import main
from medivae.models import build_model
from medivae.workflows.traverse import LatentStats, latent_stats, traverse

from tiny import tiny_model, tiny_run
from tolerance import network_bound

PAD = 2


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(tiny_model(latent_dim=5)).eval()


def test_stats_rank_dimensions_by_mean_kl(model):
    x = torch.rand(32, 1, 32, 32)
    stats = latent_stats(model, x)
    q = model.encode(x)
    torch.testing.assert_close(stats.kl, q.kl_per_dim().mean(0).detach())
    assert stats.kl[stats.order()].diff().le(0).all()


def test_aggregate_std_is_the_spread_of_posterior_samples(model):
    x = torch.rand(32, 1, 32, 32)
    stats = latent_stats(model, x)
    with torch.no_grad():
        q = model.encode(x)
        z = q.mean + q.std * torch.randn(2000, *q.mean.shape)  # (S, B, D): draws from E_x q(z|x)
    torch.testing.assert_close(stats.std, z.flatten(0, 1).std(0), rtol=0.03, atol=1e-3)


def test_each_row_moves_one_dimension_around_the_posterior_mean(model):
    x_ref = torch.rand(1, 1, 32, 32)
    kl, std = torch.tensor([0.1, 3.0, 0.0, 1.0, 2.0]), torch.tensor([1.0, 0.5, 2.0, 1.0, 1.0])
    stats = LatentStats(kl=kl, std=std)
    imgs = traverse(model, x_ref, stats, n_dims=3, k=2.0, steps=5)
    assert imgs.shape == (3 * 5, 1, 32, 32)
    with torch.no_grad():
        mu = model.encode(x_ref).mean[0]
        recon = model.decode(mu[None])
        # traverse decodes the 15 latents as one batch, here 5 or 1: another batch shape may sum in another
        # order, so images in [0, 1] agree within the decoder's rounding bound (for each side); a wrong
        # dimension or step moves pixels by far more
        tol = dict(rtol=0, atol=2 * network_bound(model))
        for row, j in enumerate([1, 4, 3]):  # highest KL first
            z = mu.repeat(5, 1)
            z[:, j] += torch.linspace(-2.0, 2.0, 5) * stats.std[j]
            torch.testing.assert_close(imgs[row * 5 : row * 5 + 5], model.decode(z), **tol)
    torch.testing.assert_close(imgs[2], recon[0], **tol)  # the middle column is the reconstruction itself


def test_a_dimension_the_decoder_ignores_gives_a_constant_row():
    model = build_model(tiny_model(latent_dim=5)).eval()
    x_ref = torch.rand(1, 1, 32, 32)
    stats = LatentStats(kl=torch.tensor([5.0, 0.0, 0.0, 0.0, 0.0]), std=torch.ones(5))
    with torch.no_grad():
        model.decoder_input.weight[:, 0] = 0.0  # z0 no longer reaches the decoder
    imgs = traverse(model, x_ref, stats, n_dims=1, steps=4)
    assert all(torch.equal(imgs[0], im) for im in imgs[1:])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return api.train(tiny_run("phantoms:80", epochs=1), tmp_path_factory.mktemp("t") / "run", progress=False)


def test_cli_writes_png_of_expected_size(run, tmp_path, capsys):
    out = tmp_path / "t.png"
    assert main(["traverse", str(run), "--out", str(out), "--dims", "3", "--steps", "5", "--range", "2"]) == 0
    assert Image.open(out).size == (5 * (32 + PAD) + PAD, 3 * (32 + PAD) + PAD)
    assert capsys.readouterr().out.count(" z") == 3  # one line naming the 3 rows' dimensions and KL


def test_cli_defaults_show_every_dimension_and_accept_an_image(run, tmp_path):
    img = tmp_path / "ref.png"
    Image.fromarray(np.full((40, 40), 128, dtype=np.uint8)).save(img)
    out = tmp_path / "t.png"
    assert main(["traverse", str(run), "--out", str(out), "--image", str(img)]) == 0
    assert Image.open(out).size == (9 * (32 + PAD) + PAD, 4 * (32 + PAD) + PAD)  # tiny latent_dim = 4


@pytest.mark.parametrize(
    "extra, message",
    [(["--dims", "0"], "--dims"), (["--steps", "1"], "--steps"), (["--range", "0"], "--range"),
     (["--label", "lesion"], "conditional"), (["--image", "/no/such.png"], "no such image")],
)
def test_cli_bad_input_is_one_line_and_exit_2(run, tmp_path, capsys, extra, message):
    assert main(["traverse", str(run), "--out", str(tmp_path / "t.png"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medivae: error:") and message in err and len(err.strip().splitlines()) == 1
