"""Model contracts over the registry with tiny CPU models."""

from __future__ import annotations

import pytest
import torch

from medivae.models import REGISTRY, build_model, model_config
from medivae.models.conv_vae import ConvVAE
from medivae.models.distributions import DiagonalGaussian
from medivae.models.losses import neg_elbo

from tiny import tiny_model


@pytest.mark.parametrize("size", [32, 64, 128])
@pytest.mark.parametrize("channels", [1, 3])
def test_output_shapes(size, channels):
    model = build_model(tiny_model(image_size=size, channels=channels, latent_dim=5))
    x = torch.rand(2, channels, size, size)
    out = model(x)
    assert out.recon_params.shape == (2, channels, size, size)
    assert out.posterior.mean.shape == (2, 5) and out.z.shape == (2, 5)
    imgs = model.images(out.recon_params)
    assert imgs.shape == x.shape and imgs.min() >= 0 and imgs.max() <= 1


def test_article_architecture_at_64():
    model = build_model(model_config("conv_vae"))
    convs = [m for m in model.encoder if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128, 256]
    assert all(c.kernel_size == (4, 4) and c.stride == (2, 2) for c in convs)
    assert model.fc_mu.in_features == 4096 and model.fc_mu.out_features == 32
    deconvs = [m for m in model.decoder if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [d.out_channels for d in deconvs] == [128, 64, 32, 1]


def test_discretized_logistic_doubles_decoder_channels():
    model = build_model(tiny_model(likelihood="discretized_logistic"))
    out = model(torch.rand(2, 1, 32, 32))
    assert out.recon_params.shape == (2, 2, 32, 32)
    assert model.decode(out.z).shape == (2, 1, 32, 32)  # the contract's decode gives images


def test_deterministic_encoding_is_the_mean_bit_for_bit():
    torch.manual_seed(0)
    model = build_model(tiny_model())
    model.train()  # sampling must depend on the argument, never on self.training
    x = torch.rand(4, 1, 32, 32)
    model.eval()
    a = model(x, sample=False)
    b = model(x, sample=False)
    assert torch.equal(a.z, a.posterior.mean)
    assert torch.equal(a.z, b.z)
    assert torch.equal(a.recon_params, b.recon_params)
    s = model(x, sample=True)
    assert not torch.equal(s.z, s.posterior.mean)


def test_closed_form_kl_matches_monte_carlo():
    g = torch.Generator().manual_seed(1)
    mean = torch.randn(3, 6, generator=g)
    logvar = torch.randn(3, 6, generator=g) * 0.5
    q = DiagonalGaussian(mean, logvar)
    z = mean + q.std * torch.randn(200_000, 3, 6, generator=g)
    log_q = q.log_prob(z)
    log_p = -0.5 * (z.pow(2) + torch.log(torch.tensor(2 * torch.pi))).sum(-1)
    mc = (log_q - log_p).mean(0)
    torch.testing.assert_close(mc, q.kl(), rtol=0.02, atol=0.02)


@pytest.mark.parametrize("name", sorted(n for n, f in REGISTRY.items() if f.build is ConvVAE))
def test_every_parameter_gets_a_gradient_and_a_step_changes_weights(name):
    """The conv_vae family's entries; every family gets the same checks in test_family_contract.py."""
    cfg = model_config(name, image_size=32, latent_dim=4, base_width=4, max_width=16,
                       num_classes=2 if REGISTRY[name].preset.get("num_classes") else None)
    model = build_model(cfg)
    x = torch.rand(4, 1, 32, 32)
    y = torch.tensor([0, 1, 0, 1])
    terms = neg_elbo(model.likelihood, model(x, y), x)
    terms.loss.mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.optim.Adam(model.parameters(), lr=1e-2).step()
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    # an eval pass changes nothing (no BatchNorm statistics updated)
    model.eval()
    after_step = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model(x, y, sample=False)
    assert all(torch.equal(after_step[k], v) for k, v in model.state_dict().items())


def test_per_sample_loss_is_sum_over_pixels_and_latents():
    model = build_model(tiny_model())
    x = torch.rand(3, 1, 32, 32)
    out = model(x, sample=False)
    terms = neg_elbo(model.likelihood, out, x)
    bce = torch.nn.functional.binary_cross_entropy(torch.sigmoid(out.recon_params), x, reduction="none")
    torch.testing.assert_close(terms.rec, bce.flatten(1).sum(1), rtol=1e-4, atol=1e-2)
    assert terms.loss.shape == (3,)
    torch.testing.assert_close(terms.loss, terms.rec + terms.kl)


def test_unknown_model_lists_valid_ones():
    from medivae.runtime.errors import UserError

    with pytest.raises(UserError, match="conv_vae"):
        model_config("no_such_model")


def test_model_facts_come_from_the_family_or_its_hook():
    from medivae.models.family import ModelFacts, describe, epoch_end, extra_anomaly_scores, figures

    logistic = build_model(tiny_model(latent_dim=5, likelihood="discretized_logistic"))
    assert describe(logistic) == ModelFacts(likelihood="discretized_logistic", discrete_likelihood=True,
                                            latent_dim=5, beta=1.0)
    assert describe(build_model(tiny_model(latent_dim=3))).discrete_likelihood is False  # bernoulli on gray levels

    class Bare(torch.nn.Module):  # a family that defines none of the optional hooks
        cfg = tiny_model()
        capabilities = frozenset({"sample"})

    bare = Bare()
    # no "likelihood" / "gaussian_latent" capability: no likelihood name or latent size, whatever cfg has
    assert describe(bare) == ModelFacts(likelihood=None, discrete_likelihood=False, latent_dim=None, beta=bare.cfg.beta)
    assert epoch_end(bare, None) == {} and figures(bare) == {} and extra_anomaly_scores(bare, None, None) == {}
    bare.describe = lambda: ModelFacts(likelihood="mine", latent_dim=7)
    assert describe(bare).likelihood == "mine" and describe(bare).latent_dim == 7
