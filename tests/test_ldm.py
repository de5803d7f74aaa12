"""ldm: the KL term is the closed form; each stage moves only its own networks; the prior sees standardised
latents; samples are deterministic and follow the label; the adversarial terms start at their epoch; the
best checkpoint follows the prior; what the family cannot do it refuses in one line."""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from medivae.models import build_model, model_config
from medivae.models.diffusion import LatentStandardiser
from medivae.models.family import StepContext
from medivae.models.ldm import LDMConfig
from medivae.runfolder.config import TrainConfig
from medivae.runtime.errors import UserError

from tolerance import gamma, mean_bound, network_bound, std_rel_bound, unit_roundoff

TINY = dict(image_size=32, width=8, res_blocks=1, res_width=4, latent_channels=2, disc_width=4, disc_layers=2,
            prior_epochs=1, prior_width=8, prior_updates=2, sampling_steps=4, num_classes=0)
TRAIN = TrainConfig(epochs=3, precision="fp32", lr=1e-2)


def _ldm(**kw):
    torch.manual_seed(0)
    return build_model(model_config("ldm", **{**TINY, **kw}))


def _ctx(epoch=1, step=0, progress=None, seed=0):
    progress = epoch - 1.0 if progress is None else progress
    return StepContext(epoch=epoch, step=step, progress=progress, train=TRAIN,
                       generator=torch.Generator().manual_seed(seed))


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def _train_batch(model, opts, x, y, ctx):
    """What the trainer does with a batch: every active step in order, each zeroing, stepping its optimizer."""
    terms = {}
    for step in model.training_steps():
        if step.runs(ctx):
            out = step.run(model.trained_modules(), x, y, ctx)
            opts[step.optimizer].zero_grad(set_to_none=True)
            out.loss.backward()
            opts[step.optimizer].step()
            terms.update(out.terms)
    return terms


def test_the_kl_term_is_the_closed_form_summed_over_latent_elements():
    model = _ldm()
    x = torch.rand(3, 1, 32, 32)
    q = model.encode(x)
    assert q.mode().shape == (3, 2, 8, 8)
    logvar = q.arrays()["logvar"]
    mean, std = q.mode(), logvar.mul(0.5).exp()
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mean, std), torch.distributions.Normal(0.0, 1.0))
    # two formulas for 0.5 (mu^2 + s^2 - 1 - log s^2) summed over n elements: each within gamma(n + 4) of the
    # sum of the terms' sizes (a few roundings per element, then the sum), twice
    size = 0.5 * (mean**2 + std**2 + 1 + logvar.abs()).flatten(1).sum(1)
    assert ((q.kl() - ref.flatten(1).sum(1)).abs() <= 2 * gamma(mean[0].numel() + 4) * size).all()
    # the step's kl term is that of the posterior of x; its loss is L1 + kl_weight * KL
    model = _ldm(kl_weight=1e-3, adv_start=5.0)
    out = model.training_steps()[0].run(model.trained_modules(), x, None, _ctx())
    torch.testing.assert_close(out.terms["kl"], model.encode(x).kl(), rtol=0, atol=0)
    want = (out.terms["rec"] + 1e-3 * out.terms["kl"]).mean()
    torch.testing.assert_close(out.loss.detach(), want, rtol=1e-6, atol=0)


def test_the_autoencoder_stage_leaves_the_prior_untouched_and_the_prior_stage_the_autoencoder():
    model = _ldm(adv_start=0.0)
    opts = model.optimizers(TRAIN, torch.device("cpu"))
    x = torch.rand(6, 1, 32, 32)
    prior0, ema0 = _state(model.prior), _state(model.prior_ema)
    ae0, disc0 = _state(model.autoencoder), _state(model.disc)
    terms = _train_batch(model, opts, x, None, _ctx(epoch=1))
    assert {"rec", "kl", "adv", "fm", "disc", "disc_acc"} <= set(terms) and "prior" not in terms
    assert not _same(ae0, _state(model.autoencoder)) and not _same(disc0, _state(model.disc))
    assert _same(prior0, _state(model.prior)) and _same(ema0, _state(model.prior_ema))
    assert not model.prior_ready
    ae1, disc1 = _state(model.autoencoder), _state(model.disc)
    terms = _train_batch(model, opts, x, None, _ctx(epoch=3))  # the last epoch: stage 2
    assert set(terms) == {"prior", "prior_mse"} and terms["prior"].shape == (6,)
    assert _same(ae1, _state(model.autoencoder)) and _same(disc1, _state(model.disc))
    assert not _same(prior0, _state(model.prior))
    assert model.prior_ready and int(model.prior_ema.n_averaged) == 2  # one per update: prior_updates = 2


def test_the_prior_learns_the_latents_standardised_per_channel():
    model = _ldm()
    x = torch.rand(8, 1, 32, 32)
    prior_step = next(s for s in model.training_steps() if s.name == "prior")
    prior_step.run(model.trained_modules(), x, None, _ctx(epoch=3, seed=5))
    z = model.encode(x).sample(torch.Generator().manual_seed(5))  # the draw the step made first
    fitted = LatentStandardiser.fit(z)
    # the step's statistics (float64, then fp32) against an fp32 fit: within the fp32 reductions' bounds
    dims, r = (0, 2, 3), unit_roundoff(torch.float32)
    mean, std = model.latent_mean.flatten(), model.latent_std.flatten()
    assert ((mean - fitted.mean.flatten()).abs() <= mean_bound(z, dims) + r * mean.abs()).all()
    assert ((std - fitted.std.flatten()).abs() <= (std_rel_bound(z, dims) + r) * std).all()
    u = model._latents  # what the prior was trained on: mean 0 and std 1 per channel
    assert (u.mean(dims).abs() <= mean_bound(u, dims) + 2 * r * u.abs().mean(dims)).all()
    assert ((u.std(dims) - 1).abs() <= std_rel_bound(u, dims) + 3 * r).all()
    # the draws decode through the inverse map: standardised -> latent ((z - m) / s * s + m: four roundings)
    tol = 4 * r * (z.abs() + model.latent_mean.abs())
    assert ((model.standardiser().decode(u) - z).abs() <= tol).all()


@pytest.mark.parametrize(("batch", "logged"), [(6, 6), (3, 3)])
def test_the_prior_updates_split_the_batch_and_log_every_image_once(batch, logged):
    model = _ldm(prior_updates=4)
    opts = model.optimizers(TRAIN, torch.device("cpu"))
    terms = _train_batch(model, opts, torch.rand(batch, 1, 32, 32), None, _ctx(epoch=3))
    assert terms["prior_mse"].shape == (logged,) and torch.isfinite(terms["prior"]).all()
    torch.testing.assert_close(terms["prior"], terms["prior_mse"] * 2 * 8 * 8)
    assert int(model.prior_ema.n_averaged) == 4


def test_samples_come_from_the_moving_average_of_the_prior():
    model = _ldm(prior_ema=0.999)
    opts = model.optimizers(TRAIN, torch.device("cpu"))
    x = torch.rand(6, 1, 32, 32)
    _train_batch(model, opts, x, None, _ctx(epoch=3))  # two updates: the average is the weights after one
    _train_batch(model, opts, x, None, _ctx(epoch=3, step=1))
    assert int(model.prior_ema.n_averaged) == 4
    ema, raw = model.prior_ema.module, model.prior
    assert not _same(_state(ema), _state(raw))
    assert model._require_prior() is ema
    with torch.no_grad():
        for p in ema.out.parameters():  # the zero output layer ignores everything else
            p.normal_(0, 0.1)
    a = model.sample(2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(0.5)
    assert not torch.equal(a, model.sample(2, generator=torch.Generator().manual_seed(0)))
    assert _ldm(prior_ema=0.0)._require_prior() is not None


def test_the_adversarial_terms_start_at_their_epoch():
    model = _ldm(adv_start=1.5)
    steps = {s.name: s for s in model.training_steps()}
    x = torch.rand(4, 1, 32, 32)
    early, late = _ctx(epoch=2, progress=1.25), _ctx(epoch=2, progress=1.5)
    assert not steps["discriminator"].runs(early) and steps["discriminator"].runs(late)
    before = steps["autoencoder"].run(model.trained_modules(), x, None, early)
    after = steps["autoencoder"].run(model.trained_modules(), x, None, _ctx(epoch=2, progress=1.5))
    assert "adv" not in before.terms and {"adv", "fm", "adv_weight"} <= set(after.terms)
    torch.testing.assert_close(before.terms["rec"], after.terms["rec"])  # the same draws: same reconstruction
    t = after.terms
    plain = (t["rec"] + model.cfg.kl_weight * t["kl"]).mean()
    extra = (t["adv_weight"] * t["adv"] + t["fm"]).mean()
    # the same four terms per image summed and averaged in another order: within gamma(n) of their sizes
    parts = [t["rec"], model.cfg.kl_weight * t["kl"], t["adv_weight"] * t["adv"], t["fm"]]
    size = sum(p.detach().abs() for p in parts).mean()
    assert abs(float(after.loss.detach() - (plain + extra))) <= gamma(len(parts) + len(x) + 2) * float(size)
    assert not steps["discriminator"].runs(_ctx(epoch=3, progress=2.5))  # nor in the prior stage


def test_samples_are_deterministic_for_a_generator_and_follow_the_label():
    model = _ldm(num_classes=2, guidance=1.0).eval()
    with torch.no_grad():  # an untrained prior predicts the same noise for every class (zero output layer)
        for p in model.prior_ema.module.out.parameters():
            p.normal_(0, 0.1)

    def draw(label, seed=0):
        return model.sample(3, label=label, generator=torch.Generator().manual_seed(seed))

    a = draw(0)
    assert a.shape == (3, 1, 32, 32) and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, draw(0))
    assert not torch.equal(a, draw(0, seed=1))
    assert not torch.equal(a, draw(1))
    assert not torch.equal(a, draw(None))  # unconditional: the null class
    cooler = model.sample(3, label=0, generator=torch.Generator().manual_seed(0), temperature=0.5)
    assert not torch.equal(a, cooler)  # DDIM starts from N(0, T^2 I)
    z = model.prior_latents(2, torch.Generator().manual_seed(0))
    assert z.shape == (2, 2, 8, 8) and z.device.type == "cpu"


def test_validation_counts_an_untrained_prior_as_predicting_no_noise():
    model = _ldm().eval()
    x = torch.rand(4, 1, 32, 32)
    with torch.no_grad():
        terms = model.validation_terms(x, None, torch.Generator().manual_seed(0))
    assert torch.equal(terms["prior"], torch.full((4,), 2.0 * 8 * 8))
    torch.testing.assert_close(terms["loss"], terms["rec"] + model.cfg.kl_weight * terms["kl"] + terms["prior"])
    model.prior_ready.fill_(1.0)
    with torch.no_grad():
        terms = model.validation_terms(x, None, torch.Generator().manual_seed(0))
        again = model.validation_terms(x, None, torch.Generator().manual_seed(0))
    assert not torch.equal(terms["prior"], torch.full((4,), 2.0 * 8 * 8))
    assert torch.equal(terms["loss"], again["loss"])  # fixed noise: epochs compare


def test_capabilities_follow_the_config_and_the_data():
    cfg = model_config("ldm", image_size=64)
    assert cfg.latent_shape == (4, 8, 8) and model_config("ldm", image_size=32).latent_shape == (4, 8, 8)
    assert model_config("ldm", image_size=128).latent_shape == (4, 16, 16)
    assert model_config("ldm", image_size=64, downsample=4).latent_shape == (4, 16, 16)
    assert cfg.for_data(("normal", "lesion"), "phantoms").num_classes == 2
    assert cfg.for_data((), "folder").num_classes == 0 and cfg.for_data(("one",), "folder").num_classes == 0
    assert build_model(cfg.for_data(("a", "b"), "x")).capabilities == {"sample", "latent", "conditional"}
    assert build_model(cfg.for_data((), "x")).capabilities == {"sample", "latent"}
    no_prior = model_config("ldm", image_size=32, prior_epochs=0).for_data(("a", "b"), "x")
    assert no_prior.num_classes == 0 and build_model(no_prior).capabilities == {"latent"}
    with pytest.raises(UserError, match="no prior to sample from"):
        build_model(no_prior).sample(2)
    with pytest.raises(UserError, match="--epochs must exceed"):
        _ldm(prior_epochs=3).optimizers(TRAIN, torch.device("cpu"))


@pytest.mark.parametrize(("field", "value", "says"), [
    ("downsample", 3, "downsample 3"), ("downsample", 16, "downsample 16"), ("latent_channels", 0, "latent_channels"),
    ("kl_weight", -1e-6, "kl_weight"), ("prior_ema", 1.0, "prior_ema"), ("p_uncond", 1.0, "p_uncond"),
    ("adv_loss", "wgan", "wgan"), ("disc_layers", 5, "disc_layers"), ("num_classes", -2, "num_classes"),
    ("timesteps", 1, "timesteps"), ("guidance", -1.0, "guidance"),
])
def test_impossible_options_are_errors_that_name_the_value(field, value, says):
    with pytest.raises(UserError, match=says):
        LDMConfig(image_size=32, **{field: value})


@pytest.mark.slow
def test_two_stages_in_one_run_and_the_best_checkpoint_follows_the_prior(tmp_path):
    from medivae import api
    from medivae.runfolder.config import DataConfig, RunConfig
    from medivae.train.metrics import read_metrics

    cfg = RunConfig(data=DataConfig(source="phantoms:60", image_size=32),
                    model=model_config("ldm", **{**TINY, "num_classes": -1}),
                    train=TrainConfig(epochs=3, batch_size=16, precision="fp32", seed=1767661200070))
    run = tmp_path / "r"
    api.train(cfg, run, progress=False)
    rows = read_metrics(run)
    assert ["train_rec" in r for r in rows] == [True, True, False]
    assert ["train_prior" in r for r in rows] == [False, False, True]
    assert rows[0]["val_prior"] == rows[1]["val_prior"] == 2 * 8 * 8  # no prior yet
    assert rows[2]["val_rec"] == rows[1]["val_rec"]  # the autoencoder is frozen in stage 2
    state = json.loads((run / "best" / "state.json").read_text())
    assert state["best_epoch"] == 3 and rows[2]["val_prior"] < 2 * 8 * 8
    saved = json.loads((run / "config.json").read_text())["model"]
    assert saved["num_classes"] == 2  # phantoms: normal, lesion
    assert math.isfinite(rows[2]["val_loss"])


@pytest.mark.slow  # 27 s: two runs
def test_a_run_killed_in_its_prior_stage_resumes_to_the_numbers_of_an_uninterrupted_one(tmp_path, monkeypatch):
    """Killed after the first prior epoch (standardisation fitted, moving average under way), resumed: the same
    weights (the moving average and its update count included) and the same validation numbers as a run that was
    never stopped."""
    from medivae import api
    from medivae.runfolder.config import DataConfig, RunConfig
    from medivae.train.metrics import read_metrics

    from tiny import train_killed_after

    cfg = RunConfig(data=DataConfig(source="phantoms:60", image_size=32),
                    model=model_config("ldm", **{**TINY, "prior_epochs": 2, "prior_updates": 4, "adv_start": 9.0}),
                    train=TrainConfig(epochs=4, batch_size=8, precision="fp32", seed=1767661200070, num_threads=1))
    straight = api.train(cfg, tmp_path / "straight", progress=False)
    train_killed_after(cfg, tmp_path / "resumed", 3, monkeypatch)
    resumed = api.train(cfg, tmp_path / "resumed", resume=True, progress=False)
    a, b = (load_file(str(r / "last" / "model.safetensors")) for r in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert int(a["prior_ema.n_averaged"]) == 2 * 6 * 4 and float(a["prior_ready"]) == 1.0  # 6 batches an epoch

    def numbers(run):
        return [{k: v for k, v in r.items() if k.startswith(("train_", "val_"))} for r in read_metrics(run)]

    assert numbers(straight) == numbers(resumed)


# --- two gloo ranks: one standardisation -------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch(rank: int) -> torch.Tensor:
    return torch.rand(5, 1, 32, 32, generator=torch.Generator().manual_seed(40 + rank))


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model = _ldm()  # the same weights on both ranks
        prior_step = next(s for s in model.training_steps() if s.name == "prior")
        prior_step.run(model.trained_modules(), _batch(rank), None, _ctx(epoch=3, seed=rank))
        save_file({"mean": model.latent_mean.contiguous(), "std": model.latent_std.contiguous()},
                  str(Path(out) / f"stats{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_standardise_by_the_statistics_of_both_batches(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    a, b = (load_file(str(tmp_path / f"stats{r}.safetensors")) for r in range(2))
    assert torch.equal(a["mean"], b["mean"]) and torch.equal(a["std"], b["std"])
    model = _ldm()
    z = torch.cat([model.encode(_batch(r)).sample(torch.Generator().manual_seed(r)) for r in range(2)])
    both = LatentStandardiser.fit(z)  # pooled over the 10 images of the two ranks
    # a channel's mean and std move by at most the rms of a change of its n latents: the encoder's rounding
    # (another thread count here than on the ranks; each side within its bound) and the fp32 reduction here
    n = z[:, 0].numel()
    rms = z.detach().double().pow(2).mean((0, 2, 3)).sqrt().view(-1, 1, 1)
    tol = (2 * network_bound(model.autoencoder) + gamma(n)) * rms
    assert ((a["mean"] - both.mean).abs() <= tol).all() and ((a["std"] - both.std).abs() <= tol).all()
    alone = LatentStandardiser.fit(z[:5])
    assert ((a["mean"] - alone.mean).abs() > tol).any()  # not rank 0's batch alone
