"""medivae's latent diffusion against MONAI's 2D latent diffusion pipeline, at equal training seconds.

On MedNIST Hand at 64 px (``--data``, ``--labels``), split by medivae (8,000 / 1,000 / 1,000 images):

1. **medivae** (``--medivae RECIPE``): ``medivae train --model ldm`` (``ldm``; its prior trains in the run's last
   epochs), or ``conv_vae`` followed by ``medivae fit-sampler`` (``conv_vae+diffusion``, ``conv_vae+flow``).
   Its epochs are planned so that training takes about ``--seconds`` of wall clock: seconds per training image
   of each stage come from a short pilot run on phantoms of the same size (``--medivae-epochs`` skips it), and
   the autoencoder gets ``--ae-share`` of the budget (default: MONAI's tutorial's proportion, 55 of 135
   minutes). Training seconds: the trainer's per-epoch training-loop seconds (metrics.jsonl, validation
   excluded), plus the wall seconds of ``fit-sampler``.
2. **MONAI** (``benchmarks/monai_ldm.py``: the tutorial's networks and losses, and how they differ here): trained
   on the medivae run's training split (``medivae.data.load_dataset`` with the run's data config, so both arms
   see the same images) for exactly the seconds medivae's training took, split by ``--ae-share``.
3. **Scoring**: each arm draws as many images as the test split holds (medivae's as ``medivae evaluate`` draws
   them, MONAI's by DDIM in ``--sampling-steps``); they, the validation images (the real-vs-real floor) and the
   validation images blurred by a Gaussian of sigma 1 px are scored against the test images in the dataset's
   reference extractor (``medivae evaluate``'s, cached under $MEDIVAE_CACHE/reference): FD, precision, recall,
   density, coverage and high-frequency power vs real, each with a 95 % bootstrap interval.

Staged: each call runs one ``--seed`` and adds (or replaces) it under "runs" in ``--out``, with the commit, the
command, the load average before and after each arm, CPU seconds, the thread count and the torch / MONAI versions;
"summary" holds each row's mean over the seeds there. A finished medivae run or a saved MONAI sample file in
``--work`` is reused when the same seed is run again at the same commit with the same settings (a run made
otherwise stops the call). Run it under the shared lock:

    flock /tmp/medivae-heavy.lock python benchmarks/ldm_peer.py --seconds 600 --seed 1
    python benchmarks/ldm_peer.py --markdown benchmarks/results/ldm_peer.json

MONAI is needed for the benchmark only (``pip install monai einops``); it is not a medivae dependency.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import monai_ldm  # benchmarks/ is on sys.path (the scripts run as files)
import numpy as np
from common import ROOT, git_commit, load_average, medivae, still_at, trained_epochs, update_json

SHARED = next((d / "shared" for d in ROOT.parents if (d / "shared" / "data").is_dir()), ROOT.parent / "shared")
MEDNIST = SHARED / "data" / "mednist" / "MedNIST.tar.gz"  # ../shared beside the checkout (or a worktree's folder)
RECIPES = ("ldm", "conv_vae+diffusion", "conv_vae+flow")
ROWS = {"medivae": "medivae", "monai": "MONAI 2D LDM", "floor": "real validation images (floor)",
        "blur_sigma1": "real validation images, Gaussian blur sigma = 1"}
METRICS = ("fd", "precision", "recall", "density", "coverage", "hf_power_ratio")
PILOT_IMAGES = 800
GRID_PER_PANEL = 12  # 3 rows of 4: the PNG stays under 100 KB


def epoch_seconds(run: Path) -> list[float]:
    from medivae.train.metrics import read_metrics

    return [r["seconds"] for r in read_metrics(run)]


# --- planning the medivae arm ------------------------------------------------------------------------------
def model_args(recipe: str, args) -> list[str]:
    if recipe == "ldm":
        return ["--model", "ldm", "--model-arg", f"sampling_steps={args.sampling_steps}"]
    return ["--model", "conv_vae"]


def pilot(recipe: str, args) -> dict[str, float]:
    """Seconds per training image of each stage, from a short run on phantoms at the benchmark's image size:
    ldm {plain, adversarial, prior} (epoch 1 plain, 2-3 adversarial, 4 prior), conv_vae {plain} (epoch 2)."""
    out = args.work / f"pilot_{recipe.split('+')[0]}"
    stages = ["--epochs", 4, "--model-arg", "prior_epochs=1", "--model-arg", "adv_start=1"] if recipe == "ldm" \
        else ["--epochs", 2]
    if trained_epochs(out) < stages[1]:
        medivae("train", "--data", f"phantoms:{args.pilot_images}", "--image-size", args.image_size,
                *model_args(recipe, args), *stages, "--seed", args.seed, "--threads", args.threads,
                "--precision", args.precision, "--out", out,
                "--no-progress", "--no-cache")
    n = round(args.pilot_images * 0.8)  # phantoms are split 80 / 10 / 10
    s = [x / n for x in epoch_seconds(out)]
    return {"plain": s[0], "adversarial": (s[1] + s[2]) / 2, "prior": s[3]} if recipe == "ldm" else {"plain": s[1]}


def plan(recipe: str, per_image: dict[str, float], n_train: int, args) -> dict:
    """Epochs that fill ``args.seconds``: the autoencoder ``args.ae_share`` of it, the prior (or the post-hoc
    sampler) the rest; ldm's adversarial terms start after the first third of its autoencoder epochs, as in its
    defaults (2 of 6)."""
    ae_s, rest_s = args.ae_share * args.seconds, (1 - args.ae_share) * args.seconds
    if recipe == "ldm":
        per_epoch = n_train * (per_image["plain"] + 2 * per_image["adversarial"]) / 3
        ae = max(1, round(ae_s / per_epoch))
        prior = max(1, round(rest_s / (n_train * per_image["prior"])))
        return {"epochs": ae + prior, "prior_epochs": prior, "adv_start": round(ae / 3, 3)}
    share = 1.0 if recipe == "conv_vae+flow" else args.ae_share  # a flow is fitted in seconds: all to the VAE
    epochs = max(1, round(share * args.seconds / (n_train * per_image["plain"])))
    return {"epochs": epochs, "sampler_seconds": None if share == 1.0 else round(rest_s, 1)}


def given_plan(recipe: str, text: str) -> dict:
    """--medivae-epochs: "AE,PRIOR" for ldm, "EPOCHS" (and for conv_vae+diffusion ",SECONDS" of its fit)."""
    v = [float(x) for x in text.split(",")]
    if recipe == "ldm":
        ae, prior = int(v[0]), int(v[1])
        return {"epochs": ae + prior, "prior_epochs": prior, "adv_start": round(ae / 3, 3)}
    return {"epochs": int(v[0]), "sampler_seconds": v[1] if len(v) > 1 else None}


def arm_settings(args) -> dict:
    """What decides the medivae arm's run besides the seed (its folder's) and the commit: a run in --work is
    reused only when every one of these is what this call asks for."""
    return {"recipe": args.medivae, "data": str(args.data), "labels": list(args.labels),
            "image_size": args.image_size, "seconds": args.seconds, "medivae_epochs": args.medivae_epochs,
            "ae_share": args.ae_share, "sampling_steps": args.sampling_steps, "precision": args.precision,
            "pilot_images": args.pilot_images}


def train_medivae(recipe: str, run: Path, args) -> dict:
    """Train (or reuse a finished) medivae run with the planned epochs: its record, training seconds included."""
    info_file = run.parent / "medivae_arm.json"
    if info_file.exists():  # reused only when trained to its plan by the code under test, with these settings
        info = json.loads(info_file.read_text())
        same = info.get("commit") == args.commit and info.get("settings") == arm_settings(args)
        if same and trained_epochs(run) == info["plan"]["epochs"]:
            return info
        if not same and run.exists():
            raise SystemExit(f"{run} was trained at commit {info.get('commit')} with {info.get('settings')}, not at "
                             f"{args.commit} with {arm_settings(args)}: use another --work (or remove it)")
    if args.medivae_epochs:
        per_image, p = None, given_plan(recipe, args.medivae_epochs)
    else:
        per_image = pilot(recipe, args)
        p = plan(recipe, per_image, args.n_train, args)
    extra = ["--model-arg", f"prior_epochs={p['prior_epochs']}", "--model-arg", f"adv_start={p['adv_start']}"] \
        if recipe == "ldm" else []
    cmd = ["train", "--data", args.data, "--image-size", args.image_size, *args.labels_args,
           *model_args(recipe, args), *extra, "--epochs", p["epochs"], "--seed", args.seed,
           "--threads", args.threads, "--precision", args.precision, "--out", run, "--no-progress"]
    train = medivae(*cmd, *(["--resume"] if trained_epochs(run) else []))
    seconds = epoch_seconds(run)
    rec = {"recipe": recipe, "commit": args.commit, "settings": arm_settings(args), "threads": args.threads,
           "run": str(run), "pilot_seconds_per_image": per_image, "plan": p,
           "train": train, "epoch_seconds": [round(s, 2) for s in seconds], "train_seconds": round(sum(seconds), 2),
           "sampler": "prior" if recipe == "ldm" else recipe.split("+")[1]}
    if rec["sampler"] != "prior":
        budget = ["--time-budget", p["sampler_seconds"]] if p.get("sampler_seconds") else []
        quiet = ["--no-progress"] if rec["sampler"] == "diffusion" else []  # the only fit with a progress bar
        rec["fit_sampler"] = medivae("fit-sampler", run, "--sampler", rec["sampler"], *budget, *quiet)
        rec["train_seconds"] = round(rec["train_seconds"] + rec["fit_sampler"]["wall_seconds"], 2)
    info_file.write_text(json.dumps(rec, indent=2) + "\n")
    return rec


def sample_medivae(r, sampler: str, n: int, labels) -> tuple[np.ndarray, dict]:
    """n images of the loaded run ``r`` as ``medivae evaluate`` draws them (fp32, 8-bit): uint8 (n, C, H, W)."""
    import torch

    from medivae.workflows.evaluate import generate_images

    start, cpu = time.perf_counter(), time.process_time()
    x = generate_images(r.model, n, labels, r.config.train.seed, r.latent_sampler(sampler))
    seconds = time.perf_counter() - start
    rec = {"seconds": round(seconds, 2), "cpu_seconds": round(time.process_time() - cpu, 2),
           "images_per_s": round(n / max(seconds, 1e-9), 2), "checkpoint": r.checkpoint}
    return (x * 255).round().to(torch.uint8).numpy(), rec


# --- the MONAI arm --------------------------------------------------------------------------------------------
def monai_settings(args) -> dict:
    """What decides the MONAI arm's samples besides the seed, size, budget and count: a saved sample file is
    reused only when these are what this call asks for."""
    return {"sampling_steps": args.sampling_steps, "ae_share": args.ae_share, "precision": args.precision}


def monai_arm(train_images: np.ndarray, seconds: float, n: int, args) -> tuple[np.ndarray, dict]:
    """MONAI's pipeline for ``seconds`` (reused from --work when this seed, size and budget already ran)."""
    import torch

    from medivae.runtime.device import autocast_dtype

    path = args.work / f"monai_{args.monai_size}.npz"
    if path.exists():
        saved = np.load(path, allow_pickle=False)
        rec = json.loads(str(saved["record"]))
        if rec["budget_seconds"] == round(seconds, 2) and len(saved["samples"]) == n \
                and rec.get("commit") == args.commit and rec.get("settings") == monai_settings(args):
            return saved["samples"], rec
    dtype = autocast_dtype(torch.device("cpu"), args.precision)
    load = load_average()
    samples, rec = monai_ldm.train_and_sample(train_images, seconds, n, args.seed, args.monai_size,
                                              args.sampling_steps, dtype, args.ae_share)
    rec = {"budget_seconds": round(seconds, 2), "commit": args.commit, "settings": monai_settings(args),
           "threads": args.threads, "load_before": load,
           "load_after": load_average(), **rec}
    np.savez(path, samples=samples, record=json.dumps(rec))
    return samples, rec


# --- scoring -----------------------------------------------------------------------------------------------------
def training_images(args) -> int:
    """How many training images the medivae run will have (medivae's split of --data), for its plan."""
    from medivae.data import load_dataset
    from medivae.runfolder.config import DataConfig

    cfg = DataConfig(source=args.data, image_size=args.image_size, labels=args.labels)
    return len(load_dataset(cfg, progress=False)["train"])


def reference(cfg, splits: dict, args):
    """The dataset's one reference extractor, as ``medivae evaluate`` finds (or trains and caches) it."""
    from medivae.workflows.evaluate import shared_reference

    return shared_reference(cfg.data, splits["train"], args.reference_epochs, False, "cpu")


def score(ref, test: np.ndarray, rows: dict[str, np.ndarray], args) -> dict:
    """Every row (uint8 (N, C, H, W)) against the test images: the five feature-space metrics and the
    high-frequency power ratio, each with its 95 % bootstrap interval."""
    from medivae.evaluation import sample_quality as sq
    from medivae.evaluation.bootstrap import ratio_of_means_ci
    from medivae.evaluation.sharpness import high_frequency_power

    f_test, p_test = ref.features(test), high_frequency_power(test)
    out = {}
    for name, x in rows.items():
        f, p = ref.features(x), high_frequency_power(x)
        ci = sq.compare_ci(f_test, f, args.bootstrap, args.seed)
        ci["hf_power_ratio"] = ratio_of_means_ci(p, p_test, args.bootstrap, args.seed)
        out[name] = {"n": len(x), **sq.compare(f_test, f), "hf_power_ratio": float(p.mean() / p_test.mean()),
                     "ci95": ci}
    return out


def side_by_side(panels: dict[str, np.ndarray], path: Path) -> dict:
    """One PNG: a 3 x 4 grid per panel (real test images, then each arm), left to right, titled."""
    from PIL import Image, ImageDraw

    from medivae.runtime.images import grid, save_png

    tiles = [grid(x[:GRID_PER_PANEL], nrow=4) for x in panels.values()]
    h, gap, title = tiles[0].shape[0], 8, 14
    canvas = np.full((h + title, sum(t.shape[1] for t in tiles) + gap * (len(tiles) - 1)), 255, np.uint8)
    x0 = 0
    for t in tiles:
        canvas[title:, x0 : x0 + t.shape[1]] = t
        x0 += t.shape[1] + gap
    img = Image.fromarray(canvas)
    draw, x0 = ImageDraw.Draw(img), 0
    for name, t in zip(panels, tiles, strict=True):
        draw.text((x0 + 2, 1), name, fill=0)
        x0 += t.shape[1] + gap
    save_png(np.asarray(img), path)
    return {"file": str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path), "panels": list(panels),
            "bytes": path.stat().st_size}


# --- one seed, the JSON, the table ---------------------------------------------------------------------------
def versions() -> dict:
    """Library versions, and the medivae that ran: its folder and that checkout's commit ("" outside git), which
    differ from this script's when medivae comes from elsewhere on PYTHONPATH."""
    import monai
    import torch

    import medivae
    from medivae.runtime.version import __version__

    src = Path(medivae.__file__).parent
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True).stdout.strip()
    return {"python": platform.python_version(), "torch": torch.__version__, "monai": monai.__version__,
            "medivae": __version__, "medivae_path": str(src), "medivae_commit": head}


def run_seed(args) -> dict:
    import torch

    from medivae.evaluation.blur import gaussian_blur
    from medivae.runfolder.run import load_run

    start, load = time.perf_counter(), load_average()
    args.n_train = training_images(args)
    run = args.work / "medivae_run"
    med = train_medivae(args.medivae, run, args)
    loaded = load_run(run, device="cpu")
    cfg, splits = loaded.config, loaded.splits()  # the run's own split: the MONAI arm trains on the same images
    test, val = np.asarray(splits["test"].images), np.asarray(splits["val"].images)
    n = len(test)
    torch.set_num_threads(args.threads)
    med_x, med["sampling"] = sample_medivae(loaded, med["sampler"], n, splits["test"].labels)
    mon_x, mon = monai_arm(np.asarray(splits["train"].images), med["train_seconds"], n, args)
    ref = reference(cfg, splits, args)
    rows = {"medivae": med_x, "monai": mon_x, "floor": val, "blur_sigma1": gaussian_blur(val, 1.0)}
    scores = score(ref, test, rows, args)
    grid = side_by_side({"real (test)": test, f"medivae {args.medivae}": med_x, f"MONAI ({args.monai_size})": mon_x},
                        args.grid)
    return {
        "commit": args.commit, "command": args.command, "seed": args.seed, "threads": args.threads,
        "versions": versions(), "cpu_count": os.cpu_count(), "load_before": load, "load_after": load_average(),
        "wall_seconds": round(time.perf_counter() - start, 1),
        "data": {"source": args.data, "labels": list(args.labels), "image_size": args.image_size,
                 "split_seed": cfg.data.split_seed, **{k: len(v) for k, v in splits.items()}},
        "reference": {"extractor": ref.name, "fd_name": f"FD-{ref.name}", "hash": ref.folder.name,
                      "against": "test", "epochs": args.reference_epochs, "bootstrap": args.bootstrap},
        "arms": {"medivae": med, "monai": mon}, "rows": scores, "grid": grid,
    }


def summary(runs: dict) -> dict:
    """Each row's metrics averaged over the seeds in ``runs`` (with the seeds' values)."""
    out = {}
    for row in ROWS:
        vals = {m: [r["rows"][row][m] for r in runs.values() if row in r["rows"]] for m in METRICS}
        out[row] = {m: {"mean": float(np.mean(v)), "values": v} for m, v in vals.items() if v}
    secs = {arm: [r["arms"][arm]["train_seconds"] for r in runs.values()] for arm in ("medivae", "monai")}
    return {"seeds": sorted(runs, key=int), "rows": out, "train_seconds": secs}


def markdown(result: dict) -> str:
    """The table: one line per row and seed, value [95 % interval] for every metric."""
    lines = ["| seed | samples from | FD | precision | recall | density | coverage | HF power vs real |",
             "|---|---|---|---|---|---|---|---|"]
    for seed, r in sorted(result["runs"].items(), key=lambda kv: int(kv[0])):
        names = {**ROWS, "medivae": f"medivae `{r['arms']['medivae']['recipe']}`",
                 "monai": f"MONAI 2D LDM ({r['arms']['monai']['size']})"}
        for row, s in r["rows"].items():
            cells = []
            for m in METRICS:
                ci, spec = s["ci95"].get(m), ".4g" if m == "fd" else ".3f"
                cells.append(f"{s[m]:{spec}}" + (f" [{ci[0]:{spec}}, {ci[1]:{spec}}]" if ci else ""))
            lines.append(f"| {seed} | {names[row]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write(out: Path, record: dict) -> dict:
    """Add (or replace) one seed's record under the file's lock (seeds may run side by side), atomically."""

    def add(result: dict) -> dict:
        result["runs"][str(record["seed"])] = record
        # what the documentation's results index shows of a file: the last run's commit, every seed's command
        result["commit"], result["commands"] = record["commit"], {k: r["command"] for k, r in result["runs"].items()}
        result["summary"] = summary(result["runs"])
        return result

    return update_json(out, add, {"benchmark": "ldm_peer", "runs": {}})


def parse(argv) -> argparse.Namespace:
    from medivae.runtime.seeding import DEFAULT_SEED

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(MEDNIST))
    p.add_argument("--labels", default="Hand", help="class names to keep, comma-separated ('' for all)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seconds", type=float, default=600.0, help="training seconds of each arm (wall clock)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--medivae", default="ldm", choices=RECIPES)
    p.add_argument("--medivae-epochs", help="skip the pilot: AE,PRIOR epochs (ldm) or EPOCHS[,FIT_SECONDS]")
    p.add_argument("--ae-share", type=float, default=monai_ldm.AE_SHARE,
                   help="the autoencoder's share of the seconds (default: the tutorial's 55 of 135 minutes)")
    p.add_argument("--monai-size", default="cpu", choices=tuple(monai_ldm.SIZES))
    p.add_argument("--sampling-steps", type=int, default=50, help="DDIM steps of both arms' diffusion sampling")
    p.add_argument("--precision", default="auto", help="training precision of both arms (medivae's --precision)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads of both arms (0: the cores idle at start)")
    p.add_argument("--reference-epochs", type=int, default=5)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--pilot-images", type=int, default=PILOT_IMAGES)
    p.add_argument("--work", type=Path, default=Path("/tmp/ldm_peer"))
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ldm_peer.json")
    p.add_argument("--grid", type=Path, default=ROOT / "docs" / "results" / "images" / "ldm_peer_hand.png")
    p.add_argument("--markdown", type=Path, help="print the table of this JSON and exit")
    args = p.parse_args(argv)
    args.commit = git_commit()  # a run or MONAI sample file in --work is reused only at the same commit
    args.command = " ".join(["python benchmarks/ldm_peer.py", *(sys.argv[1:] if argv is None else argv)])
    args.labels = tuple(x for x in args.labels.split(",") if x)
    args.labels_args = ["--labels", ",".join(args.labels)] if args.labels else []
    if not 0 < args.ae_share < 1:
        p.error(f"--ae-share must be in (0, 1), not {args.ae_share}")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return 0
    from medivae.runtime.device import auto_threads

    args.threads = args.threads or auto_threads() or 1  # decided once: both arms get the same
    args.work = args.work / f"seed{args.seed}"
    args.work.mkdir(parents=True, exist_ok=True)
    record = run_seed(args)
    still_at(args.commit)  # the commit the record names made every part of it
    result = write(args.out, record)
    print(markdown({"runs": {str(args.seed): result["runs"][str(args.seed)]}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
