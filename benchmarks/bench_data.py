"""Data loading: MedNIST (58,954 JPEGs in a .tar.gz) decoded on the first load vs read from the
decoded cache, and the images/s a training loop receives from the cached memmap.

    python benchmarks/bench_data.py [--source ../shared/data/mednist/MedNIST.tar.gz]
                                    [--out benchmarks/results/data.json]

The cache goes to a fresh temporary folder (removed afterwards) unless --cache-dir is given.
The batch loop reads through the trainer's own ``batch_source``/``gather`` and ``to_float``.
Note: the page cache is warm (the entry was just written); a cold read from disk is slower.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SEED = 1767661200070


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def batch_rate(images, batch_size: int, batches: int, seed: int, convert: bool = True) -> float:
    """Images/s of random batches as the training loop gathers them; ``convert``: also uint8 -> float."""
    from medivae.data import to_float
    from medivae.train.trainer import batch_source, gather

    source = batch_source(images)
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(batches):
        idx = torch.randint(0, len(images), (batch_size,), generator=g)
        x = gather(source, idx)
        if convert:
            x = to_float(x)
    seconds = time.perf_counter() - start
    assert x.shape[0] == batch_size
    return batches * batch_size / seconds


def _folder_bytes(root: Path) -> int:
    return int(sum(f.stat().st_size for f in root.rglob("*") if f.is_file()))


def run(args) -> dict:
    from medivae.data import load_dataset, load_source
    from medivae.runfolder.config import DataConfig

    cfg = DataConfig(source=str(args.source), image_size=args.image_size)
    first, t_first = timed(lambda: load_source(cfg, progress=False))
    full = first["all"]
    assert full.meta["cache"] == "built", "the cache folder was not empty"
    second, t_cached = timed(lambda: load_source(cfg, progress=False))
    assert second["all"].meta["cache"] == "hit"
    splits, t_split_first = timed(lambda: load_dataset(cfg, progress=False))
    _, t_split_cached = timed(lambda: load_dataset(cfg, progress=False))
    train = splits["train"].images
    in_ram = np.array(train)  # the same split held in memory, for comparison
    return {
        "source": str(args.source),
        "n_images": len(full),
        "n_skipped": full.meta["n_skipped"],
        "image_shape": list(full.images.shape[1:]),
        "first_load_s": round(t_first, 3),
        "first_load_images_per_s": round(len(full) / t_first, 1),
        "cached_load_s": round(t_cached, 3),
        "speedup": round(t_first / t_cached, 1),
        "load_dataset_first_s": round(t_split_first, 3),
        "load_dataset_cached_s": round(t_split_cached, 3),
        "train_split": {"n": len(train), "memmap": isinstance(train, np.memmap)},
        "batch_loop": {
            "batch_size": args.batch_size,
            "batches": args.batches,
            "memmap_images_per_s": round(batch_rate(train, args.batch_size, args.batches, SEED), 1),
            "in_ram_images_per_s": round(batch_rate(in_ram, args.batch_size, args.batches, SEED), 1),
            "memmap_gather_only_images_per_s": round(batch_rate(train, args.batch_size, args.batches, SEED,
                                                                convert=False), 1),
            "in_ram_gather_only_images_per_s": round(batch_rate(in_ram, args.batch_size, args.batches, SEED,
                                                                convert=False), 1),
        },
        "cache_bytes": _folder_bytes(Path(os.environ["MEDIVAE_CACHE"])),
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "torch": torch.__version__,
            "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        },
        "notes": "warm page cache; times are wall clock on a shared machine",
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mednist = REPO.parent / "shared" / "data" / "mednist" / "MedNIST.tar.gz"
    p.add_argument("--source", type=Path, default=mednist)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "data.json")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--batches", type=int, default=300)
    p.add_argument("--cache-dir", type=Path, default=None, help="default: a temporary folder")
    args = p.parse_args(argv)
    if not args.source.exists():
        raise SystemExit(f"{args.source}: not found (pass --source)")
    cache = args.cache_dir or Path(tempfile.mkdtemp(prefix="medivae-bench-data-"))
    os.environ["MEDIVAE_CACHE"] = str(cache)
    try:
        result = run(args)
    finally:
        if args.cache_dir is None:
            shutil.rmtree(cache, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
