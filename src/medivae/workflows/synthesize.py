"""``medivae synthesize``: sample a run, drop the samples that look memorised, write the rest.

Opens the run (:mod:`medivae.run`), samples its family, applies the nearest-neighbour filter of
:mod:`medivae.evaluation.privacy` in pixel and reference-feature space, and writes the kept images
(PNG + labels.csv, or .npz), nearest-pair PNGs, memorisation.json and ``results.json["privacy"]``.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import torch

from medivae.data import load_dataset
from medivae.data.imageset import label_code
from medivae.errors import UserError
from medivae.evaluation.features import load_or_fit_reference
from medivae.evaluation.privacy import SpaceCheck, check_space, memorisation_report, pixel_vectors
from medivae.generate import grid, sample_images, save_png
from medivae.io import atomic_write_bytes, atomic_write_text
from medivae.models.family import has, require
from medivae.results import RESULTS_FILE, merge_results, read_results
from medivae.run import load_run
from medivae.seeding import torch_generator
from medivae.workflows.evaluate import reference_description


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


def generate_uint8(model, codes: np.ndarray | None, n: int, seed: int, latent_sampler=None) -> np.ndarray:
    """n samples of the family, uint8 (n, C, H, W), each conditioned on codes[i] when given; from
    ``latent_sampler`` (a post-hoc sampler, medivae.samplers) instead of the prior when given."""
    y = None if codes is None else torch.as_tensor(codes).long()
    img = sample_images(model, n, torch_generator(seed, "synthesize"), y, precision="fp32",
                        latent_sampler=latent_sampler)
    return (img * 255).round().clamp(0, 255).to(torch.uint8).numpy()


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
    rows = ["path,label"]
    for i, (img, lab) in enumerate(zip(images, label_names, strict=True)):
        rel = f"images/{i:06d}.png"
        save_png(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0), folder / rel)
        rows.append(f"{rel},{lab}")
    atomic_write_text(folder / "labels.csv", "\n".join(rows) + "\n")
    return {"images": str(folder / "images"), "labels": str(folder / "labels.csv")}


def _reference(run_dir, cfg, epochs: int, progress: bool, device):
    """The reference extractor (features.py), trained on every label of the run's source so it can
    tell classes apart even when the run itself saw one class; cached under RUN/reference/."""
    data = dataclasses.replace(cfg.data, labels=())
    train = load_dataset(data, cfg.train.seed, progress=False)["train"]
    desc = reference_description(data)  # evaluate's key: one cache for both tools
    return load_or_fit_reference(
        Path(run_dir) / "reference", train, desc, cfg.train.seed, epochs, progress=progress, device=device
    )


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
) -> dict:
    """Sample n images, reject those closer to the training set than real test images are, write the rest.
    ``sampler``: "prior", or a post-hoc latent sampler of the run (medivae fit-sampler)."""
    if n < 1 or not 0 <= percentile <= 100 or fmt not in ("png", "npz") or n_pairs < 0:
        raise UserError(
            f"need -n >= 1, 0 <= --percentile <= 100, --format png|npz (got {n}, {percentile}, {fmt})"
        )
    read_results(Path(run_dir) / RESULTS_FILE)  # fail now, not after sampling, if it cannot be merged into
    run = load_run(run_dir, device=device)
    model, cfg, dev = run.model, run.config, run.device
    require(model, "sample", "synthesize")
    latent = run.latent_sampler(sampler)
    codes, names = _label_plan(model, cfg, label, n)
    fake = generate_uint8(model, codes, n, cfg.train.seed if seed is None else seed, latent)
    splits = load_dataset(cfg.data, cfg.train.seed, progress=False)
    train, held = splits["train"], splits["test"] if len(splits["test"]) else splits["val"]
    checks = [
        check_space(
            "pixel", pixel_vectors(fake), pixel_vectors(train.images), pixel_vectors(held.images), percentile
        )
    ]
    ref = _reference(run_dir, cfg, reference_epochs, progress, dev)
    checks.append(
        check_space(
            f"feature-{ref.name}",
            ref.features(fake),
            ref.features(train.images),
            ref.features(held.images),
            percentile,
        )
    )
    rejected, report = memorisation_report(checks, percentile)
    out = Path(out)
    keep = np.flatnonzero(~rejected)
    files = write_synthetic(out, fake[keep], [names[i] for i in keep], tuple(cfg.label_names), fmt)
    for c in checks:
        if n_pairs:
            pair_figure(fake, train.images, c, out / f"nearest_{c.name}.png", n_pairs)
            files[f"nearest_{c.name}"] = str(out / f"nearest_{c.name}.png")
    report.update(
        run=str(run_dir),
        sampler=sampler,
        label=label,
        n_written=len(keep),
        reference_folder=str(ref.folder),
        n_train=len(train),
        n_held_out=len(held),
        files=files,
    )
    atomic_write_text(out / "memorisation.json", json.dumps(report, indent=2) + "\n")
    merge_results(Path(run_dir) / RESULTS_FILE, "privacy", report)
    return report


def pair_figure(synthetic: np.ndarray, train: np.ndarray, check: SpaceCheck, path, n: int = 8) -> None:
    """The ``n`` closest (synthetic, nearest training image) pairs of one space as a PNG, pair by pair."""
    order = np.argsort(check.synthetic)[:n]
    pairs = np.stack([synthetic[order], train[check.neighbour[order]]], 1)  # (n, 2, C, H, W)
    mosaic = grid(pairs.reshape(-1, *synthetic.shape[1:]), nrow=2 * min(4, len(order)))  # 4 pairs a row
    save_png(mosaic, path, min_side=256)
