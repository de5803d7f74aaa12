"""Synthetic anomalies, the scores beyond the residual, selection on validation only, localisation on phantoms."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from medivae.cli import main
from medivae.data.imageset import ImageSet
from medivae.data.phantoms import make_phantoms
from medivae.evaluation.anomaly import normative as nm
from medivae.evaluation.anomaly.localisation import best_dice, pixel_metrics
from medivae.evaluation.anomaly.passes import ImagePass, Scoring
from medivae.evaluation.anomaly.restoration import map_restore
from medivae.evaluation.anomaly.scorers import healing_scores
from medivae.evaluation.anomaly.synthetic import foreign_patch
from medivae.evaluation.reconstruction import ssim_maps
from medivae.workflows.anomaly import protocol as ap
from test_anomaly import TINY, _fit_on_normal_phantoms

from tolerance import assert_same_order, network_bound


def test_foreign_patch_masks_are_exactly_the_changed_pixels():
    normals = make_phantoms(40, 32, seed=3, lesion_fraction=0.0).images
    s = foreign_patch(normals, seed=5)
    assert s.images.shape == normals.shape and s.images.dtype == np.uint8 and s.masks.shape == (40, 32, 32)
    changed = (s.images != normals).any(1)
    np.testing.assert_array_equal(s.masks, changed)  # outside: the input bit for bit; inside: every pixel differs
    assert changed.any(axis=(1, 2)).mean() > 0.9  # it does change
    f = s.params["factor"]
    assert (s.params["source"] != np.arange(40)).all() and ((f >= 0.3) & (f <= 1.0)).all()
    np.testing.assert_array_equal(foreign_patch(normals, seed=5).images, s.images)  # deterministic
    assert not np.array_equal(foreign_patch(normals, seed=6).masks, s.masks)


def test_pixel_metrics_on_analytic_maps():
    masks = np.zeros((2, 8, 8), dtype=bool)
    masks[:, 2:4, 2:5] = True
    m = pixel_metrics(masks.astype(float) + 0.01 * np.random.default_rng(0).random(masks.shape), masks)
    assert m["auroc"] == 1.0 and m["auprc"] == 1.0 and m["best_dice"] == 1.0
    assert pixel_metrics(np.ones(masks.shape), masks)["auroc"] == 0.5
    assert best_dice(np.r_[3.0, 2, 1, 0], np.array([1, 0, 1, 0], bool)) == pytest.approx(0.8)  # top 3: 2 * 2 / (2 + 3)
    assert pixel_metrics(np.zeros((1, 4, 4)), np.zeros((1, 4, 4), bool)) is None


def test_latent_gmm_finds_the_components_and_scores_outliers_higher():
    rng = np.random.default_rng(1)
    centres = np.array([[-4.0, 0], [4.0, 0]])
    train = np.concatenate([c + rng.normal(size=(200, 2)) for c in centres])
    val = np.concatenate([c + rng.normal(size=(50, 2)) for c in centres])
    gmm, rec = nm.fit_latent_gmm(train, val)
    assert rec["components"] == 2
    s = nm.latent_gmm_score(np.array([[-4.0, 0], [0.0, 0]]), gmm)  # the midpoint is far from both modes
    assert s[1] > s[0] + 2


@pytest.fixture(scope="module")
def phantom_model():
    return _fit_on_normal_phantoms(steps=150)


def test_restoration_moves_the_image_towards_normal_and_only_a_little(phantom_model):
    import torch

    from medivae.data.phantoms import phantom_with_mask

    img, mask = phantom_with_mask(32, seed=11, index=0)
    x = torch.from_numpy(img[None, None] / 255.0).float()
    xr = map_restore(phantom_model, x, steps=20, tv=0.1)
    nll = [float(phantom_model.log_weights(t, None, 1, torch.Generator().manual_seed(0)).neg_elbo().detach())
           for t in (x, xr)]
    assert nll[1] < nll[0]  # more likely under the normative model
    r = (x - xr).abs()[0, 0].numpy()
    assert r[mask].mean() > 2 * r[~mask].mean()  # and changed most where the lesion is


def test_every_map_beats_the_blurred_residual_baseline_on_phantoms(phantom_model):
    """Every map beats |x - blur(x)| (an autoencoder that only blurs), its sigma chosen on these very masks.
    The restoration also beats the stronger model-free map, the blurred residual against the mean normal image
    (AUPRC 0.68-0.69 against 0.64 with default ATen, AVX2-only oneDNN, one thread). The other maps of this
    small model sit at that baseline or below it, which results.json shows beside them: the plain residual
    moves between 0.66 and 0.70 with the kernels that trained the model, too close to 0.64 to assert."""
    normals = make_phantoms(200, 32, seed=7, lesion_fraction=0.0).images
    ctx = Scoring(phantom_model, batch_size=64, seed=13)
    train = ImageSet(normals, np.zeros(len(normals), np.int64), ("normal",))
    fitted = ap.fit_normals(ctx, train, ImagePass(ctx, normals[:40]), None)
    r = ap.phantom_localisation(ctx, fitted, {"restoration": 0.1}, normals)
    assert set(r["maps"]) == {"residual", "ssim", "ssim_z", "restoration", "gradient"}
    for name, m in r["maps"].items():
        assert m["auprc"] > 2 * r["baseline"]["self_blur"]["auprc"], (name, m, r["baseline"])
    assert r["maps"]["restoration"]["auprc"] > r["baseline"]["mean_normal"]["auprc"], r


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("protocol") / "run"
    argv = ["anomaly", "fit", "--data", "phantoms:200", "--normal-label", "normal", "--out", str(run)]
    assert main([*argv, "--epochs", "1", "--seed", "7", *TINY]) == 0
    return run


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory):
    """A cvae fitted on normal phantoms: its decoder takes a class, so feeding it a scored image's own label
    would change that image's scores."""
    run = tmp_path_factory.mktemp("cvae") / "run"
    argv = ["anomaly", "fit", "--data", "phantoms:200", "--normal-label", "normal", "--out", str(run)]
    assert main([*argv, "--model", "cvae", "--epochs", "2", "--seed", "7", *TINY]) == 0
    return run


def _protocol(run, flip_test_labels: bool):
    from medivae.runfolder.run import load_run
    from medivae.workflows.anomaly.sets import scoring_sets

    r = load_run(run, device="cpu")
    sets = scoring_sets(r.config, "normal", None, "test")
    if flip_test_labels:
        s = sets["scored"]
        sets["scored"] = dataclasses.replace(s, labels=np.where(s.labels == 0, 1, 0)[::-1].copy())
    ctx = Scoring(r.model, k=2, seed=r.config.train.seed, normal_class=0)
    out = ap.run_protocol(ctx, sets, None)
    return out.record, out.scores["scored"]


def test_the_default_does_not_change_when_test_labels_change(conditional_run):
    """A conditional family sees every scored image as the normal class: test labels reach no score, no map
    and no choice."""
    a, sa = _protocol(conditional_run, False)
    b, sb = _protocol(conditional_run, True)
    assert a["default"] == b["default"] and a["val_auroc"] == b["val_auroc"]
    assert a["val_normal_stats"] == b["val_normal_stats"] and set(a["val_auroc"]) <= set(a["val_normal_stats"])
    assert all(sd > 0 for _, sd in a["val_normal_stats"].values())
    assert a["restoration"]["tv"] == b["restoration"]["tv"]
    assert set(sa) == set(sb) and {"rec_error", "neg_elbo", "restoration", "ensemble"} <= set(sa)
    for name in sa:
        np.testing.assert_array_equal(sa[name], sb[name], err_msg=name)


def test_a_conditional_model_scores_every_image_as_the_normal_class(conditional_run, tmp_path):
    """rec_error (and its AUROC) is that of reconstructions decoded as the normal class, whatever the image's
    label; decoded as their own class the lesion images would score otherwise."""
    import csv

    from medivae.evaluation.anomaly.detection import detection_metrics
    from medivae.runfolder.run import load_run
    from medivae.workflows.anomaly.sets import scoring_sets

    argv = ["anomaly", "score", str(conditional_run), "--out", str(tmp_path / "a"), "--iwae-samples", "2",
            "--n-maps", "0", "--fpr", "0.2", "--bootstrap", "0", "--no-progress"]
    assert main(argv) == 0
    r = json.loads((conditional_run / "results.json").read_text())["anomaly"]
    rows = list(csv.DictReader((tmp_path / "a" / "scores.csv").open()))
    run = load_run(conditional_run, device="cpu")
    s = scoring_sets(run.config, "normal", None, "test")["scored"]
    x = torch.from_numpy(s.images / 255.0).float()

    def mse(**given):
        return (run.reconstruct(s.images, **given) - x).pow(2).flatten(1).mean(1).double().numpy()

    as_normal, as_labelled = mse(label="normal"), mse(labels=s.labels)
    assert np.abs(as_normal - as_labelled)[s.labels != 0].max() > 1e-3 * as_normal.max()  # the label matters
    np.testing.assert_allclose([float(row["rec_error"]) for row in rows], as_normal, rtol=1e-5)
    y = s.labels != 0
    assert r["metrics"]["rec_error"]["auroc"] == pytest.approx(detection_metrics(as_normal, y)["auroc"], abs=1e-12)


def test_score_cli_reports_protocol_baselines_and_localisation(scored_run, tmp_path, capsys):
    assert main(["anomaly", "score", str(scored_run), "--out", str(tmp_path / "a"), "--bootstrap", "50",
                 "--fpr", "0.1", "--n-maps", "0"]) == 0
    r = json.loads((scored_run / "results.json").read_text())["anomaly"]
    p = r["protocol"]
    assert p["default"] in p["val_auroc"] and {"restoration", "feature_res", "ensemble"} <= set(p["val_auroc"])
    assert set(r["trivial_baselines"]) == {"png_size", "mean_intensity", "intensity_std"}
    assert all(b["ci95"] for b in r["trivial_baselines"].values())
    assert {"residual", "restoration"} <= set(r["localisation"]["synthetic"])
    assert set(r["localisation"]["phantoms"]["maps"]) >= {"residual", "ssim", "ssim_z", "restoration", "gradient"}
    assert "restoration" in r["metrics"]


def test_vq_healing_replaces_exactly_the_codes_the_prior_finds_unlikely():
    import torch

    from medivae.models import build_model
    from medivae.models.family import families

    cfg = families()["vq_vae"].make_config(image_size=32, codebook_size=16, code_dim=8, width=16, res_width=8,
                                           res_blocks=1, prior_width=16, prior_layers=1, prior_heads=2,
                                           prior_epochs=1, num_classes=0)
    model = build_model(cfg).eval()
    assert "heal" in model.capabilities
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    idx = model.encode(x).indices
    with torch.no_grad():
        np.testing.assert_array_equal(model.heal(x, threshold=0.0), model.decode_indices(idx).float())
        model.prior.head.bias[3] = 5.0  # code 3 likely everywhere (p ~ 0.91), every other code p ~ 0.006
        all3 = model.decode_indices(torch.full_like(idx, 3)).float()
        np.testing.assert_array_equal(model.heal(x, threshold=0.01), all3)
        np.testing.assert_array_equal(model.heal(x, threshold=0.005), model.decode_indices(idx).float())
    s, m = healing_scores(ImagePass(Scoring(model), (x.numpy() * 255).astype(np.uint8)), 0.01)
    assert s.shape == (3,) and m.shape == (3, 32, 32) and (s > 0).all()


def test_ssim_z_weighs_a_difference_by_how_much_normals_vary_there():
    """The same local change counts more where normal images are always reconstructed alike than where
    their reconstructions vary; below-average dissimilarity counts zero."""
    rng = np.random.default_rng(0)
    normals = rng.integers(60, 200, size=(40, 1, 32, 32)).astype(np.uint8)
    x = normals / 255.0
    recon = x.copy()
    recon[..., :16] += rng.normal(0, 0.15, size=(40, 1, 32, 16))  # left: varies
    recon[..., 16:] += 0.01  # right: always nearly the same, small error
    recon = recon.clip(0, 1)
    d = 1.0 - ssim_maps(x, recon)[1]
    mean, std = nm.fit_ssim_norm([d[:16], d[16:32], d[32:]])  # three chunks: the sums add up
    np.testing.assert_allclose(mean, d.mean(0), atol=1e-12)
    np.testing.assert_allclose(std, d.std(0, ddof=1) + nm.NORM_STD_OFFSET, atol=1e-9)
    assert mean.shape == std.shape == (32, 32) and std[:, 5:10].mean() > 5 * std[:, -10:-5].mean()
    image = x[:1]
    changed = image.copy()
    changed[..., 8:14, 3:9] = 0.0  # the same square changed in the left half ...
    changed[..., 8:14, 23:29] = 0.0  # ... and in the right half
    score, amap = nm.normative_ssim(1.0 - ssim_maps(image, changed)[1], (mean, std))
    assert amap.shape == (1, 32, 32) and (amap >= 0).all() and score[0] > 0
    assert amap[0, 8:14, 23:29].mean() > 3 * amap[0, 8:14, 3:9].mean()
    same, zero = nm.normative_ssim(1.0 - ssim_maps(image, image)[1], (mean, std))
    assert same[0] == 0 and not zero.any()  # a perfect reconstruction is below every normal's dissimilarity


def test_bf16_healing_heals_as_fp32_does():
    """`--precision auto` runs VQ healing's encoder, prior and decoder in bf16 where native; the prior's
    probabilities are compared in fp32, so the healed images are those of fp32 up to rounding."""
    import torch

    from medivae.models import build_model
    from medivae.models.family import families

    cfg = families()["vq_vae"].make_config(image_size=32, codebook_size=16, code_dim=8, width=16, res_width=8,
                                           res_blocks=1, prior_width=16, prior_layers=1, prior_heads=2,
                                           prior_epochs=1, num_classes=0)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():  # an untrained head gives every code p = 1/16; spread it so some fall below 0.05
        model.prior.head.weight.normal_(0.0, 1.0)
    images = make_phantoms(16, 32, seed=5, lesion_fraction=0.5).images
    x = torch.from_numpy(images / 255.0).float()
    with torch.no_grad():
        plain = (x - model.reconstruct(x)).abs().mean((1, 2, 3)).numpy()
    exact, _ = healing_scores(ImagePass(Scoring(model, precision="fp32"), images), 0.05)
    fast, _ = healing_scores(ImagePass(Scoring(model, precision="bf16"), images), 0.05)
    assert np.abs(exact - plain).max() > 1e-3  # codes were healed, not just reconstructed
    assert not np.array_equal(exact, fast)  # bf16 really ran
    bound = network_bound(model, torch.bfloat16)
    np.testing.assert_allclose(fast, exact, rtol=bound)
    assert_same_order(fast, exact, bound, "healing")
