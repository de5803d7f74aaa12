"""Post-hoc latent samplers (medivae.models.samplers) and the VampPrior (models/conv_vae.py, prior="vamp").

Analytic cases: a known two-component mixture for the GMM and the flow; the VampPrior's density against
an independent mixture of torch.distributions; its Monte Carlo KL against a large independent Monte Carlo
estimate of KL(q || p_vamp). End to end through the CLI: fit-sampler, sample/evaluate/synthesize
--sampler, and the refusal of a sampler file whose run checkpoint changed.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from torch import distributions as D

import medivae
from medivae.cli import main
from medivae.models import model_config
from medivae.models.conv_vae import ConvVAE
from medivae.models.samplers import Coupling, fit, fit_flow, fit_gmm, load_sampler, save_sampler
from medivae.runtime.errors import UserError

from tolerance import gamma

WEIGHTS = np.array([0.3, 0.7])
MEANS = np.array([[-3.0, 0.0], [2.0, 1.0]])
COVS = np.array([[[1.0, 0.5], [0.5, 1.0]], [[0.5, 0.0], [0.0, 0.25]]])


def draw_mixture(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    k = rng.choice(2, size=n, p=WEIGHTS)
    return np.stack([rng.multivariate_normal(MEANS[c], COVS[c]) for c in k])


def mixture_moments() -> tuple[np.ndarray, np.ndarray]:
    mean = WEIGHTS @ MEANS
    second = sum(w * (c + np.outer(m, m)) for w, m, c in zip(WEIGHTS, MEANS, COVS, strict=True))
    return mean, second - np.outer(mean, mean)


# --- GMM ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gmm():
    return fit_gmm(draw_mixture(6000, 0), draw_mixture(1000, 1), max_components=4, seed=0)


def test_bic_on_validation_picks_the_true_number_of_components(gmm):
    g, info = gmm
    assert info["components"] == 2
    assert min(info["bic_by_components"], key=info["bic_by_components"].get) == 2
    order = np.argsort(g.means[:, 0].numpy())
    np.testing.assert_allclose(g.weights.numpy()[order], WEIGHTS, atol=0.03)
    np.testing.assert_allclose(g.means.numpy()[order], MEANS, atol=0.1)


def test_gmm_samples_follow_the_fitted_mixture(gmm):
    g, _ = gmm
    z = g.sample(20000, torch.Generator().manual_seed(0)).double().numpy()
    # moments of the fitted mixture itself (exact up to sampling error)
    w, mu = g.weights.numpy(), g.means.numpy()
    cov = (g.chol @ g.chol.transpose(1, 2)).numpy()
    mean = w @ mu
    second = sum(wk * (ck + np.outer(mk, mk)) for wk, mk, ck in zip(w, mu, cov, strict=True))
    np.testing.assert_allclose(z.mean(0), mean, atol=0.05)
    np.testing.assert_allclose(np.cov(z, rowvar=False), second - np.outer(mean, mean), atol=0.1)
    # and of the true mixture it was fitted to: per-dimension KS and the energy distance
    ref = draw_mixture(20000, 2)
    true_mean, true_cov = mixture_moments()
    np.testing.assert_allclose(z.mean(0), true_mean, atol=0.1)
    np.testing.assert_allclose(np.cov(z, rowvar=False), true_cov, atol=0.2)
    for d in range(2):
        assert stats.ks_2samp(z[:, d], ref[:, d]).pvalue > 0.001
        assert stats.energy_distance(z[:, d], ref[:, d]) < 0.05
    # a wrong sampler (one Gaussian with the right moments) fails the same KS test: the test has power
    wrong = np.random.default_rng(3).multivariate_normal(true_mean, true_cov, size=20000)
    assert stats.ks_2samp(wrong[:, 0], ref[:, 0]).pvalue < 1e-6


def test_gmm_log_prob_is_the_mixture_density(gmm):
    g, _ = gmm
    z = torch.randn(50, 2, dtype=torch.float64)
    comps = D.MultivariateNormal(g.means, scale_tril=g.chol)
    ref = D.MixtureSameFamily(D.Categorical(probs=g.weights), comps)
    torch.testing.assert_close(g.log_prob(z), ref.log_prob(z))


# --- flow -----------------------------------------------------------------------------------------------
def test_coupling_inverse_undoes_forward():
    torch.manual_seed(0)
    c = Coupling(5, (torch.arange(5) % 2).float(), 16)
    for p in c.net.parameters():
        torch.nn.init.normal_(p, std=0.5)  # not the identity it starts as
    x = torch.randn(10, 5)
    y, log_det = c(x)
    assert not torch.allclose(y, x)
    torch.testing.assert_close(c.inverse(y), x)
    jac = torch.autograd.functional.jacobian(lambda v: c(v[None])[0][0], x[0])
    torch.testing.assert_close(log_det[0], torch.logdet(jac), atol=1e-4, rtol=1e-4)


def test_flow_learns_the_mixture():
    flow, info = fit_flow(draw_mixture(4000, 0), draw_mixture(1000, 1), seed=0, max_epochs=60, patience=10)
    z = flow.sample(8000, torch.Generator().manual_seed(0)).double().numpy()
    true_mean, true_cov = mixture_moments()
    np.testing.assert_allclose(z.mean(0), true_mean, atol=0.2)
    np.testing.assert_allclose(np.cov(z, rowvar=False), true_cov, atol=0.5)
    single = D.MultivariateNormal(torch.tensor(true_mean), torch.tensor(true_cov))
    val = torch.tensor(draw_mixture(1000, 1))
    assert info["val_nll"] < -single.log_prob(val).mean().item() - 0.2  # beats the best single Gaussian


# --- per class, files ------------------------------------------------------------------------------------
def test_per_class_sampler_draws_each_class_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    train = np.concatenate([rng.normal(-5, 1, (500, 3)), rng.normal(5, 1, (500, 3))])
    labels = np.repeat([0, 1], 500)
    s = fit("gmm", train, train, labels, labels, max_components=2)
    y = torch.tensor([0] * 100 + [1] * 100)
    z = s.sample(200, torch.Generator().manual_seed(1), y)
    assert (z[:100].mean(0) < -4).all() and (z[100:].mean(0) > 4).all()
    save_sampler(s, tmp_path, "abc")
    back = load_sampler(tmp_path, "gmm", "abc")
    torch.testing.assert_close(back.sample(200, torch.Generator().manual_seed(1), y), z)
    with pytest.raises(UserError, match="other weights"):
        load_sampler(tmp_path, "gmm", "abd")


# --- VampPrior -------------------------------------------------------------------------------------------
def tiny_vamp(k: int = 5) -> ConvVAE:
    torch.manual_seed(0)
    cfg = model_config("vamp_vae", image_size=32, latent_dim=3, base_width=4, max_width=16, pseudo_inputs=k)
    return ConvVAE(cfg).eval()


def vamp_reference(model) -> D.Distribution:
    means, logvars = model.prior_components()
    comps = D.Independent(D.Normal(means.double(), torch.exp(0.5 * logvars.double())), 1)
    return D.MixtureSameFamily(D.Categorical(logits=torch.zeros(len(means), dtype=means.dtype)), comps)


def test_vamp_log_density_is_the_log_mean_exp_of_its_components():
    model = tiny_vamp()
    with torch.no_grad():
        z = torch.randn(7, 4, 3)
        means, logvars = model.prior_components()
        comps = torch.stack([D.Independent(D.Normal(m, torch.exp(0.5 * lv)), 1).log_prob(z)
                             for m, lv in zip(means, logvars, strict=True)])  # (K, 7, 4)
        want = torch.logsumexp(comps, 0) - math.log(len(means))
        # a component's log density sums D terms of a few roundings each, logsumexp moves by at most the largest
        # error of its inputs: within gamma(D + K + 6) of the terms' sizes, for each side (K components)
        sq = (z[None] - means[:, None, None]) ** 2 / (2 * logvars.exp()[:, None, None])  # (K, 7, 4, D)
        size = (sq + 0.5 * logvars.abs()[:, None, None] + 1).sum(-1).amax(0) + want.abs()  # (7, 4)
        tol = gamma(z.shape[-1] + len(means) + 6) * size
        got = model.prior_log_prob(z)
        assert ((got - want).abs() <= 2 * tol).all()
        assert ((got - vamp_reference(model).log_prob(z.double())).abs() <= tol).all()


def test_vamp_kl_estimate_matches_a_monte_carlo_kl():
    model = tiny_vamp()
    with torch.no_grad():  # posteriors (and so the pseudo-inputs' components) far from N(0, I), a decoder that
        model.fc_mu.bias.add_(2.0)  # reads z: the VampPrior's ELBO differs from one with the N(0, I) prior
        model.decoder_input.weight.mul_(5.0)
    x = torch.rand(1, 1, 32, 32)
    n = 20000
    with torch.no_grad():
        kl = model.validation_terms(x.expand(n, -1, -1, -1), None, torch.Generator().manual_seed(0))["kl"]
        q = model.encode(x)
        qd = D.Independent(D.Normal(q.mean[0], q.std[0]), 1)
        z = qd.sample((200000,))
        ref = qd.log_prob(z).double() - vamp_reference(model).log_prob(z.double())
        se = math.hypot(kl.std().item() / math.sqrt(n), ref.std().item() / math.sqrt(len(z)))
        assert abs(kl.mean().item() - ref.mean().item()) < 4 * se + 1e-3
        lw = model.log_weights(x, k=400, generator=torch.Generator().manual_seed(1))
        assert lw.kl is None  # no closed form: neg_elbo uses the Monte Carlo average
        # against an independent estimate of -ELBO = -E_q log p(x|z) + KL(q || VampPrior): the decoder on
        # draws of our own and the reference KL above
        zs = z[:4000]
        rec = -model.likelihood.log_prob(model.decode_params(zs), x.expand(len(zs), -1, -1, -1)).double()
        per_draw = -(lw.log_px + lw.log_ratio)[:, 0]  # (K,)
        se = math.sqrt(per_draw.var() / len(per_draw) + rec.var() / len(rec) + ref.var() / len(ref))
        assert abs(lw.neg_elbo().item() - (rec.mean() + ref.mean()).item()) < 4 * se


def test_vamp_prior_latents_sample_the_mixture():
    model = tiny_vamp()
    z = model.prior_latents(40000, torch.Generator().manual_seed(0)).double()
    ref = vamp_reference(model)
    torch.testing.assert_close(z.mean(0), ref.mean.detach(), atol=0.03, rtol=0)
    torch.testing.assert_close(z.var(0), ref.variance.detach(), atol=0.05, rtol=0.05)


def test_normal_prior_has_no_new_parameters_and_vamp_refuses_conditional():
    normal = ConvVAE(model_config("conv_vae", image_size=32, latent_dim=3, base_width=4))
    vamp = ConvVAE(model_config("vamp_vae", image_size=32, latent_dim=3, base_width=4, pseudo_inputs=6))
    assert set(vamp.state_dict()) - set(normal.state_dict()) == {"pseudo_logits"}
    assert vamp.pseudo_logits.shape == (6, 1, 32, 32)
    assert 0 < vamp.pseudo_images().min() and vamp.pseudo_images().max() < 1
    assert set(vamp.figures()) == {"pseudo_inputs"} and normal.figures() == {}
    with pytest.raises(UserError, match="unconditional"):
        model_config("cvae", prior="vamp")
    with pytest.raises(UserError, match="unknown prior"):
        model_config("conv_vae", prior="flat")
    with pytest.raises(UserError, match="pseudo inputs"):
        model_config("vamp_vae", pseudo_inputs=0)


def test_vamp_training_step_gives_the_pseudo_inputs_a_gradient():
    from medivae.models.family import StepContext
    from medivae.runfolder.config import TrainConfig

    model = tiny_vamp().float().train()
    x = torch.rand(4, 1, 32, 32)
    running = [m.running_mean.clone() for m in model.encoder.modules() if hasattr(m, "running_mean")]
    ctx = StepContext(epoch=0, step=0, progress=0.0, train=TrainConfig(), generator=torch.Generator())
    out = model.training_steps()[0].run({"vae": model}, x, None, ctx)
    out.loss.backward()
    assert model.pseudo_logits.grad is not None and model.pseudo_logits.grad.abs().sum() > 0
    after = [m.running_mean for m in model.encoder.modules() if hasattr(m, "running_mean")]
    # one update from the data batch only: the pseudo-inputs do not touch the running statistics
    torch.manual_seed(0)
    fresh = tiny_vamp().float().train()
    fresh.encode(x)
    want = [m.running_mean for m in fresh.encoder.modules() if hasattr(m, "running_mean")]
    for a, w, r in zip(after, want, running, strict=True):
        torch.testing.assert_close(a, w)
        assert not torch.equal(a, r)


# --- end to end -------------------------------------------------------------------------------------------
TRAIN = ["--data", "phantoms:80", "--image-size", "32", "--latent-dim", "4", "--base-width", "4",
         "--model-arg", "max_width=16", "--batch-size", "16", "--precision", "fp32", "--device", "cpu",
         "--threads", "1", "--no-progress"]


def one_line_error(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def run_with_samplers(tmp_path_factory):
    run = tmp_path_factory.mktemp("sampler") / "run"
    assert main(["train", *TRAIN, "--out", str(run), "--epochs", "1"]) == 0
    for kind in ("gmm", "flow"):
        assert main(["fit-sampler", str(run), "--sampler", kind, "--max-components", "3"]) == 0
    return run


def test_fit_sampler_writes_files_results_and_a_picture(run_with_samplers):
    run = run_with_samplers
    manifest = (run / "best" / "manifest.json").read_bytes()
    for kind in ("gmm", "flow"):
        meta = json.loads((run / "samplers" / f"{kind}.json").read_text())
        assert meta["checkpoint_manifest_sha256"] == hashlib.sha256(manifest).hexdigest()
        assert (run / "samplers" / f"{kind}.safetensors").is_file()
        png = np.asarray(Image.open(run / "samplers" / f"samples_{kind}.png"))
        assert png.std() > 0
    results = json.loads((run / "results.json").read_text())
    assert set(results["samplers"]) == {"gmm", "flow"}


def test_sample_evaluate_synthesize_with_a_sampler(run_with_samplers, tmp_path):
    run = run_with_samplers
    for kind in ("prior", "gmm", "flow"):
        assert main(["sample", str(run), "--sampler", kind, "-n", "8", "--out", str(tmp_path / f"{kind}.png")]) == 0
    a = medivae.load(run)
    torch.testing.assert_close(a.sample(6, seed=3, sampler="gmm"), a.sample(6, seed=3, sampler="gmm"))
    assert not torch.equal(a.sample(6, seed=3, sampler="gmm"), a.sample(6, seed=3))
    assert main(["evaluate", str(run), "--sampler", "flow", "-k", "2", "--max-images", "8", "--n-samples", "16",
                 "--reference-epochs", "1", "--no-progress"]) == 0
    ev = json.loads((run / "results.json").read_text())["evaluation"]
    assert ev["sample_quality"]["sampler"] == "flow"
    out = tmp_path / "syn"
    assert main(["synthesize", str(run), "-n", "8", "--out", str(out), "--sampler", "gmm", "--pairs", "0",
                 "--reference-epochs", "1", "--no-progress"]) == 0
    assert json.loads((out / "memorisation.json").read_text())["sampler"] == "gmm"


def test_a_sampler_fitted_on_a_run_without_best_names_the_checkpoint_it_read(run_with_samplers, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_with_samplers, run)
    shutil.rmtree(run / "best")
    assert main(["fit-sampler", str(run), "--sampler", "gmm", "--max-components", "2"]) == 0
    meta = json.loads((run / "samplers" / "gmm.json").read_text())
    assert meta["checkpoint"] == "last"
    manifest = (run / "last" / "manifest.json").read_bytes()
    assert meta["checkpoint_manifest_sha256"] == hashlib.sha256(manifest).hexdigest()
    assert json.loads((run / "results.json").read_text())["samplers"]["gmm"]["checkpoint"] == "last"
    assert main(["sample", str(run), "--sampler", "gmm", "-n", "4", "--out", str(tmp_path / "s.png")]) == 0


def test_a_sampler_of_another_checkpoint_is_refused(run_with_samplers, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(run_with_samplers, other)
    err = one_line_error(capsys, ["sample", str(other), "--sampler", "nope", "--out", str(tmp_path / "x.png")])
    assert "unknown sampler" in err
    # the run trains on (its checkpoint changes): the sampler fitted before is refused, with the fix
    assert main(["train", *TRAIN, "--out", str(other), "--epochs", "2", "--resume"]) == 0
    for argv in (["sample", str(other), "--sampler", "gmm", "--out", str(tmp_path / "x.png")],
                 ["evaluate", str(other), "--sampler", "flow", "-k", "2", "--max-images", "4", "--no-progress"]):
        err = one_line_error(capsys, argv)
        assert "fitted to other weights" in err and "medivae fit-sampler" in err
    assert not (tmp_path / "x.png").exists()
    # a tampered tensor file is refused too
    third = tmp_path / "third"
    shutil.copytree(run_with_samplers, third)
    (third / "samplers" / "gmm.safetensors").write_bytes(b"\0" * 64)
    err = one_line_error(capsys, ["sample", str(third), "--sampler", "gmm", "--out", str(tmp_path / "y.png")])
    assert "corrupt" in err
