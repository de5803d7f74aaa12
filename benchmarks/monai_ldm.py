"""MONAI's 2D latent diffusion pipeline as its tutorial trains it, with a wall-clock budget instead of epochs.

The tutorial is ``generation/2d_ldm/2d_ldm_tutorial.ipynb`` in Project-MONAI/tutorials (MONAI >= 1.4, where
the generative networks live in ``monai.networks.nets``), which trains on MedNIST Hand at 64 px:

- stage 1: ``AutoencoderKL`` (channels 128, 128, 256; latent 3 channels at a quarter of the image side; 2 residual
  blocks; no attention), loss L1 + 1e-6 · KL (summed over latent elements, averaged over the batch); from the
  end of a warm-up (10 of its 100 epochs) a ``PatchDiscriminator`` (3 layers, 64 channels) with the least-squares
  ``PatchAdversarialLoss`` at weight 0.01 on both sides; Adam 1e-4 (autoencoder) and 5e-4 (discriminator);
- stage 2: ``DiffusionModelUNet`` (channels 128, 256, 512, attention at the two deeper levels) learning the noise
  of ``DDPMScheduler(1000 steps, linear betas 0.0015-0.0195)`` on latents scaled by 1 / std of one training
  batch's latents (``LatentDiffusionInferer``), Adam 1e-4, MSE; batch 64 throughout.

What differs here, and why:

- no perceptual loss (``PerceptualLoss`` with AlexNet, weight 0.001): it downloads weights, which nothing in
  this project may do;
- no ``RandAffined`` augmentation: both arms of the benchmark train on the same images as they are;
- bf16 autocast where the CPU has native bf16 (medivae's rule, ``runtime.device.autocast_dtype``) instead of
  fp16 autocast on CUDA;
- each stage stops at its share of a wall-clock budget instead of after 100 and 200 epochs; the tutorial's
  stated times (about 55 and 80 minutes on its GPU) give the shares, and the adversarial warm-up is the first
  10 % of the autoencoder's seconds;
- stage 2 does not encode each batch a second time: the notebook does so only to get the noise's shape;
- sampling is DDIM (``DDIMScheduler`` on the trained schedule, ``clip_sample`` as in the tutorial's scheduler)
  in ``sampling_steps`` steps instead of 1000 DDPM steps, in fp32;
- ``size="cpu"`` divides every channel width (and the group-norm groups, attention head widths) by 4: at the
  tutorial's widths a 2-core CPU fits only a few dozen optimizer steps of each network in 10 minutes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

TUTORIAL_MINUTES = {"autoencoder": 55.0, "unet": 80.0}  # the notebook's stated training times
AE_SHARE = TUTORIAL_MINUTES["autoencoder"] / sum(TUTORIAL_MINUTES.values())
WARM_UP = 0.1  # autoencoder_warm_up_n_epochs / max_epochs = 10 / 100
BATCH = 64
SIZES = {"tutorial": 1, "cpu": 4}  # channel width divisor


@dataclass(frozen=True)
class Schedule:
    timesteps: int = 1000
    beta_start: float = 0.0015
    beta_end: float = 0.0195

    def kwargs(self) -> dict:
        return dict(num_train_timesteps=self.timesteps, schedule="linear_beta", beta_start=self.beta_start,
                    beta_end=self.beta_end)


def networks(size: str = "cpu") -> dict[str, torch.nn.Module]:
    """The tutorial's three networks, every width divided by ``SIZES[size]``."""
    from monai.networks.nets import AutoencoderKL, DiffusionModelUNet, PatchDiscriminator

    d = SIZES[size]
    groups = 32 // d
    ae = AutoencoderKL(spatial_dims=2, in_channels=1, out_channels=1, channels=(128 // d, 128 // d, 256 // d),
                       latent_channels=3, num_res_blocks=2, attention_levels=(False, False, False),
                       with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False, norm_num_groups=groups)
    disc = PatchDiscriminator(spatial_dims=2, num_layers_d=3, channels=64 // d, in_channels=1, out_channels=1)
    unet = DiffusionModelUNet(spatial_dims=2, in_channels=3, out_channels=3, num_res_blocks=2,
                              channels=(128 // d, 256 // d, 512 // d), attention_levels=(False, True, True),
                              num_head_channels=(0, 256 // d, 512 // d), norm_num_groups=groups)
    return {"autoencoder": ae, "discriminator": disc, "unet": unet}


def batches(images: np.ndarray, rng: np.random.Generator):
    """Endless shuffled epochs of float (B, 1, H, W) in [0, 1] from uint8 (N, 1, H, W)."""
    while True:
        order = rng.permutation(len(images))
        for i in range(0, len(order), BATCH):
            yield torch.from_numpy(np.asarray(images[np.sort(order[i : i + BATCH])], dtype=np.float32) / 255.0)


def _autocast(dtype):
    return torch.autocast("cpu", dtype=dtype, enabled=dtype is not None)


class _Clock:
    """Wall and process CPU seconds since it started."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def seconds(self) -> float:
        return time.perf_counter() - self.wall

    def record(self, **extra) -> dict:
        return {"seconds": round(self.seconds(), 2), "cpu_seconds": round(time.process_time() - self.cpu, 2),
                **extra}


def _kl(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) summed over latent elements, averaged over the batch."""
    kl = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2)) - 1).sum(dim=(1, 2, 3))
    return kl.mean()


def train_autoencoder(nets: dict, images: np.ndarray, seconds: float, rng, dtype=None,
                      kl_weight: float = 1e-6, adv_weight: float = 0.01) -> dict:
    """Stage 1 for ``seconds`` of wall clock (checked before each step): {seconds, cpu_seconds, steps, ...}."""
    from monai.losses.adversarial_loss import PatchAdversarialLoss

    ae, disc = nets["autoencoder"].train(), nets["discriminator"].train()
    opt_g = torch.optim.Adam(ae.parameters(), lr=1e-4)
    opt_d = torch.optim.Adam(disc.parameters(), lr=5e-4)
    adv = PatchAdversarialLoss(criterion="least_squares")
    clock, steps, adv_steps, l1 = _Clock(), 0, 0, float("nan")
    for x in batches(images, rng):
        elapsed = clock.seconds()
        if elapsed >= seconds:
            break
        adversarial = elapsed >= WARM_UP * seconds
        opt_g.zero_grad(set_to_none=True)
        with _autocast(dtype):
            recon, mu, sigma = ae(x)
            rec = F.l1_loss(recon.float(), x)
            loss = rec + kl_weight * _kl(mu.float(), sigma.float())
            if adversarial:
                loss = loss + adv_weight * adv(disc(recon.contiguous().float())[-1], target_is_real=True,
                                               for_discriminator=False)
        loss.backward()
        opt_g.step()
        if adversarial:
            opt_d.zero_grad(set_to_none=True)
            with _autocast(dtype):
                fake = adv(disc(recon.contiguous().detach())[-1], target_is_real=False, for_discriminator=True)
                real = adv(disc(x)[-1], target_is_real=True, for_discriminator=True)
                loss_d = adv_weight * (fake + real) * 0.5
            loss_d.backward()
            opt_d.step()
            adv_steps += 1
        steps, l1 = steps + 1, float(rec.detach())
    return clock.record(budget=round(seconds, 2), steps=steps, adversarial_steps=adv_steps,
                        epochs=round(steps * BATCH / len(images), 3), last_l1=l1)


@torch.no_grad()
def scale_factor(ae, images: np.ndarray, rng) -> float:
    """1 / std of the latents of one training batch (Rombach et al. 2022, sec. 4.3.2), as the tutorial sets it."""
    ae.eval()
    return float(1.0 / ae.encode_stage_2_inputs(next(batches(images, rng))).std())


def train_unet(nets: dict, images: np.ndarray, seconds: float, rng, generator: torch.Generator, dtype=None,
               schedule: Schedule = Schedule()) -> tuple[dict, object]:
    """Stage 2 for ``seconds`` of wall clock: (its record, the LatentDiffusionInferer to sample with)."""
    from monai.inferers import LatentDiffusionInferer
    from monai.networks.schedulers import DDPMScheduler

    ae, unet = nets["autoencoder"].eval(), nets["unet"].train()
    scale = scale_factor(ae, images, rng)
    inferer = LatentDiffusionInferer(DDPMScheduler(**schedule.kwargs()), scale_factor=scale)
    opt = torch.optim.Adam(unet.parameters(), lr=1e-4)
    side = images.shape[-1] // 4  # two stride-2 stages of the autoencoder
    clock, steps, mse = _Clock(), 0, float("nan")
    for x in batches(images, rng):
        if clock.seconds() >= seconds:
            break
        noise = torch.randn((len(x), 3, side, side), generator=generator)
        t = torch.randint(0, schedule.timesteps, (len(x),), generator=generator)
        opt.zero_grad(set_to_none=True)
        with _autocast(dtype):
            pred = inferer(inputs=x, autoencoder_model=ae, diffusion_model=unet, noise=noise, timesteps=t)
            loss = F.mse_loss(pred.float(), noise)
        loss.backward()
        opt.step()
        steps, mse = steps + 1, float(loss.detach())
    record = clock.record(budget=round(seconds, 2), steps=steps, epochs=round(steps * BATCH / len(images), 3),
                          last_mse=mse, scale_factor=scale)
    return record, inferer


@torch.no_grad()
def sample(nets: dict, inferer, n: int, side: int, generator: torch.Generator, steps: int = 50,
           schedule: Schedule = Schedule(), batch: int = 100) -> tuple[np.ndarray, dict]:
    """n images, uint8 (n, 1, side, side), by DDIM in ``steps`` steps; and {seconds, cpu_seconds, images_per_s}."""
    from monai.networks.schedulers import DDIMScheduler

    ddim = DDIMScheduler(**schedule.kwargs())
    ddim.set_timesteps(num_inference_steps=steps)
    ae, unet = nets["autoencoder"].eval(), nets["unet"].eval()
    clock, out = _Clock(), []
    noise = torch.randn((n, 3, side // 4, side // 4), generator=generator)
    for i in range(0, n, batch):
        x = inferer.sample(input_noise=noise[i : i + batch], autoencoder_model=ae, diffusion_model=unet,
                           scheduler=ddim, verbose=False)
        out.append((x.float().clamp(0, 1) * 255).round().to(torch.uint8).numpy())
    rec = clock.record(steps=steps)
    rec["images_per_s"] = round(n / max(rec["seconds"], 1e-9), 2)
    return np.concatenate(out), rec


def train_and_sample(images: np.ndarray, seconds: float, n: int, seed: int, size: str = "cpu",
                     sampling_steps: int = 50, dtype=None, ae_share: float = AE_SHARE) -> tuple[np.ndarray, dict]:
    """The whole pipeline on uint8 training images (N, 1, H, W): ``ae_share`` of ``seconds`` for stage 1, the
    rest for stage 2, then n samples. -> (uint8 samples (n, 1, H, W), a JSON-ready record)."""
    from medivae.runtime.seeding import numpy_rng, seed_everything, torch_generator

    seed_everything(seed)  # network initialisation and the autoencoder's posterior draws (global RNG)
    nets = networks(size)
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in nets.items()}
    ae = train_autoencoder(nets, images, ae_share * seconds, numpy_rng(seed, "monai", "ae"), dtype)
    left = max(seconds - ae["seconds"], 0.0)  # what stage 1 overran comes off stage 2: the total stays fixed
    unet, inferer = train_unet(nets, images, left, numpy_rng(seed, "monai", "unet"),
                               torch_generator(seed, "monai", "unet-noise"), dtype)
    samples, sampling = sample(nets, inferer, n, images.shape[-1], torch_generator(seed, "monai", "samples"),
                               sampling_steps)
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
    return samples, {"size": size, "parameters": params, "precision": precision, "autoencoder": ae,
                     "unet": unet, "train_seconds": round(ae["seconds"] + unet["seconds"], 2),
                     "train_cpu_seconds": round(ae["cpu_seconds"] + unet["cpu_seconds"], 2), "sampling": sampling}
