"""KL controls: β (Higgins et al. 2017), linear and cyclical warm-up (Fu et al. 2019), free bits
(Kingma et al. 2016). Expected values are worked out by hand from each paper's definition."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from medivae.data import ImageSet
from medivae.models import build_model, model_config
from medivae.models.losses import free_bits_kl, kl_weight, neg_elbo
from medivae.runfolder.config import RunConfig
from medivae.runtime.errors import UserError
from medivae.train.trainer import Trainer

from tiny import tiny_model, tiny_run


@pytest.fixture
def batch():
    torch.manual_seed(0)
    model = build_model(tiny_model(latent_dim=3)).eval()
    x = torch.rand(4, 1, 32, 32)
    with torch.no_grad():
        return model, x, model(x, sample=False)


def hand_terms(out, x):
    """-log p(x|z) for the Bernoulli decoder and KL(N(mu, s^2) || N(0, 1)) per dimension, by formula."""
    p = torch.sigmoid(out.recon_params)
    rec = -(x * torch.log(p) + (1 - x) * torch.log(1 - p)).flatten(1).sum(1)
    mu, logvar = out.posterior.mean, out.posterior.logvar
    kl_dim = 0.5 * (mu**2 + logvar.exp() - 1 - logvar)
    return rec, kl_dim


def test_beta_one_is_the_plain_elbo(batch):
    model, x, out = batch
    rec, kl_dim = hand_terms(out, x)
    terms = neg_elbo(model.likelihood, out, x, beta=1.0)
    torch.testing.assert_close(terms.loss, rec + kl_dim.sum(1), rtol=1e-4, atol=1e-2)
    assert torch.equal(terms.loss, terms.neg_elbo)


@pytest.mark.parametrize("beta", [0.0, 0.5, 4.0])
def test_beta_weights_only_the_kl(batch, beta):
    model, x, out = batch
    rec, kl_dim = hand_terms(out, x)
    terms = neg_elbo(model.likelihood, out, x, beta=beta)
    torch.testing.assert_close(terms.loss, rec + beta * kl_dim.sum(1), rtol=1e-4, atol=1e-2)
    # the reported ELBO is the honest one whatever β was
    torch.testing.assert_close(terms.neg_elbo, rec + kl_dim.sum(1), rtol=1e-4, atol=1e-2)


def test_free_bits_floor_each_dimensions_batch_mean():
    kl = torch.tensor([[0.1, 2.0, 0.3], [0.3, 1.0, 0.1]], requires_grad=True)  # (B=2, D=3)
    # batch means 0.2, 1.5, 0.2: dims 0 and 2 sit below λ = 0.5 and count as 0.5 each
    out = free_bits_kl(kl, 0.5)
    torch.testing.assert_close(out, torch.tensor([0.5 + 2.0 + 0.5, 0.5 + 1.0 + 0.5]))
    torch.testing.assert_close(out.mean(), torch.tensor(0.5 + 1.5 + 0.5))  # Σ_j max(λ, E_batch KL_j)
    out.mean().backward()
    torch.testing.assert_close(kl.grad, torch.tensor([[0.0, 0.5, 0.0], [0.0, 0.5, 0.0]]))
    assert torch.equal(free_bits_kl(kl, 0.0), kl.sum(1))


def test_free_bits_in_the_loss(batch):
    model, x, out = batch
    rec, kl_dim = hand_terms(out, x)
    lam = float(kl_dim.mean(0).median())  # one dimension on each side of the floor, one on it
    expected = rec + 2.0 * torch.where(kl_dim.mean(0) >= lam, kl_dim, torch.full_like(kl_dim, lam)).sum(1)
    terms = neg_elbo(model.likelihood, out, x, beta=2.0, free_bits=lam)
    torch.testing.assert_close(terms.loss, expected, rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(terms.kl, kl_dim.sum(1))  # the KL reported is never floored


def test_linear_warmup():
    assert [kl_weight("linear", 2.0, t, 4.0) for t in (0, 1, 2, 4, 7)] == [0.0, 0.5, 1.0, 2.0, 2.0]


def test_cyclical_warmup_follows_fu_et_al():
    # cycle length 4 epochs, R = 0.5: β rises linearly over 2 epochs, holds for 2, then restarts at 0
    got = [kl_weight("cyclical", 2.0, t, 4.0) for t in (0, 1, 2, 3, 4, 5, 6.5)]
    assert got == [0.0, 1.0, 2.0, 2.0, 0.0, 1.0, 2.0]


def test_constant_schedule_is_beta():
    assert kl_weight("constant", 3.0, 0.0, 0.0) == 3.0


def test_settings_are_saved_in_the_run_config():
    cfg = tiny_run()
    model = dataclasses.replace(cfg.model, beta=4.0, kl_schedule="cyclical", warmup_epochs=2.0, free_bits=0.25)
    cfg = dataclasses.replace(cfg, model=model)
    back = RunConfig.from_dict(cfg.to_dict())
    assert back == cfg and back.model.beta == 4.0 and back.model.free_bits == 0.25


def test_bad_settings_are_user_errors():
    with pytest.raises(UserError, match="warmup"):
        model_config("conv_vae", kl_schedule="linear")
    with pytest.raises(UserError, match="free bits"):
        model_config("conv_vae", free_bits=-1)
    with pytest.raises(UserError, match="KL schedule"):
        model_config("hierarchical_vae", kl_schedule="sawtooth")
    with pytest.raises(UserError, match="N\\(0, I\\)"):  # the VampPrior's KL has no dimensions to floor
        model_config("vae_gan", prior="vamp", free_bits=0.5)


def one_step_weights(tmp_path, beta: float, **model_kw) -> dict[str, torch.Tensor]:
    """Weights after the trainer's first step (one batch = the whole set)."""
    rng = np.random.default_rng(0)
    data = ImageSet(rng.integers(0, 256, (16, 1, 32, 32), dtype=np.uint8), np.zeros(16))
    cfg = tiny_run(batch_size=16)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, beta=beta, **model_kw))
    torch.manual_seed(0)
    model = build_model(cfg.model)
    trainer = Trainer(cfg, model, torch.device("cpu"), tmp_path, progress=False)
    trainer.train_epoch(data, torch.from_numpy(data.images), epoch=1)
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(a, b) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_trainer_starts_warmup_at_zero_and_free_bits_stop_the_kl_gradient(tmp_path):
    no_kl = one_step_weights(tmp_path, beta=0.0)
    assert same(one_step_weights(tmp_path, 1.0, kl_schedule="linear", warmup_epochs=2.0), no_kl)
    assert same(one_step_weights(tmp_path, 1.0, kl_schedule="cyclical", warmup_epochs=2.0), no_kl)
    # a floor far above any dimension's KL leaves the KL term constant: no gradient from it
    assert same(one_step_weights(tmp_path, 1.0, free_bits=1e4), no_kl)
    assert not same(one_step_weights(tmp_path, 1.0), no_kl)


@pytest.mark.parametrize("args", [["--model", "vq_vae", "--free-bits", "0.5"],
                                  ["--model", "hierarchical_vae", "--free-bits", "0.5"],
                                  ["--model", "vae_gan", "--prior", "vamp", "--free-bits", "0.1"],
                                  ["--model", "hierarchical_vae", "--model-arg", "kl_balance=true"]])
def test_a_kl_setting_the_family_cannot_use_is_one_line(args, tmp_path, capsys):
    """Refused before anything is written, never silently ignored, never a traceback."""
    from medivae.cli import main

    out = tmp_path / "r"
    assert main(["train", "--data", "phantoms:40", "--image-size", "32", "--epochs", "1", "--out", str(out),
                 "--no-progress", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("medivae: error:") and err.count("\n") == 0
    assert ("free_bits" in err or "free-bits" in err or "kl_balance" in err) and not out.exists()


def test_hierarchical_kl_balancing_acts_during_a_warm_up_by_default():
    """With a warm-up and kl_balance left unset, the loss weighs each group by NVAE's balance while β < 1;
    without a warm-up it balances nothing, and asking it to is refused (above)."""
    from medivae.models.family import StepContext
    from medivae.models.hierarchical_vae import balanced_kl

    assert not model_config("hierarchical_vae").balances_kl  # the default: no warm-up, nothing to balance
    cfg = model_config("hierarchical_vae", image_size=32, width=8, z_channels=2, num_scales=2,
                       kl_schedule="linear", warmup_epochs=1.0)
    assert cfg.kl_balance is None and cfg.balances_kl
    torch.manual_seed(0)
    m = build_model(cfg).train()
    with torch.no_grad():  # posteriors away from their priors: groups with different KLs
        for block in m.groups:
            block.posterior[-1].weight.add_(0.3 * torch.randn(block.posterior[-1].weight.shape))
    x = (torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 255).round() / 255
    ctx = StepContext(1, 0, 0.5 * cfg.warmup_epochs, tiny_run().train, torch.Generator().manual_seed(3))
    out = m.training_steps()[0].run(m.trained_modules(), x, None, ctx)
    assert float(out.terms["beta"]) == 0.5
    with torch.no_grad():
        again = m(x, sample=True, generator=torch.Generator().manual_seed(3))  # the same draws
        rec, kl = -m.likelihood.log_prob(again.recon_params, x), again.kl()
        balanced = (rec + 0.5 * balanced_kl(kl, m.kl_alpha)).mean() / x[0].numel()
        plain = (rec + 0.5 * kl.sum(1)).mean() / x[0].numel()
    tol = 1e-5 * abs(float(plain))  # fp32 sums of a few thousand terms: far below the difference tested
    assert abs(float(balanced - plain)) > 100 * tol  # the test can tell the two apart
    assert abs(float(out.loss.detach() - balanced)) < tol
