"""Generation through the family contract, batched and without gradients: samples, latent interpolation,
encodings, reconstructions. PNG grids are in :mod:`medivae.runtime.images`."""

from __future__ import annotations

import torch


def fast_inference(model, precision: str = "auto"):
    """Context for batched inference at training speed: channels_last weights (changes ``model`` in place;
    values are untouched) and, for ``precision="auto"``, bf16 autocast where the hardware does it natively,
    as in training. About 3x the fp32 images/s of sampling and reconstruction on an AVX-512 BF16 CPU
    (benchmarks/bench_train.py); ``precision="fp32"`` gives the exact fp32 numbers."""
    from medivae.runtime.device import autocast, autocast_dtype

    device = next(model.parameters(), torch.empty(0)).device  # a parameterless model runs on the CPU
    model.to(memory_format=torch.channels_last)
    return autocast(device, autocast_dtype(device, precision))


def decode_latents(model, z: torch.Tensor, y=None, batch: int = 256, precision: str = "auto") -> torch.Tensor:
    """The family's ``decode`` of latents z (N, ...) in batches: float (N, C, H, W) in [0, 1] on the CPU."""
    outs = []
    model.eval()
    with torch.no_grad(), fast_inference(model, precision):  # 256 measured faster than 1024 on CPU (cache)
        for i in range(0, len(z), batch):
            yi = None if y is None else y[i : i + batch]
            outs.append(model.decode(z[i : i + batch], yi).float().cpu())
    return torch.cat(outs)


def class_blocks(num_classes: int, n: int) -> torch.Tensor:
    """Class indices (n,) in equal blocks, label order: how a conditional family samples every class."""
    per = -(-n // num_classes)  # ceil
    return torch.arange(num_classes).repeat_interleave(per)[:n]


def decode_sampled(model, z: torch.Tensor, y=None, generator=None, temperature: float = 1.0, batch: int = 256,
                   precision: str = "auto") -> torch.Tensor:
    """The family's ``decode_sampler_latents`` of latents z (N, ...) a post-hoc sampler drew, in batches:
    float (N, C, H, W) in [0, 1] on the CPU."""
    from medivae.models.family import decode_sampler_latents

    device = next(model.parameters()).device
    outs = []
    model.eval()
    with torch.no_grad(), fast_inference(model, precision):
        for i in range(0, len(z), batch):
            yi = None if y is None else y[i : i + batch].to(device)
            zi = z[i : i + batch].to(device)
            outs.append(decode_sampler_latents(model, zi, yi, generator, temperature).float().cpu())
    return torch.cat(outs)


@torch.no_grad()
def encode_sampler_latents(model, x: torch.Tensor, y: torch.Tensor | None = None, batch: int = 256) -> torch.Tensor:
    """The latents a post-hoc sampler models (the family's ``sampler_latents``) of images x (N, C, H, W), in
    batches, fp32: (N, ...) on the CPU."""
    from medivae.models.family import sampler_latents

    model.eval()
    outs = []
    for i in range(0, len(x), batch):
        yi = None if y is None else y[i : i + batch]
        outs.append(sampler_latents(model, x[i : i + batch], yi).float().cpu())
    return torch.cat(outs)


def sample_images(
    model, n: int, generator: torch.Generator, label=None, temperature: float = 1.0, precision: str = "auto",
    batch: int = 256, latent_sampler=None, guidance: float = 0.0, sampling_steps: int | None = None,
    progress: bool = False, top_k: int = 0,
) -> torch.Tensor:
    """n images from the family's ``sample``, in batches: float (n, C, H, W) in [0, 1] on the CPU.
    ``label``: one class index, (n,) indices, or None (a conditional family then gets equal class blocks).
    ``latent_sampler``: a post-hoc sampler (:mod:`medivae.models.samplers`) drawn from instead of the prior;
    ``guidance``, ``sampling_steps``, ``progress``: the diffusion sampler's options; ``top_k`` > 0: a "code_prior"
    family's draws from the ``top_k`` most likely codes at each position."""
    return torch.cat(list(sample_batches(model, n, generator, label, temperature, precision, batch, latent_sampler,
                                         guidance, sampling_steps, progress, top_k)))


def sample_batches(
    model, n: int, generator: torch.Generator, label=None, temperature: float = 1.0, precision: str = "auto",
    batch: int = 256, latent_sampler=None, guidance: float = 0.0, sampling_steps: int | None = None,
    progress: bool = False, top_k: int = 0,
):
    """:func:`sample_images` one batch (b, C, H, W) at a time: the same draws in the same order, and memory for
    one batch of images however large ``n`` is (a post-hoc sampler's latents, far smaller, are drawn at once)."""
    from medivae.models.family import has

    model.eval()
    if top_k and (latent_sampler is not None or not has(model, "code_prior")):
        raise ValueError("top_k is an option of a family's code prior (the \"code_prior\" capability)")
    extra = {"top_k": top_k} if top_k else {}  # the contract's sample() of other families has no top_k
    if has(model, "conditional") and label is None:
        label = class_blocks(model.num_classes, n)
    if latent_sampler is not None:
        y = None if label is None else torch.as_tensor(label).long().expand(n)
        device = next(model.parameters()).device
        with torch.no_grad():
            z = latent_sampler.sample(n, generator, y, temperature, guidance=guidance, steps=sampling_steps,
                                      progress=progress, precision=precision, device=device)
        for i in range(0, n, batch):
            yi = None if y is None else y[i : i + batch]
            yield decode_sampled(model, z[i : i + batch], yi, generator, temperature, batch, precision)
        return
    for i in range(0, n, batch):
        m = min(batch, n - i)
        li = label if label is None or isinstance(label, int) else torch.as_tensor(label)[i : i + m]
        with torch.no_grad(), fast_inference(model, precision):
            yield model.sample(m, li, generator, temperature, **extra).float().cpu()


def slerp(z0: torch.Tensor, z1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation (Shoemake 1985; White 2016 for latent spaces). z: (D,), t: (S,) -> (S, D)."""
    a, b = z0 / z0.norm(), z1 / z1.norm()
    omega = torch.arccos((a * b).sum().clamp(-1.0, 1.0))
    t = t[:, None]
    if omega.abs() < 1e-6:
        return (1 - t) * z0 + t * z1
    so = torch.sin(omega)
    return torch.sin((1 - t) * omega) / so * z0 + torch.sin(t * omega) / so * z1


def interpolate_latents(z0: torch.Tensor, z1: torch.Tensor, steps: int, mode: str = "linear") -> torch.Tensor:
    """``steps`` points from z0 to z1 (any shape; slerp works on the flattened vectors): (steps, *z0.shape)."""
    t = torch.linspace(0, 1, steps, dtype=z0.dtype)
    flat0, flat1 = z0.reshape(-1), z1.reshape(-1)
    path = slerp(flat0, flat1, t) if mode == "slerp" else (1 - t[:, None]) * flat0 + t[:, None] * flat1
    return path.reshape(steps, *z0.shape)


@torch.no_grad()
def interpolate(
    model, z0: torch.Tensor, z1: torch.Tensor, steps: int, mode: str = "linear", device="cpu",
    label: int | None = None,
):
    """Decode ``steps`` points between latents z0 and z1: float (steps, C, H, W).
    ``label``: the class every point is decoded as (conditional models)."""
    z = interpolate_latents(z0.float().cpu(), z1.float().cpu(), steps, mode).to(device)
    y = None if label is None else torch.full((steps,), int(label), dtype=torch.long, device=device)
    return decode_latents(model, z, y)


@torch.no_grad()
def interpolate_sampled(
    model, z0: torch.Tensor, z1: torch.Tensor, steps: int, mode: str = "linear", label: int | None = None,
    generator: torch.Generator | None = None, precision: str = "auto",
) -> torch.Tensor:
    """Decode ``steps`` points between two latents a post-hoc sampler drew (the family's sampler latents,
    models/family.py) through ``decode_sampler_latents``: float (steps, C, H, W) in [0, 1] on the CPU.
    Each point is decoded alone with ``generator`` in the same state, so what a family draws on the way
    (the finer groups of a hierarchy) is the same noise all along the path and only the latent moves."""
    z = interpolate_latents(z0.float().cpu(), z1.float().cpu(), steps, mode)  # (steps, *z0.shape)
    y = None if label is None else torch.tensor([int(label)])
    state = None if generator is None else generator.get_state()
    outs = []
    for zi in z:
        if state is not None:
            generator.set_state(state)
        outs.append(decode_sampled(model, zi[None], y, generator, precision=precision))
    return torch.cat(outs)


@torch.no_grad()
def encode_mean(model, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """The deterministic encoding (posterior mean, or pre-quantisation latent) of images x (B, C, H, W)."""
    model.eval()
    return model.encode(x, y).mode().float()


@torch.no_grad()
def encode_arrays(model, x: torch.Tensor, y=None, batch: int = 256) -> dict[str, torch.Tensor]:
    """The family's representation of images x (N, C, H, W) in batches: {name: (N, ...)} on the CPU."""
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {}
    for i in range(0, len(x), batch):
        yi = None if y is None else y[i : i + batch]
        for k, v in model.encode(x[i : i + batch], yi).arrays().items():
            parts.setdefault(k, []).append(v.detach().cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


@torch.no_grad()
def reconstruct(
    model, x: torch.Tensor, y: torch.Tensor | None = None, batch: int = 256, precision: str = "auto"
) -> torch.Tensor:
    """The family's ``reconstruct`` of x: float (B, C, H, W) in [0, 1], on CPU. ``precision``: fast_inference."""
    model.eval()
    outs = []
    with fast_inference(model, precision):
        for i in range(0, len(x), batch):
            yi = None if y is None else y[i : i + batch]
            xi = x[i : i + batch].contiguous(memory_format=torch.channels_last)
            outs.append(model.reconstruct(xi, yi).float().cpu())
    return torch.cat(outs)



@torch.no_grad()
def map_batches(model, fn, x: torch.Tensor, y: torch.Tensor | None = None, batch: int = 256,
                precision: str = "fp32", desc: str | None = None):
    """``fn(x_batch, y_batch)`` over images x (N, C, H, W) in batches, in eval mode under :func:`fast_inference`
    of ``model``: its tensor outputs (one tensor, or a dict of them) concatenated along the first axis, on the
    CPU. No gradients unless ``fn`` asks for them (``torch.enable_grad()``). ``desc``: a progress bar (stderr)."""
    from tqdm import tqdm

    model.eval()
    parts: list = []
    with fast_inference(model, precision):
        for i in tqdm(range(0, len(x), batch), desc=desc, disable=desc is None, leave=False):
            xi = x[i : i + batch].contiguous(memory_format=torch.channels_last)
            parts.append(fn(xi, None if y is None else y[i : i + batch]))
    if parts and isinstance(parts[0], dict):
        return {k: torch.cat([p[k].detach().cpu() for p in parts]) for k in parts[0]}
    return torch.cat([p.detach().cpu() for p in parts])
