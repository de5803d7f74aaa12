"""Training-time augmentation: small random shifts and intensity changes of each training image.

Why: a normative model trained on a small set of normal images (PneumoniaMNIST has 1,214) learns the
exact framing and exposure of that set; new normal images that are framed or exposed a little
differently then look anomalous. Shifting each image by a few pixels and changing its contrast and
brightness a little teaches the model that these are not what "abnormal" means. Off by default.
No flips: a mirrored chest X-ray has its heart on the wrong side, which is an anomaly, not a variant.

Written here (not torchvision, which does not import beside the CPU torch build; not MONAI, a large
dependency for three lines of tensor indexing) so that it runs batched on the training device with the
trainer's own per-epoch generator, which keeps runs reproducible and resumes bitwise.

``--augment`` takes ``KEY=VALUE`` pairs separated by commas:

- ``shift=P``: translate each image by whole pixels, up to P in each direction (edge pixels repeated);
- ``contrast=C``: scale each image's deviations from its mean by a factor drawn from [1 - C, 1 + C];
- ``brightness=B``: add a value drawn from [-B, B]; values are clipped to [0, 1] afterwards.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medivae.runtime.errors import UserError

KEYS = {"shift": int, "contrast": float, "brightness": float}


def parse_augment(spec: str) -> dict[str, float]:
    """``"shift=2,contrast=0.1"`` -> {"shift": 2, "contrast": 0.1}; "" -> {} (no augmentation)."""
    out: dict[str, float] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in KEYS:
            raise UserError(f"--augment takes {', '.join(f'{k}=VALUE' for k in KEYS)} separated by commas, "
                            f"not {part!r}")
        try:
            number = KEYS[key](value)
        except ValueError:
            raise UserError(f"--augment {key} needs a {KEYS[key].__name__} value, not {value!r}") from None
        if number < 0 or (key == "contrast" and number >= 1):
            raise UserError(f"--augment {key} must be >= 0{' and < 1' if key == 'contrast' else ''}, not {value}")
        out[key] = number
    return out


def augment(x: torch.Tensor, spec: dict[str, float], generator: torch.Generator) -> torch.Tensor:
    """x: float (B, C, H, W) in [0, 1] -> the same images, each shifted / rescaled at random.

    The random draws come from ``generator`` (on the CPU, so CPU and GPU runs draw the same numbers)
    in a fixed order, whatever the keys: a run resumed at an epoch boundary draws what the uninterrupted
    run drew."""
    if not spec:
        return x
    b = x.shape[0]
    u = torch.rand(b, 2, generator=generator)  # contrast, brightness (drawn even when unused: fixed order)
    shift = int(spec.get("shift", 0))
    offsets = torch.randint(0, 2 * shift + 1, (b, 2), generator=generator) if shift else None
    if offsets is not None:
        h, w = x.shape[-2:]
        padded = F.pad(x, (shift, shift, shift, shift), mode="replicate")  # (B, C, H + 2P, W + 2P)
        offsets = offsets.to(x.device)
        rows = offsets[:, 0, None] + torch.arange(h, device=x.device)  # (B, H)
        cols = offsets[:, 1, None] + torch.arange(w, device=x.device)  # (B, W)
        batch = torch.arange(b, device=x.device)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
        x = x.permute(0, 3, 1, 2)
    contrast, brightness = spec.get("contrast", 0.0), spec.get("brightness", 0.0)
    if contrast or brightness:
        u = u.to(device=x.device, dtype=x.dtype)
        scale = (1 + contrast * (2 * u[:, 0] - 1))[:, None, None, None]
        offset = (brightness * (2 * u[:, 1] - 1))[:, None, None, None]
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * scale + mean + offset).clamp(0, 1)
    return x  # in whatever memory layout the indexing left: the caller lays it out for its model
