"""``medivae utility``: is a synthetic set useful? Read what ``medivae synthesize`` wrote, load the real
data, and run the train-on-synthetic / test-on-real comparison of :mod:`medivae.evaluation.utility`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from medivae.data import load_dataset
from medivae.data.folder import read_csv_list
from medivae.data.imageset import ImageSet, concat, image_hashes
from medivae.data.npz import load_npz
from medivae.data.readers import ReadOptions, UnreadableFile, read_prepared
from medivae.data.sources import same_source
from medivae.evaluation.utility import tstr
from medivae.runfolder.config import DataConfig
from medivae.runtime.constants import BOOTSTRAP_RESAMPLES, IMAGE_SIZES
from medivae.runtime.device import pick_device
from medivae.runtime.errors import UserError
from medivae.runtime.io import atomic_write_text
from medivae.runtime.seeding import DEFAULT_SEED


# --- reading what ``medivae synthesize`` wrote --------------------------------------------------------------
def load_synthetic(folder: str | Path, channels: int | None = None) -> tuple[np.ndarray, list[str]]:
    """uint8 images (N, C, S, S) and a label name per image from a synthesize folder (labels.csv or .npz)."""
    folder = Path(folder)
    if (folder / "synthetic.npz").is_file() or folder.suffix == ".npz":
        return _load_npz(folder / "synthetic.npz" if folder.is_dir() else folder)
    if (folder / "labels.csv").is_file():
        return _load_csv(folder / "labels.csv", channels)
    raise UserError(
        f"{folder}: no labels.csv or synthetic.npz; point --synthetic at a 'medivae synthesize' folder"
    )


def _load_csv(path: Path, channels: int | None) -> tuple[np.ndarray, list[str]]:
    from PIL import Image

    files, labels, _ = read_csv_list(path)
    if not files:
        raise UserError(f"{path} lists no images")
    try:
        with Image.open(files[0]) as im:
            size, gray = im.size[0], im.mode in ("L", "I;16", "I", "F")
        ch = channels or (1 if gray else 3)
        images = np.concatenate([read_prepared(f, size, ReadOptions(channels=ch)) for f in files])
    except (UnreadableFile, OSError, ValueError, SyntaxError) as e:
        raise UserError(f"{path.parent}: cannot read a synthetic image ({type(e).__name__}: {e})") from None
    return images, labels


def _load_npz(path: Path) -> tuple[np.ndarray, list[str]]:
    train = load_npz(path)["train"]
    with np.load(path, allow_pickle=False) as d:
        known = [str(s) for s in d["label_names"]] if "label_names" in d.files else list(train.label_names)
    return train.images, [known[c] if 0 <= c < len(known) else "" for c in train.labels]


def as_imageset(images: np.ndarray, label_names: list[str], names: tuple[str, ...], where: str) -> ImageSet:
    """Synthetic images with label *names* -> an ImageSet coded like the real data (``names``)."""
    unknown = sorted({s for s in label_names if s not in names})
    if unknown:
        raise UserError(
            f"{where}: synthetic label(s) {unknown} are not labels of the real data {list(names)}"
        )
    return ImageSet(images, np.array([names.index(s) for s in label_names], dtype=np.int64), names)


def _check_synthetic(synthetic: list, parts: list, runs: list | None, force: bool) -> list[str]:
    """What makes these synthetic sets unfit for the comparison, as one line (a UserError) unless ``force``
    (then returned as notes): a folder given twice (its images would count double), a single class (TSTR has
    nothing to tell apart), a folder whose memorisation.json names a run not among ``runs``."""
    why, seen = [], {}
    for folder in map(Path, synthetic):
        key = folder.resolve()
        if key in seen:
            why.append(f"--synthetic names {seen[key]} twice ({folder})")
        seen.setdefault(key, folder)
    classes = sorted({s for _, labels in parts for s in labels})
    if len(classes) < 2:
        why.append(f"the synthetic images hold one class only ({classes[0] if classes else 'unlabelled'!r}); "
                   "synthesize every class (one folder per class, or a conditional run)")
    if runs:
        ours = {Path(r).resolve() for r in runs}
        for folder in map(Path, synthetic):
            made_by = _synthesized_by(folder)
            if made_by is not None and made_by.resolve() not in ours:
                why.append(f"{folder} was synthesized by {made_by}, which is not among --run")
    if why and not force:
        raise UserError(f"{'; '.join(why)}; pass --force to use them anyway")
    return why


def _synthesized_by(folder: Path) -> Path | None:
    """The run a synthesize folder's memorisation.json names (None when it names none or cannot be read)."""
    path = (folder if folder.is_dir() else folder.parent) / "memorisation.json"
    try:
        record = json.loads(path.read_text())
        run = record.get("run_absolute") or record.get("run")
    except (OSError, ValueError, AttributeError):
        return None
    return Path(run) if isinstance(run, str) and run else None


# --- the real data: the VAE runs' own split -----------------------------------------------------------------
_SAME_DATA = ("source", "image_size", "channels", "resize_mode", "window", "normalize", "nifti_axis",
              "val_fraction", "test_fraction", "split_seed")


def _check_same_data(runs: list, real: str | None) -> None:
    c0 = runs[0].config
    for r in runs[1:]:
        diff = [k for k in _SAME_DATA if getattr(r.config.data, k) != getattr(c0.data, k)]
        if diff:
            raise UserError(f"runs {runs[0].folder} and {r.folder} differ in {diff}; "
                            "utility needs runs trained on the same data and split")
    if real is not None and not same_source(real, c0.data.source):
        raise UserError(f"--real {real} is not the source the run {runs[0].folder} trained on "
                        f"({c0.data.source}); drop --real to use the run's own data and split")


def run_real_splits(runs: list) -> tuple[dict[str, ImageSet], dict]:
    """Real train/test for TSTR that no run trained on: each class takes the split of the first run that
    was fitted on it (``Run.splits()``: the run's seed, fractions and label filter); classes no run saw
    take the same-seed split of the rest of the source. A test image whose pixels equal any run's
    training image (a duplicate in the source) is dropped, so the overlap is zero by content."""
    _check_same_data(runs, None)
    cfg = runs[0].config
    everything = runs[0].splits(cfg.data.source)  # every label: the label names and codes
    names = everything["train"].label_names
    parts: dict[str, list[ImageSet]] = {"train": [], "test": []}
    covered: set[int] = set()
    trained = []
    for r in runs:
        own = r.splits()
        trained.append(own["train"].images)
        codes = set(np.unique(own["train"].labels).tolist()) - covered
        for k in parts:
            parts[k].append(own[k].subset(np.flatnonzero(np.isin(own[k].labels, sorted(codes)))))
        covered |= codes
    rest = [names[c] for c in range(len(names)) if c not in covered]
    if rest:
        other = load_dataset(dataclasses.replace(cfg.data, labels=tuple(rest)), progress=False)
        for k in parts:
            parts[k].append(other[k])
    out = {k: concat(v, names) for k, v in parts.items()}
    seen = set(np.concatenate([image_hashes(t) for t in trained]).tolist())
    clean = np.flatnonzero([h not in seen for h in image_hashes(out["test"].images)])
    info = {"runs": [str(r.folder) for r in runs], "source": cfg.data.source, "split_seed": cfg.data.split_seed,
            "run_labels": [list(r.config.data.labels) for r in runs], "labels_from_rest_of_source": rest,
            "n_test_dropped_as_training_duplicates": int(len(out["test"]) - len(clean))}
    out["test"] = out["test"].subset(clean)
    return out, info


def _source_splits(real: str, size: int, channels: int, seed: int | None, val_fraction: float,
                   test_fraction: float) -> tuple[dict[str, ImageSet], dict]:
    """Without a run: ``real`` split with ``seed`` and the fractions (cannot know what a VAE trained on)."""
    seed = DEFAULT_SEED if seed is None else seed
    data = DataConfig(source=str(real), image_size=size, channels=channels, val_fraction=val_fraction,
                      test_fraction=test_fraction, split_seed=seed)
    splits = load_dataset(data, progress=False)
    info = {"seed": seed, "note": "real data split by utility itself; pass --run to use the VAE run's split"}
    return splits, info


# --- run-level: what ``api.utility`` calls ------------------------------------------------------------------
def _runs_real_splits(runs: list, real, channels: int, size: int, seed: int | None):
    """The real splits of the VAE runs the synthetic images came from (checked to be one data set of the
    synthetic images' shape): (splits, split record, seed, source)."""
    from medivae.runfolder.run import load_run

    opened = [load_run(r, device="cpu") for r in runs]
    _check_same_data(opened, real)
    d = opened[0].config.data
    if (d.channels, d.image_size) != (channels, size):
        raise UserError(f"synthetic images are {channels}x{size}x{size}, the run's data "
                        f"{d.channels}x{d.image_size}x{d.image_size}")
    splits, split_info = run_real_splits(opened)
    return splits, split_info, opened[0].config.train.seed if seed is None else seed, d.source


def utility_run(
    real: str | None,
    synthetic: list,
    out=None,
    epochs: int = 10,
    seed: int | None = None,
    width: int = 32,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    device: str = "auto",
    progress: bool = True,
    batch_size: int = 128,
    runs: list | None = None,
    bootstrap: int = BOOTSTRAP_RESAMPLES,
    force: bool = False,
) -> dict:
    """TSTR / real+synthetic / real-only on a real test split no VAE trained on; written to ``out`` (JSON).
    ``runs``: the VAE run folders the synthetic images came from (their split and labels are used)."""
    if min(epochs, width, batch_size) < 1 or bootstrap < 0:
        raise UserError(f"--epochs, --width and --batch-size must be >= 1 and --bootstrap >= 0 "
                        f"(got {epochs}, {width}, {batch_size}, {bootstrap})")
    if real is None and not runs:
        raise UserError("pass --run RUN (the VAE run the synthetic images came from) or --real SOURCE")
    parts = [load_synthetic(d) for d in synthetic]
    notes = _check_synthetic(synthetic, parts, runs, force)
    shapes = {p[0].shape[1:] for p in parts}
    if len(shapes) != 1:
        raise UserError(f"the synthetic folders hold images of different shapes {sorted(shapes)}")
    channels, size, _ = shapes.pop()
    if size not in IMAGE_SIZES:
        raise UserError(f"synthetic images are {size}x{size}; medivae sizes are {list(IMAGE_SIZES)}")
    if runs:
        splits, split_info, seed, real = _runs_real_splits(runs, real, channels, size, seed)
    else:
        splits, split_info = _source_splits(real, size, channels, seed, val_fraction, test_fraction)
        seed = split_info["seed"]
    train, test = splits["train"], splits["test"]
    train.images = np.array(train.images)  # in memory: the cache's read-only memmap makes torch warn
    names = train.label_names
    if len(names) < 2 or (test.labels < 0).any() or len(test) == 0:
        raise UserError(f"{real}: utility needs a labelled real test split with at least 2 classes")
    syn = as_imageset(np.concatenate([p[0] for p in parts]), [s for p in parts for s in p[1]], names,
                      ", ".join(map(str, synthetic)))
    result = {
        "real": str(real), "real_split": split_info, "synthetic": [str(s) for s in synthetic],
        "n_synthetic": len(syn), "image_size": size, "epochs": epochs, "batch_size": batch_size, "seed": seed,
        "classifier_width": width, "bootstrap": bootstrap, "notes": notes,
        **tstr(train, syn, test, epochs, seed, width, progress, pick_device(device), batch_size, bootstrap),
    }
    out = Path(out) if out is not None else Path(synthetic[0]) / "utility.json"
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    result["file"] = str(out)
    return result
