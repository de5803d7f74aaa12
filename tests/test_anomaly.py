"""Anomaly detection: metrics on constructed scores, maps on phantoms with a known lesion, the CLI."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch

from medivae.cli import main
from medivae.evaluation.anomaly import calibration as cal
from medivae.evaluation.anomaly import detection as det
from medivae.evaluation.anomaly import normative as nm
from medivae.evaluation.anomaly.maps import gradient_maps, map_contrast
from medivae.evaluation.anomaly.passes import ImagePass, Scoring
from medivae.evaluation.anomaly.scorers import COMBINED_FROM, SCORERS, score_pass
from medivae.workflows.anomaly.sets import scoring_sets

from tiny import TINY, tiny_model
from tolerance import assert_same_order, network_bound


def score(model, images, k: int = 2, seed: int = 0, precision: str = "fp32"):
    """Every scorer that needs no statistics of the normals: (the pass, {name: (N,)})."""
    p = ImagePass(Scoring(model, k=k, seed=seed, precision=precision), images)
    return p, score_pass(p, None, {})[0]


def test_auroc_is_one_on_separable_and_half_on_constant_scores():
    is_anomaly = np.array([0, 0, 0, 1, 1, 0, 1], dtype=bool)
    separable = np.where(is_anomaly, 5.0, 1.0) + np.arange(7) * 0.01
    assert det.detection_metrics(separable, is_anomaly) == {"auroc": 1.0, "auprc": 1.0}
    assert det.detection_metrics(np.full(7, 3.0), is_anomaly)["auroc"] == 0.5
    assert det.detection_metrics(-separable, is_anomaly)["auroc"] == 0.0
    assert det.detection_metrics(separable, np.zeros(7, dtype=bool)) is None  # one class: no AUROC


def test_threshold_keeps_false_positives_at_the_target_rate():
    normals = np.random.default_rng(0).normal(size=1000)
    thr = cal.threshold_at_fpr(normals, 0.05)
    assert (normals > thr).mean() <= 0.05
    assert (normals > thr - 0.05).mean() > 0.04  # and it is not needlessly high
    r = det.rates_at(np.r_[normals, normals + 10], np.r_[np.zeros(1000), np.ones(1000)], thr)
    assert r["fpr"] <= 0.05 and r["tpr"] == 1.0


def _in_sample_quantile(normals, fpr):  # an in-sample quantile: not conformal
    return float(np.quantile(normals, 1.0 - fpr, method="higher"))


@pytest.mark.parametrize("n", [19, 41, 100])
def test_conformal_threshold_keeps_the_expected_test_fpr_at_the_target(n):
    """Simulation: many validation draws of n normals, each with fresh test normals."""
    rng = np.random.default_rng(n)
    draws, n_test, fpr = 4000, 200, 0.05
    val, test = rng.normal(size=(draws, n)), rng.normal(size=(draws, n_test))
    conformal = np.array([cal.threshold_at_fpr(v, fpr) for v in val])
    got = (test > conformal[:, None]).mean()
    assert got <= fpr + 0.003
    assert abs(got - cal.conformal_guarantee(n, fpr)["expected_fpr_bound"]) < 0.003
    if n == 41:  # the old in-sample quantile overshot the target (7.1 % at 41 normals)
        old = np.array([_in_sample_quantile(v, fpr) for v in val])
        assert (test > old[:, None]).mean() > fpr + 0.01


@pytest.mark.parametrize("n", [19, 39])
def test_a_combined_score_standardised_on_other_normals_keeps_the_bound(n):
    """Simulation of ``combined`` (the mean z-score of two parts) with the conformal threshold on n calibration
    normals: standardised with the mean and std of the calibration normals themselves, a new normal is
    flagged more often than the target (6 % at n = 19 for 5 %); standardised with other normals (the
    training normals in ``anomaly score``), the expected rate is the conformal bound."""
    rng = np.random.default_rng(n)
    draws, n_test, fpr, names = 20000, 50, 0.05, ("a", "b")

    def normals(size):  # two parts on different scales, one skewed
        return {"a": rng.normal(3.0, 2.0, size), "b": rng.exponential(1.0, size)}

    own, other = [], []
    for _ in range(draws):
        cal_set, std_set, test = normals(n), normals(n), normals(n_test)
        for out, on in ((own, cal_set), (other, std_set)):
            z = cal.calibrate(on, names)
            thr = cal.threshold_at_fpr(cal.combined_score(cal_set, z), fpr)
            out.append((cal.combined_score(test, z) > thr).mean())
    bound = cal.conformal_guarantee(n, fpr)["expected_fpr_bound"]
    assert abs(np.mean(other) - bound) < 0.002  # the conformal rate itself, not only below it
    assert np.mean(own) > bound + 0.002  # 6.0 % at n = 19, 5.3 % at n = 39


def test_combined_is_standardised_on_training_normals_not_on_the_calibration_normals(normal_run, tmp_path):
    from medivae.runfolder.run import load_run

    argv = ["anomaly", "score", str(normal_run), "--out", str(tmp_path / "a"), "--iwae-samples", "2",
            "--n-maps", "0", "--fpr", "0.2", "--bootstrap", "0", "--no-progress", "--batch-size", "128"]
    assert main(argv) == 0
    r = json.loads((normal_run / "results.json").read_text())["anomaly"]
    run = load_run(normal_run, device="cpu")
    sets = scoring_sets(run.config, "normal", None, "test")
    # the CLI's batches: another batch shape may round the reconstructions differently, the same one cannot
    ctx = Scoring(run.model, batch_size=128, k=2, seed=run.config.train.seed)
    mean, std = r["calibration"]["z_score"]["ssim"]
    val = ImagePass(ctx, sets["val"].images).ssim[0]
    assert abs(mean - val.mean()) > 1e-6 * abs(val.mean())  # not the normals the threshold is set on
    from medivae.workflows.anomaly.protocol import standardisation_normals

    on = ImagePass(ctx, standardisation_normals(sets["train"], ctx.seed)).ssim[0]
    assert len(on) == r["calibration"]["normals"] and not set(map(bytes, sets["val"].images)) & set(
        map(bytes, standardisation_normals(sets["train"], ctx.seed)))
    assert (mean, std) == pytest.approx((on.mean(), on.std()), rel=1e-9)


def test_conformal_threshold_refuses_too_few_normals():
    assert cal.min_calibration(0.05) == 19 and cal.min_calibration(0.2) == 4
    cal.threshold_at_fpr(np.arange(19.0), 0.05)  # k = ceil(20 * 0.95) = 19: the largest
    assert cal.threshold_at_fpr(np.arange(19.0), 0.05) == 18.0
    with pytest.raises(ValueError, match="need at least 19"):
        cal.threshold_at_fpr(np.arange(18.0), 0.05)


def test_too_few_validation_normals_for_the_fpr_exit_2(normal_run, tmp_path, capsys):
    assert main(["anomaly", "score", str(normal_run), "--fpr", "0.01", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "need at least 99" in err and err.count("\n") == 1 and not (tmp_path / "a").exists()


class _PerfectBernoulli(torch.nn.Module):
    """Reconstructs every image exactly, with a Bernoulli likelihood (logits of the image itself)."""

    capabilities = frozenset({"likelihood", "latent"})

    def __init__(self):
        super().__init__()
        from medivae.models.distributions import Bernoulli

        self.likelihood = Bernoulli()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def reconstruct(self, x, y=None):
        return x

    def encode(self, x, y=None):
        from medivae.models.distributions import DiagonalGaussian

        z = torch.zeros(len(x), 2)
        return DiagonalGaussian(z, z)

    def log_weights(self, x, y, k, generator):
        from medivae.models.family import LogWeights

        logits = torch.logit(x.clamp(1e-6, 1 - 1e-6))
        log_px = self.likelihood.log_prob(logits, x).double().expand(k, -1)
        return LogWeights(log_px, torch.zeros_like(log_px), torch.zeros(len(x), dtype=torch.float64))


def test_perfectly_reconstructed_uniform_images_are_not_ranked_by_brightness():
    """Under a Bernoulli "likelihood" a uniform image at 128 costs ~2,839 nats and at 0 costs 0: the
    complexity-corrected score would rank by brightness."""
    images = np.stack([np.full((1, 64, 64), v, np.uint8) for v in (0, 128, 0, 128, 255, 64)])
    _, s = score(_PerfectBernoulli(), images, k=2)
    assert s["iwae"][1] - s["iwae"][0] > 2000  # the Bernoulli "NLL" is brightness
    assert "iwae_minus_png" not in s  # so no code-length correction is offered on it
    calib = cal.calibrate(s, COMBINED_FROM)
    assert list(calib) == ["ssim"]
    combined = cal.combined_score(s, calib)
    np.testing.assert_allclose(combined, combined[0])  # every perfect reconstruction scores the same


def test_combined_score_is_centred_on_calibration_normals_and_rises_for_outliers():
    rng = np.random.default_rng(1)
    val = {"iwae": rng.normal(500, 20, 200), "rec_error": rng.normal(0.01, 0.002, 200)}
    calib = cal.calibrate(val, ("iwae", "rec_error"))
    assert abs(cal.combined_score(val, calib).mean()) < 1e-9
    outlier = {"iwae": np.array([600.0]), "rec_error": np.array([0.02])}
    assert cal.combined_score(outlier, calib)[0] > 3


def test_latent_mahalanobis_grows_with_distance_from_normal_codes():
    codes = np.random.default_rng(2).normal(size=(500, 3)) * [1.0, 2.0, 0.5]
    gauss = nm.fit_latent_gaussian(codes)
    near, far = np.array([[0.1, 0.1, 0.1]]), np.array([[0.0, 0.0, 2.0]])  # 4 sd along the thin axis
    assert nm.mahalanobis(far, gauss)[0] > 10 * nm.mahalanobis(near, gauss)[0]


def _fit_on_normal_phantoms(steps: int = 80, seed: int = 7):
    """A small VAE fitted on lesion-free phantoms with a bare loop (no checkpoints or figures: fast)."""
    import torch

    from medivae.data.imageset import to_float
    from medivae.data.phantoms import make_phantoms
    from medivae.models import build_model
    from medivae.models.losses import neg_elbo

    torch.manual_seed(seed)
    x = to_float(make_phantoms(300, 32, seed, lesion_fraction=0.0).images)
    model = build_model(tiny_model(base_width=8, latent_dim=8, likelihood="gaussian"))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        xb = x[torch.randint(0, len(x), (32,), generator=g)]
        loss = neg_elbo(model.likelihood, model(xb), xb).loss.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_maps_highlight_an_inserted_lesion():
    from medivae.data.phantoms import phantom_with_mask

    model = _fit_on_normal_phantoms()
    pairs = [phantom_with_mask(32, seed=11, index=i) for i in range(6)]
    images = np.stack([p[0] for p in pairs])[:, None]  # (6, 1, 32, 32)
    masks = np.stack([p[1] for p in pairs])
    p = ImagePass(Scoring(model, k=2), images)
    for name, maps in (("residual", p.residual), ("gradient", gradient_maps(p))):
        contrast = [map_contrast(m, mask) for m, mask in zip(maps, masks, strict=True)]
        assert np.median(contrast) > 2.0, (name, contrast)  # lesion pixels stand out over the rest


def test_bf16_scoring_ranks_images_as_fp32_does():
    """The fast path (bf16 networks, fp32 sums) moves scores by rounding only: within the network's bf16
    rounding bound, and every pair of images that fp32 tells apart by more than that keeps its order."""
    from medivae.data.phantoms import make_phantoms

    model = _fit_on_normal_phantoms(steps=40)
    bound = network_bound(model, torch.bfloat16)  # ~7 % for this net: a worst case, not what it moves
    images = make_phantoms(64, 32, seed=5, lesion_fraction=0.5).images
    exact = score(model, images, k=4, seed=3, precision="fp32")[1]
    fast = score(model, images, k=4, seed=3, precision="bf16")[1]
    for name in ("neg_elbo", "iwae", "rec_error", "ssim"):
        assert not np.array_equal(exact[name], fast[name]), name  # bf16 really ran
        np.testing.assert_allclose(fast[name], exact[name], rtol=bound, err_msg=name)
        assert_same_order(fast[name], exact[name], bound, name)


def test_score_cli_end_to_end(normal_run, tmp_path, capsys):
    out = tmp_path / "scored"
    rc = main(
        [
            "anomaly",
            "score",
            str(normal_run),
            "--out",
            str(out),
            "--iwae-samples",
            "2",
            "--n-maps",
            "4",
            "--device",
            "cpu",
            "--fpr",
            "0.2",  # the conformal threshold needs >= 1/FPR - 1 validation normals; the tiny run has ~10
            "--bootstrap",
            "100",
        ]
    )
    assert rc == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "AUROC" in printed and "prevalence" in printed and "conformal threshold" in printed
    # progress bars by default, on stderr: every scoring pass, the iterative restoration too
    assert "of scored images" in captured.err and "MAP restoration (tv" in captured.err
    r = json.loads((normal_run / "results.json").read_text())["anomaly"]
    assert r["normal_label"] == "normal" and r["split"] == "test"
    # Bernoulli likelihood (the default): no complexity-corrected score, and combined is SSIM alone
    names = {s.name for s in SCORERS} - {"iwae_minus_png", "vq_healing", "diffusion_healing"}  # no such priors
    assert set(r["metrics"]) == {*names, "combined", "ensemble"}
    assert r["combined"]["components"] == ["ssim"]
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert_metrics_match_the_scores(r, rows)
    t = r["threshold"]
    assert t["method"] == "conformal" and t["expected_fpr_bound"] <= 0.2 and "exchangeable" in t["guarantee"]
    assert t["rank"] == cal.conformal_rank(t["n_calibration"], 0.2)
    assert 0 < r["prevalence"] < 1
    for name, ci in r["ci95"].items():
        assert ci["auroc"][0] <= r["metrics"][name]["auroc"] <= ci["auroc"][1], name
    assert len(rows) == r["n_scored"] == r["n_normal"] + r["n_anomalous"]
    assert all((out / f).stat().st_size > 0 for f in ("roc.png", "overlays.png", "maps.npz"))
    assert np.load(out / "maps.npz")["maps"].shape == (len(rows), 32, 32)
    # the calibration and the scored normals, each against the training normals (all from one generator)
    ns = r["normal_shift"]
    assert ns["scored_split"] == "test" and ns["scored"]["n_other"] == r["n_normal"]
    for key in ("val", "scored"):
        assert not ns[key]["differ"] and ns[key]["ci95"][0] <= ns[key]["auroc"] <= ns[key]["ci95"][1], key
    assert "normals vs the training normals" in printed and "differ from the training normals" not in printed


def assert_metrics_match_the_scores(r: dict, rows: list[dict]) -> None:
    """Every AUROC in results.json is the one of scores.csv's column against its labels, and the labels are the
    images' classes (normal = 0); the flagged column is the threshold on ``combined``; default_beaten_by lists
    exactly the trivial baselines above the default."""
    from medivae.evaluation.bootstrap import auroc

    y = np.array([row["is_anomaly"] == "1" for row in rows])
    assert y.any() and not y.all()
    assert all((row["label"] != r["normal_label"]) == a for row, a in zip(rows, y, strict=True))
    one_tie = 0.5 / (y.sum() * (~y).sum())  # scores.csv keeps 6 digits: two close scores may tie there
    for name, m in r["metrics"].items():
        assert m["auroc"] == pytest.approx(auroc(y, np.array([float(row[name]) for row in rows])), abs=one_tie), name
    flagged = np.array([row["flagged"] == "1" for row in rows])
    np.testing.assert_array_equal(flagged, np.array([float(row["combined"]) for row in rows]) > r["threshold"]["value"])
    default = r["metrics"][r["protocol"]["default"]]["auroc"]
    assert r["default_beaten_by"] == {n: b["auroc"] for n, b in r["trivial_baselines"].items() if b["auroc"] > default}


def test_scored_normals_were_never_trained_on(normal_run):
    from medivae.runfolder.config import RunConfig

    cfg = RunConfig.load(normal_run / "config.json")
    sets = scoring_sets(cfg, "normal", None, "test")
    seen = {img.tobytes() for img in sets["train"].images}
    scored = sets["scored"]
    normals = scored.images[scored.labels == sets["normal_code"]]
    assert len(normals) > 0 and not any(img.tobytes() in seen for img in normals)
    assert (scored.labels != sets["normal_code"]).any()


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["anomaly", "fit", "--data", "phantoms:40", "--normal-label", "healthy", "--out", "{tmp}/r"],
            "unknown label",
        ),
        (["anomaly", "score", "{tmp}/missing"], "no such run folder"),
    ],
)
def test_bad_input_exits_2(argv, message, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv + (TINY if argv[1] == "fit" else [])) == 2
    err = capsys.readouterr().err
    assert err.startswith("medivae: error:") and message in err and err.count("\n") == 1


def test_an_unreadable_results_json_is_refused_before_scoring(normal_run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(normal_run, copy)
    (copy / "results.json").write_text("{broken")
    assert main(["anomaly", "score", str(copy), "--out", str(tmp_path / "scores")]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert (copy / "results.json").read_text() == "{broken" and not (tmp_path / "scores").exists()


def test_bad_fpr_exits_2(normal_run, capsys):
    assert main(["anomaly", "score", str(normal_run), "--fpr", "1.5"]) == 2
    assert "--fpr" in capsys.readouterr().err
