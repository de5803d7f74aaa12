"""VAE-GAN: each step moves only its own network; without the adversarial terms it is the plain VAE, loss
for loss; a discriminator that wins outright is handled like a NaN; it trains, resumes and scores."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from medivae.models import build_model, model_config
from medivae.models.family import Diverged, StepContext
from medivae.models.losses import neg_elbo
from medivae.runfolder.config import TrainConfig

from tolerance import network_bound

TINY = dict(image_size=32, latent_dim=4, base_width=4, max_width=16, disc_width=4, disc_layers=2)


def _gan(**kw):
    torch.manual_seed(0)
    return build_model(model_config("vae_gan", **{**TINY, **kw}))


def _ctx(step=0, progress=1.0, seed=0):
    return StepContext(epoch=2, step=step, progress=progress, train=TrainConfig(precision="fp32"),
                       generator=torch.Generator().manual_seed(seed))


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def _run(model, opts, step, x, ctx):
    """What the trainer does with one step: zero its optimizer's grads, backward, step it."""
    opt = opts[step.optimizer]
    out = step.run(model.trained_modules(), x, None, ctx)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    opt.step()
    return out


def _by_hand(twin, x, seed: int, adv_weight: float, feature_weight: float):
    """The generator step's loss and λ from the module docstring's formulas, on a copy of the model with
    the step's draws: (loss, λ, the fakes). β = 1, no warm-up, no free bits, the hinge loss."""
    b, g = len(x), torch.Generator().manual_seed(seed)
    out = twin.vae(x, sample=True, generator=g)
    elbo = neg_elbo(twin.likelihood, out, x)
    z = twin.vae.prior_latents(b, g)
    twin.vae.eval()  # prior samples as sampling decodes them
    samples = twin.vae.decode(z)
    twin.vae.train()
    fakes = torch.cat([twin.likelihood.mean(out.recon_params), samples])
    logits, feats = twin.disc.eval()(torch.cat([x, fakes]))
    adv = (-logits[b:]).flatten(1).mean(1).view(2, b).mean(0)  # hinge, generator side: reconstructions, samples
    fm = sum((f[:b] - f[b : 2 * b]).pow(2).flatten(1).mean(1) for f in feats)
    w = twin.vae.decoder[-1].weight
    g_rec = torch.autograd.grad(elbo.loss.mean(), w, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adv.mean(), w, retain_graph=True)[0]
    lam = adv_weight * g_rec.norm() / (g_adv.norm() + 1e-4)  # VQGAN's adaptive weight
    return (elbo.loss + lam * adv + feature_weight * fm).mean(), lam, fakes


def test_each_step_moves_only_its_own_network_with_the_documented_losses():
    model = _gan(adv_start=0.0, adv_weight=0.3, feature_weight=2.0)
    opts = model.optimizers(TrainConfig(lr=1e-2), torch.device("cpu"))
    gen_step, disc_step = model.training_steps()
    x = torch.rand(6, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    twin = copy.deepcopy(model)
    vae0, disc0 = _state(model.vae), _state(model.disc)
    out = _run(model, opts, gen_step, x, _ctx(seed=5))
    loss, lam, fakes = _by_hand(twin, x, 5, adv_weight=0.3, feature_weight=2.0)
    assert lam > 0 and abs(float(lam) - 0.3) > 1e-3  # adaptive: not the bare adv_weight
    torch.testing.assert_close(out.terms["adv_weight"], lam.detach())
    torch.testing.assert_close(out.loss, loss)
    torch.testing.assert_close(model._fakes, fakes.detach())
    assert _same(disc0, _state(model.disc))  # weights and spectral-norm vectors untouched
    assert not _same(vae0, _state(model.vae))
    vae1, disc_twin = _state(model.vae), copy.deepcopy(model.disc)  # a training-mode twin: the same power step
    logits, _ = disc_twin(torch.cat([x, model._fakes]))
    real, fake = logits[:6], logits[6:]
    want = F.relu(1 - real).flatten(1).mean(1) + F.relu(1 + fake).flatten(1).mean(1).view(2, 6).mean(0)
    out = _run(model, opts, disc_step, x, _ctx())
    torch.testing.assert_close(out.loss, want.mean())
    assert float(out.terms["disc_acc"]) == float(0.5 * ((real > 0).float().mean() + (fake < 0).float().mean()))
    assert _same(vae1, _state(model.vae))
    assert not _same(disc0, _state(model.disc))


def test_prior_samples_pass_the_decoder_as_sampling_decodes_them():
    """Generator step: the prior samples the discriminator judges are the decoder's eval-mode output (its
    running BatchNorm statistics), and they leave those statistics as the reconstructions left them."""
    model = _gan(adv_start=0.0)
    x = torch.rand(6, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    twin = copy.deepcopy(model)
    model.training_steps()[0].run(model.trained_modules(), x, None, _ctx(seed=5))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        twin.vae(x, sample=True, generator=g)  # the reconstructions only, with the step's draws
    norms = [(k, v) for k, v in model.vae.state_dict().items() if "running" in k]
    assert norms and all(torch.equal(v, twin.vae.state_dict()[k]) for k, v in norms)
    z = twin.vae.prior_latents(6, g)  # the step's prior latents
    torch.testing.assert_close(model._fakes[6:], twin.vae.eval().decode(z))


def test_best_is_an_epoch_trained_adversarially_throughout(tmp_path, monkeypatch):
    """Epochs before the adversarial start cannot become best/, whatever their validation loss; a run too
    short to have one is refused."""
    from medivae import api
    from medivae.runtime.errors import UserError
    from medivae.train.trainer import Trainer

    from tiny import tiny_run

    losses = iter([1.0, 5.0, 6.0])  # epoch 1, before the adversarial terms, has the lowest
    monkeypatch.setattr(Trainer, "evaluate", lambda self, split, batch_size=256: {"loss": next(losses)})
    cfg = tiny_run("phantoms:60", epochs=3)
    cfg = type(cfg)(data=cfg.data, train=cfg.train, model=model_config("vae_gan", **{**TINY, "adv_start": 1.0}))
    api.train(cfg, tmp_path / "r", progress=False)
    state = json.loads((tmp_path / "r" / "best" / "state.json").read_text())
    assert (state["epoch"], state["best_epoch"], state["best_val"]) == (2, 2, 5.0)
    short = type(cfg)(data=cfg.data, train=dataclasses.replace(cfg.train, epochs=1), model=cfg.model)
    with pytest.raises(UserError, match="at least 2"):
        api.train(short, tmp_path / "short", progress=False)
    assert build_model(model_config("vae_gan", **{**TINY, "adv_start": 0.5})).first_best_epoch(cfg.train) == 2
    assert build_model(model_config("vae_gan", **{**TINY, "adv_start": 0.0})).first_best_epoch(cfg.train) == 1


def test_without_adversarial_terms_it_is_the_plain_vae():
    x = torch.rand(5, 1, 32, 32)
    gan = _gan(adv_start=0.0, adv_weight=0.0, feature_weight=0.0)
    torch.manual_seed(0)  # the generator is built first, from the same seed: the same initial VAE
    vae = build_model(model_config("conv_vae", **{k: v for k, v in TINY.items() if not k.startswith("disc")}))
    assert _same(_state(vae), _state(gan.vae))
    gan_out = gan.training_steps()[0].run(gan.trained_modules(), x, None, _ctx(seed=3))
    vae_out = vae.training_steps()[0].run(vae.trained_modules(), x, None, _ctx(seed=3))
    torch.testing.assert_close(gan_out.loss, vae_out.loss, rtol=0, atol=0)
    torch.testing.assert_close(gan_out.terms["rec"], vae_out.terms["rec"], rtol=0, atol=0)


def test_before_the_warm_up_ends_only_the_vae_trains():
    model = _gan(adv_start=1.0)
    gen_step, disc_step = model.training_steps()
    early = _ctx(progress=0.5)
    assert not disc_step.runs(early) and disc_step.runs(_ctx(progress=1.0))
    out = gen_step.run(model.trained_modules(), torch.rand(4, 1, 32, 32), None, early)
    assert "adv" not in out.terms


def test_a_discriminator_that_is_never_wrong_for_an_epoch_counts_as_divergence():
    model = _gan()
    model._watch.acc[:] = torch.tensor([40.0, 40.0], dtype=torch.float64)  # 40 batches, all 100 % right
    with pytest.raises(Diverged, match="pinned at 100 %"):
        model.epoch_end(_ctx())
    model._watch.acc[:] = torch.tensor([30.0, 40.0], dtype=torch.float64)
    assert model.epoch_end(_ctx()) == {"disc_acc_epoch": 0.75}


def test_a_pinned_discriminator_rolls_both_networks_back_and_halves_the_learning_rate(tmp_path, monkeypatch):
    from medivae import api
    from medivae.models.vae_gan import VAEGAN
    from medivae.train.metrics import read_metrics

    from tiny import tiny_run

    real, calls = VAEGAN.epoch_end, []

    def pinned_once(self, ctx):
        calls.append(ctx.epoch)
        if len(calls) == 1:
            raise Diverged("discriminator accuracy pinned at 100 % over epoch 1")
        return real(self, ctx)

    monkeypatch.setattr(VAEGAN, "epoch_end", pinned_once)
    cfg = tiny_run("phantoms:60", epochs=1)
    cfg = type(cfg)(data=cfg.data, train=cfg.train, model=model_config("vae_gan", **{**TINY, "adv_start": 0.0}))
    with pytest.warns(UserWarning, match="pinned at 100 %"):
        api.train(cfg, tmp_path / "r", progress=False)
    rows = read_metrics(tmp_path / "r")
    assert calls == [1, 1] and rows[0]["nan_events"] == 1 and rows[0]["lr"] == cfg.train.lr / 2
    state = json.loads((tmp_path / "r" / "last" / "state.json").read_text())
    assert state["nan_events"] == 1


def test_the_discriminator_gives_two_more_anomaly_scores(monkeypatch):
    model = _gan().eval()
    x = torch.rand(3, 1, 32, 32)
    scores = model.anomaly_scores(x)
    assert scores["disc"].shape == scores["disc_res"].shape == (3,)
    assert torch.isfinite(scores["disc"]).all() and (scores["disc_res"] > 0).all()
    # the verdict is on x alone, whatever else is in the discriminator's batch: x with its reconstructions (6
    # images) rounds as x alone (3) up to the network's bound, relative to the logits' size (their mean |.|);
    # a batch that mixed the images (batch statistics, the wrong half) moves it by O(the logits)
    logits = model.disc(x)[0].flatten(1).double()
    bound = 2 * network_bound(model.disc) * logits.abs().mean(1)
    assert ((scores["disc"] + logits.mean(1)).abs() <= bound).all()
    # disc_res is the feature distance to the reconstruction: none for a perfect one, more for a worse one
    monkeypatch.setattr(model.vae, "reconstruct", lambda x, y=None: x.clone())
    assert torch.all(model.anomaly_scores(x)["disc_res"] == 0)
    monkeypatch.setattr(model.vae, "reconstruct", lambda x, y=None: x.flip(-1))
    flipped = model.anomaly_scores(x)["disc_res"]
    monkeypatch.setattr(model.vae, "reconstruct", lambda x, y=None: (x + 0.01).clamp(0, 1))
    assert torch.all(model.anomaly_scores(x)["disc_res"] < flipped)
