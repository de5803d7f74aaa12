"""``medivae fit-sampler``: a post-hoc latent sampler (:mod:`medivae.models.samplers`) fitted on a run's
training latents, selected/early-stopped on its validation latents. gmm and flow model the posterior means of
a Gaussian-latent family, per class for a conditional run; diffusion models the family's
``sampler_latents`` (models/family.py: posterior means, the pre-quantisation grid of vq_vae, the top
groups of hierarchical_vae), one model for every class with classifier-free guidance. Writes
RUN/samplers/<kind>.safetensors + <kind>.json (with the checkpoint's manifest hash),
RUN/samplers/samples_<kind>.png (64 draws, shown in the report) and ``results.json["samplers"][kind]``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from medivae.data import to_float
from medivae.models.family import has, labels_for, require, require_sampler_latents
from medivae.models.inference import encode_sampler_latents
from medivae.models.samplers import KINDS, DiffusionFit, fit, fit_diffusion, sampler_paths, save_sampler
from medivae.runfolder.results import RESULTS_FILE, merge_results, read_results
from medivae.runfolder.run import Run, load_run
from medivae.runtime.errors import UserError
from medivae.runtime.images import save_grid
from medivae.runtime.paths import probe_writable
from medivae.runtime.seeding import derive_seed, torch_generator


def posterior_means(run: Run, images, labels, draws: int = 0, seed: int = 0,
                    split: str = "train") -> tuple[np.ndarray, np.ndarray | None]:
    """(posterior means (N, D) float64, class indices (N,) or None for an unconditional run); with ``draws``
    > 0, ``draws`` samples of q(z | x) per image instead, (N * draws, D) image by image, labels repeated."""
    q = run.encode(images, labels=labels)
    y = np.clip(np.asarray(labels), 0, None) if has(run.model, "conditional") else None
    if not draws:
        return q["mean"].double().numpy(), y
    g = torch_generator(seed, "fit-sampler-posterior-draws", split)
    mean, std = q["mean"].double(), torch.exp(0.5 * q["logvar"].double())
    eps = torch.randn(len(mean), draws, mean.shape[1], generator=g, dtype=torch.float64)
    z = (mean[:, None] + std[:, None] * eps).reshape(-1, mean.shape[1])
    return z.numpy(), None if y is None else np.repeat(y, draws)


def sampler_latents(run: Run, images, labels, batch: int = 256) -> tuple[torch.Tensor, np.ndarray | None]:
    """(the family's sampler latents (N, ...) float32, class indices (N,) or None), encoded in batches."""
    y = labels_for(run.model, labels, run.device)
    parts = []
    for i in range(0, len(images), batch):
        x = to_float(np.asarray(images[i : i + batch]), run.device)
        parts.append(encode_sampler_latents(run.model, x, None if y is None else y[i : i + batch]))
    z = torch.cat(parts) if parts else torch.empty(0)
    return z, None if y is None else y.cpu().numpy()


def fit_sampler_run(run_dir, kind: str, max_components: int = 10, checkpoint: str = "best",
                    device: str = "auto", diffusion: DiffusionFit | None = None, progress: bool = False,
                    posterior_draws: int = 0) -> dict:
    """Fit, save and record one sampler; returns its JSON description (``<kind>.json``).
    ``diffusion``: how the diffusion sampler trains (default :class:`DiffusionFit`); ``posterior_draws`` > 0:
    fit to that many draws of q(z | x) per image instead of the posterior means (Gaussian-latent families)."""
    if kind not in KINDS:
        raise UserError(f"unknown sampler {kind!r}; choose one of {list(KINDS)}")
    if max_components < 1 or posterior_draws < 0:
        raise UserError(f"need --max-components >= 1 and --posterior-draws >= 0, not {max_components}, "
                        f"{posterior_draws}")
    results_path = Path(run_dir) / RESULTS_FILE
    _check_outputs(Path(run_dir), kind)  # fail now, not after the fit, if a file cannot be written
    start = time.perf_counter()
    run = load_run(run_dir, which=checkpoint, device=device)
    if kind == "diffusion" and not posterior_draws:
        require_sampler_latents(run.model, "fit-sampler --sampler diffusion")
    else:
        require(run.model, "gaussian_latent", f"fit-sampler --sampler {kind}" +
                (" --posterior-draws" if posterior_draws else ""))
    splits = run.splits()
    train, val = splits["train"], splits["val"] if len(splits["val"]) else splits["train"]
    seed = run.config.train.seed
    if posterior_draws:
        zt, yt = posterior_means(run, train.images, train.labels, posterior_draws, seed, "train")
        zv, yv = posterior_means(run, val.images, val.labels, posterior_draws, seed, "val")
    elif kind == "diffusion":
        zt, yt = sampler_latents(run, train.images, train.labels)
        zv, yv = sampler_latents(run, val.images, val.labels)
    else:
        zt, yt = posterior_means(run, train.images, train.labels)
        zv, yv = posterior_means(run, val.images, val.labels)
    if kind == "diffusion":
        classes = run.model.num_classes if has(run.model, "conditional") else 0
        sampler = fit_diffusion(zt, zv, yt, yv, classes, derive_seed(seed, "fit-sampler-diffusion"), diffusion,
                                progress)
    else:
        sampler = fit(kind, zt, zv, yt, yv, max_components, seed)
    extra = {"checkpoint": run.checkpoint, "n_train": len(zt), "n_val": len(zv), "posterior_draws": posterior_draws,
             "label_names": list(run.config.label_names) if yt is not None else None,
             "seconds": round(time.perf_counter() - start, 1)}
    folder = Path(run_dir) / "samplers"
    st, js = save_sampler(sampler, folder, run.checkpoint_sha256(), extra)
    save_grid(run.sample(64, sampler=kind, precision="fp32"), folder / f"samples_{kind}.png", nrow=8)
    summary = {"file": str(js), "checkpoint": run.checkpoint, "n_train": len(zt), "n_val": len(zv),
               "latents": f"{posterior_draws} posterior draws per image" if posterior_draws else "means",
               "seconds": extra["seconds"], **_fit_summary(kind, sampler.info)}
    merge_results(results_path, "samplers", {**_samplers_block(results_path), kind: summary})
    return {"safetensors": str(st), "json": str(js), **summary}


def _samplers_block(results_path: Path) -> dict:
    """results.json's "samplers" entry ({} if none); a UserError if the file or the entry is not an object."""
    block = read_results(results_path).get("samplers", {})
    if not isinstance(block, dict):
        raise UserError(f'{results_path}: its "samplers" entry is not a JSON object; move the file away and run '
                        "again")
    return block


def _check_outputs(run_dir: Path, kind: str) -> None:
    """RUN/samplers/ and the three files of sampler ``kind`` in it can be written, and results.json merged into:
    refused before the fit, so that a refusal leaves the run as it was."""
    _samplers_block(run_dir / RESULTS_FILE)
    folder = run_dir / "samplers"
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder}: is a file, not a folder; move it away and run again")
    for p in (*sampler_paths(folder, kind), folder / f"samples_{kind}.png"):
        if p.exists() and not p.is_file():
            raise UserError(f"{p}: is not an ordinary file; move it away and run again")
    if folder.is_dir():
        probe_writable(folder, f"medivae fit-sampler writes into {folder}")


def _fit_summary(kind: str, info: dict) -> dict:
    """Per class: the chosen number of components (gmm) or the early-stopping epoch and validation NLL (flow);
    the diffusion sampler's epochs, width and validation ε-MSE."""
    if kind == "gmm":
        return {"components": {c: i["components"] for c, i in info.items()}}
    if kind == "diffusion":
        keep = ("latent_shape", "num_classes", "width", "epochs", "best_epoch")
        return {**{k: info[k] for k in keep}, "val_eps_mse": round(info["val_eps_mse"], 5)}
    return {"best_epoch": {c: i["best_epoch"] for c, i in info.items()},
            "val_nll_nats": {c: round(i["val_nll"], 3) for c, i in info.items()}}
