"""Training speed of medivae against the seed article's code, side by side on MedNIST 64x64 (issue 7).

Both programs train the article's network (4 conv + 4 transposed-conv layers, latent 32) on the same
images with batch size 128 for the same number of epochs. The runs ALTERNATE (baseline, medivae,
baseline, medivae, ...) so that load from other processes hits both alike. For each run we record
the training-loop images/s each program reports, the wall time and CPU seconds of the whole process,
its peak RSS (``os.wait4`` rusage of that child) and the single-sample test negative ELBO after the
last epoch (the baseline prints it; for medivae the same quantity is computed on the same test
images, in fp32, from the ``last/`` checkpoint). Then, with the trained medivae model: prior sampling,
reconstruction and per-image negative-ELBO scoring images/s; and a scaling table: one training epoch
at image size 64/128/256 and at two dataset sizes, with the images in RAM or memory-mapped from disk.

Data: MedNIST.tar.gz (all six classes, 58,954 JPEGs) read with tarfile + PIL into a temporary
MedMNIST-layout .npz with a seeded, stratified 80/10/10 train/val/test split; ``--n-images`` keeps a
seeded, stratified subset of the training split. The baseline ignores the val split.

    python benchmarks/bench_train.py                    # full run (~30-60 min on 2 cores)
    python benchmarks/bench_train.py --quick --out /tmp/train.json   # smoke test, under a minute
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from medivae.runtime.io import atomic_write_text
from medivae.runtime.seeding import DEFAULT_SEED, numpy_rng

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when imported by speed_ablation.py
from common import git_commit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
BASELINE = SHARED / "baselines" / "seed_article_vae.py"
MEDNIST = SHARED / "data" / "mednist" / "MedNIST.tar.gz"


# --- data -----------------------------------------------------------------------------------------
def read_mednist(tar_path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """All JPEGs of MedNIST.tar.gz -> uint8 (N, 64, 64), int labels (N,), class names (sorted)."""
    from PIL import Image

    images, classes = [], []
    with tarfile.open(tar_path) as tf:
        for m in tf:
            if m.isfile() and m.name.lower().endswith((".jpeg", ".jpg")):
                images.append(np.asarray(Image.open(io.BytesIO(tf.extractfile(m).read())).convert("L")))
                classes.append(m.name.split("/")[-2])
    names = sorted(set(classes))
    return np.stack(images), np.array([names.index(c) for c in classes], dtype=np.int64), names


def stratified_take(labels: np.ndarray, idx: np.ndarray, n: int, seed: int) -> np.ndarray:
    """A seeded subset of ``idx`` of about ``n`` items with the class proportions of ``idx``."""
    if n <= 0 or n >= len(idx):
        return idx
    rng = numpy_rng(seed, "bench-subset")
    keep = []
    for lab in np.unique(labels[idx]):
        members = idx[labels[idx] == lab]
        keep.append(rng.permutation(members)[: max(1, round(n * len(members) / len(idx)))])
    return np.sort(np.concatenate(keep))


def build_npz(tar_path: Path, out: Path, n_train: int, n_test: int, seed: int) -> dict:
    """Write a MedMNIST-layout npz (images (N, 64, 64), labels (N, 1)); returns the split sizes."""
    from medivae.data.split import split_indices

    x, y, names = read_mednist(tar_path)
    splits = split_indices(y, 0.1, 0.1, seed)
    splits["train"] = stratified_take(y, splits["train"], n_train, seed)
    splits["test"] = stratified_take(y, splits["test"], n_test, seed)
    splits["val"] = stratified_take(y, splits["val"], n_test, seed)
    arrays = {}
    for k, idx in splits.items():
        arrays[f"{k}_images"], arrays[f"{k}_labels"] = x[idx], y[idx, None].astype(np.uint8)
    np.savez(out, **arrays)
    return {"classes": names, **{k: int(len(v)) for k, v in splits.items()}}


# --- child processes --------------------------------------------------------------------------------
# Every child runs under this launcher, which reports the child's own peak RSS (VmHWM) at exit. The
# rusage of a child cannot be used: Linux carries the parent's peak RSS into it across fork + exec.
LAUNCHER = """
import atexit, runpy, sys
def peak():
    try:
        print('PEAK_RSS_KB', [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')][0],
              file=sys.stderr, flush=True)
    except (OSError, IndexError):
        pass
atexit.register(peak)
kind, target = sys.argv[1], sys.argv[2]
sys.argv = sys.argv[2:]
if kind == 'path':
    runpy.run_path(target, run_name='__main__')
else:
    runpy.run_module(target, run_name='__main__', alter_sys=True)
"""


def run_measured(cmd: list[str], env: dict) -> dict:
    """Run ``python [-m] ...`` given as ``cmd`` (without the interpreter) under LAUNCHER: its stdout, wall
    and CPU seconds (rusage via ``os.wait4``: this child's alone) and peak RSS in MB."""
    kind, target = ("module", cmd[1]) if cmd[0] == "-m" else ("path", cmd[0])
    args = [sys.executable, "-c", LAUNCHER, kind, target, *cmd[2 if kind == "module" else 1 :]]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:  # files: no pipe can fill up
        start = time.perf_counter()
        proc = subprocess.Popen(args, stdout=out, stderr=err, env=env)
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd[:5]))} ... failed ({proc.returncode}):\n{stderr[-3000:]}")
    peak = re.search(r"PEAK_RSS_KB (\d+)", stderr)
    return {
        "stdout": stdout,
        "wall_s": round(wall, 2),
        "cpu_s": round(ru.ru_utime + ru.ru_stime, 2),
        "peak_rss_mb": round(int(peak.group(1)) / 1024, 1) if peak else None,  # None: no /proc (not Linux)
    }


def child_env(threads: int) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_baseline(npz: Path, epochs: int, threads: int) -> dict:
    r = run_measured([str(BASELINE), str(npz), str(epochs)], child_env(threads))
    speed = re.search(r"images/s ([\d.]+)\s+time ([\d.]+)s\s+threads (\d+)", r["stdout"])
    elbo = re.search(r"test negELBO/img ([\d.]+)", r["stdout"])
    if not (speed and elbo):
        raise SystemExit(f"unexpected baseline output:\n{r['stdout'][-1000:]}")
    return {
        "images_per_s": float(speed.group(1)),
        "train_s": float(speed.group(2)),
        "threads": int(speed.group(3)),
        "test_neg_elbo": float(elbo.group(1)),
        **{k: r[k] for k in ("wall_s", "cpu_s", "peak_rss_mb")},
    }


def run_medivae(npz: Path, epochs: int, threads: int, run_dir: Path, extra: list[str]) -> dict:
    from medivae.train.metrics import read_metrics

    cmd = [
        "-m", "medivae", "train", "--data", str(npz), "--out", str(run_dir), "--no-cache",
        "--epochs", str(epochs), "--batch-size", "128", "--no-progress", "--seed", str(DEFAULT_SEED), *extra,
    ]
    if threads:
        cmd += ["--threads", str(threads)]
    r = run_measured(cmd, child_env(threads))
    rows = read_metrics(run_dir)
    n_train = int(np.load(npz)["train_images"].shape[0])
    train_s = sum(row["seconds"] for row in rows)
    return {
        "images_per_s": round(n_train * len(rows) / train_s, 1),
        "train_s": round(train_s, 2),
        "threads": _run_threads(run_dir),
        "test_neg_elbo": round(test_neg_elbo(run_dir, npz), 2),
        **{k: r[k] for k in ("wall_s", "cpu_s", "peak_rss_mb")},
    }


def _run_threads(run_dir: Path) -> int | None:
    """The CPU threads the run used, as medivae recorded them (env.json)."""
    try:
        return json.loads((run_dir / "env.json").read_text()).get("threads")
    except (OSError, ValueError):
        return None


@torch.no_grad()
def test_neg_elbo(run_dir: Path, npz: Path, batch: int = 256) -> float:
    """The baseline's number for a medivae run: eval mode, one posterior sample per image, fp32."""
    from medivae.api import load_run
    from medivae.data import to_float
    from medivae.models.losses import neg_elbo
    from medivae.runtime.seeding import torch_generator

    run = load_run(run_dir, which="last", device="cpu")
    model, dev = run.model, run.device
    images = np.load(npz)["test_images"][:, None]
    gen = torch_generator(DEFAULT_SEED, "bench-test")
    total = 0.0
    for i in range(0, len(images), batch):
        x = to_float(images[i : i + batch], dev)
        out = model(x, sample=True, generator=gen)
        total += neg_elbo(model.likelihood, out, x).neg_elbo.double().sum().item()
    return total / len(images)


# --- inference speed ----------------------------------------------------------------------------------
def timed(fn, n_images: int, repeats: int = 3) -> float:
    """Best-of-``repeats`` images/s of ``fn()`` after one warm-up call (best: least disturbed by load)."""
    fn()
    best = min(_seconds(fn) for _ in range(repeats))
    return round(n_images / best, 1)


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def inference_speed(run_dir: Path, npz: Path, n_images: int) -> dict:
    """images/s of prior sampling, reconstruction, per-image negative-ELBO scoring and anomaly scoring
    (16 draws per image; batched, no grad),
    through medivae.models.inference's fast path ("auto": bf16 where native + channels_last) and in fp32."""
    from medivae.api import load_run
    from medivae.data import to_float
    from medivae.evaluation.anomaly.passes import ImagePass, Scoring
    from medivae.evaluation.anomaly.scorers import score_pass
    from medivae.models.inference import fast_inference, reconstruct, sample_images
    from medivae.models.losses import neg_elbo
    from medivae.runtime.seeding import torch_generator

    run = load_run(run_dir, which="last", device="cpu")
    model, dev = run.model, run.device
    u8 = np.load(npz)["test_images"][:n_images, None]
    x = to_float(u8, dev)
    n = len(x)

    @torch.no_grad()
    def score(precision):
        gen = torch_generator(DEFAULT_SEED, "bench-score")
        with fast_inference(model, precision):
            for i in range(0, n, 256):
                xb = x[i : i + 256].contiguous(memory_format=torch.channels_last)
                neg_elbo(model.likelihood, model(xb, sample=True, generator=gen), xb).neg_elbo.cpu()

    out = {"n_images": n, "threads": torch.get_num_threads()}
    for p in ("auto", "fp32"):
        sfx = "" if p == "auto" else "_fp32"
        gen = torch_generator(0, "bench-sample")
        sample = lambda p=p, g=gen: sample_images(model, n, g, precision=p)  # noqa: E731
        out[f"sample_images_per_s{sfx}"] = timed(sample, n)
        out[f"reconstruct_images_per_s{sfx}"] = timed(lambda p=p: reconstruct(model, x, precision=p), n)
        out[f"score_neg_elbo_images_per_s{sfx}"] = timed(lambda p=p: score(p), n)
        # medivae anomaly score's scorer: 16 posterior draws per image, IWAE, SSIM, residual maps
        anomaly = lambda p=p: score_pass(ImagePass(Scoring(model, k=16, precision=p), u8), None, {})  # noqa: E731
        out[f"anomaly_score_images_per_s{sfx}"] = timed(anomaly, n)
    return out


# --- scaling ---------------------------------------------------------------------------------------
def scaling_worker(npy: str, size: int, storage: str, epochs: int) -> None:
    """One training epoch (after a one-batch warm-up) of the article's model at ``size``, through the
    trainer's own data path; prints one JSON line. Runs in its own process for a clean peak RSS."""
    from medivae.data import ImageSet
    from medivae.models import build_model
    from medivae.models.conv_vae import ConvVAEConfig as ModelConfig
    from medivae.runfolder.config import RunConfig, TrainConfig
    from medivae.runtime.device import pick_device
    from medivae.train.trainer import Trainer, batch_source

    # read-only: batches go through trainer.gather's sorted NumPy reads (a copy-on-write map, as
    # medivae's decoded-image cache makes, would be wrapped as a tensor instead)
    images = np.load(npy, mmap_mode="r" if storage == "memmap" else None)
    train = ImageSet(images, np.zeros(len(images), dtype=np.int64))
    cfg = RunConfig(model=ModelConfig(image_size=size), train=TrainConfig(epochs=epochs, batch_size=128))
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, build_model(cfg.model), pick_device("auto"), Path(tmp), progress=False)
        warm = ImageSet(images[:128], train.labels[:128])  # one batch: oneDNN builds its kernels
        trainer.train_epoch(warm, batch_source(warm.images), 1)
        source = batch_source(train.images)
        start = time.perf_counter()
        for epoch in range(1, epochs + 1):
            trainer.train_epoch(train, source, epoch)
        seconds = time.perf_counter() - start
    print(json.dumps({"seconds_per_epoch": seconds / epochs, "images_per_s": len(train) * epochs / seconds,
                      "threads": trainer.threads}))


def scaling_table(x64: np.ndarray, work: Path, sizes, counts, threads: int, epochs: int) -> list[dict]:
    """Rows (image size, n images, ram|memmap) -> training images/s, seconds per epoch, peak RSS."""
    from medivae.data.preprocess import resize

    rows = []
    plan = [(s, counts[0]) for s in sizes] + [(sizes[0], n) for n in counts[1:]]
    for size, n in plan:
        npy = work / f"scale_{size}_{n}.npy"
        reps = int(np.ceil(n / len(x64)))
        np.save(npy, resize(np.concatenate([x64] * reps)[:n], size))
        for storage in ("ram", "memmap"):
            cmd = [__file__, "--scaling-worker", str(npy), str(size), storage, str(epochs)]
            r = run_measured(cmd, child_env(threads))
            res = json.loads(r["stdout"].strip().splitlines()[-1])
            rows.append({
                "image_size": size, "n_images": n, "storage": storage,
                "images_per_s": round(res["images_per_s"], 1),
                "seconds_per_epoch": round(res["seconds_per_epoch"], 2),
                "peak_rss_mb": r["peak_rss_mb"], "threads": res["threads"],
            })
            print(f"  scaling {size}px n={n} {storage}: {rows[-1]['images_per_s']} img/s", flush=True)
        npy.unlink()
    return rows


# --- main ------------------------------------------------------------------------------------------
def summarise(runs: list[dict]) -> dict:
    med = lambda key: float(np.median([r[key] for r in runs]))  # noqa: E731
    return {
        "images_per_s_median": med("images_per_s"),
        "test_neg_elbo_median": med("test_neg_elbo"),
        "peak_rss_mb_max": max((r["peak_rss_mb"] or 0) for r in runs) or None,
        "cpu_s_per_1000_images_median": round(1000 * med("cpu_s") / runs[0]["n_images_trained"], 2),
    }


def compare(arms: dict[str, list[dict]]) -> dict:
    summary = {arm: summarise(runs) for arm, runs in arms.items()}
    base, ours = summary["baseline"], summary["medivae"]
    pairs = zip(arms["baseline"], arms["medivae"], strict=True)
    return {
        "summary": summary,
        "throughput_ratio": round(ours["images_per_s_median"] / base["images_per_s_median"], 2),
        "paired_ratios": [round(m["images_per_s"] / b["images_per_s"], 2) for b, m in pairs],
        "test_neg_elbo_rel_diff": round(ours["test_neg_elbo_median"] / base["test_neg_elbo_median"] - 1, 5),
    }


def run_arms(args, npz: Path, n_train: int, work: Path) -> dict[str, list[dict]]:
    """A B (C) A B (C) ...: alternating, so that load from other processes hits every arm alike."""
    arms = {"baseline": [], "medivae": []} | ({"medivae_fp32": []} if args.fp32 else {})
    for rep in range(args.repeats):
        for arm in arms:
            load = round(os.getloadavg()[0], 2)
            if arm == "baseline":
                r = run_baseline(npz, args.epochs, args.threads)
            else:
                extra = ["--precision", "fp32"] if arm == "medivae_fp32" else []
                r = run_medivae(npz, args.epochs, args.threads, work / f"{arm}_{rep}", extra)
            arms[arm].append({**r, "n_images_trained": n_train * args.epochs, "loadavg_before": load})
            print(f"{arm} #{rep + 1}: {r['images_per_s']} img/s ({r['threads']} threads), "
                  f"test -ELBO {r['test_neg_elbo']:.2f}, peak RSS {r['peak_rss_mb']} MB", flush=True)
    return arms


def short_runs(args, tar: Path, work: Path) -> dict:
    """Whole processes of a short run (issue 15): ``--short-n`` training images, ``--short-epochs`` epochs,
    alternating baseline / medivae. ``outside_s`` = wall time minus the time in training epochs: start-up,
    data loading, validation, checkpoints, figures and report for medivae; start-up, data loading and the
    test pass for the article's script."""
    npz = work / "short.npz"
    split = build_npz(tar, npz, args.short_n, 1000, DEFAULT_SEED)
    runs = {"baseline": [], "medivae": []}
    for rep in range(args.repeats):
        for arm in runs:
            if arm == "baseline":
                r = run_baseline(npz, args.short_epochs, args.threads)
            else:
                r = run_medivae(npz, args.short_epochs, args.threads, work / f"short_{rep}", [])
            r["outside_s"] = round(r["wall_s"] - r["train_s"], 2)
            runs[arm].append(r)
            print(f"short {arm} #{rep + 1}: wall {r['wall_s']} s, outside training {r['outside_s']} s", flush=True)
    med = {arm: {k: float(np.median([r[k] for r in rs])) for k in ("wall_s", "train_s", "outside_s")}
           for arm, rs in runs.items()}
    return {
        "n_train": split["train"], "epochs": args.short_epochs, "runs": runs, "median": med,
        "whole_process_ratio": round(med["baseline"]["wall_s"] / med["medivae"]["wall_s"], 2),
        "paired_whole_process_ratios": [round(b["wall_s"] / m["wall_s"], 2)
                                        for b, m in zip(runs["baseline"], runs["medivae"], strict=True)],
    }


# --- what the CPU can do at most ---------------------------------------------------------------------
def roofline_worker(gemm_n: int) -> None:
    """Prints one JSON line: dense GEMM GFLOP/s in fp32 and bf16 at this process's thread count (the best of
    10 products of two n x n matrices, for n = ``gemm_n`` and ``gemm_n // 2``, after warm-up: the fastest this
    process saw, not a hardware peak, which tuned convolution kernels can exceed), and the training FLOPs per
    image of the article's network at 64 px (forward + backward of a batch of 128, counted by
    ``torch.utils.flop_counter.FlopCounterMode``; the loss and Adam, a few per cent, are not counted)."""
    import importlib.util

    from torch.utils.flop_counter import FlopCounterMode

    gemm = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        best = 0.0
        for n in (gemm_n // 2, gemm_n):
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            for _ in range(2):
                a @ b
            for _ in range(10):
                start = time.perf_counter()
                a @ b
                best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
        gemm[name] = round(best, 1)
    spec = importlib.util.spec_from_file_location("seed_article_vae", BASELINE)
    article = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(article)  # defines the model; its training runs only under __main__
    model, x = article.VAE(), torch.rand(128, 1, 64, 64)
    with FlopCounterMode(display=False) as counter:
        recon, mu, logvar = model(x)
        article.loss_function(recon, x, mu, logvar)[0].backward()
    print(json.dumps({"threads": torch.get_num_threads(), "gemm_gflops": gemm,
                      "train_flops_per_image": counter.get_total_flops() / len(x)}))


def roofline(threads: int, arms: dict[str, list[dict]], gemm_n: int = 2048) -> dict:
    """How near each arm runs to this CPU's dense-GEMM speed in its precision (medivae: bf16 where native,
    the article's code: fp32): achieved GFLOP/s = images/s x training FLOPs per image. Measured in a child
    with the runs' thread setting. ``ratio_if_at_gemm_peak``: the throughput ratio medivae would reach if
    its whole training step ran at the measured bf16 GEMM speed and the article's code as measured (a
    reference, not a bound: the fastest convolution kernels run at about that speed)."""
    from medivae.runtime.device import cpu_has_native_bf16

    load = round(os.getloadavg()[0], 2)
    r = run_measured([__file__, "--roofline-worker", str(gemm_n)], child_env(threads))
    out = json.loads(r["stdout"].strip().splitlines()[-1])
    out["loadavg_before"], out["loadavg_after"] = load, round(os.getloadavg()[0], 2)  # a busy machine: GEMM low
    flops = out["train_flops_per_image"]
    precision = {"baseline": "fp32", "medivae": "bf16" if cpu_has_native_bf16() else "fp32", "medivae_fp32": "fp32"}
    out["arms"] = {}
    for arm, runs in arms.items():
        ips = float(np.median([x["images_per_s"] for x in runs]))
        achieved = ips * flops / 1e9
        peak = out["gemm_gflops"][precision[arm]]
        out["arms"][arm] = {"precision": precision[arm], "images_per_s_median": ips,
                            "achieved_gflops": round(achieved, 1), "fraction_of_gemm_peak": round(achieved / peak, 3)}
    base = out["arms"]["baseline"]["images_per_s_median"]
    out["ratio_if_at_gemm_peak"] = round(out["gemm_gflops"][precision["medivae"]] * 1e9 / flops / base, 2)
    return out


def machine() -> dict:
    from medivae.runtime.device import cpu_has_native_bf16

    cpu = ""
    if Path("/proc/cpuinfo").exists():
        m = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
        cpu = m.group(1).strip() if m else ""
    return {
        "cpu": cpu or platform.processor(), "cores": os.cpu_count(), "torch": torch.__version__,
        "native_bf16": cpu_has_native_bf16(), "python": platform.python_version(),
    }


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=3, help="training epochs of each run (default 3)")
    p.add_argument("--repeats", type=int, default=2, help="alternating pairs of runs (default 2)")
    p.add_argument("--n-images", type=int, default=0, help="training images (0: all of the train split)")
    p.add_argument("--n-test", type=int, default=0, help="test (and val) images (0: all of the split)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads of every run (0: each one's default)")
    p.add_argument("--fp32", action="store_true", help="also alternate a medivae --precision fp32 arm")
    p.add_argument("--scaling-n", type=int, default=2048, help="images per scaling run (default 2048)")
    p.add_argument("--no-scaling", action="store_true", help="skip the scaling table")
    p.add_argument("--short-n", type=int, default=8000, help="training images of the short runs (default 8000)")
    p.add_argument("--short-epochs", type=int, default=2, help="epochs of the short runs (default 2)")
    p.add_argument("--short-only", action="store_true", help="only the short whole-process runs")
    p.add_argument("--no-short", action="store_true", help="skip the short whole-process runs")
    p.add_argument("--quick", action="store_true", help="tiny smoke run: 512 images, 1 epoch, 1 repeat")
    p.add_argument("--tar", type=Path, default=MEDNIST, help="MedNIST.tar.gz")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "train.json")
    p.add_argument("--scaling-worker", nargs=4, help=argparse.SUPPRESS)
    p.add_argument("--roofline-worker", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.repeats, args.n_images, args.n_test, args.scaling_n = 1, 1, 512, 256, 128
        args.short_n, args.short_epochs = 512, 1
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.scaling_worker:
        npy, size, storage, epochs = args.scaling_worker
        scaling_worker(npy, int(size), storage, int(epochs))
        return 0
    if args.roofline_worker:
        roofline_worker(args.roofline_worker)
        return 0
    for path in (BASELINE, args.tar):
        if not path.exists():
            raise SystemExit(f"{path}: not found (the benchmark needs ../shared next to the repository)")
    result = {
        "command": " ".join(["python benchmarks/bench_train.py", *(sys.argv[1:] if argv is None else argv)]),
        "commit": git_commit(),
        "machine": machine(), "loadavg_start": [round(v, 2) for v in os.getloadavg()],
        "epochs": args.epochs, "batch_size": 128, "repeats": args.repeats,
    }
    with tempfile.TemporaryDirectory(prefix="medivae-bench-") as tmp:
        work = Path(tmp)
        if not args.no_short:
            result["short_run"] = short_runs(args, args.tar, work)
        if args.short_only:
            return _write(args, result)
        npz = work / "mednist64.npz"
        split = build_npz(args.tar, npz, args.n_images, args.n_test, DEFAULT_SEED)
        print(f"data: {split}", flush=True)
        result["data"] = {"source": "MedNIST.tar.gz (64x64), seeded stratified 80/10/10 split", **split}
        result["runs"] = run_arms(args, npz, split["train"], work)
        result |= compare(result["runs"])
        result["roofline"] = roofline(args.threads, result["runs"], 512 if args.quick else 2048)
        n_inf = min(split["test"], 512 if args.quick else 4096)
        result["inference"] = inference_speed(work / "medivae_0", npz, n_inf)
        if not args.no_scaling:
            sizes = (32, 64) if args.quick else (64, 128, 256)  # quick: only that the table is made
            x64 = np.load(npz)["train_images"][:, None]
            counts = (args.scaling_n, 4 * args.scaling_n)
            result["scaling"] = scaling_table(x64, work, sizes, counts, args.threads, 1)
    print(f"ratio {result['throughput_ratio']} (pairs {result['paired_ratios']}), test -ELBO rel. diff "
          f"{result['test_neg_elbo_rel_diff']:+.2%}")
    roof = result["roofline"]
    print(f"GEMM GFLOP/s fp32 {roof['gemm_gflops']['fp32']}, bf16 {roof['gemm_gflops']['bf16']}; "
          + ", ".join(f"{a} {v['achieved_gflops']} ({v['fraction_of_gemm_peak']:.0%} of its GEMM speed)"
                      for a, v in roof["arms"].items())
          + f"; ratio at the bf16 GEMM speed {roof['ratio_if_at_gemm_peak']}")
    return _write(args, result)


def _write(args, result: dict) -> int:
    result["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    if "short_run" in result:
        print(f"short runs: whole-process ratio {result['short_run']['whole_process_ratio']}")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
