"""hierarchical_vae invariants: the KL of the hierarchy, deterministic sampling, one top-down path shared by
inference and generation, bf16, the NVAE KL balancing and the trainer's gradient-norm skip. The contract
suite (tests/test_family_contract.py -k hierarchical) covers training, commands, resume and torchrun."""

from __future__ import annotations

import math

import pytest
import torch

from medivae.models import build_model, model_config
from medivae.models.family import StepContext, decode_sampler_latents, sampler_latents
from medivae.models.hierarchical_vae import balanced_kl
from medivae.models.inference import interpolate_sampled
from medivae.runfolder.config import TrainConfig
from medivae.runtime.errors import UserError

from tolerance import network_bound, rel_err

SIZE = 32


def tiny(**kw):
    torch.manual_seed(0)
    fields = dict(image_size=SIZE, width=8, z_channels=2, num_scales=2, groups_per_scale=2, **kw)
    return build_model(model_config("hierarchical_vae", **fields)).eval()


def images(n: int = 4, seed: int = 0) -> torch.Tensor:
    """8-bit phantom-like images: float (n, 1, 32, 32), k/255."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, SIZE, SIZE, generator=g) * 255).round() / 255


def perturb_(model) -> None:
    """Make every posterior correction non-zero (at init q = p almost exactly, and the KL tests would be vacuous)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in model.groups:
            w = block.posterior[-1].weight
            w.add_(0.3 * torch.randn(w.shape, generator=g))


def test_config_is_validated_with_one_line_errors():
    with pytest.raises(UserError, match="num scales 5 does not fit image size 32"):
        model_config("hierarchical_vae", image_size=32, num_scales=5)
    with pytest.raises(UserError, match="width must be >= 1"):
        model_config("hierarchical_vae", width=0)
    with pytest.raises(UserError, match="unknown likelihood"):
        model_config("hierarchical_vae", likelihood="poisson")
    assert model_config("hierarchical_vae").resolutions == [4, 8, 16]
    assert model_config("hierarchical_vae", image_size=32).resolutions == [2, 4, 8]
    assert model_config("hierarchical_vae", image_size=32, stem_stride=2).resolutions == [4, 8, 16]
    with pytest.raises(UserError, match="stem stride must be 2 or 4"):
        model_config("hierarchical_vae", stem_stride=3)
    assert model_config("hierarchical_vae", image_size=32, stem_stride=2, num_scales=5).resolutions[0] == 1
    with pytest.raises(UserError, match="num scales 6 does not fit image size 32: at most 5"):
        model_config("hierarchical_vae", image_size=32, stem_stride=2, num_scales=6)


def test_stem_stride_2_puts_the_finest_latents_at_half_the_image_side():
    m = tiny(stem_stride=2)
    x = images()
    arrays = m.encode(x).arrays()
    assert [tuple(arrays[f"group{i}_mean"].shape[1:]) for i in range(4)] == [(2, 8, 8)] * 2 + [(2, 16, 16)] * 2
    assert m.reconstruct(x).shape == x.shape and m.sample(2, generator=torch.Generator().manual_seed(0)).shape == (
        2, 1, SIZE, SIZE)
    torch.testing.assert_close(m.decode(m.encode(x).mode()), m.reconstruct(x))
    # the default layout is unchanged, so runs trained before the option existed still load
    assert [k for k in tiny().state_dict() if k.startswith(("stem", "head"))] == [
        k for k in tiny(stem_stride=4).state_dict() if k.startswith(("stem", "head"))]


def test_latent_layout_and_decode_of_encode_is_reconstruct():
    m = tiny()
    x = images()
    enc = m.encode(x)
    arrays = enc.arrays()
    assert sorted(arrays) == sorted(f"group{i}_{k}" for i in range(4) for k in ("mean", "logvar"))
    assert [tuple(arrays[f"group{i}_mean"].shape[1:]) for i in range(4)] == [(2, 4, 4)] * 2 + [(2, 8, 8)] * 2
    z = enc.mode()
    assert z.shape == (4, m.latent_size) == (4, 2 * 2 * (16 + 64))
    with torch.no_grad():
        assert torch.equal(m.decode(z), m.reconstruct(x))
        assert torch.equal(m.reconstruct(x), m.reconstruct(x))  # the posterior-mean path, bit for bit


def test_total_kl_is_the_sum_of_group_kls_and_matches_monte_carlo():
    m = tiny()
    perturb_(m)
    x = images(2)
    with torch.no_grad():
        terms = m.validation_terms(x, None, torch.Generator().manual_seed(0))
        groups = torch.stack([terms[f"kl_g{i}"] for i in range(4)], 1)
        assert torch.allclose(terms["kl"], groups.sum(1))
        assert torch.allclose(terms["loss"], terms["rec"].double() + terms["kl"].double())
        assert (groups > 0.1).all()  # not the vacuous q = p
        # E_q[log q(z|x) - log p(z)] by Monte Carlo over the whole hierarchy (each group given its sampled
        # parents) equals the expectation of the sum of the closed-form per-group KLs
        lw = m.log_weights(x, k=4000, generator=torch.Generator().manual_seed(1), max_decode=4000)
    mc = -lw.log_ratio  # (K, B)
    err = 4 * mc.std(0) / math.sqrt(mc.shape[0])
    assert ((mc.mean(0) - lw.kl).abs() < err).all(), (mc.mean(0), lw.kl, err)
    # the top group's KL has no parent: its closed form is exact, the same in every draw
    out = m(x.repeat(3, 1, 1, 1), sample=True, generator=torch.Generator().manual_seed(2))
    top = out.kl()[:, 0].view(3, 2)
    assert torch.allclose(top[0], top[1]) and torch.allclose(top[0], top[2])


def test_importance_weights_estimate_the_elbo_of_the_training_path():
    """log_weights (chunked, sample-major) against independent draws through another code path: per image,
    -E[log_ratio] is the closed-form KL of the hierarchy, and -E[log_w] the negative ELBO that the training
    and validation pass computes (rec + the groups' KLs), each within four standard errors."""
    m = tiny()
    perturb_(m)
    x, k = images(3), 200
    with torch.no_grad():
        lw = m.log_weights(x, k=k, generator=torch.Generator().manual_seed(0), max_decode=48)  # chunks of 16
        val = m.validation_terms(x.repeat(k, 1, 1, 1), None, torch.Generator().manual_seed(1))
    assert lw.log_px.shape == lw.log_ratio.shape == (k, 3) and lw.log_px.dtype == torch.float64
    ratio, neg_w = -lw.log_ratio, -lw.log_w  # (K, B)
    loss, kl = val["loss"].view(k, 3).double(), val["kl"].view(k, 3).double()  # (K, B), image i at [:, i]
    assert (lw.kl > 1.0).all()  # the posteriors differ from the priors: there is something to get wrong
    se = ratio.std(0) / math.sqrt(k) + kl.std(0) / math.sqrt(k)
    assert ((ratio.mean(0) - lw.kl).abs() < 4 * se).all()
    se = torch.sqrt(neg_w.var(0) / k + loss.var(0) / k)
    assert ((neg_w.mean(0) - loss.mean(0)).abs() < 4 * se).all()
    assert ((lw.neg_elbo() - loss.mean(0)).abs() < 4 * se).all()


def test_sampling_is_deterministic_at_a_fixed_seed_and_temperature():
    m = tiny()
    with torch.no_grad():
        a = m.sample(3, generator=torch.Generator().manual_seed(5), temperature=0.7)
        b = m.sample(3, generator=torch.Generator().manual_seed(5), temperature=0.7)
        c = m.sample(3, generator=torch.Generator().manual_seed(6), temperature=0.7)
        d = m.sample(3, generator=torch.Generator().manual_seed(5), temperature=1.0)
        z = m.prior_latents(3, torch.Generator().manual_seed(5), 0.7)
        z0 = m.prior_latents(3, torch.Generator().manual_seed(5), 1e-6)
    assert a.shape == (3, 1, SIZE, SIZE) and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)
    assert rel_err(m.decode(z), a) <= network_bound(m)  # prior_latents are what sample decodes (up to rounding)
    # temperature scales every group's prior std: T -> 0 gives the chain of prior means
    assert z0.abs().max() < 5 and not torch.allclose(z, z0)


def test_a_path_between_sampler_latents_keeps_the_lower_groups_noise():
    """``interpolate --sampler``: only the top groups move along the path; the finer groups, drawn from
    p(z_g | z_<g) on the way, get the same noise at every point (else equal ends would give a flickering row)."""
    m = tiny()
    with torch.no_grad():
        top = sampler_latents(m, images(2))  # (2, groups_per_scale * z_channels, r, r)
        still = interpolate_sampled(m, top[0], top[0], 4, generator=torch.Generator().manual_seed(3), precision="fp32")
        path = interpolate_sampled(m, top[0], top[1], 3, generator=torch.Generator().manual_seed(3), precision="fp32")
        end = decode_sampler_latents(m, top[1:], generator=torch.Generator().manual_seed(3))
        other = decode_sampler_latents(m, top[1:], generator=torch.Generator().manual_seed(4))
    assert still.shape == (4, 1, SIZE, SIZE)
    # (1 - t) z + t z is z up to one rounding: the same image up to the network's rounding
    assert all(rel_err(s, still[0]) <= network_bound(m) for s in still[1:])
    assert rel_err(path[-1:], end) <= network_bound(m)
    assert rel_err(other, end) > 10 * network_bound(m)  # the noise matters: the equalities above are not vacuous


def test_generation_runs_the_top_down_modules_of_inference():
    """Shared weights: the modules that sampling calls are a subset of those inference calls, and changing a
    top-down weight changes both paths."""
    m = tiny()
    x = images(2)
    called: dict[str, set[str]] = {"sample": set(), "infer": set()}
    mode = ["infer"]
    hooks = [mod.register_forward_hook(lambda mod_, i, o, n=name: called[mode[0]].add(n))
             for name, mod in m.named_modules() if name]
    with torch.no_grad():
        m(x, sample=True, generator=torch.Generator().manual_seed(0))
        mode[0] = "sample"
        m.sample(2, generator=torch.Generator().manual_seed(0))
    for h in hooks:
        h.remove()
    assert called["sample"] <= called["infer"]
    assert {"groups.0.prior", "groups.3.cell", "head"} <= called["sample"]
    assert not any(n.startswith(("stem", "encoder")) or ".posterior" in n for n in called["sample"])
    with torch.no_grad():
        s0, r0 = m.sample(2, generator=torch.Generator().manual_seed(0)), m.reconstruct(x)
        m.groups[2].cell.body[4].weight.add_(0.5)  # a top-down weight below the top group
        s1, r1 = m.sample(2, generator=torch.Generator().manual_seed(0)), m.reconstruct(x)
    assert not torch.equal(s0, s1) and not torch.equal(r0, r1)


def test_bf16_autocast_forward_backward_is_finite_with_fp32_kl_and_likelihood():
    m = tiny(kl_schedule="linear", warmup_epochs=2.0).train()
    perturb_(m)
    x = images(8)
    ctx = StepContext(1, 0, 0.5, TrainConfig(), torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m.training_steps()[0].run(m.trained_modules(), x, None, ctx)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.terms["rec"].dtype == torch.float32
    assert out.terms["kl_g0"].dtype == torch.float32 and out.terms["loss"].dtype == torch.float64
    assert float(out.terms["beta"]) == pytest.approx(0.25)
    grads = [p.grad for p in m.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)  # every parameter is trained


def test_kl_balancing_weights_average_one_and_favour_small_informative_groups():
    kl = torch.tensor([[1.0, 10.0], [3.0, 10.0]])  # group 0 carries 2 nats, group 1 10 nats
    alpha = torch.tensor([1.0, 1.0])
    out = balanced_kl(kl, alpha)
    # equal sizes: weights proportional to each group's share, normalised to mean 1
    coeff = torch.tensor([2.01, 10.01]) / torch.tensor([2.01, 10.01]).mean()
    assert torch.allclose(out, (kl * coeff).sum(1))
    # a 4x larger group with the same share is pushed 4x less
    big = balanced_kl(torch.tensor([[5.0, 5.0]]), torch.tensor([1.0, 4.0]))
    assert torch.allclose(big, torch.tensor([5.0 * 1.6 + 5.0 * 0.4]))


def test_trainer_skips_updates_whose_gradient_norm_explodes(tmp_path):
    """skip_threshold tiny: every update is skipped (weights unchanged) and counted; 0: none is."""
    from medivae.data import ImageSet
    from medivae.runfolder.config import DataConfig, RunConfig
    from medivae.train.trainer import Trainer

    def fit(threshold):
        torch.manual_seed(0)
        cfg = model_config("hierarchical_vae", image_size=SIZE, width=8, z_channels=2, num_scales=2,
                           groups_per_scale=1, skip_threshold=threshold)
        run = RunConfig(data=DataConfig(image_size=SIZE), model=cfg,
                        train=TrainConfig(epochs=1, batch_size=8, precision="fp32", num_threads=1))
        model = build_model(cfg)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        trainer = Trainer(run, model, torch.device("cpu"), tmp_path / str(threshold), progress=False)
        trainer.verbose = False
        imgs = (images(16) * 255).round().to(torch.uint8).numpy()
        split = ImageSet(imgs, torch.zeros(16, dtype=torch.long).numpy() - 1)
        terms = trainer.train_epoch(split, imgs, 1)
        changed = any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
        return terms, changed

    terms, changed = fit(1e-9)
    assert terms["grad_skipped"] == 1.0 and terms["grad_norm"] > 0 and not changed
    terms, changed = fit(1e9)
    assert terms["grad_skipped"] == 0.0 and changed
