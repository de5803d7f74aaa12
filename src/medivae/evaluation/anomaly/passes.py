"""One model over one set of images, computed once and read by every scorer.

:class:`Scoring` says how a set is scored (model, device, batch size, precision, posterior draws, seed, the
class a conditional family is given). :class:`ImagePass` holds one set of uint8 images and computes, when a
scorer first asks and then never again: the float images, the deterministic reconstructions, the posterior
means, the likelihood bounds over K posterior draws, the family's own scores and the SSIM of image and
reconstruction. Every batch loop goes through :func:`medivae.models.inference.map_batches`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from medivae.data.imageset import to_float
from medivae.evaluation.likelihood import iwae_from_log_weights
from medivae.evaluation.reconstruction import ssim_maps
from medivae.models.family import extra_anomaly_scores, has, labels_for
from medivae.models.healing import LatentDiffusion
from medivae.models.inference import map_batches


@dataclass
class Scoring:
    """How images are scored. ``precision``: "fp32" (exact) or "auto" (bf16 networks where the hardware has
    them, :func:`medivae.models.inference.fast_inference`). ``k``: posterior draws per image for the likelihood
    bounds. ``progress``: bars on stderr over every pass. ``normal_class``: the class a conditional family is
    given for *every* image, anomalous or not: the normal class it was fitted on (an image's own label would
    let the label, not the image, decide its score). ``diffusion``: the run's diffusion prior
    (:meth:`medivae.runfolder.run.Run.diffusion_prior`), for diffusion healing; None: no such score."""

    model: torch.nn.Module
    device: torch.device | str = "cpu"
    batch_size: int = 128
    precision: str = "fp32"
    k: int = 16
    seed: int = 0
    progress: bool = False
    normal_class: int | None = None
    diffusion: LatentDiffusion | None = None

    def batches(self, fn, x: torch.Tensor, y=None, desc: str = "scoring", precision: str | None = None):
        """``fn(x_batch, y_batch)`` over x in batches of ``batch_size`` (:func:`map_batches`)."""
        return map_batches(self.model, fn, x, y, self.batch_size, precision or self.precision,
                           desc if self.progress else None)


class ImagePass:
    """One set of uint8 images (N, C, H, W) under a model; each property is computed once, on first use.
    A conditional family sees every image as ``ctx.normal_class``: labels never reach a score."""

    def __init__(self, ctx: Scoring, images: np.ndarray, name: str = "images"):
        self.ctx, self.images, self.name = ctx, np.asarray(images), name

    def __len__(self) -> int:
        return len(self.images)

    @cached_property
    def x(self) -> torch.Tensor:
        """float (N, C, H, W) in [0, 1] on the scoring device."""
        return to_float(self.images, self.ctx.device)

    @cached_property
    def y(self) -> torch.Tensor | None:
        """(N,) the normal class, for a conditional family; None for the others."""
        if not has(self.ctx.model, "conditional"):
            return None
        if self.ctx.normal_class is None:
            raise ValueError("a conditional family is scored as its normal class: set Scoring.normal_class")
        return labels_for(self.ctx.model, np.full(len(self), self.ctx.normal_class), self.ctx.device)

    @cached_property
    def recon(self) -> torch.Tensor:
        """Deterministic reconstructions, float (N, C, H, W) in [0, 1] on the CPU."""
        model = self.ctx.model
        return self.ctx.batches(lambda x, y: model.reconstruct(x, y).float(), self.x, self.y,
                                f"reconstructing {self.name}")

    @cached_property
    def codes(self) -> np.ndarray:
        """The deterministic encodings (posterior means, or pre-quantisation latents), flattened: (N, D)."""
        model = self.ctx.model
        out = self.ctx.batches(lambda x, y: model.encode(x, y).mode().flatten(1).float(), self.x, self.y,
                               f"encoding {self.name}")
        return out.double().numpy()

    @cached_property
    def bounds(self) -> dict[str, np.ndarray]:
        """{"neg_elbo", "iwae" (the K-sample bound on -log p(x), :mod:`medivae.evaluation.likelihood`)[, "kl"]}
        in nats (N,) from one set of K posterior draws per image; {} for a family without a likelihood."""
        if not has(self.ctx.model, "likelihood"):
            return {}
        model, k = self.ctx.model, self.ctx.k
        gen = torch.Generator().manual_seed(self.ctx.seed)

        def bounds(x, y):
            lw = model.log_weights(x, y, k, gen)  # (K, B) float64
            out = {"neg_elbo": lw.neg_elbo(), "iwae": -iwae_from_log_weights(lw.log_w, k)}
            return out | ({} if lw.kl is None else {"kl": lw.kl.double()})

        return {n: v.double().numpy() for n, v in self.ctx.batches(bounds, self.x, self.y,
                                                                   f"likelihood of {self.name}").items()}

    @cached_property
    def family_scores(self) -> dict[str, np.ndarray]:
        """The family's own scores (e.g. a VAE-GAN's discriminator), {name: (N,)}."""
        model = self.ctx.model
        out = self.ctx.batches(lambda x, y: extra_anomaly_scores(model, x, y), self.x, self.y,
                               f"family scores of {self.name}")
        return {n: v.double().numpy() for n, v in out.items()}

    @cached_property
    def ssim(self) -> tuple[np.ndarray, np.ndarray]:
        """1 - SSIM of each image and its reconstruction: scores (N,) and maps (N, H, W)
        (:func:`medivae.evaluation.reconstruction.ssim_maps`)."""
        s, maps = ssim_maps(self.x.cpu().numpy(), self.recon.numpy())
        return 1.0 - s, (1.0 - maps).astype(np.float32)

    @cached_property
    def squared_error(self) -> np.ndarray:
        """Mean squared error of each image and its reconstruction, float64 (N,)."""
        return (self.x.cpu() - self.recon).pow(2).flatten(1).mean(1).double().numpy()

    @cached_property
    def residual(self) -> np.ndarray:
        """|x - reconstruction|, channel mean, float32 (N, H, W)."""
        return (self.x.cpu() - self.recon).abs().mean(1).numpy()

    @cached_property
    def png_nats(self) -> np.ndarray:
        return png_nats(self.images)


def png_nats(images: np.ndarray) -> np.ndarray:
    """Input complexity (Serrà et al. 2020): each uint8 image's lossless PNG size, in nats, (N,).
    A generic compressor works one image at a time; at ~0.1 ms an image it is not the bottleneck."""
    import io

    from PIL import Image

    out = np.empty(len(images))
    for i, img in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)).save(buf, "PNG", compress_level=9)
        out[i] = len(buf.getvalue()) * 8 * math.log(2)
    return out
