"""N(0, I) prior vs post-hoc GMM / flow / diffusion latent samplers vs VampPrior, per data set.

For each ``--data NAME=SOURCE``: ``medivae train`` one conv_vae with the N(0, I) prior and (for the vamp
row) one with ``--prior vamp --pseudo-inputs K``, same image size, epochs and seed (a finished run is kept,
an interrupted one resumed from last/); ``medivae fit-sampler`` gmm, flow and diffusion on the N(0, I) run.
Then the ``--rows`` (default all five): N(0, I) / GMM / flow / diffusion (the N(0, I) run) and VampPrior
(the vamp run's own prior):

- ``medivae evaluate RUN --sampler S``: FD / precision / recall / density / coverage of generated
  images against held-out real images, in the feature space of the per-data-set reference extractor
  under $MEDIVAE_CACHE/reference (keyed by the data's fingerprint and split seed, so both runs share it;
  the script stops if the four rows do not name the same extractor hash), with the real-vs-real floor;
- ``medivae synthesize RUN --sampler S -n N``: memorisation rate (samples nearer to a training image
  than reconstructions of held-out images are) with its 95 % bootstrap interval, nearest-neighbour
  distances in pixel and feature space, membership-inference AUROC;
- ``medivae sample RUN --sampler S``: a sample grid, docs/results/images/samplers_<NAME>_<row>.png.

Writes benchmarks/results/samplers.json (commit and exact command recorded); ``--markdown FILE`` prints
its README table. Run it under the shared lock (MedNIST unpacked first: mkdir -p /tmp/mn && tar -xzf
/work/shared/data/mednist/MedNIST.tar.gz -C /tmp/mn):

    flock /tmp/medivae-heavy.lock python benchmarks/samplers_compare.py \\
        --data cxr=/tmp/mn/resized/CXR --data pneu=/work/shared/data/pneumoniamnist.npz \\
        --epochs cxr=8 --epochs pneu=5
    python benchmarks/samplers_compare.py --markdown benchmarks/results/samplers.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from common import SAMPLE_METRICS as METRICS  # noqa: E402  (benchmarks/ is on sys.path)
from common import git_commit, privacy, sample_quality, trained_epochs  # noqa: E402

# row -> (which run, --sampler): the post-hoc samplers are fitted on the N(0, I) run
ROWS = {"prior": ("normal", "prior"), "gmm": ("normal", "gmm"), "flow": ("normal", "flow"),
        "diffusion": ("normal", "diffusion"), "diffusion_draws": ("draws", "diffusion"), "vamp": ("vamp", "prior")}
# row -> the fit-sampler arguments; "draws" is a copy of the N(0, I) run (same weights) whose diffusion sampler
# is fitted to posterior draws instead of posterior means
POSTHOC = {"gmm": ["--sampler", "gmm"], "flow": ["--sampler", "flow"], "diffusion": ["--sampler", "diffusion"],
           "diffusion_draws": ["--sampler", "diffusion", "--posterior-draws", "4"]}
ROW_NAMES = {
    "prior": "N(0, I) prior",
    "gmm": "GMM (post hoc)",
    "flow": "flow (post hoc)",
    "diffusion": "diffusion (post hoc, DDIM 50 steps)",
    "diffusion_draws": "diffusion on 4 posterior draws per image",
    "vamp": "VampPrior",
    "floor": "real held-out (floor)",
}
MAX_GRID_BYTES = 100_000  # README pictures stay small



def medivae(*args) -> float:
    """Run one ``medivae`` command (printed first); its wall seconds."""
    args = [str(a) for a in args]
    print("$ medivae", " ".join(args), flush=True)
    start = time.perf_counter()
    code = subprocess.run([sys.executable, "-m", "medivae", *args]).returncode
    if code:
        raise SystemExit(f"medivae {args[0]} exited with {code} (its message is above); rerun to resume")
    return round(time.perf_counter() - start, 1)



def train(out: Path, source: str, epochs: int, prior: list[str], args) -> float | None:
    """Train (or resume an interrupted) run; None when it already holds ``epochs`` epochs."""
    done = trained_epochs(out)
    if done >= epochs:
        return None
    cmd = [
        "train",
        "--data",
        source,
        "--model",
        "conv_vae",
        "--out",
        out,
        "--image-size",
        args.image_size,
        "--epochs",
        epochs,
        "--seed",
        args.seed,
        "--threads",
        args.threads,
        "--no-progress",
        *prior,
    ]
    return medivae(*cmd, *(["--resume"] if done > 0 else []))


def evaluate_row(run: Path, sampler: str, args) -> dict:
    """``medivae evaluate RUN --sampler S`` -> its sample-quality block (common.sample_quality)."""
    wall = medivae("evaluate", run, "--sampler", sampler, "-k", args.k, "--max-images", args.max_images,
                   "--n-samples", args.n_samples, "--threads", args.threads, "--no-progress")
    return {"wall_s": wall, **sample_quality(run, sampler)}


def synthesize_row(run: Path, sampler: str, out: Path, args) -> dict:
    """``medivae synthesize RUN --sampler S -n N`` -> memorisation and nearest-neighbour numbers (common.privacy)."""
    wall = medivae(
        "synthesize", run, "--sampler", sampler, "-n", args.n_synth, "--format", "npz", "--out", out, "--no-progress"
    )
    return {"wall_s": wall, **privacy(out)}


def sample_grid(run: Path, sampler: str, path: Path, n: int, args) -> dict:
    medivae("sample", run, "--sampler", sampler, "-n", n, "--seed", args.seed, "--out", path, "--no-progress")
    if path.stat().st_size > MAX_GRID_BYTES:
        print(f"warning: {path} is {path.stat().st_size // 1000} KB; use --grid 16 for the README", flush=True)
    return {"file": str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path), "bytes": path.stat().st_size}


def one_reference(rows: dict, name: str) -> str:
    """The reference-extractor hash every row (evaluate and synthesize) used; stops the script if two differ."""
    seen = {f"{r} {tool}": rows[r][tool]["reference_hash"] for r in rows for tool in ("evaluate", "synthesize")}
    if len(set(seen.values())) != 1:
        raise SystemExit(
            f"{name}: the rows were measured with different reference extractors, so their "
            f"FD / precision / recall do not compare: {json.dumps(seen, indent=2)}"
        )
    return next(iter(seen.values()))


def run_dataset(name: str, source: str, epochs: int, args) -> dict:
    wanted = {ROWS[r][0] for r in args.rows} | ({"normal"} if any(ROWS[r][0] == "draws" for r in args.rows) else set())
    runs = {k: args.work / f"{name}_{k}" for k in ("normal", "vamp", "draws") if k in wanted}
    priors = {"normal": [], "vamp": ["--prior", "vamp", "--pseudo-inputs", args.pseudo_inputs]}
    train_s = {k: train(runs[k], source, epochs, priors[k], args) for k in runs if k != "draws"}
    if "draws" in runs and not runs["draws"].exists():
        shutil.copytree(runs["normal"], runs["draws"])
    posthoc = [r for r in args.rows if r in POSTHOC]
    fit_s = {r: medivae("fit-sampler", runs[ROWS[r][0]], *POSTHOC[r], "--no-progress") for r in posthoc}
    fitted = {r: json.loads((runs[ROWS[r][0]] / "results.json").read_text())["samplers"][ROWS[r][1]] for r in posthoc}
    rows = {}
    for row, (which, sampler) in ((r, ROWS[r]) for r in args.rows):
        rows[row] = {
            "run": str(runs[which]),
            "sampler": sampler,
            "evaluate": evaluate_row(runs[which], sampler, args),
            "synthesize": synthesize_row(runs[which], sampler, args.work / "synth" / f"{name}_{row}", args),
            "grid": sample_grid(runs[which], sampler, args.images / f"samplers_{name}_{row}.png", args.grid, args),
        }
        print(
            name,
            row,
            json.dumps({k: round(v, 4) for k, v in rows[row]["evaluate"]["model"].items()}),
            "memorisation",
            rows[row]["synthesize"]["memorisation_rate"],
            flush=True,
        )
        one_reference(rows, name)  # stop at the first row measured with another extractor
    return {
        "source": source,
        "epochs": epochs,
        "train_wall_s": train_s,
        "fit_sampler_wall_s": fit_s,
        "samplers": {r: {k: v for k, v in fitted[r].items() if k not in ("file",)} for r in posthoc},
        "reference_hash": one_reference(rows, name),
        "rows": rows,
    }


def _cell(v, interval, spec: str, scale: float = 1.0) -> str:
    """``v`` [lo, hi] formatted with ``spec`` ("—" for a missing number or interval)."""
    if v is None:
        return "—"
    if not interval:
        return f"{v * scale:{spec}}"
    return f"{v * scale:{spec}} [{interval[0] * scale:{spec}}, {interval[1] * scale:{spec}}]"


def markdown(result: dict) -> str:
    """The README table: data set x sampler (and the real-vs-real floor), FD [95 % CI], P / R / D / C [95 % CI],
    high-frequency power of the samples over the real images' (— where not measured), memorisation % [95 % CI];
    then the reference extractor of each data set, the commit and the command."""
    first = next(iter(next(iter(result["datasets"].values()))["rows"].values()))["evaluate"]
    lines = [
        f"| data set | sampler | {first['fd_name']} | precision | recall | density | coverage | HF power vs real "
        "| memorisation % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for ds, d in result["datasets"].items():
        for row, r in d["rows"].items():
            m, c, syn = r["evaluate"]["model"], r["evaluate"]["ci95"], r["synthesize"]
            cells = [_cell(m["fd"], c["fd"], ".4g")] + [_cell(m.get(k), c.get(k), ".3f") for k in METRICS[1:]]
            cells.append(_cell(syn["memorisation_rate"], syn["memorisation_ci95"], ".1f", 100))
            lines.append(f"| {ds} | {ROW_NAMES[row]} | " + " | ".join(cells) + " |")
        ev = next(iter(d["rows"].values()))["evaluate"]  # the floor is the same for every row: real vs real
        f, c = ev["floor"], ev["ci95"]
        cells = [_cell(f["fd"], c["floor_fd"], ".4g")] + [_cell(f.get(k), c.get(f"floor_{k}"), ".3f")
                                                           for k in METRICS[1:]]
        lines.append(f"| {ds} | {ROW_NAMES['floor']} | " + " | ".join(cells) + " | — |")
    refs = ", ".join(f"{ds}: `{d['reference_hash']}`" for ds, d in result["datasets"].items())
    e = result["settings"]
    epochs = ", ".join(f"{ds} {n}" for ds, n in e["epochs"].items())
    lines.append(
        f"\n95 % bootstrap intervals in brackets. {first['fd_name']} / precision / recall / density / coverage: "
        f"{e['n_samples']} generated images against real {first['reference_split']} images, in the feature space "
        f"of one reference extractor per data set ({refs}, under $MEDIVAE_CACHE/reference); the floor row is real "
        f"{first['held_out_split']} images against the same. Memorisation: share of {e['n_synth']} samples nearer "
        "to a training image than the 1st percentile of reconstructed held-out images (`medivae synthesize`). "
        f"conv_vae, {e['image_size']} px, epochs {epochs}; commit `{result['commit'][:10]}`; "
        f"`{result['command']}`."
    )
    return "\n".join(lines)


def appended(old: dict, new: dict) -> dict:
    """``old`` with ``new``'s rows (and their fits and timings) added to its data sets; each invocation's
    command, commit, rows and CPU seconds kept under "stages". The rows must share one reference extractor."""
    stage = {k: new[k] for k in ("command", "commit", "cpu_seconds_of_commands")} | {"rows": new["settings"]["rows"]}
    out = {**old, "stages": [*old.get("stages", [{k: old.get(k) for k in stage}]), stage]}
    for name, d in new["datasets"].items():
        if name not in out["datasets"]:
            out["datasets"][name] = d
            continue
        o = out["datasets"][name]
        for key in ("rows", "train_wall_s", "fit_sampler_wall_s", "samplers"):
            o[key] = {**o.get(key, {}), **d[key]}
        o["reference_hash"] = one_reference(o["rows"], name)
    return out


def parse_pairs(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise SystemExit(f"{what} wants NAME=VALUE, not {item!r}")
        out[name] = value
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", action="append", default=[], help="NAME=SOURCE (repeat for each data set)")
    p.add_argument("--epochs", action="append", default=[], help="NAME=EPOCHS per data set, or EPOCHS for all")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--pseudo-inputs", type=int, default=100)
    p.add_argument("--seed", type=int, default=None, help="training seed (default medivae's)")
    p.add_argument("-k", type=int, default=10, help="IWAE samples of medivae evaluate")
    p.add_argument("--max-images", type=int, default=1000)
    p.add_argument("--n-samples", type=int, default=1000, help="generated images for sample quality")
    p.add_argument("--n-synth", type=int, default=1000, help="samples drawn by medivae synthesize")
    p.add_argument("--grid", type=int, default=64, choices=(16, 64), help="images per sample grid")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path("/tmp/samplers_compare"))
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "samplers.json")
    p.add_argument("--images", type=Path, default=ROOT / "docs" / "results" / "images")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows (default {','.join(ROWS)})")
    p.add_argument("--append", action="store_true",
                   help="add this invocation's rows to --out's data sets instead of replacing the file")
    p.add_argument("--markdown", type=Path, help="print the README table of this JSON and exit")
    args = p.parse_args(argv)
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    if not args.rows or set(args.rows) - set(ROWS):
        p.error(f"--rows takes a comma-separated subset of {', '.join(ROWS)}, not {','.join(args.rows)!r}")
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return 0
    data = parse_pairs(args.data, "--data")
    if not data:
        p.error("give at least one --data NAME=SOURCE")
    plain = [e for e in args.epochs if "=" not in e]
    epochs = {n: int(plain[-1]) if plain else 5 for n in data} | {
        n: int(e) for n, e in parse_pairs([e for e in args.epochs if "=" in e], "--epochs").items()
    }
    from medivae.runtime.io import atomic_write_text
    from medivae.runtime.seeding import DEFAULT_SEED

    args.seed = DEFAULT_SEED if args.seed is None else args.seed
    args.work.mkdir(parents=True, exist_ok=True)
    args.images.mkdir(parents=True, exist_ok=True)
    result = {
        "command": " ".join(["python benchmarks/samplers_compare.py", *(argv or sys.argv[1:])]),
        "commit": git_commit(),
        "model": "conv_vae",
        "settings": {
            k: getattr(args, k)
            for k in ("image_size", "pseudo_inputs", "seed", "k", "max_images", "n_samples", "n_synth", "grid", "rows")
        }
        | {"epochs": epochs},
        "datasets": {},
    }
    for name, source in data.items():
        load_before = os.getloadavg()
        result["datasets"][name] = run_dataset(name, source, epochs[name], args)
        result["datasets"][name]["load_average_1_5_15"] = {"start": load_before, "end": os.getloadavg()}
    result["cpu_seconds_of_commands"] = round(sum(resource.getrusage(resource.RUSAGE_CHILDREN)[:2]), 1)
    if args.append and args.out.exists():
        result = appended(json.loads(args.out.read_text()), result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
