"""What each of the trainer's speed settings is worth (issue 7): training images/s of the article's 64 px
model with every setting on, and with each one turned off alone, on the same MedNIST images.

Variants (each one training epoch in a fresh process, after a one-batch warm-up, through the trainer's
own loop and data path; the variants ALTERNATE over ``--rounds`` rounds so that load from other
processes hits them alike; the JSON keeps every run, medians and each median's ratio to ``default``):

- ``default``: what ``medivae train`` does: bf16 autocast where native, channels_last, fused Adam,
  glibc keeping freed memory, conv biases that feed a BatchNorm frozen, threads = idle cores.
- ``fp32``: ``--precision fp32``.            - ``contiguous``: ``channels_last=False``.
- ``malloc_default``: glibc's own trim/mmap thresholds (``device.keep_freed_memory`` not called).
- ``biases_trained``: the redundant biases are trained like every other parameter.
- ``plain_convs``: ``nn.Conv2d`` / ``nn.ConvTranspose2d`` instead of the trunks' CPU fast paths
  (``models/cpu_conv.py``: the one-channel output layer, the GEMM weight gradient of the 4x4 layers).
- ``none``: all five off at once.
- ``compiled``: ``default`` plus ``--compile`` (torch.compile; compiling happens in the untimed warm-up).

    python benchmarks/speed_ablation.py                       # 8,192 images, 3 rounds: ~8 min on 2 cores
    python benchmarks/speed_ablation.py --n-images 1024 --rounds 1 --out /tmp/ablation.json   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from medivae.runtime.io import atomic_write_text
from medivae.runtime.seeding import DEFAULT_SEED

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the worker runs under bench_train's launcher
from bench_train import MEDNIST, ROOT, build_npz, child_env, machine, run_measured  # noqa: E402

OFF = {  # variant -> the settings it turns off
    "default": (),
    "fp32": ("bf16",),
    "contiguous": ("channels_last",),
    "malloc_default": ("malloc",),
    "biases_trained": ("bias_freeze",),
    "plain_convs": ("cpu_conv",),
    "none": ("bf16", "channels_last", "malloc", "bias_freeze", "cpu_conv"),
    "compiled": (),  # plus torch.compile
}


def plain_convs(model) -> None:
    """Swap the trunks' DownConv / UpConv for the plain PyTorch layers with the same weights."""
    import torch

    from medivae.models.cpu_conv import DownConv, UpConv

    for seq in (model.encoder, model.decoder):
        for i, layer in enumerate(seq):
            if isinstance(layer, (DownConv, UpConv)):
                kind = torch.nn.Conv2d if isinstance(layer, DownConv) else torch.nn.ConvTranspose2d
                seq[i] = kind(layer.in_channels, layer.out_channels, 4, 2, 1)
                seq[i].load_state_dict(layer.state_dict())


def worker(npy: str, variant: str) -> None:
    """One timed training epoch of ``variant``; prints one JSON line."""
    import torch

    from medivae.data import ImageSet
    from medivae.models import build_model
    from medivae.models.conv_vae import ConvVAEConfig as ModelConfig
    from medivae.models.cpu_conv import DownConv, UpConv
    from medivae.runfolder.config import RunConfig, TrainConfig
    from medivae.runtime.device import pick_device
    from medivae.train import trainer as trainer_mod

    off = OFF[variant]
    if "malloc" in off:
        trainer_mod.keep_freed_memory = lambda: False
    if "bias_freeze" in off:
        trainer_mod.redundant_biases = lambda model: []
    images = np.load(npy)
    data = ImageSet(images, np.zeros(len(images), dtype=np.int64))
    train = TrainConfig(
        epochs=1, batch_size=128, seed=DEFAULT_SEED,
        precision="fp32" if "bf16" in off else "auto", channels_last="channels_last" not in off,
        compile=variant == "compiled",
    )  # fmt: skip
    cfg = RunConfig(model=ModelConfig(image_size=64), train=train)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    if "cpu_conv" in off:
        plain_convs(model)
    with tempfile.TemporaryDirectory() as tmp:
        t = trainer_mod.Trainer(cfg, model, pick_device("auto"), Path(tmp), progress=False)
        warm = ImageSet(images[:128], data.labels[:128])
        t.train_epoch(warm, trainer_mod.batch_source(warm.images), 1)
        start = time.perf_counter()
        t.train_epoch(data, trainer_mod.batch_source(data.images), 1)
        seconds = time.perf_counter() - start
    frozen = sum(1 for p in t.model.parameters() if not p.requires_grad)
    fast = sum(1 for m in t.model.modules() if isinstance(m, (DownConv, UpConv)))
    print(json.dumps({"images_per_s": len(data) / seconds, "threads": t.threads, "frozen_tensors": frozen,
                      "fast_path_convs": fast}))  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-images", type=int, default=8192, help="training images per run (default 8192)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: medivae's default)")
    p.add_argument("--tar", type=Path, default=MEDNIST, help="MedNIST.tar.gz")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "speed_ablation.json")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return 0
    if not args.tar.exists():
        raise SystemExit(f"{args.tar}: not found (the benchmark needs ../shared next to the repository)")
    result = {
        "command": " ".join(["python benchmarks/speed_ablation.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine(), "loadavg_start": [round(v, 2) for v in os.getloadavg()],
        "n_images": args.n_images, "batch_size": 128, "rounds": args.rounds,
        "variants": {v: list(off) for v, off in OFF.items()},
    }  # fmt: skip
    runs: dict[str, list[dict]] = {v: [] for v in OFF}
    with tempfile.TemporaryDirectory(prefix="medivae-ablation-") as tmp:
        npz, npy = Path(tmp) / "mednist64.npz", Path(tmp) / "train.npy"
        build_npz(args.tar, npz, args.n_images, 0, DEFAULT_SEED)
        np.save(npy, np.load(npz)["train_images"][:, None])
        for rnd in range(args.rounds):
            for variant in OFF:
                load = round(os.getloadavg()[0], 2)
                r = run_measured([__file__, "--worker", str(npy), variant], child_env(args.threads))
                res = json.loads(r["stdout"].strip().splitlines()[-1])
                runs[variant].append({**res, "images_per_s": round(res["images_per_s"], 1),
                                      "peak_rss_mb": r["peak_rss_mb"], "loadavg_before": load})  # fmt: skip
                print(f"round {rnd + 1} {variant:15s} {res['images_per_s']:7.1f} img/s (load {load})", flush=True)
    med = {v: float(np.median([r["images_per_s"] for r in rs])) for v, rs in runs.items()}
    result["runs"] = runs
    result["median_images_per_s"] = med
    result["ratio_to_default"] = {v: round(m / med["default"], 3) for v, m in med.items()}
    result["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["ratio_to_default"]), f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
