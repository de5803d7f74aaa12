"""Pixel maps of where an image is anomalous, float (N, H, W), higher = more anomalous.

The residual |x - x̂| and 1 - SSIM(x, x̂) come with the scoring pass (:class:`~.passes.ImagePass`); here are the
maps that need more: the gradient of the negative ELBO with respect to the input (Zimmerer et al. 2019), which
points at the pixels that make the image unlikely, and the SSIM map read against the training normals' own
maps (:mod:`.normative`). The restoration and healing maps come with their scores (:mod:`.scorers`).
"""

from __future__ import annotations

import numpy as np
import torch

from medivae.evaluation.anomaly.passes import ImagePass


def gradient_maps(p: ImagePass) -> np.ndarray:
    """|d(-ELBO)/dx| (one posterior draw, fixed noise), channel mean, float32 (N, H, W). Needs a family with a
    likelihood; in eval mode, so the images of a batch do not mix. Always fp32."""
    model, seed = p.ctx.model, p.ctx.seed

    def grad(x, y):
        x = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            nll = model.log_weights(x, y, 1, torch.Generator().manual_seed(seed)).neg_elbo()
            (g,) = torch.autograd.grad(nll.sum(), x)
        return g.abs().mean(1).float()

    return p.ctx.batches(grad, p.x, p.y, f"gradient maps of {p.name}", precision="fp32").numpy()


def map_contrast(amap: np.ndarray, mask: np.ndarray) -> float:
    """Mean map value inside ``mask`` divided by the mean outside it (> 1: the map points at the mask)."""
    mask = np.asarray(mask, dtype=bool)
    return float(amap[mask].mean() / max(amap[~mask].mean(), 1e-12))
