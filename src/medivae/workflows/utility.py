"""``medivae utility``: is a synthetic set useful? Read what ``medivae synthesize`` wrote, load the real
data, and run the train-on-synthetic / test-on-real comparison of :mod:`medivae.evaluation.utility`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from medivae.config import DataConfig
from medivae.constants import IMAGE_SIZES
from medivae.data import load_dataset
from medivae.data.folder import decode_image, read_csv_list
from medivae.data.imageset import ImageSet
from medivae.data.npz import load_npz
from medivae.errors import UserError
from medivae.evaluation.utility import tstr
from medivae.io import atomic_write_text
from medivae.seeding import DEFAULT_SEED
from medivae.train.device import pick_device


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
        images = np.stack([decode_image(f, size, ch, "pad") for f in files])
    except (OSError, ValueError, SyntaxError) as e:
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


# --- run-level: what ``api.utility`` calls ------------------------------------------------------------------
def utility_run(
    real: str,
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
) -> dict:
    """TSTR / real+synthetic / real-only on the real test split of ``real``; written to ``out`` (JSON)."""
    if min(epochs, width, batch_size) < 1:
        raise UserError(
            f"--epochs, --width and --batch-size must be >= 1 (got {epochs}, {width}, {batch_size})"
        )
    parts = [load_synthetic(d) for d in synthetic]
    shapes = {p[0].shape[1:] for p in parts}
    if len(shapes) != 1:
        raise UserError(f"the synthetic folders hold images of different shapes {sorted(shapes)}")
    channels, size, _ = shapes.pop()
    if size not in IMAGE_SIZES:
        raise UserError(f"synthetic images are {size}x{size}; medivae sizes are {list(IMAGE_SIZES)}")
    seed = DEFAULT_SEED if seed is None else seed
    data = DataConfig(
        source=str(real),
        image_size=size,
        channels=channels,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
    )
    splits = load_dataset(data, seed, progress=False)
    train, test = splits["train"], splits["test"]
    train.images = np.array(train.images)  # in memory: the cache's read-only memmap makes torch warn
    names = train.label_names
    if len(names) < 2 or (test.labels < 0).any() or len(test) == 0:
        raise UserError(f"{real}: utility needs a labelled real test split with at least 2 classes")
    syn = as_imageset(
        np.concatenate([p[0] for p in parts]),
        [s for p in parts for s in p[1]],
        names,
        ", ".join(map(str, synthetic)),
    )
    result = {
        "real": str(real),
        "synthetic": [str(s) for s in synthetic],
        "n_synthetic": len(syn),
        "image_size": size,
        "epochs": epochs,
        "batch_size": batch_size,
        "seed": seed,
        "classifier_width": width,
        **tstr(train, syn, test, epochs, seed, width, progress, pick_device(device), batch_size),
    }
    out = Path(out) if out is not None else Path(synthetic[0]) / "utility.json"
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    result["file"] = str(out)
    return result
