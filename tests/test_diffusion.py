"""The latent diffusion core (medivae.models.diffusion): schedule, forward process, denoisers, DDIM,
guidance, healing, standardisation, save/load and refusals. Tiny widths and few steps throughout."""

from __future__ import annotations

import json
import math

import pytest
import torch

from medivae.models.diffusion import (
    NULL_CLASS,
    DiffusionSpec,
    LatentStandardiser,
    NoiseSchedule,
    build_denoiser,
    ddim_sample,
    ddim_timesteps,
    diffusion_loss,
    ema_model,
    guided_noise,
    heal,
)
from medivae.runtime.device import one_thread
from medivae.runtime.errors import UserError

from tolerance import gamma, mean_bound, network_bound, rel_err, std_rel_bound, unit_roundoff


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices: torch's threads only cost time on a busy machine."""
    with one_thread():
        yield


def test_cosine_schedule_is_strictly_decreasing_and_in_the_open_unit_interval():
    ab = NoiseSchedule(1000).alpha_bar
    assert ab.shape == (1001,) and ab[0] == 1.0
    assert bool((ab[1:] < ab[:-1]).all())
    assert bool((ab[1:] > 0).all()) and bool((ab[1:] < 1).all())
    # the cosine form: half the signal variance is gone close to t = T/2 (Nichol & Dhariwal's fig. 3)
    assert 0.45 < float(ab[500]) < 0.55


def test_q_sample_has_the_forward_process_mean_and_variance():
    sched, n, c = NoiseSchedule(100), 40_000, 2.0
    g = torch.Generator().manual_seed(0)
    z0 = torch.full((n, 1), c)
    for step in (0, 10, 50, 100):
        t = torch.full((n,), step, dtype=torch.long)
        zt = sched.q_sample(z0, t, torch.randn(n, 1, generator=g))[:, 0].double()
        ab = float(sched.alpha_bar[step])
        var = 1 - ab
        if step == 0:
            assert torch.equal(zt.float(), z0[:, 0])
            continue
        # 5 standard errors of a sample mean (σ²/n) and of a sample variance (2σ⁴/n)
        assert abs(float(zt.mean()) - math.sqrt(ab) * c) < 5 * math.sqrt(var / n)
        assert abs(float(zt.var()) - var) < 5 * math.sqrt(2 / n) * var


@pytest.mark.parametrize("shape", [(6,), (4, 16, 16), (2, 5, 7), (3, 8, 8)])
def test_denoiser_maps_latents_to_noise_of_the_same_shape_with_and_without_classes(shape):
    spec = DiffusionSpec(shape, num_classes=3, width=16)
    den = build_denoiser(spec)
    z = torch.randn(4, *shape)
    t = torch.tensor([1, 2, 500, 1000])
    for y in (None, torch.tensor([0, 1, 2, NULL_CLASS])):
        out = den(z, t, y)
        assert out.shape == z.shape and bool(torch.isfinite(out).all())


def test_null_class_is_the_same_as_no_class():
    den = build_denoiser(DiffusionSpec((5,), num_classes=2, width=16))
    torch.nn.init.normal_(den.out[-1].weight)  # a non-zero output layer, so the classes matter
    z, t = torch.randn(3, 5), torch.tensor([3, 40, 900])
    assert torch.equal(den(z, t, None), den(z, t, torch.full((3,), NULL_CLASS)))
    assert not torch.equal(den(z, t, None), den(z, t, torch.zeros(3, dtype=torch.long)))


def test_loss_is_per_sample_and_one_step_changes_the_weights():
    spec = DiffusionSpec((2, 8, 8), num_classes=2, width=8, timesteps=50)
    den, sched = build_denoiser(spec), NoiseSchedule(50)
    z0, y = torch.randn(5, 2, 8, 8), torch.tensor([0, 1, 0, 1, 1])
    loss = diffusion_loss(den, sched, z0, y, torch.Generator().manual_seed(0))
    assert loss.shape == (5,) and bool((loss > 0).all())
    before = [p.detach().clone() for p in den.parameters()]
    opt = torch.optim.SGD(den.parameters(), lr=0.1)
    loss.mean().backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, den.parameters(), strict=True))


def test_loss_draws_depend_only_on_the_generator():
    spec = DiffusionSpec((4,), width=16, timesteps=20)
    den, sched, z0 = build_denoiser(spec), NoiseSchedule(20), torch.randn(8, 4)
    a = diffusion_loss(den, sched, z0, generator=torch.Generator().manual_seed(3))
    b = diffusion_loss(den, sched, z0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_ddim_update_on_the_untrained_denoiser_is_a_product_of_cosines():
    """Zero output layer -> v = 0 -> ε = b_t z_t and ẑ0 = a_t z_t (a = cos θ, b = sin θ): one DDIM step from
    t to s gives a_s a_t z + b_s b_t z = cos(θ_t - θ_s) z, so the whole chain scales z_T by Π cos(Δθ)."""
    den, sched = build_denoiser(DiffusionSpec((3,), width=8, timesteps=100)), NoiseSchedule(100)
    z = ddim_sample(den, sched, 7, steps=10, generator=torch.Generator().manual_seed(0))
    zT = torch.randn(7, 3, generator=torch.Generator().manual_seed(0))
    theta = torch.arccos(sched.alpha_bar.sqrt())
    ts = ddim_timesteps(100, 10)
    scale = math.prod(math.cos(float(theta[t] - theta[s])) for t, s in zip(ts[:-1], ts[1:], strict=True))
    assert 0.5 < scale < 0.99  # a real shrink, so the check below tells the steps apart
    # elementwise float32 arithmetic (v = 0 exactly): each step rounds z at most 7 times (the float32 factors
    # a and b, four products, a sum), 10 steps; one step more or less changes z by 1 - cos(Δθ), far more
    torch.testing.assert_close(z, scale * zT, rtol=gamma(7 * 10 + 1), atol=0)


# --- a denoiser fitted to a two-point latent distribution ------------------------------------------------
POINTS = torch.tensor([[1.5, -0.5], [-1.0, 2.0]])
P_FIRST = 0.3


def _train_two_point(conditional: bool, seed: int = 0, steps: int = 500):
    g = torch.Generator().manual_seed(seed)
    n = 2048
    y = (torch.rand(n, generator=g) > P_FIRST).long()  # class 0: the first point, probability 0.3
    z = POINTS[y]
    std = LatentStandardiser.fit(z)
    u = std.encode(z)
    torch.manual_seed(seed)
    spec = DiffusionSpec((2,), num_classes=2 if conditional else 0, width=32, timesteps=200)
    den, sched = build_denoiser(spec), NoiseSchedule(200)
    ema = ema_model(den, decay=0.99)
    opt = torch.optim.Adam(den.parameters(), lr=2e-3)
    with one_thread():  # module fixtures start before the autouse one
        for _ in range(steps):
            idx = torch.randint(0, n, (128,), generator=g)
            loss = diffusion_loss(den, sched, u[idx], y[idx] if conditional else None, g).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            ema.update_parameters(den)
    return ema.module.eval(), sched, std


@pytest.fixture(scope="module")
def two_point():
    return _train_two_point(conditional=False)


@pytest.fixture(scope="module")
def two_point_conditional():
    return _train_two_point(conditional=True)


def _nearest(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index of the nearest point (n,), distance to it (n,))."""
    d = torch.cdist(z, POINTS)
    return d.argmin(1), d.min(1).values


def test_ddim_reproduces_a_two_point_distribution(two_point):
    den, sched, std = two_point
    n = 2000
    z = std.decode(ddim_sample(den, sched, n, steps=50, generator=torch.Generator().manual_seed(1)))
    which, dist = _nearest(z)
    spread = float(POINTS.diff(dim=0).norm())
    assert float((dist < 0.1 * spread).float().mean()) > 0.95  # almost every draw lands on a point
    # the first point's share: Binomial(n, 0.3) plus the training set's own Binomial(2048, 0.3) error
    se = math.sqrt(P_FIRST * (1 - P_FIRST) * (1 / n + 1 / 2048))
    assert abs(float((which == 0).float().mean()) - P_FIRST) < 5 * se
    # hence the mean and variance of the distribution
    mean = P_FIRST * POINTS[0] + (1 - P_FIRST) * POINTS[1]
    var = P_FIRST * (1 - P_FIRST) * (POINTS[0] - POINTS[1]) ** 2
    torch.testing.assert_close(z.mean(0), mean, atol=float(5 * se * spread + 0.05), rtol=0)
    torch.testing.assert_close(z.var(0), var, rtol=0.15, atol=0.05)


def test_ddim_with_a_fixed_generator_is_deterministic_and_batching_does_not_matter(two_point):
    den, sched, _ = two_point
    a = ddim_sample(den, sched, 50, steps=8, generator=torch.Generator().manual_seed(5))
    b = ddim_sample(den, sched, 50, steps=8, generator=torch.Generator().manual_seed(5))
    c = ddim_sample(den, sched, 50, steps=8, generator=torch.Generator().manual_seed(6))
    d = ddim_sample(den, sched, 50, steps=8, generator=torch.Generator().manual_seed(5), batch=7)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # another batch shape may sum in another order: each of the 8 denoiser calls within its rounding bound,
    # for a and for d (first order, norm-wise); a batch that mixed up rows or noise moves z by O(1)
    assert rel_err(d, a) <= 2 * 8 * network_bound(den)


def test_classes_pick_their_point_and_guidance_zero_is_the_conditional_model(two_point_conditional):
    den, sched, std = two_point_conditional
    n = 400
    y = torch.arange(2).repeat_interleave(n // 2)
    for w in (0.0, 2.0):
        z = std.decode(ddim_sample(den, sched, n, y=y, guidance=w, steps=25,
                                   generator=torch.Generator().manual_seed(2)))
        assert float((_nearest(z)[0] == y).float().mean()) > 0.97
    zt, t = torch.randn(6, 2), torch.tensor([5, 50, 100, 150, 199, 200])
    yc = torch.tensor([0, 1, 0, 1, 0, 1])
    assert torch.equal(guided_noise(den, zt, t, yc, 0.0), den(zt, t, yc).float())
    cond, uncond = den(zt, t, yc), den(zt, t, None)
    want = uncond + 2.5 * (cond - uncond)
    # guided_noise runs both halves as one batch of 12, here two of 6: each output within the network's
    # rounding bound of the exact one, twice, weighted by the guidance's 3.5 and 2.5 (norm-wise)
    bound = 2 * network_bound(den) * (3.5 * cond.norm() + 2.5 * uncond.norm()) / want.norm()
    assert rel_err(guided_noise(den, zt, t, yc, 1.5), want) <= bound


def test_heal_from_zero_is_the_identity_and_from_a_little_noise_stays_close(two_point):
    den, sched, std = two_point
    u = std.encode(POINTS[[0, 1, 1, 0]])
    assert torch.equal(heal(den, sched, u, 0), u)
    healed = heal(den, sched, u, 20, steps=5, generator=torch.Generator().manual_seed(0))
    assert healed.shape == u.shape
    assert float((std.decode(healed) - POINTS[[0, 1, 1, 0]]).norm(dim=1).max()) < 0.3
    with pytest.raises(UserError, match="t_start"):
        heal(den, sched, u, 201)


# --- standardisation, save/load, refusals ----------------------------------------------------------------
def test_standardiser_is_per_dimension_or_per_channel_and_inverts():
    g = torch.Generator().manual_seed(0)
    flat = torch.randn(500, 3, generator=g) * torch.tensor([1.0, 5.0, 0.1]) + torch.tensor([2.0, -1.0, 0.0])
    s = LatentStandardiser.fit(flat)
    u = s.encode(flat)
    # mean 0 and std 1 up to the rounding of the fitted mean and std and of those of u (two roundings each)
    r = unit_roundoff(torch.float32)
    assert (u.mean(0).abs() <= mean_bound(flat, 0) / s.std + mean_bound(u, 0) + 2 * r * u.abs().mean(0)).all()
    assert ((u.std(0) - 1).abs() <= std_rel_bound(flat, 0) + std_rel_bound(u, 0) + 2 * r).all()
    # (z - m) / s * s + m: four roundings, each within u of at most |z| + |m|
    assert ((s.decode(u) - flat).abs() <= 4 * r * (flat.abs() + s.mean.abs())).all()
    grid = torch.randn(20, 2, 4, 4, generator=g) * torch.tensor([3.0, 0.5])[:, None, None]
    sg = LatentStandardiser.fit(grid)
    assert sg.mean.shape == (2, 1, 1)
    rows, ug = grid.transpose(0, 1).reshape(2, -1), sg.encode(grid).transpose(0, 1).reshape(2, -1)
    assert ((ug.std(1) - 1).abs() <= std_rel_bound(rows, 1) + std_rel_bound(ug, 1) + 2 * r).all()
    back = LatentStandardiser.from_tensors(sg.tensors())
    assert torch.equal(back.encode(grid), sg.encode(grid))


@pytest.mark.parametrize("shape", [(4,), (2, 8, 8)])
def test_save_load_round_trip_gives_the_same_samples(shape):
    spec = DiffusionSpec(shape, num_classes=2, width=8, timesteps=30)
    den = build_denoiser(spec)
    for p in den.parameters():
        torch.nn.init.normal_(p, std=0.05)
    spec2 = DiffusionSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert spec2 == spec
    den2 = build_denoiser(spec2)
    den2.load_state_dict(den.state_dict())
    y = torch.tensor([0, 1, 1])
    a = ddim_sample(den, NoiseSchedule(30), 3, y=y, guidance=1.0, steps=4, generator=torch.Generator().manual_seed(0))
    b = ddim_sample(den2, NoiseSchedule(30), 3, y=y, guidance=1.0, steps=4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


def test_refusals():
    with pytest.raises(UserError, match="latent_shape"):
        DiffusionSpec((3, 4))
    with pytest.raises(UserError, match="timesteps"):
        DiffusionSpec((3,), timesteps=1)
    with pytest.raises(UserError, match="expected keys"):
        DiffusionSpec.from_dict({"latent_shape": [3], "depth": 2})
    den, sched = build_denoiser(DiffusionSpec((3,), width=8, timesteps=10)), NoiseSchedule(10)
    with pytest.raises(UserError, match="sampling-steps"):
        ddim_sample(den, sched, 2, steps=0)
    with pytest.raises(UserError, match="guidance"):
        ddim_sample(den, sched, 2, guidance=1.0)
    with pytest.raises(UserError, match="unconditional"):
        ddim_sample(den, sched, 2, y=torch.tensor([0, 1]))


def test_ddim_timesteps_are_descending_and_end_at_zero():
    assert ddim_timesteps(1000, 4) == [1000, 750, 500, 250, 0]
    assert ddim_timesteps(3, 50) == [3, 2, 1, 0]
    assert ddim_timesteps(10, 1) == [10, 0]


def test_bf16_autocast_sampling_is_close_to_fp32(two_point):
    """The DDIM update stays fp32; only the denoiser runs in bf16. A step from t to s is
    z_s = cos(θ_t - θ_s) z_t - sin(θ_t - θ_s) v, so an error in v (within the network's bf16 bound of fp32's)
    moves z_s by sin(Δθ) times it, and earlier errors shrink by cos(Δθ): to first order the draw moves by at
    most Σ sin(Δθ) times the bound times the scale of v (that of the standardised latent)."""
    den, sched, _ = two_point
    a = ddim_sample(den, sched, 64, steps=10, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        b = ddim_sample(den, sched, 64, steps=10, generator=torch.Generator().manual_seed(0))
    assert b.dtype == torch.float32
    theta = torch.arccos(sched.alpha_bar.double().sqrt())
    ts = ddim_timesteps(200, 10)
    reach = sum(math.sin(float(theta[t] - theta[s])) for t, s in zip(ts[:-1], ts[1:], strict=True))
    bound = reach * network_bound(den, torch.bfloat16) * float(a.norm(dim=1).max())
    # a draw that starts within the rounding's reach of the tie between the two points may end at the other
    # (not first order): few of 64, so the 90th percentile is a first-order draw; other noise moves ~40 % of
    # the draws to the other point, one spread (~3) away
    assert float((a - b).norm(dim=1).quantile(0.9)) <= bound


def test_the_moving_average_averages_the_weights_and_keeps_the_schedule_exact():
    """The EMA's ᾱ is the schedule's, bit for bit, after many updates (an average of a constant drifts by rounding,
    and a checkpoint, which does not store ᾱ, would give a resumed run another one); its weights are the
    warmed-up average: after a copy at the first update, d = min(decay, (1 + n) / (10 + n)) at update n."""
    den = build_denoiser(DiffusionSpec((4,), width=8, timesteps=1000))
    ema = ema_model(den, decay=0.999)
    w = den.inp.weight
    expect = None
    with torch.no_grad():
        for n in range(300):
            w.add_(0.01)
            ema.update_parameters(den)
            d = min(0.999, (1 + n) / (10 + n))
            expect = w.clone() if expect is None else d * expect + (1 - d) * w
    assert torch.equal(ema.module.alpha_bar, NoiseSchedule(1000).alpha_bar.float())
    torch.testing.assert_close(ema.module.inp.weight, expect)


@pytest.mark.parametrize("width", [50, 20, 7])
def test_a_u_net_of_any_width_builds_and_denoises(width):
    """The attention block's heads divide its channels whatever the width (--width 50: 100 channels at 4x4, not
    the 3 heads of 100 // 32); widths that are multiples of 32 keep ch // 32 heads."""
    den = build_denoiser(DiffusionSpec((2, 8, 8), width=width, timesteps=10))
    z = torch.randn(3, 2, 8, 8)
    out = den(z, torch.tensor([1, 5, 10]))
    assert out.shape == z.shape and bool(torch.isfinite(out).all())
    assert build_denoiser(DiffusionSpec((2, 8, 8), width=64, timesteps=10)).mid_attn.attn.num_heads == 4
