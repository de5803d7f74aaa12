"""``medivae synthesize``: sample a run, drop the samples that look memorised, write the rest.

Opens the run (:mod:`medivae.runfolder.run`), samples its family, applies the nearest-neighbour filter of
:mod:`medivae.evaluation.privacy` in pixel and reference-feature space, and writes the kept images
(PNG + labels.csv, or .npz), nearest-pair PNGs, memorisation.json and ``results.json["privacy"]``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import torch

from medivae.data import load_dataset
from medivae.data.imageset import label_code
from medivae.evaluation.bootstrap import mean_ci
from medivae.evaluation.privacy import (
    SpaceCheck,
    check_space,
    membership_auroc,
    memorisation_report,
    nearest,
    pixel_vectors,
)
from medivae.models.family import has, require
from medivae.models.inference import map_batches, sample_batches
from medivae.models.samplers import DEFAULT_SAMPLING_STEPS, check_options
from medivae.runfolder.results import RESULTS_FILE, merge_results, read_results
from medivae.runfolder.run import load_run
from medivae.runtime.constants import BOOTSTRAP_RESAMPLES
from medivae.runtime.errors import UserError
from medivae.runtime.images import grid, save_png
from medivae.runtime.io import atomic_write_bytes, atomic_write_text, relocated, staged_folder
from medivae.runtime.seeding import numpy_rng, torch_generator
from medivae.workflows.evaluate import shared_reference

MEMORISATION_FILE = "memorisation.json"  # written last: a folder holding it is a complete synthesize output
MEMBERSHIP_DRAWS = 8  # draws of (t, noise) per image for the diffusion-loss membership test


def _label_plan(model, cfg, label: str | None, n: int) -> tuple[np.ndarray | None, list[str]]:
    """(class index to condition each image on, or None; label name written for each image)."""
    names = list(cfg.label_names)
    if has(model, "conditional"):
        if label is None:  # balanced classes
            codes = np.arange(n) % model.num_classes
        elif label_code(names, label) is not None:
            codes = np.full(n, label_code(names, label))
        else:
            raise UserError(f"unknown label {label!r}; this run knows {names}")
        return codes, [names[c] for c in codes]
    trained = tuple(cfg.data.labels)
    if label is None:
        return None, [trained[0] if len(trained) == 1 else ""] * n
    if trained == (label,):
        return None, [label] * n
    raise UserError(
        f"--label {label!r}: this unconditional run was trained on "
        f"{list(trained) or 'every label'}; fit one run per class (--labels {label}) or a cvae"
    )


def generate_uint8(model, codes: np.ndarray | None, n: int, seed: int, latent_sampler=None, guidance: float = 0.0,
                   sampling_steps: int | None = None, progress: bool = False) -> np.ndarray:
    """n samples of the family, uint8 (n, C, H, W), each conditioned on codes[i] when given; from
    ``latent_sampler`` (a post-hoc sampler, medivae.models.samplers) instead of the prior when given, with
    the diffusion sampler's ``guidance`` and ``sampling_steps``."""
    y = None if codes is None else torch.as_tensor(codes).long()
    batches = sample_batches(model, n, torch_generator(seed, "synthesize"), y, precision="fp32",
                             latent_sampler=latent_sampler, guidance=guidance, sampling_steps=sampling_steps,
                             progress=progress)  # to uint8 a batch at a time: a quarter of the memory
    return np.concatenate([(b * 255).round().clamp(0, 255).to(torch.uint8).numpy() for b in batches])


def write_synthetic(
    folder, images: np.ndarray, label_names: list[str], known: tuple[str, ...], fmt: str
) -> dict:
    """PNG files + labels.csv (path,label: a medivae CSV source), or synthetic.npz (MedMNIST layout)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "npz":
        codes = np.array([known.index(s) if s in known else -1 for s in label_names], dtype=np.int64)
        arr = images[:, 0] if images.shape[1] == 1 else images.transpose(0, 2, 3, 1)
        buf = io.BytesIO()
        np.savez_compressed(
            buf,
            train_images=arr,
            train_labels=codes[:, None],
            label_names=np.array(known or ("",), dtype=str),
        )
        atomic_write_bytes(folder / "synthetic.npz", buf.getvalue())
        return {"images": str(folder / "synthetic.npz")}
    buf = io.StringIO()
    rows = csv.writer(buf, lineterminator="\n")  # quotes a label holding a comma or a quote
    rows.writerow(["path", "label"])
    for i, (img, lab) in enumerate(zip(images, label_names, strict=True)):
        rel = f"images/{i:06d}.png"
        save_png(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0), folder / rel)
        rows.writerow([rel, lab])
    atomic_write_text(folder / "labels.csv", buf.getvalue())
    return {"images": str(folder / "images"), "labels": str(folder / "labels.csv")}


def _reference(run_dir, cfg, epochs: int, progress: bool, device):
    """The reference extractor (features.py), trained on every label of the run's source so it can
    tell classes apart even when the run itself saw one class; shared under $MEDIVAE_CACHE/reference."""
    data = dataclasses.replace(cfg.data, labels=())
    return shared_reference(data, load_dataset(data, progress=False)["train"], epochs, progress, device)


def synthesize_run(
    run_dir,
    n: int,
    out,
    label: str | None = None,
    percentile: float = 1.0,
    fmt: str = "png",
    seed: int | None = None,
    n_pairs: int = 8,
    reference_epochs: int = 5,
    device: str = "auto",
    progress: bool = True,
    sampler: str = "prior",
    bootstrap: int = BOOTSTRAP_RESAMPLES,
    guidance: float = 0.0,
    sampling_steps: int | None = None,
) -> dict:
    """Sample n images, reject those closer to the training set than reconstructions of held-out images
    are, write the rest; a membership-inference AUROC and (``bootstrap`` > 0) 95 % intervals.
    ``sampler``: "prior", or a post-hoc latent sampler of the run (medivae fit-sampler); ``guidance`` and
    ``sampling_steps``: the diffusion sampler's."""
    if n < 1 or not 0 <= percentile <= 100 or fmt not in ("png", "npz") or n_pairs < 0 or bootstrap < 0:
        raise UserError(
            f"need -n >= 1, 0 <= --percentile <= 100, --format png|npz (got {n}, {percentile}, {fmt})"
        )
    read_results(Path(run_dir) / RESULTS_FILE)  # fail now, not after sampling, if it cannot be merged into
    run = load_run(run_dir, device=device)
    model, cfg, dev = run.model, run.config, run.device
    if sampler == "prior":
        require(model, "sample", "synthesize")
    check_options(sampler, guidance, sampling_steps, has(model, "conditional"))
    latent = run.latent_sampler(sampler)
    codes, names = _label_plan(model, cfg, label, n)
    fake = generate_uint8(model, codes, n, cfg.train.seed if seed is None else seed, latent, guidance,
                          sampling_steps, progress)
    splits = load_dataset(cfg.data, progress=False)
    train, held = splits["train"], splits["test"] if len(splits["test"]) else splits["val"]
    ref = _reference(run_dir, cfg, reference_epochs, progress, dev)
    checks = memorisation_checks(run, fake, train, held, percentile, ref)
    rejected, report = memorisation_report(checks, percentile)
    report["calibration"] = (f"reconstructions of the {len(held)} held-out images: as smooth as samples, and "
                             "never copies, so blur is not taken for copying")
    report["membership_inference"] = membership_inference(run, train, held, fake, bootstrap, cfg.train.seed,
                                                          run.diffusion_prior(sampler))
    if bootstrap:
        report["ci95"] = {"memorisation_rate": mean_ci(rejected.astype(np.float64), bootstrap, cfg.train.seed)}
    keep = np.flatnonzero(~rejected)
    report.update(
        run=str(run_dir), run_absolute=str(Path(run_dir).resolve()),  # utility checks it against its --run
        sampler=sampler, **({"guidance": guidance, "sampling_steps": sampling_steps or DEFAULT_SAMPLING_STEPS}
                            if sampler == "diffusion" else {}),
        label=label, n_written=len(keep), reference_folder=str(ref.folder), reference_hash=ref.folder.name,
        n_train=len(train), n_held_out=len(held),
    )
    out = Path(out)
    with staged_folder(out) as stage:  # all of the output or none of it, even over an earlier one (--force)
        files = _write_outputs(stage, fake, keep, names, cfg, fmt, checks, train, n_pairs)
        report["files"] = relocated(files, stage, out)
        atomic_write_text(stage / MEMORISATION_FILE, json.dumps(report, indent=2) + "\n")
    merge_results(Path(run_dir) / RESULTS_FILE, "privacy", report)
    return report


def _write_outputs(out: Path, fake: np.ndarray, keep: np.ndarray, names: list, cfg, fmt: str, checks, train,
                   n_pairs: int) -> dict:
    """The kept synthetic images with their labels, and a figure of each check's nearest training pairs."""
    files = write_synthetic(out, fake[keep], [names[i] for i in keep], tuple(cfg.label_names), fmt)
    for c in checks:
        if n_pairs:
            pair_figure(fake, train.images, c, out / f"nearest_{c.name}.png", n_pairs)
            files[f"nearest_{c.name}"] = str(out / f"nearest_{c.name}.png")
    return files


def _uint8(x: torch.Tensor) -> np.ndarray:
    return (x * 255).round().clamp(0, 255).to(torch.uint8).numpy()


def memorisation_checks(run, fake: np.ndarray, train, held, percentile: float, ref=None) -> list[SpaceCheck]:
    """Nearest-training-image checks of ``fake`` uint8 (N, C, H, W) in pixel space (and the reference
    extractor's feature space), calibrated on the run's reconstructions of the ``held`` images."""
    recon = _uint8(run.reconstruct(held.images, labels=held.labels))
    spaces = [("pixel", pixel_vectors)] + ([(f"feature-{ref.name}", ref.features)] if ref is not None else [])
    return [check_space(name, f(fake), f(train.images), f(recon), percentile) for name, f in spaces]


def membership_inference(run, train, held, fake: np.ndarray, n_boot: int, seed: int, diffusion=None) -> dict:
    """Can training images be told from held-out ones? As many training images as held-out ones (drawn
    with the seed), scored by the model's ELBO (where the family has a likelihood: a member is more
    likely), by the loss of the diffusion prior the samples came from (``diffusion``, a
    :class:`medivae.models.healing.LatentDiffusion`: a member has a lower loss, Carlini et al. 2023) and by the
    pixel distance to the nearest synthetic image (a member is nearer)."""
    m = min(len(train), len(held))
    members = train.subset(np.sort(numpy_rng(seed, "membership").choice(len(train), m, replace=False)))
    out: dict = {"note": "AUROC of telling training from held-out images; 0.5: indistinguishable"}
    if has(run.model, "likelihood"):
        elbo = [-neg_elbo(run, s, seed) for s in (members, held)]
        out["elbo"] = membership_auroc(*elbo, n_boot=n_boot, seed=seed)
    if diffusion is not None:
        loss = [-diffusion_loss(run, diffusion, s, seed) for s in (members, held)]
        out["diffusion_loss"] = {**membership_auroc(*loss, n_boot=n_boot, seed=seed), "prior": diffusion.source,
                                 "draws_per_image": MEMBERSHIP_DRAWS}
    d = [nearest(pixel_vectors(s.images), pixel_vectors(fake))[0] for s in (members, held)]
    out["nearest_synthetic_pixel"] = membership_auroc(-d[0], -d[1], n_boot=n_boot, seed=seed)
    return out


def neg_elbo(run, s, seed: int) -> np.ndarray:
    """-ELBO in nats of each image of ``s`` (one posterior draw; a conditional family given each image's own
    label), float64 (N,)."""
    model, gen = run.model, torch.Generator().manual_seed(seed)
    return map_batches(model, lambda x, y: model.log_weights(x, y, 1, gen).neg_elbo(), run.images(s.images),
                       run.labels(s.labels)).double().numpy()


def diffusion_loss(run, diffusion, s, seed: int) -> np.ndarray:
    """The diffusion prior's ε-MSE of each image of ``s``, averaged over MEMBERSHIP_DRAWS seeded draws of t and
    noise (a conditional family's prior given each image's own label), float64 (N,)."""
    gen = torch_generator(seed, "membership-diffusion-loss")
    return map_batches(run.model, lambda x, y: diffusion.loss(x, y, gen, MEMBERSHIP_DRAWS), run.images(s.images),
                       run.labels(s.labels)).double().numpy()


def pair_figure(synthetic: np.ndarray, train: np.ndarray, check: SpaceCheck, path, n: int = 8) -> None:
    """The ``n`` closest (synthetic, nearest training image) pairs of one space as a PNG, pair by pair."""
    order = np.argsort(check.synthetic)[:n]
    pairs = np.stack([synthetic[order], train[check.neighbour[order]]], 1)  # (n, 2, C, H, W)
    mosaic = grid(pairs.reshape(-1, *synthetic.shape[1:]), nrow=2 * min(4, len(order)))  # 4 pairs a row
    save_png(mosaic, path, min_side=256)
