"""``medivae fit-sampler --sampler diffusion`` end to end on phantoms: files and results, samples measurably
closer to the data than the N(0, I) prior's, determinism, the sample / evaluate / synthesize options,
class-conditional runs with guidance, vq_vae's spatial grid, hierarchical_vae's top groups, and refusals.
The core (schedule, DDIM, guidance, healing) is tested in tests/test_diffusion.py."""

from __future__ import annotations

import hashlib
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import medivae
from medivae.cli import main
from medivae.evaluation.sample_quality import frechet_distance
from medivae.models import build_model, model_config
from medivae.models.family import decode_sampler_latents, require_sampler_latents, sampler_latents
from medivae.runtime.errors import UserError

BASE = ["--image-size", "32", "--batch-size", "32", "--precision", "fp32", "--no-progress", "--seed", "3"]
CONV = ["--latent-dim", "8", "--base-width", "8"]
FIT = ["--no-progress", "--epochs", "150", "--patience", "30"]


def one_line_error(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def conv_run(tmp_path_factory):
    """A conv_vae trained briefly on phantoms (its aggregate posterior is far from N(0, I)) + a diffusion sampler."""
    run = tmp_path_factory.mktemp("diffusion") / "run"
    assert main(["train", "--data", "phantoms:600", "--out", str(run), "--epochs", "4", *BASE, *CONV]) == 0
    assert main(["fit-sampler", str(run), "--sampler", "diffusion", *FIT]) == 0
    return run


def test_fit_writes_the_sampler_bound_to_the_checkpoint_and_records_it(conv_run):
    meta = json.loads((conv_run / "samplers" / "diffusion.json").read_text())
    manifest = (conv_run / "best" / "manifest.json").read_bytes()
    assert meta["checkpoint_manifest_sha256"] == hashlib.sha256(manifest).hexdigest()
    assert meta["spec"]["latent_shape"] == [8] and meta["spec"]["num_classes"] == 0
    assert 1 <= meta["fit"]["best_epoch"] <= meta["fit"]["epochs"] <= 150
    assert (conv_run / "samplers" / "diffusion.safetensors").is_file()
    assert np.asarray(Image.open(conv_run / "samplers" / "samples_diffusion.png")).std() > 0
    summary = json.loads((conv_run / "results.json").read_text())["samplers"]["diffusion"]
    assert summary["val_eps_mse"] < 1.0  # below the ε-MSE of predicting 0 (the noise's variance)


def _pooled(images) -> np.ndarray:
    """Images (N, 1, 32, 32), uint8 or float in [0, 1] -> 8x8 means (N, 64) float64: coarse layout and intensity."""
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images).float()
    x = x / 255 if x.max() > 1.5 else x
    return F.avg_pool2d(x, 4).flatten(1).double().numpy()


def test_diffusion_samples_are_closer_to_the_data_than_prior_samples(conv_run):
    """Fréchet distances to the held-out data, in the latent (posterior means of the test images) and in
    8x8-pooled pixels (against the training images): the diffusion sampler must beat N(0, I) by a wide margin
    (measured on this fixture: latent 0.005 vs 11, pixels 0.8 vs 1.9)."""
    run = medivae.load(conv_run)
    splits = run.splits()
    z_test = run.encode(splits["test"].images)["mean"].double().numpy()
    z_diff = run.latent_sampler("diffusion").sample(1000, torch.Generator().manual_seed(0), steps=25).double().numpy()
    z_prior = np.random.default_rng(0).standard_normal(z_diff.shape)
    fd_diff, fd_prior = frechet_distance(z_test, z_diff), frechet_distance(z_test, z_prior)
    assert fd_diff < 0.1 * fd_prior
    real = _pooled(splits["train"].images)
    fd = {k: frechet_distance(real, _pooled(run.sample(400, seed=1, sampler=k, precision="fp32", sampling_steps=25
                                                       if k == "diffusion" else None)))
          for k in ("prior", "diffusion")}
    assert fd["diffusion"] < 0.7 * fd["prior"]


def test_sampling_is_deterministic_and_the_step_count_is_used(conv_run):
    run = medivae.load(conv_run)
    a = run.sample(6, seed=2, sampler="diffusion", sampling_steps=10)
    assert torch.equal(a, run.sample(6, seed=2, sampler="diffusion", sampling_steps=10))
    assert not torch.equal(a, run.sample(6, seed=3, sampler="diffusion", sampling_steps=10))
    assert not torch.equal(a, run.sample(6, seed=2, sampler="diffusion", sampling_steps=3))


def test_sample_evaluate_synthesize_with_the_diffusion_sampler(conv_run, tmp_path):
    png = tmp_path / "d.png"
    assert main(["sample", str(conv_run), "--sampler", "diffusion", "--sampling-steps", "5", "-n", "8",
                 "--out", str(png), "--no-progress"]) == 0
    assert np.asarray(Image.open(png)).std() > 0
    assert main(["evaluate", str(conv_run), "--sampler", "diffusion", "--sampling-steps", "5", "-k", "2",
                 "--max-images", "8", "--n-samples", "16", "--reference-epochs", "1", "--bootstrap", "0",
                 "--no-progress"]) == 0
    sq = json.loads((conv_run / "results.json").read_text())["evaluation"]["sample_quality"]
    assert (sq["sampler"], sq["sampling_steps"], sq["guidance"]) == ("diffusion", 5, 0.0)
    out = tmp_path / "syn"
    assert main(["synthesize", str(conv_run), "-n", "8", "--out", str(out), "--sampler", "diffusion",
                 "--sampling-steps", "5", "--pairs", "0", "--reference-epochs", "1", "--bootstrap", "0",
                 "--no-progress"]) == 0
    report = json.loads((out / "memorisation.json").read_text())
    assert report["sampler"] == "diffusion" and "nearest_synthetic_pixel" in report["membership_inference"]


def test_fit_to_posterior_draws(conv_run, tmp_path):
    """--posterior-draws K: K draws of q(z|x) per image, spread like the posterior (mean ± std), seeded."""
    from medivae.workflows.fit_sampler import posterior_means

    run = medivae.load(conv_run)
    train = run.splits()["train"]
    q = run.encode(train.images)
    z, y = posterior_means(run, train.images, train.labels, draws=3, seed=5)
    assert z.shape == (3 * len(train), 8) and y is None
    eps = (z.reshape(len(train), 3, 8) - q["mean"].double().numpy()[:, None]) / np.exp(
        0.5 * q["logvar"].double().numpy())[:, None]
    n = eps.size  # standardised draws: mean 0 and variance 1 within 5 standard errors
    assert abs(eps.mean()) < 5 / np.sqrt(n) and abs(eps.var() - 1) < 5 * np.sqrt(2 / n)
    assert np.array_equal(z, posterior_means(run, train.images, train.labels, draws=3, seed=5)[0])
    copy = tmp_path / "run"
    shutil.copytree(conv_run, copy)
    assert main(["fit-sampler", str(copy), "--sampler", "diffusion", "--posterior-draws", "2", "--no-progress",
                 "--epochs", "2", "--width", "32"]) == 0
    summary = json.loads((copy / "results.json").read_text())["samplers"]["diffusion"]
    assert summary["n_train"] == 2 * len(train) and summary["latents"] == "2 posterior draws per image"


def test_refusals_are_one_line(conv_run, tmp_path, capsys):
    out = str(tmp_path / "x.png")
    sample = ["sample", str(conv_run), "--out", out]
    assert "class-conditional" in one_line_error(capsys, [*sample, "--sampler", "diffusion", "--guidance", "1"])
    assert "--sampler diffusion" in one_line_error(capsys, [*sample, "--sampler", "gmm", "--guidance", "1"])
    assert "--sampler diffusion" in one_line_error(capsys, [*sample, "--sampling-steps", "5"])
    assert ">= 1" in one_line_error(capsys, [*sample, "--sampler", "diffusion", "--sampling-steps", "0"])
    assert "options of --sampler diffusion" in one_line_error(
        capsys, ["fit-sampler", str(conv_run), "--sampler", "gmm", "--epochs", "3"])
    assert not (tmp_path / "x.png").exists()


def test_a_family_without_a_continuous_latent_is_refused():
    model = SimpleNamespace(cfg=SimpleNamespace(name="codes_only"), capabilities=frozenset({"sample"}))
    with pytest.raises(UserError, match="codes_only has no continuous latent") as e:
        require_sampler_latents(model, "fit-sampler --sampler diffusion")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError):
        sampler_latents(model, torch.zeros(1, 1, 8, 8))


# --- a class-conditional run: one denoiser for both classes, classifier-free guidance ---------------------------
def test_cvae_gets_a_class_conditional_sampler_with_guidance(tmp_path):
    run = tmp_path / "cvae"
    assert main(["train", "--model", "cvae", "--data", "phantoms:200", "--out", str(run), "--epochs", "1",
                 *BASE, *CONV]) == 0
    assert main(["fit-sampler", str(run), "--sampler", "diffusion", "--no-progress", "--epochs", "10",
                 "--width", "32"]) == 0
    meta = json.loads((run / "samplers" / "diffusion.json").read_text())
    assert meta["spec"]["num_classes"] == 2 and meta["classes"] == [0, 1]
    r = medivae.load(run)
    w0 = r.sample(4, label="lesion", seed=0, sampler="diffusion", sampling_steps=4)
    w3 = r.sample(4, label="lesion", seed=0, sampler="diffusion", sampling_steps=4, guidance=3.0)
    assert w0.shape == w3.shape == (4, 1, 32, 32) and not torch.equal(w0, w3)
    assert main(["sample", str(run), "--sampler", "diffusion", "--label", "normal", "--guidance", "2",
                 "--sampling-steps", "3", "-n", "4", "--out", str(tmp_path / "g.png"), "--no-progress"]) == 0


# --- families whose latent is not a flat Gaussian -----------------------------------------------------------------
VQ = dict(codebook_size=16, code_dim=4, width=16, res_width=8, res_blocks=1, prior_width=16, prior_layers=1,
          prior_heads=2, prior_epochs=1)


def test_vq_vae_gets_a_u_net_over_its_pre_quantisation_grid(tmp_path):
    run = tmp_path / "vq"
    args = [a for k, v in VQ.items() for a in ("--model-arg", f"{k}={v}")]
    assert main(["train", "--model", "vq_vae", "--data", "phantoms:120", "--out", str(run), "--epochs", "2",
                 *BASE, *args]) == 0
    assert main(["fit-sampler", str(run), "--sampler", "diffusion", "--no-progress", "--epochs", "3",
                 "--width", "8"]) == 0
    meta = json.loads((run / "samplers" / "diffusion.json").read_text())
    assert meta["spec"]["latent_shape"] == [4, 8, 8]  # code_dim x (32 / downsample 4)^2
    assert main(["fit-sampler", str(run), "--sampler", "diffusion", "--posterior-draws", "2", "--no-progress"]) == 2
    r = medivae.load(run)
    x = r.sample(3, seed=0, sampler="diffusion", sampling_steps=3)
    assert x.shape == (3, 1, 32, 32) and float(x.min()) >= 0 and float(x.max()) <= 1
    # a sampled grid is decoded through the quantiser: the image of its nearest codes
    model = r.model
    z = torch.randn(2, 4, 8, 8)
    codes = model.autoencoder.codebook.nearest(z.permute(0, 2, 3, 1).reshape(-1, 4)).view(2, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(decode_sampler_latents(model, z), model.decode_indices(codes))


def test_hierarchical_vae_models_its_top_groups_and_draws_the_rest_from_its_prior():
    torch.manual_seed(0)
    model = build_model(model_config("hierarchical_vae", image_size=32, width=8, z_channels=2, num_scales=2,
                                     groups_per_scale=2)).eval()
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        top = sampler_latents(model, x)
        assert top.shape == (3, 4, 4, 4)  # 2 groups x 2 channels at the coarsest scale (32 / 4 / 2)
        groups = model.encode(x).groups
        torch.testing.assert_close(top, torch.cat([groups[0].q.mean, groups[1].q.mean], 1))
        a = decode_sampler_latents(model, top, generator=torch.Generator().manual_seed(0))
        b = decode_sampler_latents(model, top, generator=torch.Generator().manual_seed(0))
        c = decode_sampler_latents(model, top, generator=torch.Generator().manual_seed(1))
        assert torch.equal(a, b) and not torch.equal(a, c)  # the lower groups are drawn
        # at temperature 0 the lower groups are their prior means: decoding the top of x is deterministic
        d = decode_sampler_latents(model, top, temperature=0.0, generator=torch.Generator().manual_seed(5))
        e = decode_sampler_latents(model, top, temperature=0.0, generator=torch.Generator().manual_seed(6))
        assert torch.equal(d, e) and d.shape == x.shape


def test_hierarchical_vae_fit_sampler_end_to_end(tmp_path):
    run = tmp_path / "hvae"
    args = [a for k, v in dict(width=8, z_channels=2, num_scales=2, groups_per_scale=2).items()
            for a in ("--model-arg", f"{k}={v}")]
    assert main(["train", "--model", "hierarchical_vae", "--data", "phantoms:80", "--out", str(run), "--epochs", "1",
                 *BASE, *args]) == 0
    assert main(["fit-sampler", str(run), "--sampler", "diffusion", "--no-progress", "--epochs", "2",
                 "--width", "8"]) == 0
    assert json.loads((run / "samplers" / "diffusion.json").read_text())["spec"]["latent_shape"] == [4, 4, 4]
    assert medivae.load(run).sample(2, sampler="diffusion", sampling_steps=2).shape == (2, 1, 32, 32)


# --- fitting and files, without a run ----------------------------------------------------------------------------
def _toy(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g) * torch.tensor([2.0, 0.5, 1.0]) + torch.tensor([1.0, -3.0, 0.0])


def test_fit_diffusion_is_seeded_keeps_its_best_epoch_and_stops_at_the_time_budget():
    from medivae.models.samplers import DiffusionFit, fit_diffusion

    opts = DiffusionFit(width=16, max_epochs=6, patience=3, batch=64)
    a = fit_diffusion(_toy(256, 0), _toy(64, 1), seed=7, opts=opts)
    b = fit_diffusion(_toy(256, 0), _toy(64, 1), seed=7, opts=opts)
    assert all(torch.equal(x, y) for x, y in zip(a.denoiser.state_dict().values(), b.denoiser.state_dict().values(),
                                                 strict=True))
    assert 1 <= a.info["best_epoch"] <= a.info["epochs"] <= 6
    torch.testing.assert_close(a.standardiser.mean, _toy(256, 0).mean(0))
    quick = fit_diffusion(_toy(256, 0), _toy(64, 1), seed=7, opts=DiffusionFit(width=16, time_budget=1e-9))
    assert quick.info["epochs"] == 1
    with pytest.raises(UserError, match="max epochs"):
        DiffusionFit(max_epochs=0)


def test_diffusion_sampler_files_round_trip_and_refuse_other_weights(tmp_path):
    from medivae.models.samplers import DiffusionFit, fit_diffusion, load_sampler, save_sampler

    y = torch.arange(2).repeat(128)
    s = fit_diffusion(_toy(256, 0), _toy(64, 1), y, y[:64], num_classes=2, seed=3,
                      opts=DiffusionFit(width=16, max_epochs=2, batch=64))
    save_sampler(s, tmp_path, "a" * 64)
    back = load_sampler(tmp_path, "diffusion", "a" * 64)
    labels = torch.tensor([0, 1, 1, 0])
    draw = {k: x.sample(4, torch.Generator().manual_seed(0), labels, guidance=1.0, steps=5) for k, x in
            (("saved", s), ("loaded", back))}
    assert torch.equal(draw["saved"], draw["loaded"]) and draw["saved"].shape == (4, 3)
    with pytest.raises(UserError, match="fitted to other weights"):
        load_sampler(tmp_path, "diffusion", "b" * 64)
