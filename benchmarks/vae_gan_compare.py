"""vae_gan against conv_vae on one data set, several seeds each (issue 18).

Each (model, seed) trains with ``medivae train`` for the same epochs; then, from the run's best
checkpoint: PSNR / SSIM of test reconstructions (fp32), and for ``--n-samples`` prior samples
FD / precision / recall / density / coverage against the training images in the feature space of ONE
reference extractor (trained once on the training split, shared by every run, so the numbers compare),
the sharpness ratio (high-frequency power share of samples over that of real test images; 1 = as sharp
as real data; medivae.evaluation.sharpness) and whether the run trained without intervention (no NaN /
divergence rollback in metrics.jsonl). Writes JSON (with the commit it ran on) and, for the first seed,
sample grids.

    python benchmarks/vae_gan_compare.py --data /tmp/mn/resized/CXR --epochs 6 --seeds 3
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
from common import git_commit, trained_epochs  # noqa: E402  (benchmarks/ is on sys.path)


def train(model: str, seed: int, args, out: Path) -> float:
    """Train (or resume an interrupted run of) one (model, seed); wall seconds of this call."""
    cmd = [sys.executable, "-m", "medivae", "train", "--data", args.data, "--model", model, "--out", str(out),
           "--epochs", str(args.epochs), "--seed", str(seed), "--image-size", str(args.image_size), "--no-progress"]
    cmd += shlex.split(dict(args.train_args).get(model, ""))
    if trained_epochs(out) > 0:
        cmd.append("--resume")
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def measure(run_dir: Path, reference, n_samples: int) -> dict:
    import torch

    from medivae.evaluation import sample_quality as sq
    from medivae.evaluation.bootstrap import mean_ci
    from medivae.evaluation.reconstruction import per_image_metrics
    from medivae.evaluation.sharpness import hf_power_ratio, sharpness_ratio
    from medivae.runfolder.run import load_run
    from medivae.train.metrics import read_metrics

    run = load_run(run_dir, device="cpu")
    splits = run.splits()
    test, train = splits["test"], splits["train"]
    recon = run.reconstruct(test.images, labels=test.labels, precision="fp32").numpy()
    rec = per_image_metrics(test.images.astype(np.float64) / 255, recon)
    samples = run.sample(n_samples, precision="fp32")
    fake = (samples * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    real = train.images[np.random.default_rng(0).permutation(len(train))[: max(n_samples, 1000)]]
    rows = read_metrics(run_dir)
    return {
        "psnr_db": float(rec["psnr_db"].mean()), "ssim": float(rec["ssim"].mean()),
        "psnr_db_ci95": mean_ci(rec["psnr_db"]), "ssim_ci95": mean_ci(rec["ssim"]),
        **sq.compare(reference.features(real), reference.features(fake)),
        "sharpness_ratio": sharpness_ratio(fake, test.images),
        "hf_power_ratio": hf_power_ratio(fake, test.images),
        "trained_without_intervention": all(r.get("nan_events", 0) == 0 for r in rows),
        "images_per_s": float(np.median([r["images_per_s"] for r in rows])),
        "final_val_loss": rows[-1]["val_loss"],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--models", default="conv_vae,vae_gan")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--n-samples", type=int, default=1000)
    p.add_argument("--train-args", action="append", default=[], metavar="MODEL=ARGS",
                   type=lambda v: tuple(v.split("=", 1)),
                   help='extra "medivae train" arguments of one model, e.g. vq_vae="--model-arg prior_epochs=3"')
    p.add_argument("--work", type=Path, default=Path("/tmp/vae_gan_compare"))
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "vae_gan.json")
    p.add_argument("--images", type=Path, default=ROOT / "docs" / "families" / "images")
    args = p.parse_args(argv)

    from medivae.data import load_dataset
    from medivae.evaluation.features import load_or_fit_reference
    from medivae.runfolder.config import DataConfig
    from medivae.runfolder.run import load_run
    from medivae.runtime.images import save_grid
    from medivae.runtime.io import atomic_write_text
    from medivae.runtime.seeding import DEFAULT_SEED

    data_cfg = DataConfig(source=args.data, image_size=args.image_size)
    train_set = load_dataset(data_cfg, progress=False)["train"]
    reference = load_or_fit_reference(args.work / "reference", train_set, {"source": args.data,
                                      "image_size": args.image_size}, progress=False)
    result = {"command": " ".join(["python benchmarks/vae_gan_compare.py", *(argv or sys.argv[1:])]),
              "commit": git_commit(), "epochs": args.epochs, "reference_extractor": reference.name, "runs": {}}
    for model in args.models.split(","):
        for i in range(args.seeds):
            seed = DEFAULT_SEED + i
            out = args.work / f"{model}_{i}"
            done = trained_epochs(out) >= args.epochs
            wall = None if done else train(model, seed, args, out)
            r = {"seed": seed, "wall_s": wall, **measure(out, reference, args.n_samples)}
            result["runs"].setdefault(model, []).append(r)
            print(model, i, {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}, flush=True)
            if i == 0:
                grid = load_run(out, device="cpu").sample(64, precision="fp32")
                save_grid(grid, args.images / f"{model}_samples.png", nrow=8)
    keys = ("psnr_db", "ssim", "fd", "precision", "recall", "sharpness_ratio", "hf_power_ratio")
    result["summary"] = {m: {k: [float(np.mean([r[k] for r in rs])), float(np.std([r[k] for r in rs]))]
                             for k in keys} | {"seeds_without_intervention":
                                               sum(r["trained_without_intervention"] for r in rs)}
                         for m, rs in result["runs"].items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
