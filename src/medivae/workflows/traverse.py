"""Latent traversals (as in Higgins et al. 2017, Fig. 1-7): what each latent dimension controls.

Dimensions are ranked by their mean KL(q(z_j|x) || N(0, 1)) over a batch of images: a dimension
with ~0 KL is collapsed (the decoder ignores it), so its row stays constant. Each row starts from
the posterior mean of one reference image and moves only that dimension over ±k standard deviations
of the aggregate posterior q(z_j) = E_x q(z_j|x), whose variance is Var_x(mu_j) + E_x(sigma_j^2)
(about 1 when q(z) matches the prior; near the posterior noise alone when the dimension collapsed).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from medivae.data import to_float
from medivae.models.family import has, require
from medivae.runfolder.run import load_image, load_run
from medivae.runtime.errors import UserError
from medivae.runtime.images import save_grid


@dataclass
class LatentStats:
    """Per-dimension statistics of q(z|x) over a batch. All (D,)."""

    kl: torch.Tensor  # mean over the batch of KL(q(z_j|x) || N(0, 1)), nats
    std: torch.Tensor  # standard deviation of the aggregate posterior q(z_j)

    def order(self) -> torch.Tensor:
        """Dimension indices, highest KL first."""
        return torch.argsort(self.kl, descending=True, stable=True)


@torch.no_grad()
def latent_stats(model, x: torch.Tensor, y: torch.Tensor | None = None) -> LatentStats:
    """x: float (B, C, H, W) in [0, 1] (B >= 2), y: int (B,) for conditional models."""
    model.eval()
    q = model.encode(x, y)
    var = q.mean.var(0, unbiased=False) + q.logvar.exp().mean(0)
    return LatentStats(kl=q.kl_per_dim().mean(0).float().cpu(), std=var.sqrt().float().cpu())


@torch.no_grad()
def traverse(
    model,
    x_ref: torch.Tensor,
    stats: LatentStats,
    y_ref: torch.Tensor | None = None,
    n_dims: int | None = None,
    k: float = 3.0,
    steps: int = 9,
) -> torch.Tensor:
    """Decoded sweeps around the posterior mean of x_ref (1, C, H, W): float (n_dims * steps, C, H, W)
    on CPU, row r = the r-th dimension by KL, columns from -k to +k aggregate standard deviations."""
    model.eval()
    dims = stats.order()[: n_dims or len(stats.kl)]
    mu = model.encode(x_ref, y_ref).mode().float()[0]  # (D,)
    offsets = torch.linspace(-k, k, steps, device=mu.device)  # (S,)
    z = mu.repeat(len(dims), steps, 1)  # (R, S, D)
    for r, j in enumerate(dims.tolist()):
        z[r, :, j] = mu[j] + offsets * float(stats.std[j])
    z = z.reshape(-1, mu.numel())  # (R * S, D), row-major: rows are dimensions
    y = None if y_ref is None else y_ref.reshape(1).expand(len(z))
    return model.decode(z, y).float().cpu()


def traverse_run(
    run_dir, out, image=None, n_dims: int | None = None, k: float = 3.0, steps: int = 9,
    label: str | None = None, batch: int = 512, device: str = "auto",
) -> tuple[Path, LatentStats, torch.Tensor]:
    """Traversal PNG for a run: reference = ``image`` or the first test image of the run's data;
    KL ranking over up to ``batch`` validation images. Returns (png, stats, dims shown)."""
    if steps < 2:
        raise UserError(f"--steps must be >= 2, not {steps}")
    if not k > 0:
        raise UserError(f"--range must be > 0, not {k}")
    run = load_run(run_dir, device=device)
    model, cfg, dev = run.model, run.config, run.device
    require(model, "gaussian_latent", "traverse")
    if n_dims is not None and not 1 <= n_dims <= model.latent_dim:
        raise UserError(f"--dims must be between 1 and the latent size {model.latent_dim}, not {n_dims}")
    conditional = has(model, "conditional")
    k_label = run.label_index(label)  # checks the name before any data is read
    if conditional and image is not None and k_label is None:
        raise UserError(f"this run is conditional: pass --label with --image, one of {list(cfg.label_names)}")
    splits = run.splits()
    val = splits["val"] if len(splits["val"]) >= 2 else splits["train"]
    ref = splits["test"] if len(splits["test"]) else val

    def labels(s, n):
        return run.labels(s.labels[:n])

    stats = latent_stats(model, to_float(val.images[:batch], dev), labels(val, batch))
    x_ref = to_float(ref.images[:1], dev) if image is None else load_image(image, cfg).to(dev)
    y_ref = labels(ref, 1) if k_label is None else torch.tensor([k_label], device=dev)
    imgs = traverse(model, x_ref, stats, y_ref, n_dims, k, steps)
    dims = stats.order()[: n_dims or len(stats.kl)]
    return save_grid(imgs, out, nrow=steps), stats, dims
