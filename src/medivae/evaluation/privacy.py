"""A memorisation filter for synthetic images: nearest-neighbour distances to the training set.

A synthetic image is rejected when it lies closer to its nearest training image than all but
``percentile`` % of real held-out (test) images lie to theirs, in pixel space or in the reference
feature space. Real unseen images set the scale of "close", so the filter adapts to how
redundant the data set itself is (the distance-to-closest-record test of synthetic-data privacy
audits, e.g. Yale et al. 2020; the feature space follows Meehan et al. 2020). A rate near
``percentile`` % means the model copies no more than fresh real data resembles its training set.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from medivae.data.imageset import label_code, to_float


def pixel_vectors(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """uint8 (N, C, H, W) or float in [0, 1] -> float32 (N, C*H*W) scaled so distances are RMS per pixel."""
    x = to_float(images) if isinstance(images, np.ndarray) else images.float().cpu()
    flat = x.flatten(1)
    return (flat / np.sqrt(flat.shape[1])).numpy()


def nearest(query: np.ndarray, reference: np.ndarray, batch: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distance from each query row (N, F) to its nearest reference row (M, F), and its index."""
    ref = torch.as_tensor(reference, dtype=torch.float64)  # float64: a copy's distance stays ~1e-7, not 1e-3
    dist, idx = [], []
    for i in range(0, len(query), batch):
        q = torch.as_tensor(query[i : i + batch], dtype=torch.float64)
        d = torch.cdist(q, ref)
        m, j = d.min(1)
        dist.append(m)
        idx.append(j)
    if not dist:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    return torch.cat(dist).double().numpy(), torch.cat(idx).numpy()


@dataclass
class SpaceCheck:
    """Nearest-training-image distances in one space.

    synthetic: (N,) distances of synthetic images; neighbour: (N,) index of their nearest training image;
    real: (M,) distances of real held-out images; threshold: the ``percentile`` of ``real``.
    """

    name: str
    synthetic: np.ndarray
    neighbour: np.ndarray
    real: np.ndarray
    threshold: float

    @property
    def rejected(self) -> np.ndarray:
        return self.synthetic <= self.threshold  # "<=": an exact copy is caught even when the threshold is 0

    def summary(self) -> dict:
        q = (1, 5, 50)
        return {
            "threshold": self.threshold,
            "n_rejected": int(self.rejected.sum()),
            "synthetic_distance_percentiles": {str(p): float(np.percentile(self.synthetic, p)) for p in q},
            "real_distance_percentiles": {str(p): float(np.percentile(self.real, p)) for p in q},
        }


def check_space(
    name: str, synthetic: np.ndarray, train: np.ndarray, held_out: np.ndarray, percentile: float
) -> SpaceCheck:
    """Vectors (N, F), (M, F), (K, F) of one space -> the distances and the percentile threshold."""
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], not {percentile}")
    if len(held_out) == 0:
        raise ValueError("need real held-out images to set the distance threshold")
    d_syn, nn_syn = nearest(synthetic, train)
    d_real, _ = nearest(held_out, train)
    return SpaceCheck(name, d_syn, nn_syn, d_real, float(np.percentile(d_real, percentile)))


def memorisation_report(checks: list[SpaceCheck], percentile: float) -> tuple[np.ndarray, dict]:
    """(rejected mask (N,): rejected in any space, JSON-able report)."""
    rejected = np.zeros(len(checks[0].synthetic), dtype=bool)
    for c in checks:
        rejected |= c.rejected
    n = len(rejected)
    report = {
        "n_synthetic": n,
        "percentile": percentile,
        "n_rejected": int(rejected.sum()),
        "memorisation_rate": float(rejected.mean()) if n else 0.0,
        "expected_rate_for_fresh_real_images": percentile / 100.0,  # per space; the union can be higher
        "spaces": {c.name: c.summary() for c in checks},
    }
    return rejected, report


def pair_figure(synthetic: np.ndarray, train: np.ndarray, check: SpaceCheck, path, n: int = 8) -> None:
    """The ``n`` closest (synthetic, nearest training image) pairs of one space as a PNG, pair by pair."""
    from medivae.generate import grid, save_png

    order = np.argsort(check.synthetic)[:n]
    pairs = np.stack([synthetic[order], train[check.neighbour[order]]], 1)  # (n, 2, C, H, W)
    mosaic = grid(pairs.reshape(-1, *synthetic.shape[1:]), nrow=2 * min(4, len(order)))  # 4 pairs a row
    save_png(mosaic, path, min_side=256)


# --- run-level: what ``api.synthesize`` calls -------------------------------------------------------------
def _label_plan(model, cfg, label: str | None, n: int) -> tuple[np.ndarray | None, list[str]]:
    """(class index to condition each image on, or None; label name written for each image)."""
    from medivae.errors import UserError
    from medivae.models.family import has

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


def generate_uint8(model, codes: np.ndarray | None, n: int, seed: int) -> np.ndarray:
    """n samples of the family, uint8 (n, C, H, W), each conditioned on codes[i] when given."""
    from medivae.generate import sample_images
    from medivae.seeding import torch_generator

    y = None if codes is None else torch.as_tensor(codes).long()
    img = sample_images(model, n, torch_generator(seed, "synthesize"), y, precision="fp32")
    return (img * 255).round().clamp(0, 255).to(torch.uint8).numpy()


def write_synthetic(
    folder, images: np.ndarray, label_names: list[str], known: tuple[str, ...], fmt: str
) -> dict:
    """PNG files + labels.csv (path,label: a medivae CSV source), or synthetic.npz (MedMNIST layout)."""
    from pathlib import Path

    from medivae.generate import save_png
    from medivae.io import atomic_write_bytes, atomic_write_text

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "npz":
        import io

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
    import dataclasses
    from pathlib import Path

    from medivae.data import load_dataset
    from medivae.evaluation.features import load_or_fit_reference

    data = dataclasses.replace(cfg.data, labels=())
    train = load_dataset(data, cfg.train.seed, progress=False)["train"]
    keep = (
        "source",
        "image_size",
        "channels",
        "labels",
        "val_fraction",
        "test_fraction",
        "resize_mode",
        "window",
    )
    desc = {k: getattr(data, k) for k in keep}  # the evaluation suite's key: one cache for both tools
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
) -> dict:
    """Sample n images, reject those closer to the training set than real test images are, write the rest."""
    import json
    from pathlib import Path

    from medivae.data import load_dataset
    from medivae.errors import UserError
    from medivae.io import atomic_write_text
    from medivae.models.family import require
    from medivae.results import merge_results, read_results
    from medivae.run import load_run

    if n < 1 or not 0 <= percentile <= 100 or fmt not in ("png", "npz") or n_pairs < 0:
        raise UserError(
            f"need -n >= 1, 0 <= --percentile <= 100, --format png|npz (got {n}, {percentile}, {fmt})"
        )
    read_results(Path(run_dir) / "results.json")  # fail now, not after sampling, if it cannot be merged into
    run = load_run(run_dir, device=device)
    model, cfg, dev = run.model, run.config, run.device
    require(model, "sample", "synthesize")
    codes, names = _label_plan(model, cfg, label, n)
    fake = generate_uint8(model, codes, n, cfg.train.seed if seed is None else seed)
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
        label=label,
        n_written=len(keep),
        reference_folder=str(ref.folder),
        n_train=len(train),
        n_held_out=len(held),
        files=files,
    )
    atomic_write_text(out / "memorisation.json", json.dumps(report, indent=2) + "\n")
    merge_results(Path(run_dir) / "results.json", "privacy", report)
    return report
