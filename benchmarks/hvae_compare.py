"""hierarchical_vae against conv_vae at EQUAL WALL-CLOCK training time on one data set (issue 17).

Both models use the discretized-logistic likelihood (hierarchical_vae's default; conv_vae gets
``--likelihood discretized_logistic``), so bits/dim are a real NLL of the 8-bit images. hierarchical_vae
trains first: one epoch, then ``--resume --epochs E`` (bitwise the uninterrupted run) with E the epochs
that fit ``--budget`` seconds at the first epoch's pace. conv_vae then gets the epochs that fit the
training seconds hierarchical_vae actually used (metrics.jsonl "seconds": training only, no validation).
With ``--epochs MODEL=E`` for both models the comparison is at fixed epochs instead (each trained from
scratch in one launch, as a learning-rate schedule over ``--epochs`` needs; e.g. both to convergence),
and ``--train-args MODEL=ARGS`` adds ``medivae train`` arguments (``--lr-schedule cosine``); a run folder
that already holds E epochs is reused (its settings are recorded). Then ``medivae evaluate RUN -k K
--max-images N`` on each (the second run reuses the first one's
reference extractor, so FD / precision / recall compare), active units per latent group of the
hierarchical run (Burda et al.: Var_x E[z|x] > 0.01 over the evaluated images), and two sample grids of
the hierarchical run at temperatures 1 and 0.7. Run it under the shared lock:

    flock /tmp/medivae-heavy.lock python benchmarks/hvae_compare.py --data /tmp/mn/resized/CXR \\
        --image-size 64 --budget 150 --name cxr64 --grids docs/families/images
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
from common import git_commit, trained_epochs  # noqa: E402  (benchmarks/ is on sys.path)

MODELS = {
    "hierarchical_vae": ["--model", "hierarchical_vae", "--batch-size", "64", "--kl-schedule", "linear",
                         "--warmup-epochs", "0.5"],
    "conv_vae": ["--model", "conv_vae", "--likelihood", "discretized_logistic"],
}


def medivae(*args) -> None:
    cmd = [sys.executable, "-m", "medivae", *map(str, args)]
    print("$ medivae", " ".join(map(str, args)), flush=True)
    subprocess.run(cmd, check=True)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def train_for(model: str, args, budget: float) -> tuple[Path, int]:
    """Train ``model`` for the epochs that fit ``budget`` training seconds, or for ``--epochs MODEL=E``;
    returns (run, epochs)."""
    out = args.work / f"{args.name}_{model}"
    common = ["--threads", "2", "--no-progress", *shlex.split(dict(args.train_args).get(model, ""))]
    fixed = dict(args.epochs).get(model)
    if fixed is not None:
        if trained_epochs(out) == int(fixed) and (out / "metrics.jsonl").exists():
            print(f"reusing {out} ({fixed} epochs)", flush=True)
            return out, int(fixed)
        shutil.rmtree(out, ignore_errors=True)
        medivae("train", "--data", args.data, "--out", out, "--image-size", args.image_size, *MODELS[model],
                "--epochs", fixed, *common)
        return out, int(fixed)
    shutil.rmtree(out, ignore_errors=True)
    medivae("train", "--data", args.data, "--out", out, "--image-size", args.image_size, *MODELS[model],
            "--epochs", 1, *common)
    epochs = max(1, round(budget / metrics(out)[0]["seconds"]))
    if epochs > 1:
        medivae("train", "--config", out / "config.json", "--out", out, "--resume", "--epochs", epochs, *common)
    return out, epochs


def group_active_units(run: Path, n_images: int) -> list[str]:
    import torch

    import medivae as mv
    from medivae.evaluation.collapse import active_units
    from medivae.runtime.seeding import numpy_rng

    r = mv.load(run, device="cpu")
    s = r.split("test")
    if n_images < len(s):  # the subset medivae evaluate scored (workflows.evaluate._subset)
        s = s.subset(np.sort(numpy_rng(r.config.train.seed, "evaluate-subset").permutation(len(s))[:n_images]))
    with torch.no_grad():
        arrays = r.encode(s.images)
    out = []
    for i in range(len(arrays) // 2):
        au, _ = active_units(arrays[f"group{i}_mean"].flatten(1).double().numpy())
        out.append(f"{au}/{arrays[f'group{i}_mean'][0].numel()}")
    return out


def summary(run: Path, epochs: int) -> dict:
    ev = json.loads((run / "results.json").read_text())["evaluation"]
    rows = metrics(run)
    seconds = sum(m["seconds"] for m in rows)
    lik, rec, sq = ev["likelihood"], ev["reconstruction"], ev["sample_quality"]
    out = {
        "epochs": epochs, "train_seconds": seconds,
        "train_images_per_s": sum(m["images_per_s"] * m["seconds"] for m in rows) / seconds,
        "iwae_k": lik["iwae_k"], "neg_iwae_bpd": lik["neg_iwae_bpd"], "neg_elbo_bpd": lik["neg_elbo_bpd"],
        "psnr_db": rec["psnr_db"], "ssim": rec["ssim"], "fd_name": sq["fd_name"],
        **{k: sq["model"][k] for k in ("fd", "precision", "recall")}, "floor": sq["floor"],
        "n_images": ev["n_images"],
        "skipped_update_fraction": float(np.mean([m.get("train_grad_skipped", 0.0) for m in rows])),
        "active_units": (f"{ev['collapse']['active_units']}/{ev['collapse']['latent_dim']}" if ev["collapse"]
                         else group_active_units(run, ev["n_images"])),
        "final_train_terms": {k: v for k, v in rows[-1].items() if k.startswith("train_")},
    }
    return out


def paired_bpd_change(hvae: Path, conv: Path, n_boot: int = 1000) -> dict | None:
    """The relative change of -IWAE (hierarchical over conv_vae - 1) with a paired bootstrap 95 % interval:
    the same test images resampled together (per-image values from ``medivae evaluate``); None when the two
    evaluations scored other images."""
    from medivae.evaluation.bootstrap import statistic_ci

    a, b = (np.load(r / "eval_per_image.npz") for r in (hvae, conv))
    if not np.array_equal(a["image_hash"], b["image_hash"]):
        return None
    h, c = a["neg_iwae"].astype(np.float64), b["neg_iwae"].astype(np.float64)

    def rel(h_, c_):
        return float(h_.mean() / c_.mean() - 1)

    return {"neg_iwae_relative": rel(h, c), "ci95": statistic_ci(rel, h, c, n_boot=n_boot),
            "n_images": len(h), "n_boot": n_boot}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--budget", type=float, default=150.0, help="training seconds of hierarchical_vae")
    p.add_argument("--name", default="cxr64")
    p.add_argument("-k", type=int, default=20)
    p.add_argument("--max-images", type=int, default=300)
    p.add_argument("--work", type=Path, default=Path("/tmp/hvae_compare"))
    p.add_argument("--out", type=Path, default=None, help="default benchmarks/results/hvae_NAME.json")
    p.add_argument("--grids", type=Path, default=None, help="folder for hvae_samples_t1.png / _t07.png")
    p.add_argument("--epochs", action="append", default=[], metavar="MODEL=E", type=lambda v: tuple(v.split("=", 1)),
                   help="fixed epochs instead of equal time (give both models)")
    p.add_argument("--train-args", action="append", default=[], metavar="MODEL=ARGS",
                   type=lambda v: tuple(v.split("=", 1)),
                   help='extra "medivae train" arguments of one model, e.g. conv_vae="--lr-schedule cosine"')
    args = p.parse_args(argv)
    if args.epochs and set(dict(args.epochs)) != set(MODELS):
        p.error(f"--epochs needs a value for each of {sorted(MODELS)}")
    args.work.mkdir(parents=True, exist_ok=True)
    hvae, e_h = train_for("hierarchical_vae", args, args.budget)
    used = sum(m["seconds"] for m in metrics(hvae))
    conv, e_c = train_for("conv_vae", args, used)
    for run in (conv, hvae):
        if run is hvae and (conv / "reference").exists():  # one reference extractor for both
            shutil.copytree(conv / "reference", hvae / "reference", dirs_exist_ok=True)
        medivae("evaluate", run, "-k", args.k, "--max-images", args.max_images, "--device", "cpu")
    if args.grids:
        for t, tag in ((1.0, "t1"), (0.7, "t07")):
            medivae("sample", hvae, "-n", 36, "--seed", 0, "--temperature", t, "--device", "cpu",
                    "--out", args.grids / f"hvae_samples_{tag}.png")
    runs = {"hierarchical_vae": summary(hvae, e_h), "conv_vae": summary(conv, e_c)}
    for name, run in (("hierarchical_vae", hvae), ("conv_vae", conv)):
        runs[name]["settings"] = json.loads((run / "config.json").read_text())
    change = paired_bpd_change(hvae, conv)
    result = {"command": " ".join(["python benchmarks/hvae_compare.py", *(argv or sys.argv[1:])]),
              "commit": git_commit(), "mode": "fixed epochs" if args.epochs else "equal training time",
              "runs": runs,
              "bpd_change": runs["hierarchical_vae"]["neg_iwae_bpd"] / runs["conv_vae"]["neg_iwae_bpd"] - 1,
              "bpd_change_paired": change}
    out = args.out or ROOT / "benchmarks" / "results" / f"hvae_{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
