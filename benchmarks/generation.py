"""Which sampler draws images like the real ones? Every family's generators, at its defaults, on one table.

One call trains one arm on one data set and one seed (``medivae train`` with the family's defaults: every arm
gets its own default ``--epochs``), measures all of that run's rows against the data's test split, and adds
(or replaces) one (data, arm, seed) record in ``results/generation.json`` (keeping the rows an earlier call
measured on the same run and this one did not); seeds are added one run at a time:

    python benchmarks/generation.py --data pneumonia32 --arm real                    # the floor and blur rows
    python benchmarks/generation.py --data pneumonia32 --arm conv_vae --seed-index 0
    python benchmarks/generation.py --table                                          # the table, as markdown

Arms and their rows (``ARMS``): ``conv_vae`` -> its N(0, I) prior and the post-hoc gmm / flow / diffusion
samplers (``medivae fit-sampler``); ``vq_vae`` -> its code prior (trained in the run's last epochs) and a post-hoc
diffusion sampler; ``ldm`` -> its diffusion prior, unconditional; labelled data only: ``cvae`` -> a post-hoc
diffusion sampler with classifier-free guidance w = ``GUIDANCE``, and ``ldm_cond`` -> the class-conditional ldm's
prior, both with TSTR; ``real`` -> the real-vs-real floor and the same test images blurred by a Gaussian of
σ = 1 px, in the same extractor (it trains nothing; its seed is the data's split, so one record is enough).

Each row: ``medivae evaluate RUN --sampler S`` (FD, precision, recall, density, coverage, high-frequency power
vs real, each with its 95 % bootstrap interval: generated images against the validation images, in the data
set's one reference extractor, beside the floor of the test images against the same), ``medivae synthesize
RUN --sampler S -n N`` (memorisation rate, membership-inference AUROC), sampling images/s (``Run.sample`` of
``--n-timing`` images in this process, fp32, ``--threads`` threads, timed around the call) and training seconds
(the trainer's per-epoch seconds from metrics.jsonl, plus the wall seconds of the row's ``fit-sampler``);
conditional rows also ``medivae utility`` (TSTR: a classifier trained on synthetic images only, and one on the
real training images only, both scored by AUC on the real test images). Seed index 0 writes a sample grid per
row beside a grid of real test images (``docs/results/images/generation_<data>_<row>.png``).

Every record holds the commit, the command, the CPU seconds of the call (its children and itself), the wall
seconds and the load average before and after (a busy machine slows a run, not its numbers).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from common import (
    DATA,
    ROOT,
    SAMPLE_METRICS,
    SEED0,
    children_cpu,
    commit_key,
    git_commit,
    load_average,
    medivae,
    privacy,
    sample_quality,
    still_at,
    trained_epochs,
    update_json,
)

GUIDANCE = 1.0  # classifier-free guidance w of the cvae's diffusion sampler (the ldm's own default)
AIM = {"fd_vs_floor": 1.5, "hf_power_ratio": 0.8, "recall_vs_floor": 0.9}  # FD <= 1.5 x floor, HF >= 0.8, ...
LABELLED = ("pneumonia32", "phantoms32")  # data sets with two or more classes: conditional arms and TSTR
IMAGES = ROOT / "docs" / "results" / "images"
MAX_GRID_BYTES = 100_000


@dataclass(frozen=True)
class Arm:
    train_args: tuple[str, ...]
    rows: dict[str, tuple[str, float | None]]  # row -> (--sampler, --guidance or None)
    label: str
    tstr: bool = False  # conditional: TSTR of each row's synthetic images


ARMS = {
    "conv_vae": Arm(("--model", "conv_vae"), {"prior": ("prior", None), "gmm": ("gmm", None), "flow": ("flow", None),
                                              "diffusion": ("diffusion", None)}, "conv_vae"),
    "vq_vae": Arm(("--model", "vq_vae"), {"prior": ("prior", None), "diffusion": ("diffusion", None)}, "vq_vae"),
    "ldm": Arm(("--model", "ldm", "--model-arg", "num_classes=0"), {"prior": ("prior", None)}, "ldm"),
    "cvae": Arm(("--model", "cvae"), {"diffusion": ("diffusion", GUIDANCE)}, "cvae", tstr=True),
    "ldm_cond": Arm(("--model", "ldm"), {"prior": ("prior", None)}, "ldm, class-conditional", tstr=True),
}
REAL_ROWS = {"floor": "real test images (floor)", "blur_sigma1": "real test images, Gaussian blur σ = 1 px"}
ROW_NAMES = {"prior": "its prior", "gmm": "GMM (post hoc)", "flow": "flow (post hoc)",
             "diffusion": "diffusion (post hoc)"}


# --- training ------------------------------------------------------------------------------------------------
def epoch_seconds(run: Path) -> float:
    """The trainer's training seconds: the sum of its per-epoch seconds (metrics.jsonl)."""
    from medivae.train.metrics import read_metrics

    return round(sum(r["seconds"] for r in read_metrics(run)), 2)


def finished(run: Path) -> bool:
    cfg = run / "config.json"
    return cfg.exists() and trained_epochs(run) == json.loads(cfg.read_text())["train"]["epochs"]


def train(arm: str, data: str, seed: int, run: Path, extra: list[str]) -> dict:
    """Train one arm (or finish an interrupted run) and fit its post-hoc samplers; a finished run keeps the
    record of its training (run/generation_train.json)."""
    saved = run / "generation_train.json"
    if finished(run) and saved.exists():
        return json.loads(saved.read_text())
    args = [*DATA[data], *ARMS[arm].train_args, "--seed", seed, "--out", run, "--no-progress", *extra]
    cmd = medivae("train", *args, *(["--resume"] if trained_epochs(run) else []))
    rec = {"train_args": shlex.join(str(a) for a in args), "train": cmd, "train_seconds": epoch_seconds(run),
           "epochs": trained_epochs(run), "fit_sampler": {}}
    saved.write_text(json.dumps(rec, indent=2) + "\n")
    return rec


def sampler_args(sampler: str, fit_args: list[str]) -> list[str]:
    """The ``fit-sampler`` arguments of one sampler: ``--fit-args`` are the diffusion sampler's."""
    return [str(a) for a in fit_args] if sampler == "diffusion" else []


def fit(run: Path, sampler: str, fit_args: list[str]) -> dict:
    """Fit one post-hoc sampler: the command's record, with the arguments it was fitted with (a reused run
    keeps a fitted sampler only when this call asks for the same ones)."""
    quiet = ["--no-progress"] if sampler == "diffusion" else []  # the only fit with a progress bar
    args = sampler_args(sampler, fit_args)
    return {**medivae("fit-sampler", run, "--sampler", sampler, *args, *quiet), "args": shlex.join(args)}


# --- measuring one row ---------------------------------------------------------------------------------------
def guidance_args(guidance: float | None) -> list:
    return [] if guidance is None else ["--guidance", guidance]


def timed_sampling(run: Path, sampler: str, guidance: float | None, n: int, seed: int, threads: int):
    """n images drawn as ``Run.sample`` draws them (fp32), timed around the call: (uint8 (n, C, H, W), record)."""
    import torch

    from medivae.runfolder.run import load_run

    torch.set_num_threads(threads)
    r = load_run(run, device="cpu")
    extra = {} if guidance is None else {"guidance": guidance}
    start, cpu, load = time.perf_counter(), time.process_time(), load_average()
    x = r.sample(n, seed=seed, precision="fp32", sampler=sampler, **extra)
    seconds = time.perf_counter() - start
    rec = {"n": n, "seconds": round(seconds, 3), "cpu_seconds": round(time.process_time() - cpu, 2),
           "images_per_s": round(n / max(seconds, 1e-9), 2), "threads": threads, "load_before": load,
           "how": "Run.sample in-process, fp32"}
    return (x * 255).round().to(torch.uint8).numpy(), rec


def measure_row(run: Path, row: str, sampler: str, guidance: float | None, work: Path, args) -> dict:
    """One row of a trained run: sample quality, privacy, sampling speed, TSTR (conditional arms)."""
    g = guidance_args(guidance)
    common = ["--bootstrap", args.bootstrap, "--reference-epochs", args.reference_epochs, "--no-progress"]
    ev = medivae("evaluate", run, "--sampler", sampler, *g, "-k", 1, "--max-images", args.max_images,
                 "--n-samples", args.n_samples, "--threads", args.threads, *common)
    out = {"sampler": sampler, "guidance": guidance, "command": args.command, "evaluate_command": ev,
           "evaluate": sample_quality(run, sampler)}
    synth = work / f"synth_{row}"
    out["synthesize_command"] = medivae("synthesize", run, "--sampler", sampler, *g, "-n", args.n_synth,
                                        "--format", "npz", "--out", synth, "--force", *common)
    out["synthesize"] = privacy(synth)
    if ARMS[args.arm].tstr:
        out["tstr"] = tstr(run, synth, args)
    images, out["sampling"] = timed_sampling(run, sampler, guidance, args.n_timing, args.seed, args.threads)
    if args.seed_index == 0:
        out["grid"] = sample_grid(images, args.images / f"generation_{args.data}_{args.arm}{args.tag}_{row}.png")
    return out


def tstr(run: Path, synth: Path, args) -> dict | None:
    """``medivae utility``'s AUCs on the real test images: trained on the synthetic images only, on real and
    synthetic, on the real training images only. None when utility refuses the set (synthesize writes no image
    it rejects as too near a training image: a model that memorises can leave too few), and the row stays."""
    try:
        medivae("utility", "--run", run, "--synthetic", synth, "--out", synth / "utility.json", "--force",
                "--bootstrap", args.bootstrap, "--epochs", args.utility_epochs, "--no-progress")
    except SystemExit as e:
        print(f"no TSTR for {synth}: {e}", file=sys.stderr, flush=True)
        return None
    u = json.loads((synth / "utility.json").read_text())
    return {k: {"auc": u[k]["auc"], "ci95": (u[k].get("ci95") or {}).get("auc")}
            for k in ("synthetic_only", "real_plus_synthetic", "real_only")}


def sample_grid(images: np.ndarray, path: Path) -> dict:
    """36 images (25 at 64 px and above: the PNG stays under 100 KB) spread evenly over ``images`` (a conditional
    run draws its classes in blocks) as one grid."""
    from medivae.runtime.images import grid, save_png

    n = min(36 if images.shape[-1] <= 32 else 25, len(images))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(grid(images[np.linspace(0, len(images) - 1, n).round().astype(int)]), path)
    if path.stat().st_size > MAX_GRID_BYTES:
        print(f"warning: {path} is {path.stat().st_size // 1000} KB", file=sys.stderr, flush=True)
    return {"file": str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path), "n": n,
            "bytes": path.stat().st_size}


def model_arm(args, run: Path, extra: list[str]) -> dict:
    """Train (or reuse) the arm's run, fit its samplers, measure every row."""
    rec = train(args.arm, args.data, args.seed, run, extra)
    rows = {}
    for row in args.rows:
        sampler, guidance = ARMS[args.arm].rows[row]
        done = rec["fit_sampler"].get(sampler, {})
        if sampler != "prior" and done.get("args") != shlex.join(sampler_args(sampler, args.fit_args)):
            # not fitted yet, or fitted with other --fit-args (a record without "args" predates them): fit again
            rec["fit_sampler"][sampler] = fit(run, sampler, args.fit_args)
            (run / "generation_train.json").write_text(json.dumps(rec, indent=2) + "\n")
        rows[row] = measure_row(run, row, sampler, guidance, run.parent / f"{run.name}_out", args)
        fit_s = rec["fit_sampler"][sampler]["wall_seconds"] if sampler != "prior" else 0.0
        rows[row]["train_seconds"] = round(rec["train_seconds"] + fit_s, 2)
        print(args.data, args.arm, row, json.dumps({k: round(v, 4) for k, v in rows[row]["evaluate"]["model"].items()}),
              file=sys.stderr, flush=True)
    return {**rec, "rows": rows}


# --- the real rows ---------------------------------------------------------------------------------------------
def data_config(data: str):
    """The DataConfig ``medivae train`` makes of the data set's arguments (so the extractor is the runs' one)."""
    from medivae.runfolder.config import DataConfig

    a = dict(zip(DATA[data][::2], DATA[data][1::2], strict=True))
    labels = tuple(x for x in a.get("--labels", "").split(",") if x)
    return DataConfig(source=a["--data"], image_size=int(a["--image-size"]), labels=labels)


def held_out_images(splits: dict, max_images: int, split_seed: int) -> np.ndarray:
    """The test images ``medivae evaluate --max-images N`` scores (all of them for 0): the real rows compare
    with the model rows only at the same images and count. uint8 (N, C, H, W)."""
    from medivae.workflows.evaluate import _subset

    return np.asarray(_subset(splits["test"], max_images, split_seed, "evaluate-subset").images)


def real_arm(args) -> dict:
    """The test images, as they are (the floor) and blurred (σ = 1 px), against the validation images that
    ``medivae evaluate`` compares generated images with, in the same extractor, with the same intervals."""
    from medivae.data import load_dataset
    from medivae.evaluation import sample_quality as sq
    from medivae.evaluation.blur import gaussian_blur
    from medivae.evaluation.bootstrap import ratio_of_means_ci
    from medivae.evaluation.sharpness import high_frequency_power
    from medivae.workflows.evaluate import MAX_REFERENCE, _subset, reference_split, shared_reference

    cfg = data_config(args.data)
    splits = load_dataset(cfg, progress=False)
    ref = shared_reference(cfg, splits["train"], args.reference_epochs, False, "cpu")
    ref_split = reference_split(splits, "test")
    real = np.asarray(_subset(splits[ref_split], MAX_REFERENCE, cfg.split_seed, "evaluate-reference").images)
    test = held_out_images(splits, args.max_images, cfg.split_seed)
    f_real, p_real = ref.features(real), high_frequency_power(real)
    info = {"fd_name": f"FD-{ref.name}", "reference_hash": ref.folder.name, "n_reference": len(real),
            "n_held_out": len(test), "reference_split": ref_split, "held_out_split": "test"}
    rows = {}
    for row, x in (("floor", test), ("blur_sigma1", gaussian_blur(test, 1.0))):
        f, p = ref.features(x), high_frequency_power(x)
        ci = {**sq.compare_ci(f_real, f, args.bootstrap, cfg.split_seed),
              "hf_power_ratio": ratio_of_means_ci(p, p_real, args.bootstrap, cfg.split_seed)}
        model = {**sq.compare(f_real, f), "hf_power_ratio": float(p.mean() / p_real.mean())}
        rows[row] = {"evaluate": {**info, "model": model, "ci95": ci}}
    grid = sample_grid(test, args.images / f"generation_{args.data}_real.png") if args.seed_index == 0 else None
    return {"split_seed": cfg.split_seed, "rows": rows, "grid": grid}


# --- the JSON ----------------------------------------------------------------------------------------------------
def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"benchmark": "generation", "records": {}}


def merged(old: dict | None, new: dict) -> dict:
    """``new``, keeping the rows an earlier record of the same trained run (same folder, same commit) measured
    and this call did not (``--rows``): each row names the command that measured it."""
    if old and new.get("run") and old.get("run") == new["run"] and old.get("commit") == new.get("commit"):
        return {**new, "rows": {**old["rows"], **new["rows"]}}
    return new


def add_record(path: Path, data: str, arm: str, seed: int, record: dict) -> dict:
    """Add (or replace) one record under a lock (calls may run side by side), written atomically."""

    def add(result: dict) -> dict:
        recs = result["records"].setdefault(data, {}).setdefault(arm, {})
        recs[str(seed)] = merged(recs.get(str(seed)), record)
        result["commit"] = record["commit"]  # the newest record's (the results index shows it)
        result["command"] = ("python benchmarks/generation.py --data DATA --arm ARM --seed-index I "
                             "(one record per call; each record holds its own command and commit)")
        return result

    return update_json(path, add, {"benchmark": "generation", "records": {}})


# --- the table ---------------------------------------------------------------------------------------------------
def value(row: dict, key: str) -> tuple[float | None, list | None]:
    """(one record's value of column ``key`` for one row, its within-run 95 % interval or None)."""
    if key in SAMPLE_METRICS:
        ev = row.get("evaluate") or {}
        return ev.get("model", {}).get(key), (ev.get("ci95") or {}).get(key)
    if key.startswith("floor_"):
        ev = row.get("evaluate") or {}
        return (ev.get("floor") or {}).get(key[6:]), (ev.get("ci95") or {}).get(key)
    s = row.get("synthesize")
    if key == "memorisation":
        return (s["memorisation_rate"], s["memorisation_ci95"]) if s else (None, None)
    if key == "mi_auroc":  # telling training from held-out images by their distance to the nearest sample
        mi = (s or {}).get("membership_inference", {}).get("nearest_synthetic_pixel")
        return (mi["auroc"], mi["ci95"]) if mi else (None, None)
    if key in ("tstr_auc", "real_only_auc"):
        t = (row.get("tstr") or {}).get("synthetic_only" if key == "tstr_auc" else "real_only")
        return (t["auc"], t["ci95"]) if t else (None, None)
    if key == "images_per_s":
        return (row.get("sampling") or {}).get("images_per_s"), None
    return row.get(key), None  # train_seconds


def over_seeds(rows: list[dict], key: str) -> tuple[float | None, list | None, int]:
    """(mean over seeds, its 95 % interval, seeds): a t-interval over the seeds' values when there are two or
    more, the run's own bootstrap interval when there is one."""
    from scipy import stats

    pairs = [value(r, key) for r in rows]
    vals = [v for v, _ in pairs if v is not None]
    if not vals:
        return None, None, 0
    m = float(np.mean(vals))
    if len(vals) == 1:
        return m, next(ci for v, ci in pairs if v is not None), 1
    h = float(stats.t.ppf(0.975, len(vals) - 1) * np.std(vals, ddof=1) / np.sqrt(len(vals)))
    return m, [m - h, m + h], len(vals)


COLUMNS = [  # (key, header, format, scale)
    ("fd", "FD", ".4g", 1), ("precision", "precision", ".3f", 1), ("recall", "recall", ".3f", 1),
    ("density", "density", ".3f", 1), ("coverage", "coverage", ".3f", 1),
    ("hf_power_ratio", "HF power vs real", ".3f", 1), ("memorisation", "memorisation %", ".1f", 100),
    ("mi_auroc", "membership AUROC", ".3f", 1), ("images_per_s", "sampling images/s", ".4g", 1),
    ("train_seconds", "training s", ".4g", 1), ("tstr_auc", "TSTR AUC", ".3f", 1),
    ("real_only_auc", "real-only AUC", ".3f", 1),
]


def cell(m: float | None, ci, spec: str, scale: float = 1) -> str:
    if m is None:
        return "–"
    text = f"{m * scale:{spec}}"
    return text + (f" [{ci[0] * scale:{spec}}, {ci[1] * scale:{spec}}]" if ci else "")


def aim_met(rows: list[dict]) -> str:
    """FD <= 1.5 x the floor's, HF power >= 0.8 of real, recall >= 0.9 x the floor's (means over seeds)."""
    mean = {k: over_seeds(rows, k)[0] for k in ("fd", "hf_power_ratio", "recall", "floor_fd", "floor_recall")}
    if any(v is None for v in mean.values()):
        return "–"
    ok = (mean["fd"] <= AIM["fd_vs_floor"] * mean["floor_fd"] and mean["hf_power_ratio"] >= AIM["hf_power_ratio"]
          and mean["recall"] >= AIM["recall_vs_floor"] * mean["floor_recall"])
    return "yes" if ok else "no"


def arm_order(arms: dict) -> list[str]:
    """The recorded arm names in table order: real, then ``ARMS``' order (ARM+ARGS after ARM)."""
    order = ("real", *ARMS)
    return sorted(arms, key=lambda a: (order.index(a.split("+")[0]), a))


def table_rows(records: dict) -> list[tuple[str, str, list[dict], list[str]]]:
    """(data, row label, the row of every seed, their commits) in table order: real rows, then each arm's (an
    arm trained with --train-args is its own arm, ARM+ARGS)."""
    out = []
    for data, arms in records.items():
        for name in arm_order(arms):
            arm, _, extra = name.partition("+")
            recs = list(arms[name].values())
            names = REAL_ROWS if arm == "real" else {r: f"`{ARMS[arm].label}` {ROW_NAMES[r]}" for r in ARMS[arm].rows}
            suffix = (f", guidance w = {GUIDANCE:g}" if arm == "cvae" else "") + (f" (`{extra}`)" if extra else "")
            for row, label in names.items():
                got = [r for r in recs if row in r["rows"]]
                if got:
                    out.append((data, label + suffix, [r["rows"][row] for r in got],
                                sorted({commit_key(r["commit"]) for r in got})))
    return out


def table(result: dict) -> str:
    """Markdown: per data set and row, the mean over seeds [95 % interval] of every column, seeds, the aim,
    the commits; then the extractor of each data set."""
    rows = table_rows(result.get("records", {}))
    if not rows:
        return "No records yet: run `python benchmarks/generation.py --data DATA --arm ARM --seed-index I`."
    head = ["data", "samples from", *(c[1] for c in COLUMNS), "seeds", "aim met", "commits"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for data, label, recs, commits in rows:
        stats_ = [over_seeds(recs, key) for key, *_ in COLUMNS]
        cells = [cell(m, ci, spec, scale) for (m, ci, _), (_, _, spec, scale) in zip(stats_, COLUMNS, strict=True)]
        n = max(s[2] for s in stats_)
        aim = "–" if label.startswith("real test images") else aim_met(recs)
        lines.append(f"| {data} | {label} | " + " | ".join(cells) + f" | {n} | {aim} | {', '.join(commits)} |")
    return "\n".join(lines) + "\n\n" + footnote(result["records"])


def footnote(records: dict) -> str:
    refs = {}
    for data, arms in records.items():
        for recs in arms.values():
            for r in recs.values():
                for row in r["rows"].values():
                    ev = row.get("evaluate") or {}
                    refs.setdefault(data, set()).add(f"{ev.get('fd_name')} `{ev.get('reference_hash')}`")
    ext = "; ".join(f"{d}: {', '.join(sorted(h))}" + (" (**more than one extractor: rows do not compare**)"
                                                       if len(h) > 1 else "") for d, h in refs.items())
    return (f"Mean over seeds with a 95 % interval: a t-interval over the seeds when there are two or more, the "
            f"run's own bootstrap interval over images when there is one. Extractors: {ext}. Aim: FD at most "
            f"{AIM['fd_vs_floor']:g} × the floor's, high-frequency power at least {AIM['hf_power_ratio']:g} of "
            f"real, recall at least {AIM['recall_vs_floor']:g} × the floor's. Membership AUROC: training against "
            "held-out images by the pixel distance to the nearest sample (0.5: indistinguishable).")


def grids(result: dict, prefix: str = "images/") -> str:
    """Markdown images of every grid the records hold, per data set: real test images first."""
    out = []
    for data, arms in result.get("records", {}).items():
        pics = [(f"{data} real test images", rec.get("grid")) for rec in arms.get("real", {}).values()]
        pics += [(f"{data} {name} {row}", r.get("grid")) for name in arm_order(arms) if name != "real"
                 for rec in arms[name].values() for row in ARMS[name.split("+")[0]].rows
                 if (r := rec["rows"].get(row))]
        lines = [f"![{name}]({prefix}{Path(g['file']).name})" for name, g in pics if g]
        if lines:
            out.append(f"**{data}**\n\n" + "\n".join(lines))
    return "\n\n".join(out)


# --- the command line ------------------------------------------------------------------------------------------
def parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", choices=sorted(DATA), default="pneumonia32")
    p.add_argument("--arm", choices=("real", *ARMS), default="conv_vae")
    p.add_argument("--seed-index", type=int, default=0, help="seed = the article's seed + this")
    p.add_argument("--rows", default="", help="a comma list of the arm's rows (default: all of them)")
    p.add_argument("--n-samples", type=int, default=0, help="generated images per evaluation (0: as many as "
                   "the test split holds)")
    p.add_argument("--max-images", type=int, default=0, help="test images evaluated (0: all)")
    p.add_argument("--n-synth", type=int, default=1000, help="images medivae synthesize draws per row")
    p.add_argument("--n-timing", type=int, default=256, help="images drawn to time sampling")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--reference-epochs", type=int, default=5, help="the shared extractor's (medivae's default)")
    p.add_argument("--utility-epochs", type=int, default=10, help="TSTR classifier epochs (medivae's default)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train-args", default="", help="extra medivae train arguments: the smoke test's short "
                   "--epochs only; recorded under the arm name ARM+ARGS")
    p.add_argument("--fit-args", default="", help="extra fit-sampler arguments of the diffusion sampler (smoke "
                   "test: --epochs 2)")
    p.add_argument("--work", type=Path, default=Path("/tmp/medivae_generation"))
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "generation.json")
    p.add_argument("--images", type=Path, default=IMAGES, help="folder of the sample grids")
    p.add_argument("--commit", default=None, help="the commit the code under test is at (default: HEAD here)")
    p.add_argument("--table", action="store_true", help="print the table of --out and stop")
    args = p.parse_args(argv)
    args.command = shlex.join(["python", "benchmarks/generation.py", *(sys.argv[1:] if argv is None else argv)])
    if args.arm == "real" and args.seed_index:
        p.error("the real arm trains nothing (its rows depend on the data's split alone): run it once, seed index 0")
    if args.arm != "real":
        arm = ARMS[args.arm]
        args.rows = [r for r in args.rows.split(",") if r] or list(arm.rows)
        if set(args.rows) - set(arm.rows):
            p.error(f"--rows of {args.arm} are {', '.join(arm.rows)}, not {','.join(args.rows)}")
        if arm.tstr and args.data not in LABELLED:
            p.error(f"--arm {args.arm} needs labelled data ({', '.join(LABELLED)}), not {args.data}")
    args.fit_args, args.seed = shlex.split(args.fit_args), SEED0 + args.seed_index
    # an arm trained with --train-args (a tuning experiment) never overwrites the plain arm's grids
    args.tag = "_" + hashlib.sha1(args.train_args.encode()).hexdigest()[:6] if args.train_args.strip() else ""
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.table:
        print(table(load(args.out)))
        return 0
    extra = shlex.split(args.train_args)
    name = f"{args.arm}+{args.train_args}" if extra else args.arm
    commit = args.commit or git_commit()
    # one run folder per code version: a finished run is measured again, never reused by other code
    run = args.work / f"{args.data}_{name.replace(' ', '_')}_{args.seed_index}_{commit_key(commit)}" / "run"
    run.parent.mkdir(parents=True, exist_ok=True)
    cpu0, own0, load0, start = children_cpu(), time.process_time(), load_average(), time.perf_counter()
    measured = real_arm(args) if args.arm == "real" else model_arm(args, run, extra)
    record = {"commit": commit, "command": args.command, "seed": args.seed, "seed_index": args.seed_index,
              "run": None if args.arm == "real" else str(run), "data_args": shlex.join(DATA[args.data]),
              **measured, "cpu_seconds": round(children_cpu() - cpu0 + time.process_time() - own0, 1),
              "wall_seconds": round(time.perf_counter() - start, 1), "load_average_before": load0,
              "load_average_after": load_average()}
    if not args.commit:  # --commit names code elsewhere; otherwise this checkout must still be at it
        still_at(commit)
    add_record(args.out, args.data, name, args.seed, record)
    print(table({"records": {args.data: {name: {str(args.seed): record}}}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
