"""Diffusion healing as an anomaly score, and the diffusion-loss membership test, on phantoms.

Two kinds of run have a diffusion prior: ``ldm`` (its own, trained by ``anomaly fit``) and a conv_vae with a
diffusion sampler fitted after ``anomaly fit`` (``medivae fit-sampler RUN --sampler diffusion``). The healing
score separates anomalies from normals, t_start = 0 gives back the reconstruction residual, scores are seeded
and independent of the batch size, runs without a diffusion prior have no such score, and ``synthesize`` with
a diffusion prior reports memorisation and membership inference."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import medivae
from medivae.cli import main
from medivae.data.imageset import label_code
from medivae.evaluation.anomaly.passes import ImagePass, Scoring
from medivae.evaluation.anomaly.scorers import HEALING_FRACTIONS, available, diffusion_healing_scores
from medivae.evaluation.anomaly.selection import synthetic_auroc
from medivae.models import build_model, model_config
from medivae.models.diffusion import DiffusionSpec, LatentStandardiser, build_denoiser
from medivae.models.family import diffusion_prior, sampler_latents
from medivae.models.samplers import DiffusionSampler
from medivae.runtime.errors import UserError

from tiny import TINY, tiny_model
from tolerance import network_bound

LDM_ARGS = ["--model", "ldm", *(a for kv in ("width=16", "res_blocks=1", "res_width=8", "latent_channels=2",
                                             "disc_width=4", "disc_layers=2", "adv_start=100", "prior_epochs=2",
                                             "prior_width=8", "sampling_steps=10") for a in ("--model-arg", kv))]
FIT = ["--data", "phantoms:400", "--normal-label", "normal", "--device", "cpu", "--threads", "1"]
SCORE = ["--iwae-samples", "2", "--n-maps", "4", "--device", "cpu", "--fpr", "0.2", "--bootstrap", "0"]


@pytest.fixture(scope="module")
def ldm_run(tmp_path_factory):
    """An ldm fitted on normal phantoms: 6 epochs of autoencoder, then 2 of its diffusion prior."""
    run = tmp_path_factory.mktemp("ldm") / "run"
    assert main(["anomaly", "fit", *FIT, "--out", str(run), *LDM_ARGS, "--image-size", "32", "--epochs", "8",
                 "--batch-size", "16", "--lr", "3e-3", "--precision", "fp32", "--no-progress", "--seed", "5"]) == 0
    return run


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    """A conv_vae fitted on normal phantoms, then a small diffusion sampler fitted to its posterior means."""
    run = tmp_path_factory.mktemp("vae") / "run"
    assert main(["anomaly", "fit", *FIT, "--out", str(run), "--image-size", "32", "--latent-dim", "16", "--base-width",
                 "8", "--batch-size", "16", "--lr", "3e-3", "--precision", "fp32", "--no-progress", "--epochs", "6",
                 "--seed", "5"]) == 0
    assert main(["fit-sampler", str(run), "--sampler", "diffusion", "--epochs", "20", "--patience", "5",
                 "--width", "32", "--no-progress", "--device", "cpu"]) == 0
    return run


def _scoring(run, batch_size: int = 64, seed: int = 0) -> Scoring:
    r = medivae.load(run, device="cpu")
    return Scoring(r.model, "cpu", batch_size, "fp32", 2, seed, normal_class=label_code(r.config.label_names, "normal"),
                   diffusion=r.diffusion_prior())


def _normals(run) -> np.ndarray:
    """The normal phantoms the run held out (validation and test), uint8 (N, 1, 32, 32)."""
    s = medivae.load(run, device="cpu").splits()
    return np.concatenate([s["val"].images, s["test"].images])


def _with_a_bright_disc(images: np.ndarray, seed: int) -> np.ndarray:
    """Anomaly i: normal i with a saturated disc of radius 4 px at a random place inside the phantom."""
    rng = np.random.default_rng(seed)
    out = images.copy()
    yy, xx = np.mgrid[:32, :32]
    for img in out:
        cy, cx = rng.integers(10, 22, 2)
        img[0][(yy - cy) ** 2 + (xx - cx) ** 2 <= 16] = 255
    return out


@pytest.mark.parametrize("which", ["ldm_run", "vae_run"])
def test_healing_separates_anomalies_from_the_normals_they_were_made_from(which, request):
    """AUROC of healing scores, normals against the same normals with a bright disc, at every t_start of the grid.
    Under chance, AUROC has standard deviation sqrt((n + m + 1) / (12 n m)) (Mann-Whitney); it must exceed 0.5 by
    four of them (0.3 for the n = m = 54 here; measured on the validation normals: about 0.9 for the ldm, 1.0 for
    the conv_vae)."""
    run = request.getfixturevalue(which)
    ctx = _scoring(run)
    assert ctx.diffusion.source == ("ldm prior" if which == "ldm_run" else "fitted diffusion sampler")
    normals = _normals(run)
    anomalies = _with_a_bright_disc(normals, 0)
    n = len(normals)
    margin = 4 * math.sqrt((2 * n + 1) / (12 * n * n))
    for fraction in HEALING_FRACTIONS:
        v, v_map = diffusion_healing_scores(ImagePass(ctx, normals), fraction)
        a, a_map = diffusion_healing_scores(ImagePass(ctx, anomalies), fraction)
        assert synthetic_auroc(v, a) > 0.5 + margin, fraction
        assert v_map.shape == (n, 32, 32) and np.isfinite(a_map).all()
        # the score is the map's mean, in float64 as the scorer takes it: exact (a float32 mean of 1024 values may
        # round ~20 ulps away on another CPU's SIMD, more than a fixed rtol of 1e-6 allows)
        np.testing.assert_array_equal(v, v_map.reshape(n, -1).mean(1, dtype=np.float64))


def test_healing_at_t_start_zero_is_the_reconstruction_residual(ldm_run):
    """Noised to t = 0, nothing is denoised: the healed image is the decoded encoding, so the map is |x - recon|
    up to the float32 round trip through the standardisation (a few ulps of the latent, through the decoder)."""
    ctx = _scoring(ldm_run)
    p = ImagePass(ctx, _normals(ldm_run)[:16])
    scores, maps = diffusion_healing_scores(p, 0.0)
    # pixels in [0, 1]: the decoder's first-order rounding bound, relative to 1 (any CPU's summation order)
    np.testing.assert_allclose(maps, p.residual, rtol=0, atol=network_bound(ctx.model))


def test_healing_at_t_start_zero_is_the_reconstruction_residual_under_a_fitted_sampler():
    """The same for a conv_vae under a diffusion sampler (untrained: at t = 0 the denoiser is never called)."""
    torch.manual_seed(0)
    model = build_model(tiny_model()).eval()
    x = torch.rand(12, 1, 32, 32)
    z = sampler_latents(model, x)
    spec = DiffusionSpec(tuple(z.shape[1:]), width=32, timesteps=100)
    prior = DiffusionSampler(spec, build_denoiser(spec), LatentStandardiser.fit(z)).prior_of(model)
    p = ImagePass(Scoring(model, "cpu", 5, diffusion=prior), (x * 255).round().byte().numpy())
    _, maps = diffusion_healing_scores(p, 0.0)
    np.testing.assert_allclose(maps, p.residual, rtol=0, atol=network_bound(model))


def test_healing_is_seeded_and_independent_of_the_batch_size(ldm_run):
    images = _normals(ldm_run)[:12]
    a = diffusion_healing_scores(ImagePass(_scoring(ldm_run, 64), images), 0.5)[0]
    assert np.array_equal(a, diffusion_healing_scores(ImagePass(_scoring(ldm_run, 64), images), 0.5)[0])
    b = diffusion_healing_scores(ImagePass(_scoring(ldm_run, 5), images), 0.5)[0]
    # the same noise per image; only the batching of convolutions differs: every DDIM step and the decoder may
    # round in another order, each within the whole network's first-order bound
    steps = _scoring(ldm_run).diffusion.heal_steps(0.5)
    np.testing.assert_allclose(a, b, rtol=(steps + 1) * network_bound(_scoring(ldm_run).model))
    other = diffusion_healing_scores(ImagePass(_scoring(ldm_run, 64, seed=1767661200070), images), 0.5)[0]
    assert not np.array_equal(a, other)  # another seed, other noise (a seed above 2**32 works)


def test_runs_without_a_diffusion_prior_have_no_healing_score(vae_run, tmp_path, capsys):
    # a family with no diffusion prior of its own
    model = build_model(tiny_model())
    assert diffusion_prior(model) is None
    assert "diffusion_healing" not in {s.name for s in available(model, None, None)}
    # an ldm trained without a prior, or not yet in its prior stage
    assert diffusion_prior(build_model(model_config("ldm", image_size=32, prior_epochs=0, num_classes=0))) is None
    assert diffusion_prior(build_model(model_config("ldm", image_size=32, num_classes=0))) is None
    # a conv_vae run without a fitted sampler; asking for one by name is a one-line refusal
    bare = tmp_path / "bare"
    assert main(["anomaly", "fit", *FIT, "--out", str(bare), *TINY, "--epochs", "1"]) == 0
    assert medivae.load(bare, device="cpu").diffusion_prior() is None
    with pytest.raises(UserError, match="no fitted diffusion sampler"):
        medivae.load(bare, device="cpu").diffusion_prior("diffusion")
    # a sampler fitted to other weights is refused, not used
    (bare / "samplers").mkdir()
    for name in ("diffusion.json", "diffusion.safetensors"):
        (bare / "samplers" / name).write_bytes((vae_run / "samplers" / name).read_bytes())
    capsys.readouterr()
    assert main(["anomaly", "score", str(bare), *SCORE]) == 2
    assert "fitted to other weights" in capsys.readouterr().err


@pytest.mark.parametrize("which", ["ldm_run", pytest.param("vae_run", marks=pytest.mark.slow)])  # 30 s: restoration
def test_anomaly_score_tunes_and_reports_diffusion_healing(which, request):
    run = request.getfixturevalue(which)
    assert main(["anomaly", "score", str(run), *SCORE]) == 0
    r = json.loads((run / "results.json").read_text())["anomaly"]
    rec = r["protocol"]["diffusion_healing"]
    assert rec["t_start_fraction"] in HEALING_FRACTIONS
    assert set(rec["tuning_auroc_by_t_start_fraction"]) == {str(f) for f in HEALING_FRACTIONS}
    assert rec["prior"] == ("ldm prior" if which == "ldm_run" else "fitted diffusion sampler")
    assert rec["t_start"] == round(rec["t_start_fraction"] * rec["timesteps"]) and rec["ddim_steps"] >= 1
    assert r["protocol"]["capable"]["diffusion_healing"] and "diffusion_healing" in r["metrics"]
    assert "diffusion_healing" in r["map_names"] and "diffusion_healing" in r["localisation"]["synthetic"]
    maps = np.load(run / "anomaly" / "maps.npz")["diffusion_healing"].astype(np.float32)
    assert maps.shape == (r["n_scored"], 32, 32) and np.isfinite(maps).all() and maps.max() > 0


@pytest.mark.parametrize("which, sampler", [("ldm_run", "prior"), ("vae_run", "diffusion")])
def test_synthesize_from_a_diffusion_prior_reports_memorisation_and_membership(which, sampler, request, tmp_path,
                                                                              capsys):
    run = request.getfixturevalue(which)
    out = tmp_path / "syn"
    assert main(["synthesize", str(run), "-n", "16", "--out", str(out), "--sampler", sampler, "--pairs", "2",
                 "--reference-epochs", "1", "--bootstrap", "20", "--no-progress", "--device", "cpu"]) == 0
    assert "membership inference by the diffusion prior's loss: AUROC" in capsys.readouterr().out
    rep = json.loads((out / "memorisation.json").read_text())
    assert rep["sampler"] == sampler and rep["n_synthetic"] == 16 and rep["n_written"] + rep["n_rejected"] == 16
    assert 0 <= rep["memorisation_rate"] <= 1 and rep["memorisation_rate"] == rep["n_rejected"] / 16
    lo, hi = rep["ci95"]["memorisation_rate"]
    assert lo <= rep["memorisation_rate"] <= hi
    mi = rep["membership_inference"]
    assert 0 <= mi["nearest_synthetic_pixel"]["auroc"] <= 1
    loss = mi["diffusion_loss"]
    assert loss["prior"] == ("ldm prior" if sampler == "prior" else "fitted diffusion sampler")
    assert 0 <= loss["auroc"] <= 1 and loss["draws_per_image"] >= 1
    assert json.loads((run / "results.json").read_text())["privacy"]["membership_inference"] == mi


def test_a_conditional_run_is_healed_as_the_normal_class_whatever_the_images_labels():
    """A cvae under a class-conditional sampler: the prior and the decoder get the normal class for every image
    (a pass never reads labels), and the class is used: another normal class, other healed images."""
    torch.manual_seed(0)
    model = build_model(model_config("cvae", image_size=32, latent_dim=4, base_width=4, max_width=16,
                                     num_classes=2)).eval()
    x = torch.rand(6, 1, 32, 32)
    z = sampler_latents(model, x, torch.zeros(6, dtype=torch.long))
    spec = DiffusionSpec(tuple(z.shape[1:]), num_classes=2, width=32, timesteps=100)
    with torch.no_grad():  # an untrained denoiser predicts zero: give its output layer weights, so y matters
        den = build_denoiser(spec)
        for p in den.parameters():
            p.normal_(0, 0.1)
    prior = DiffusionSampler(spec, den, LatentStandardiser.fit(z)).prior_of(model)
    images = (x * 255).round().byte().numpy()

    def healed(normal_class):
        return diffusion_healing_scores(ImagePass(Scoring(model, diffusion=prior, normal_class=normal_class), images),
                                        0.5)[0]

    assert np.array_equal(healed(0), healed(0)) and not np.allclose(healed(0), healed(1))
    with pytest.raises(ValueError, match="normal class"):
        healed(None)


def test_healing_a_hierarchy_does_not_depend_on_the_batch_size():
    """A hierarchical_vae under a diffusion sampler over its top groups: the healed top is decoded with the finer
    groups at their conditional prior means, not drawn, so an image's score is the same in batches of 12 and of 5
    (up to the rounding of other batch shapes: the decoder and every DDIM step within the network's bound)."""
    torch.manual_seed(0)
    model = build_model(model_config("hierarchical_vae", image_size=32, width=8, z_channels=2, num_scales=2,
                                     groups_per_scale=2)).eval()
    x = torch.rand(12, 1, 32, 32)
    z = sampler_latents(model, x)
    spec = DiffusionSpec(tuple(z.shape[1:]), width=8, timesteps=100)
    prior = DiffusionSampler(spec, build_denoiser(spec), LatentStandardiser.fit(z)).prior_of(model)
    images = (x * 255).round().byte().numpy()
    bound = network_bound(model) + network_bound(prior.denoiser)
    for fraction in (0.0, 0.5):
        a = diffusion_healing_scores(ImagePass(Scoring(model, "cpu", 12, diffusion=prior), images), fraction)[0]
        b = diffusion_healing_scores(ImagePass(Scoring(model, "cpu", 5, diffusion=prior), images), fraction)[0]
        np.testing.assert_allclose(a, b, rtol=(prior.heal_steps(fraction) + 1) * bound, atol=0)
