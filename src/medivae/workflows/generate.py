"""Images from a trained run for the commands that draw them: samples, interpolation paths, reconstructions,
and the encoded latents of a split."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from medivae.data import to_float
from medivae.models.family import has, require
from medivae.models.inference import encode_mean, interpolate, interpolate_sampled, reconstruct
from medivae.models.samplers import check_options
from medivae.runfolder.run import load_image, load_run
from medivae.runtime.constants import MAX_GRID_IMAGES, MAX_SAMPLES
from medivae.runtime.errors import UserError
from medivae.runtime.images import IMAGE_FORMATS, save_grid, save_png
from medivae.runtime.io import atomic_write_bytes, staged_folder
from medivae.runtime.paths import check_output_file, check_output_folder, given
from medivae.runtime.schema import whole_number
from medivae.runtime.seeding import torch_generator


def sample_target(out, n: int, force: bool = False) -> Path:
    """Where ``sample`` writes n images: a PNG/JPEG grid for at most MAX_GRID_IMAGES, a folder (a name without a
    suffix) for up to MAX_SAMPLES; refused as :mod:`medivae.runtime.paths` says, before any work."""
    whole_number("-n", n, 1, MAX_SAMPLES)
    out = given(out)
    if not out.suffix:
        return check_output_folder(out)
    if n > MAX_GRID_IMAGES:
        raise UserError(f"-n {n}: a grid holds at most {MAX_GRID_IMAGES} images; give --out a folder name without "
                        "a suffix to write one PNG per image")
    return check_output_file(out, force=force, suffixes=tuple(IMAGE_FORMATS))


def sample_run(run_dir, n: int, out: Path, seed: int | None = None, label: str | None = None, device="auto",
               temperature: float = 1.0, sampler: str = "prior", guidance: float = 0.0,
               sampling_steps: int | None = None, progress: bool = True, top_k: int = 0) -> Path:
    """n samples into ``out`` (checked by :func:`sample_target`): one grid, or one PNG per image in a folder,
    drawn and written a batch at a time so memory stays at one batch; a folder appears whole, or not at all."""
    run = load_run(run_dir, device=device)
    batches = run.sample_batches(n, label, seed, temperature, sampler=sampler, guidance=guidance,
                                 sampling_steps=sampling_steps, progress=progress, top_k=top_k)  # checked first
    if out.suffix:
        return save_grid(torch.cat(list(batches)), out)
    i = 0
    with staged_folder(out) as stage:  # every image or none: a stop midway leaves no half-written folder
        for batch in batches:
            for img in (batch * 255).round().clamp(0, 255).to(torch.uint8).numpy():  # (C, H, W)
                save_png(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0), stage / f"{i:06d}.png")
                i += 1
    return out


def interpolate_run(
    run_dir, out, steps: int = 8, mode: str = "linear", src=None, dst=None, seed=None, device="auto",
    label: str | None = None, sampler: str = "prior", guidance: float = 0.0, sampling_steps: int | None = None,
) -> Path:
    """A PNG of ``steps`` images along a latent path: between the posterior means of two images (``src``,
    ``dst``) or the two draws of :func:`path_ends` (the prior, or a post-hoc ``sampler`` fitted with
    ``medivae fit-sampler``: "gmm", "flow", "diffusion", whose ``guidance`` and ``sampling_steps`` apply);
    ``mode`` linear or slerp (Gaussian latents)."""
    if (src is None) != (dst is None):
        raise UserError("give both --from and --to, or neither (then two prior draws are used)")
    if src is not None and sampler != "prior":
        raise UserError(f"--sampler {sampler} draws the end points, which --from/--to make the two images' "
                        "encodings: give one or the other")
    run = load_run(run_dir, device=device)
    model, cfg, dev = run.model, run.config, run.device
    require(model, "latent", "interpolate")
    if mode == "slerp":
        require(model, "gaussian_latent", "interpolate --mode slerp")
    check_options(sampler, guidance, sampling_steps, has(model, "conditional"))
    k = run.label_index(label)
    if src is None and sampler == "prior":
        require(model, "sample", "interpolate (between prior draws; give --from and --to, or --sampler, instead)")
    latent = run.latent_sampler(sampler, "interpolate")  # refused here unless fitted to these weights
    if has(model, "conditional") and k is None:
        raise UserError(f"this run is conditional: pass --label, one of {list(cfg.label_names)}")
    if src is not None:
        y = None if k is None else torch.tensor([k], device=dev)
        z0 = encode_mean(model, load_image(src, cfg).to(dev), y)[0]
        z1 = encode_mean(model, load_image(dst, cfg).to(dev), y)[0]
        return save_grid(interpolate(model, z0, z1, steps, mode, dev, k), out, nrow=steps)
    z0, z1 = path_ends(run, latent, seed, k, guidance, sampling_steps)
    if latent is None:
        return save_grid(interpolate(model, z0, z1, steps, mode, dev, k), out, nrow=steps)
    g = torch_generator(cfg.train.seed if seed is None else seed, "interpolate-decode")
    return save_grid(interpolate_sampled(model, z0, z1, steps, mode, k, g), out, nrow=steps)


def path_ends(run, latent=None, seed: int | None = None, label: int | None = None, guidance: float = 0.0,
              sampling_steps: int | None = None) -> torch.Tensor:
    """The two draws (2, ...) an interpolation runs between, seeded by ``seed`` (None: the run's): from the
    family's prior (``latent`` None: latents ``decode`` takes), or from a post-hoc sampler
    (:meth:`Run.latent_sampler`: the family's sampler latents; a diffusion sampler's are its DDIM outputs) of
    class ``label`` for a conditional run."""
    g = torch_generator(run.config.train.seed if seed is None else seed, "interpolate")
    if latent is None:
        return run.model.prior_latents(2, g)
    y = None if label is None else torch.full((2,), int(label), dtype=torch.long)
    with torch.no_grad():
        return latent.sample(2, g, y, guidance=guidance, steps=sampling_steps, precision="auto", device=run.device)


def reconstruct_run(run_dir, data: str | None, out, split: str = "test", n: int = 16, device="auto") -> Path:
    """A PNG of ``n`` images of a split (top row) and their reconstructions (bottom row)."""
    run = load_run(run_dir, device=device)
    s = run.split(split, data)
    k = min(n, len(s))
    x = to_float(s.images[:k], run.device)
    return save_grid(torch.cat([x.cpu(), reconstruct(run.model, x, run.labels(s.labels[:k]))]), out, nrow=k)


def encode(run_dir, out, data: str | None = None, split: str = "test", device: str = "auto") -> dict:
    """Every image of a split through the family's encoder -> ``out`` (.npz): the family's arrays (e.g.
    ``mean``, ``logvar``) plus ``labels`` (N,) and ``label_names``; returns {name: shape}."""
    run = load_run(run_dir, device=device)
    s = run.split(split, data)
    arrays = {k: v.numpy() for k, v in run.encode(s.images, labels=s.labels).items()}
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays, labels=np.asarray(s.labels), label_names=np.array(s.label_names, dtype=str))
    atomic_write_bytes(Path(out), buf.getvalue())
    return {k: tuple(v.shape) for k, v in arrays.items()}
