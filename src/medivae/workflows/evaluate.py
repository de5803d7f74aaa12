"""``medivae evaluate``: every metric on one split of a run's data -> ``RUN/results.json`` -> a table.

Opens the run, loads its data and calls the pure metric functions of :mod:`medivae.evaluation`.
results.json is shared: other tools write other top-level keys; this module replaces only
``"evaluation"`` (through :func:`medivae.runfolder.results.merge_results`). Its keys (all numbers are plain
floats/ints; nats are per image; ``null`` where a number would be dishonest):

    evaluation:
      run, checkpoint ("best"/"last"), data (source), data_identity (what the data is by content, the
      reference extractor's source key: data.identity; a phantoms spec as written), split, n_images,
      seed (training), split_seed (data), seconds,
      seconds_by_part {load, likelihood, posterior, collapse, sample_quality[, fid]}
      model: {name, likelihood, latent_dim, image_size, channels}
      likelihood: {likelihood, discrete_image_likelihood, iwae_k, neg_elbo_nats, neg_iwae_nats,
                   neg_iwae_nats_by_k {"1": .., "10": .., "100": ..}, neg_elbo_bpd, neg_iwae_bpd
                   (null unless discrete_image_likelihood), note, n_images}
      reconstruction: {mse, psnr_db, ssim, n_images, foreground (null or "otsu")[, psnr_fg_db, ssim_fg,
                       fg_fraction]}   (posterior mean, per image then averaged; *_fg over the real
                       image's foreground mask, averaged over images whose mask is not empty)
      collapse: {latent_dim, kl_prior, kl_per_dim [..], kl_total_nats, active_units, active_threshold,
                 mean_variance_per_dim [..], mutual_information_nats, mi_upper_bound_nats
                 [, kl_to_standard_normal_nats]}   (KL to the model's prior: N(0, I) in closed form, a
                 learned prior by Monte Carlo, kl_prior says which; evaluation.collapse)
      sample_quality: {sampler ("prior"/"gmm"/"flow"), extractor ("cnn"/"ae"), fd_name ("FD-cnn"/"FD-ae"),
                       extractor_version (evaluation.features.VERSION; absent: 1),
                       reference_folder, reference_hash (the shared extractor's key),
                       n_generated, n_reference, n_held_out, held_out_split, reference_split,
                       model: {fd, precision, recall, density, coverage, hf_power_ratio}   generated vs real
                       floor: {fd, precision, recall, density, coverage, hf_power_ratio}}  real held-out vs real
                       (the reference is another held-out split, val when test is evaluated; hf_power_ratio:
                       mean power above 1/4 cycle/pixel over the reference's, evaluation.sharpness)
      ci95: {neg_elbo_nats, neg_iwae_nats, mse, psnr_db, ssim[, psnr_fg_db, ssim_fg]: [lo, hi]}  95 % bootstrap
            of the means over images; {fd, precision, recall, density, coverage, hf_power_ratio, floor_fd,
            floor_precision, ...: [lo, hi]} real and generated rows resampled (sample_quality.compare_ci)
      per_image_file: RUN/eval_per_image.npz (each metric per image, with image_hash); per_image_sha256: its hash
      checkpoint_sha256: SHA-256 of the evaluated checkpoint's manifest.json (compare/report flag a changed one)
      fid: null | {weights, model, floor}                      (only with --inception-weights)
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from medivae.data import ImageSet, load_dataset, to_float
from medivae.evaluation import sample_quality as sq
from medivae.evaluation.bootstrap import mean_ci, ratio_of_means_ci
from medivae.evaluation.collapse import collapse_metrics
from medivae.evaluation.features import VERSION, load_or_fit_reference
from medivae.evaluation.likelihood import likelihood_bounds
from medivae.evaluation.reconstruction import FOREGROUND_MASKS, mean_over_images, per_image_metrics
from medivae.evaluation.sharpness import high_frequency_power
from medivae.models.family import MISSING, describe, has, labels_for, latent_prior
from medivae.models.inference import reconstruct, sample_images
from medivae.models.samplers import DEFAULT_SAMPLING_STEPS, check_options
from medivae.runfolder.results import (
    PER_IMAGE_FILE,
    RESULTS_FILE,
    STAGED_PER_IMAGE,
    merge_results,
    read_results,
)
from medivae.runfolder.run import load_run
from medivae.runtime.constants import BOOTSTRAP_RESAMPLES
from medivae.runtime.errors import UserError
from medivae.runtime.io import atomic_write_bytes, fsync_dir
from medivae.runtime.seeding import numpy_rng, torch_generator

MAX_REFERENCE = 3000  # real training images in the reference set (k-NN distances are O(N^2) in memory)


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    split: str = "test"
    k: int = 100
    batch_size: int = 64
    max_images: int = 0  # 0: the whole split
    n_samples: int = 0  # generated images; 0: as many as evaluated images
    reference_epochs: int = 5
    inception_weights: str | None = None
    checkpoint: str = "best"
    sampler: str = "prior"  # or a post-hoc latent sampler of the run (medivae fit-sampler): gmm, flow, diffusion
    guidance: float = 0.0  # the diffusion sampler's classifier-free guidance w
    sampling_steps: int | None = None  # the diffusion sampler's DDIM steps (None: its default)
    bootstrap: int = BOOTSTRAP_RESAMPLES  # resamples of the evaluated images for 95 % intervals; 0: none
    foreground: str | None = None  # "otsu": PSNR / SSIM also over the real images' foreground

    def __post_init__(self):
        for name in ("k", "batch_size", "reference_epochs"):
            if getattr(self, name) < 1:
                raise UserError(f"{name.replace('_', ' ')} must be >= 1, not {getattr(self, name)}")
        for name in ("max_images", "n_samples", "bootstrap"):
            if getattr(self, name) < 0:
                raise UserError(f"{name.replace('_', ' ')} must be >= 0, not {getattr(self, name)}")
        if self.split not in ("train", "val", "test"):
            raise UserError(f"unknown split {self.split!r}; choose train, val or test")
        if self.checkpoint not in ("best", "last"):
            raise UserError(f"checkpoint must be best or last, not {self.checkpoint!r}")
        if self.foreground not in (None, *FOREGROUND_MASKS):
            raise UserError(f"unknown foreground mask {self.foreground!r}; choose {', '.join(FOREGROUND_MASKS)} "
                            "or leave --foreground out")


def _batches(s: ImageSet, model, batch_size: int, device, desc: str, progress: bool):
    for i in tqdm(range(0, len(s), batch_size), desc=desc, disable=not progress, leave=False):
        sl = slice(i, i + batch_size)
        yield to_float(s.images[sl], device), labels_for(model, s.labels[sl], device)


def _subset(s: ImageSet, n: int, seed: int, key: str) -> ImageSet:
    if n <= 0 or n >= len(s):
        return s
    return s.subset(np.sort(numpy_rng(seed, key).permutation(len(s))[:n]))


@torch.no_grad()
def posterior_and_reconstruction(model, s: ImageSet, batch_size, device, progress=False, foreground=None):
    """(posterior means (N, D), log-variances (N, D), reconstruction metrics per image) of split ``s``;
    the posterior arrays are None unless the family has a Gaussian latent. ``foreground``: also PSNR /
    SSIM over each real image's foreground mask (evaluation.reconstruction.foreground_mask)."""
    gaussian = has(model, "gaussian_latent")
    means, logvars, per = [], [], []
    for x, y in _batches(s, model, batch_size, device, "posterior", progress):
        if gaussian:
            q = model.encode(x, y)
            means.append(q.mean.double().cpu().numpy())
            logvars.append(q.logvar.double().cpu().numpy())
        recon = reconstruct(model, x, y, precision="fp32")  # metrics in exact fp32, not the fast bf16 path
        per.append(per_image_metrics(x.cpu().numpy(), recon.numpy(), foreground))
    rec = {k: np.concatenate([p[k] for p in per]) for k in per[0]}
    if not gaussian:
        return None, None, rec
    return np.concatenate(means), np.concatenate(logvars), rec


@torch.no_grad()
def generate_images(model, n: int, labels: np.ndarray, seed: int, latent_sampler=None, guidance: float = 0.0,
                    sampling_steps: int | None = None, progress: bool = False):
    """n samples of the family as float (n, C, H, W), as ``medivae sample`` shows them, quantised to
    8 bits like the real images they are compared with. A conditional family draws its labels with
    the held-out split's frequencies."""
    g = torch_generator(seed, "evaluate-samples")
    y = None
    if has(model, "conditional") and len(labels):
        y = torch.as_tensor(labels[numpy_rng(seed, "evaluate-sample-labels").integers(0, len(labels), n)])
        y = y.long().clamp(min=0)
    img = sample_images(model, n, g, y, precision="fp32", latent_sampler=latent_sampler, guidance=guidance,
                        sampling_steps=sampling_steps, progress=progress)
    return (img * 255).round() / 255


def source_fingerprint(source: str) -> str:
    """What the data is, not where it is named from: phantoms are their spec (generated from the seed);
    files are their content (data.identity: the bytes, and a folder's paths relative to it), so the same
    data on another path, through a symlink or on another machine gets the same reference extractor."""
    if source == "phantoms" or source.startswith("phantoms:"):
        return source
    from medivae.data.identity import content_identity
    from medivae.data.sources import resolve

    return content_identity(resolve(source, progress=False))


REFERENCE_KEYS = ("image_size", "channels", "labels", "val_fraction", "test_fraction", "split_seed", "resize_mode",
                  "window", "normalize", "nifti_axis")


def reference_description(data_cfg) -> dict:
    """What keys the shared reference extractor under $MEDIVAE_CACHE/reference: the data (source fingerprint,
    preprocessing, label filter, split definition), never a run's training seed or family, so every run on
    the same data is scored with the same features."""
    return {"source": source_fingerprint(data_cfg.source), **{k: getattr(data_cfg, k) for k in REFERENCE_KEYS}}


def shared_reference(data_cfg, train: ImageSet, epochs: int, progress: bool, device):
    """The dataset's one reference extractor (evaluation.features), trained once on ``train`` and cached."""
    return load_or_fit_reference(reference_root(), train, reference_description(data_cfg), epochs,
                                 progress=progress, device=device)


def reference_split(splits: dict, evaluated: str, need: int = 6) -> str:
    """The real images generated ones are compared with: another held-out split, so a model that copies
    its training images cannot beat the real-vs-real floor; the training split only when no other
    held-out split has enough images for the k-NN metrics."""
    for name in ("val", "test"):
        if name != evaluated and len(splits.get(name, ())) >= need:
            return name
    return "train"


def reference_root() -> Path:
    from medivae.data.cache import cache_root

    return cache_root() / "reference"


def sample_quality_block(model, cfg, data_cfg, splits, held_out: ImageSet, opts, run_dir, device, progress,
                         latent_sampler=None):
    """(the sample_quality block, its 95 % bootstrap intervals {fd, ..., floor_fd, ...}, (real reference
    subset, generated images)) for the optional FID.
    ``latent_sampler``: the post-hoc sampler named by ``opts.sampler`` (None: the family's prior)."""
    seed, data_seed = cfg.train.seed, data_cfg.split_seed  # the model's draws; what the data alone decides
    ref = shared_reference(data_cfg, splits["train"], opts.reference_epochs, progress, device)
    ref_split = reference_split(splits, opts.split)
    real = _subset(splits[ref_split], MAX_REFERENCE, data_seed, "evaluate-reference")
    n_gen = opts.n_samples or len(held_out)
    fake = generate_images(model, n_gen, held_out.labels, seed, latent_sampler, opts.guidance, opts.sampling_steps,
                           progress)
    block = {
        "sampler": opts.sampler,
        **({"guidance": opts.guidance, "sampling_steps": opts.sampling_steps or DEFAULT_SAMPLING_STEPS}
           if opts.sampler == "diffusion" else {}),
        "extractor": ref.name, "fd_name": f"FD-{ref.name}", "extractor_version": VERSION,
        "reference_folder": str(ref.folder), "reference_hash": ref.folder.name,
        "n_generated": n_gen, "n_reference": len(real), "n_held_out": len(held_out),
        "held_out_split": opts.split, "reference_split": ref_split,
    }
    f_real, f_fake, f_held = ref.features(real.images), ref.features(fake), ref.features(held_out.images)
    block.update(sq.with_floor(f_real, f_fake, f_held))
    p_real, p_fake, p_held = (high_frequency_power(x) for x in (real.images, fake.numpy(), held_out.images))
    block["model"]["hf_power_ratio"] = float(p_fake.mean() / p_real.mean())
    block["floor"]["hf_power_ratio"] = float(p_held.mean() / p_real.mean())
    ci = {**sq.compare_ci(f_real, f_fake, opts.bootstrap, seed),
          "hf_power_ratio": ratio_of_means_ci(p_fake, p_real, opts.bootstrap, seed),
          **{f"floor_{k}": v for k, v in sq.compare_ci(f_real, f_held, opts.bootstrap, data_seed).items()},
          "floor_hf_power_ratio": ratio_of_means_ci(p_held, p_real, opts.bootstrap, data_seed)}
    return block, ci, (real, fake)


def fid_block(net, weights: str, real: ImageSet, fake: torch.Tensor, held_out: ImageSet, device) -> dict:
    from medivae.evaluation.inception import inception_features

    f_real = inception_features(net, real.images, device=device)
    return {
        "weights": str(weights),
        "model": sq.frechet_distance(f_real, inception_features(net, fake, device=device)),
        "floor": sq.frechet_distance(f_real, inception_features(net, held_out.images, device=device)),
    }


def load_split(cfg, data: str | None, split: str, progress: bool):
    """(data config, all splits, the evaluated split) for the run's source or another one."""
    data_cfg = cfg.data if data is None else dataclasses.replace(cfg.data, source=str(data), labels=())
    splits = load_dataset(data_cfg, progress=progress)
    s = splits[split]
    if len(s) == 0:
        raise UserError(f"split {split!r} of {data_cfg.source} is empty; choose another with --split")
    return data_cfg, splits, s


def evaluate_run(run_dir, data: str | None = None, opts: EvalOptions | None = None, device: str = "auto",
                 progress: bool = True) -> dict:
    """Compute every metric the run's family supports, merge them into RUN/results.json under
    "evaluation", return that block. A section the family cannot have is None, and ``absent`` says why."""
    opts = opts or EvalOptions()
    timed = _Timer()
    results_path = Path(run_dir) / RESULTS_FILE
    read_results(results_path)  # fail now, not after minutes of work, if it cannot be merged into
    inception = _load_inception(opts.inception_weights)
    run = load_run(run_dir, which=opts.checkpoint, device=device)
    weights = run.checkpoint_sha256()  # these exact weights: compare and report flag a changed checkpoint
    model, cfg, dev = run.model, run.config, run.device
    check_options(opts.sampler, opts.guidance, opts.sampling_steps, has(model, "conditional"))
    latent = run.latent_sampler(opts.sampler)  # refused now, before any work, if it does not match the run
    seed, m = cfg.train.seed, cfg.model
    data_cfg, splits, s = timed("load", load_split, cfg, data, opts.split, progress)
    s = _subset(s, opts.max_images, data_cfg.split_seed, "evaluate-subset")  # the same images for every run
    need = max(sq.PR_K, sq.DC_K) + 1  # the k-NN metrics of sample quality compare sets of more than k points
    if has(model, "sample") and min(len(s), opts.n_samples or len(s)) < need:
        raise UserError(f"sample quality needs at least {need} evaluated and {need} generated images, not "
                        f"{len(s)} and {opts.n_samples or len(s)}: raise --max-images / --n-samples (or use a "
                        "larger split)")
    lik = collapse = quality = fid = None
    if has(model, "likelihood"):
        batches = _batches(s, model, opts.batch_size, dev, f"IWAE K={opts.k}", progress)
        lik = timed("likelihood", likelihood_bounds, model, batches, opts.k, torch_generator(seed, "evaluate-iwae"))
    mean, logvar, rec = timed("posterior", posterior_and_reconstruction, model, s, opts.batch_size, dev, False,
                              opts.foreground)
    if mean is not None:
        collapse = timed("collapse", collapse_metrics, mean, logvar, torch_generator(seed, "evaluate-mi"),
                         latent_prior(model))
    per_image = {**(lik.pop("per_image") if lik else {}), **rec}
    quality_ci = {}
    if has(model, "sample") or latent is not None:
        quality, quality_ci, (real, fake) = timed("sample_quality", sample_quality_block, model, cfg, data_cfg,
                                                  splits, s, opts, run_dir, dev, progress, latent)
        if inception is not None:
            fid = timed("fid", fid_block, inception, opts.inception_weights, real, fake, s, dev)
    result = {
        "run": str(run_dir), "checkpoint": run.checkpoint, "data": data_cfg.source,
        "data_identity": source_fingerprint(data_cfg.source), "split": opts.split,
        "n_images": len(s), "seed": seed, "split_seed": data_cfg.split_seed,
        "model": {"name": m.name, **describe(model).to_dict(), "image_size": m.image_size,
                  "channels": m.channels, "capabilities": sorted(model.capabilities),
                  "parameters": sum(p.numel() for p in model.parameters())},
        "likelihood": lik,
        "reconstruction": {**mean_over_images(rec), "n_images": len(s), "foreground": opts.foreground},
        "collapse": collapse,
        "sample_quality": quality,
        "fid": fid,
        "ci95": {**intervals(per_image, opts.bootstrap, seed), **quality_ci},
        "checkpoint_sha256": weights,
        "absent": absent_sections(model),
        "seconds": timed.total(),
        "seconds_by_part": timed.parts,
    }
    return publish(Path(run_dir), result, per_image_bytes(s, per_image))


def intervals(per_image: dict[str, np.ndarray], n_boot: int, seed: int) -> dict[str, list[float] | None]:
    """{metric: [lo, hi]}: 95 % percentile-bootstrap intervals of the mean of each per-image metric."""
    names = {"neg_elbo": "neg_elbo_nats", "neg_iwae": "neg_iwae_nats"}
    return {names.get(k, k): mean_ci(v, n_boot, seed) for k, v in per_image.items()} if n_boot else {}


def per_image_bytes(s: ImageSet, per_image: dict[str, np.ndarray]) -> bytes:
    """RUN/eval_per_image.npz's bytes: each metric per evaluated image, with the image's content hash, so
    ``medivae compare`` can pair the images two runs share."""
    from medivae.data.imageset import image_hashes

    buf = io.BytesIO()
    np.savez_compressed(buf, image_hash=image_hashes(np.asarray(s.images)), **per_image)
    return buf.getvalue()


def publish(run_dir: Path, result: dict, per_image: bytes) -> dict:
    """Make results.json["evaluation"] and eval_per_image.npz visible together. The new per-image file is
    staged under another name, results.json (naming its SHA-256) replaced, then the staged file renamed into
    place: a failure before the results are written leaves the earlier pair as it was; a kill between the last
    two steps leaves results.json naming the staged file, which readers take (:func:`medivae.workflows.compare
    .read_per_image`) and the next evaluation replaces."""
    staged, final = run_dir / STAGED_PER_IMAGE, run_dir / PER_IMAGE_FILE
    atomic_write_bytes(staged, per_image)
    block = {**result, "per_image_file": str(final), "per_image_sha256": hashlib.sha256(per_image).hexdigest()}
    try:
        written = merge_results(run_dir / RESULTS_FILE, "evaluation", block)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    os.replace(staged, final)
    fsync_dir(run_dir)
    return written


SECTION_NEEDS = {"likelihood": "likelihood", "collapse": "gaussian_latent", "sample_quality": "sample"}


def absent_sections(model) -> dict[str, str]:
    """{section: why it is absent} for the sections the run's family cannot have."""
    return {sec: f"{model.cfg.name} {MISSING[cap]}" for sec, cap in SECTION_NEEDS.items() if not has(model, cap)}


class _Timer:
    """Wall seconds of each part: tells the user what to shrink (-k, --max-images) when it is slow."""

    def __init__(self):
        self.start, self.parts = time.perf_counter(), {}

    def __call__(self, name: str, fn, *args):
        t = time.perf_counter()
        out = fn(*args)
        self.parts[name] = round(time.perf_counter() - t, 1)
        return out

    def total(self) -> float:
        return round(time.perf_counter() - self.start, 1)


def _load_inception(weights: str | None):
    if not weights:
        return None
    from medivae.evaluation.inception import load_fid_inception

    return load_fid_inception(weights)
