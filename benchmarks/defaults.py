"""Does each family, with its defaults, win the claim it is there for? Against ``conv_vae`` at equal epochs.

Every arm trains with ``medivae train`` and nothing but the defaults (the same epochs for every arm: the
default ``--epochs``), on one data set and one seed per call, then is measured on one split of that data
(``--split val`` to choose defaults, ``test`` for the table). A call adds (or replaces) one
(data, split, arm, seed) record in ``results/defaults.json``, so seeds are added one run at a time:

    python benchmarks/defaults.py --data pneumonia32 --arm conv_vae --seed-index 0
    python benchmarks/defaults.py --data pneumonia32 --arm all --seed-index 1    # every arm in turn
    python benchmarks/defaults.py --table                                       # the claims, as markdown

Each record holds the commit it ran at, the CPU seconds of the training process (user + system, of
the child), wall seconds and the load average before and after (a busy machine slows a run, not its
numbers), the arm's exact ``medivae train`` arguments and what it measured:

- ``psnr_db``: mean PSNR of the split's reconstructions (posterior mean, fp32);
- ``neg_iwae_bpd`` / ``neg_elbo_bpd``: IWAE (K = ``--iwae-k``) and ELBO bits/dim of the split (families
  with a discrete image likelihood only; :mod:`medivae.evaluation.likelihood`);
- ``hf_power_ratio``: mean power above 0.25 cycles/pixel of ``--n-samples`` prior samples over that of
  the split's real images (:mod:`medivae.evaluation.sharpness`; 1: as much fine detail as real images;
  above 1 is power real images do not have, noise or artefacts, so the claim compares |log ratio|).

The claims (``CLAIMS``): vq_vae reconstructs better (PSNR) than conv_vae; hierarchical_vae and the
VampPrior have a better likelihood (IWAE bits/dim) than conv_vae with the same discretized-logistic
likelihood; vae_gan's samples have more high-frequency power than conv_vae's.

Data (``../shared/data``; see its README): PneumoniaMNIST at 32 px (its own split), MedNIST CXR and
HeadCT at 64 px (one class of the MedNIST archive, split by medivae).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
from common import DATA, SEED0, commit_key, git_commit, still_at, trained_epochs, update_json  # noqa: E402  (benchmarks/ is on sys.path)

DL = ["--likelihood", "discretized_logistic"]
ARMS = {  # name -> medivae train model arguments: the family's defaults (and the likelihood a claim needs)
    "conv_vae": ["--model", "conv_vae"],
    "conv_vae_dl": ["--model", "conv_vae", *DL],
    "vq_vae": ["--model", "vq_vae"],
    "hierarchical_vae": ["--model", "hierarchical_vae"],
    "vamp_vae": ["--model", "vamp_vae", *DL],  # bits/dim need a discrete likelihood; the prior is the claim
    "vae_gan": ["--model", "vae_gan"],
}
# family arm, baseline arm, metric, which is better: "higher", "lower" or "nearer 1" (|log| lower)
CLAIMS = [
    ("vq_vae", "conv_vae", "psnr_db", "higher"),
    ("hierarchical_vae", "conv_vae_dl", "neg_iwae_bpd", "lower"),
    ("vamp_vae", "conv_vae_dl", "neg_iwae_bpd", "lower"),
    ("vae_gan", "conv_vae", "hf_power_ratio", "nearer 1"),
]


def train(arm: str, data: str, seed: int, out: Path, extra: list[str], commit: str) -> dict:
    """Train one arm (or finish an interrupted run): its commit, arguments, CPU and wall seconds, load average.
    A finished run keeps that record in out/defaults_train.json, so measuring it again (on another split, into
    another --out) reports its training, not the seconds of a ``--resume`` that had nothing left to do."""
    saved = Path(out) / "defaults_train.json"
    if finished(out) and saved.exists():
        return json.loads(saved.read_text())
    args = [*DATA[data], *ARMS[arm], "--seed", str(seed), "--out", str(out), "--no-progress", *extra]
    if trained_epochs(out) > 0:
        args.append("--resume")
    before, load0, start = resource.getrusage(resource.RUSAGE_CHILDREN), os.getloadavg(), time.perf_counter()
    subprocess.run([sys.executable, "-m", "medivae", "train", *args], check=True, stdout=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    rec = {"commit": commit, "seed": seed, "run": str(out), "train_args": shlex.join(args),
           "cpu_seconds": round(cpu, 1), "wall_seconds": round(time.perf_counter() - start, 1),
           "load_average_before": round(load0[0], 2), "load_average_after": round(os.getloadavg()[0], 2)}
    saved.write_text(json.dumps(rec, indent=2) + "\n")
    return rec


TRAIN_KEYS = ("commit", "commit_note", "seed", "run", "train_args", "cpu_seconds", "wall_seconds",
              "load_average_before", "load_average_after")


def finished(run_dir: Path) -> bool:
    """Whether a run holds all the epochs its config asks for."""
    cfg = Path(run_dir) / "config.json"
    return cfg.exists() and trained_epochs(run_dir) == json.loads(cfg.read_text())["train"]["epochs"]


def measure(run_dir: Path, split: str, iwae_k: int, n_samples: int) -> dict:
    """The split's PSNR, bits/dim (discrete likelihoods only) and the samples' high-frequency power ratio."""
    import torch

    from medivae.evaluation.likelihood import likelihood_bounds
    from medivae.evaluation.reconstruction import per_image_metrics
    from medivae.evaluation.sharpness import hf_power_ratio
    from medivae.models.family import has, labels_for
    from medivae.runfolder.run import load_run
    from medivae.runtime.seeding import torch_generator

    run = load_run(run_dir, device="cpu")
    s = run.split(split)
    x01 = s.images.astype(np.float64) / 255
    recon = run.reconstruct(s.images, labels=s.labels, precision="fp32").numpy()
    out = {"split": split, "n_images": len(s), "psnr_db": float(per_image_metrics(x01, recon)["psnr_db"].mean())}
    model = run.model.eval()
    if has(model, "likelihood"):
        batches = ((torch.as_tensor(x01[i : i + 64], dtype=torch.float32),
                    labels_for(model, s.labels[i : i + 64], torch.device("cpu"))) for i in range(0, len(s), 64))
        lik = likelihood_bounds(model, batches, iwae_k, torch_generator(run.config.train.seed, "defaults-iwae"))
        out.update({k: lik.get(k) for k in ("neg_iwae_bpd", "neg_elbo_bpd", "neg_iwae_nats", "iwae_k")})
    if has(model, "sample"):
        fake = (run.sample(n_samples, seed=run.config.train.seed, precision="fp32") * 255).round().numpy()
        out["hf_power_ratio"] = hf_power_ratio(fake.astype(np.uint8), s.images)
        out["n_samples"] = n_samples  # the prior samples behind hf_power_ratio (the ratio depends on the draw)
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    best = json.loads((Path(run_dir) / "best" / "state.json").read_text())
    out.update({"epochs": rows[-1]["epoch"], "best_epoch": best.get("best_epoch"),
                "rollbacks": max(r.get("nan_events", 0) for r in rows)})
    return out


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"records": {}}


def add_record(path: Path, data: str, split: str, name: str, seed: int, record: dict) -> dict:
    """Add (or replace) one record under the file's lock (calls may run side by side), written atomically."""

    def add(result: dict) -> dict:
        result["records"].setdefault(data, {}).setdefault(split, {}).setdefault(name, {})[str(seed)] = record
        return result

    return update_json(path, add, {"records": {}})


def paired(records: dict, data: str, split: str, arm: str, base: str, metric: str, how: str):
    """The seeds both arms ran, the family's and the baseline's values on them, and the paired differences
    oriented so that > 0 means the family is better (for "nearer 1": the baseline's |log| minus the family's)."""
    a = {s: r[metric] for s, r in records[data][split].get(arm, {}).items() if r.get(metric) is not None}
    b = {s: r[metric] for s, r in records[data][split].get(base, {}).items() if r.get(metric) is not None}
    seeds = sorted(a.keys() & b.keys())
    fa, fb = np.array([a[s] for s in seeds], float), np.array([b[s] for s in seeds], float)
    if how == "nearer 1":
        gain = np.abs(np.log(fb)) - np.abs(np.log(fa))
    else:
        gain = fa - fb if how == "higher" else fb - fa
    return seeds, fa, fb, gain


def t_interval(x: np.ndarray) -> tuple[float, float] | None:
    """95 % Student-t interval of the mean of x (None for fewer than two values): seeds are few, so a
    bootstrap over them would be too narrow."""
    from scipy import stats

    if len(x) < 2:
        return None
    half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
    return float(x.mean() - half), float(x.mean() + half)


def verdict(gain: np.ndarray) -> str:
    """"yes" when the paired interval of the gain is above 0, "**no**" when below, "level" when it holds 0;
    with one seed, the sign of that seed's gain and "(1 seed)"."""
    ci = t_interval(gain)
    if ci is None:
        return ("yes" if gain[0] > 0 else "**no**") + " (1 seed)"
    return "yes" if ci[0] > 0 else "**no**" if ci[1] < 0 else "level"


def table(result: dict, split: str) -> str:
    """Markdown: per data set and claim, the family's and the baseline's mean over the seeds both ran, the
    paired gain (family better when > 0) with its 95 % t interval over seeds, and the verdict."""
    rows = ["| data | claim | family | conv_vae | gain [95 % CI] | seeds | wins | commits |",
            "|---|---|---|---|---|---|---|---|"]
    recs = result["records"]
    for data in recs:
        if split not in recs[data]:
            continue
        for arm, base, metric, how in CLAIMS:
            seeds, fa, fb, gain = paired(recs, data, split, arm, base, metric, how)
            if not seeds:
                continue
            ks = {recs[data][split][a][s].get("iwae_k") for a in (arm, base) for s in seeds}
            if metric == "neg_iwae_bpd" and len(ks) > 1:
                continue  # bounds at different K do not compare
            ci = t_interval(gain)
            cell = f"{gain.mean():+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "")
            commits = {commit_key(recs[data][split][a][s]["commit"]) for a in (arm, base) for s in seeds}
            rows.append(f"| {data} | {arm} {metric} ({how} is better) | {fa.mean():.3f} | {fb.mean():.3f} ({base}) | "
                        f"{cell} | {len(seeds)} | {verdict(gain)} | {', '.join(sorted(commits))} |")
    return "\n".join(rows)


def runs_table(result: dict, split: str) -> str:
    """Markdown: every record of ``split``, one row per (data, arm, seed)."""
    rows = ["| data | arm | seed | PSNR dB | IWAE bits/dim (K) | HF power ratio | best epoch | CPU s | load | commit |",
            "|---|---|---|---|---|---|---|---|---|---|"]

    def num(v, digits=3):
        return "–" if v is None else f"{v:.{digits}f}"

    for data, splits in result["records"].items():
        for arm, seeds in splits.get(split, {}).items():
            for seed, r in seeds.items():
                bpd = f"{num(r.get('neg_iwae_bpd'))} ({r.get('iwae_k')})" if r.get("neg_iwae_bpd") else "–"
                rows.append(f"| {data} | {arm} | {seed} | {num(r['psnr_db'], 2)} | {bpd} | "
                            f"{num(r.get('hf_power_ratio'))} | {r['best_epoch']} | {r['cpu_seconds']:.0f} | "
                            f"{r['load_average_before']:.1f}–{r['load_average_after']:.1f} | "
                            f"{commit_key(r['commit'])} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", choices=sorted(DATA), default="pneumonia32")
    p.add_argument("--arm", default="all", help=f"one of {', '.join(ARMS)}, a comma list, or all")
    p.add_argument("--seed-index", type=int, default=0, help="seed = the article's seed + this")
    p.add_argument("--split", default="test", choices=("val", "test"), help="val to choose defaults")
    p.add_argument("--iwae-k", type=int, default=20, help="importance samples per image (default 20, as "
                   "hvae_compare.py: a hierarchical model's K = 100 costs 40 min of 2 busy cores per split)")
    p.add_argument("--n-samples", type=int, default=1000)
    p.add_argument("--train-args", default="", help="extra medivae train arguments (a tuning experiment); "
                   "recorded under the arm name ARM+ARGS")
    p.add_argument("--work", type=Path, default=Path("/tmp/medivae_defaults"))
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "defaults.json")
    p.add_argument("--commit", default=None, help="the commit the code under test is at (default: HEAD here)")
    p.add_argument("--table", action="store_true", help="print the claims table of --out and stop")
    args = p.parse_args(argv)
    if args.table:
        print(table(load(args.out), args.split) + "\n\n" + runs_table(load(args.out), args.split))
        return 0
    arms = list(ARMS) if args.arm == "all" else args.arm.split(",")
    extra = shlex.split(args.train_args)
    seed = SEED0 + args.seed_index
    commit = args.commit or git_commit()
    for arm in arms:
        name = f"{arm}+{args.train_args}" if extra else arm
        # one folder per code version: a finished run is measured again on another split, never reused by
        # code whose defaults may differ
        out = args.work / f"{args.data}_{name.replace(' ', '_')}_{args.seed_index}_{commit_key(commit)}"
        done = [r for split in load(args.out)["records"].get(args.data, {}).values()
                for r in split.get(name, {}).values() if r["seed"] == seed and r.get("run") == str(out)]
        # a finished run measured on another split keeps its training record (commit, CPU seconds): from the run
        # folder, or from the other split's record when the run predates out/defaults_train.json
        trained = train(arm, args.data, seed, out, extra, commit) if not (done and finished(out)) else {
            k: done[0][k] for k in TRAIN_KEYS if k in done[0]}
        record = {**trained, **measure(out, args.split, args.iwae_k, args.n_samples)}
        if not args.commit:  # --commit names code elsewhere; otherwise this checkout must still be at it
            still_at(commit)
        add_record(args.out, args.data, args.split, name, seed, record)
        print(args.data, args.split, name, seed, json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
