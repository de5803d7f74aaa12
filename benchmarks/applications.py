"""The README's application numbers on PneumoniaMNIST, with 95 % bootstrap intervals (issue 20).

Runs, as a user would, the commands of the README section "Anomaly detection, synthetic data and utility":

1. ``medivae anomaly fit`` on the normal training images only, then ``medivae anomaly score`` with no
   score option: its default score is fixed on validation normals + synthetic anomalies before any test
   image is seen. Reported: that score's test AUROC / AUPRC, every other score, and the trivial baselines
   (PNG size, mean intensity, intensity std; no model), each with its interval.
2. ``medivae train --model cvae``, ``medivae synthesize`` (memorisation rate against reconstructions of
   held-out images, membership-inference AUROC by ELBO and by distance to the nearest sample),
   ``medivae utility --run`` (train on synthetic / real + synthetic / real only, tested on the run's
   own real test split: AUC and accuracy).

Every number is read from what the commands wrote (RUN/results.json, utility.json); the script computes
nothing itself. A run folder that holds a finished run is not trained again; an interrupted one is
resumed. Writes benchmarks/results/applications.json (commands, commit, numbers);
``--markdown FILE.json`` prints the README table of such a file.

    python benchmarks/applications.py --data ../shared/data/pneumoniamnist.npz --runs runs/apps
    python benchmarks/applications.py --markdown benchmarks/results/applications.json
    # smoke run on built-in data (about a minute):
    python benchmarks/applications.py --data phantoms:300 --normal-label normal --runs /tmp/apps --tiny \\
        --out /tmp/apps/applications.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from common import git_commit, run_settings, trained_epochs  # noqa: E402  (benchmarks/ is on sys.path)

# the README's settings; --tiny replaces them for a smoke run on phantoms
CVAE_FLAGS = ["--image-size", "32", "--epochs", "30", "--batch-size", "64", "--threads", "1"]
ANOMALY_FLAGS = ["--image-size", "64", "--likelihood", "gaussian", "--epochs", "40", "--batch-size", "64",
                 "--threads", "1"]
TINY_CVAE = ["--image-size", "32", "--epochs", "1", "--batch-size", "32", "--latent-dim", "4", "--base-width", "8",
             "--threads", "1"]
TINY_ANOMALY = ["--likelihood", "gaussian", *TINY_CVAE]





def flag(flags: list[str], name: str) -> str:
    return flags[flags.index(name) + 1]


class Runner:
    """Runs ``medivae`` subcommands in fresh processes and records what ran and for how long."""

    def __init__(self):
        self.executed: list[dict] = []

    def __call__(self, *argv) -> None:
        argv = [str(a) for a in argv]
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "medivae", *argv], check=True, stdout=subprocess.DEVNULL)
        self.executed.append({"command": " ".join(["medivae", *argv]), "seconds": round(time.perf_counter() - start)})
        print(f"done ({self.executed[-1]['seconds']} s): {self.executed[-1]['command']}", flush=True)


def train_or_resume(run: Runner, out: Path, first: list[str], resume: list[str], epochs: int) -> bool:
    """Train ``out`` with ``first`` (a fresh run), or resume it with ``resume`` when it stopped early;
    nothing when it holds ``epochs`` epochs. True when it trained (later steps must then be redone)."""
    done = trained_epochs(out)
    if done >= epochs:
        return False
    run(*(resume if done else first))
    return True


def steps(args, anomaly_flags: list[str], cvae_flags: list[str]) -> dict[str, list[str]]:
    """The commands that make the numbers, as the README gives them."""
    r, boot = args.runs, ["--bootstrap", str(args.bootstrap)]
    seed = ["--seed", str(args.seed)] if args.seed is not None else []
    anomaly_flags, cvae_flags = [*anomaly_flags, "--no-progress"], [*cvae_flags, "--no-progress"]
    return {
        "anomaly_fit": [
            "anomaly",
            "fit",
            "--data",
            args.data,
            "--normal-label",
            args.normal_label,
            "--out",
            str(r / "anomaly"),
            *anomaly_flags,
            *seed,
        ],
        # anomaly fit is train with one label kept: an interrupted one resumes through train --resume
        "anomaly_resume": [
            "train",
            "--data",
            args.data,
            "--labels",
            args.normal_label,
            "--out",
            str(r / "anomaly"),
            *anomaly_flags,
            *seed,
            "--resume",
        ],
        "anomaly_score": ["anomaly", "score", str(r / "anomaly"), *boot, "--no-progress"],
        "cvae": ["train", "--data", args.data, "--model", "cvae", "--out", str(r / "cvae"), *cvae_flags, *seed],
        "cvae_resume": [
            "train",
            "--data",
            args.data,
            "--model",
            "cvae",
            "--out",
            str(r / "cvae"),
            *cvae_flags,
            *seed,
            "--resume",
        ],
        "synthesize": [
            "synthesize",
            str(r / "cvae"),
            "-n",
            str(args.n_synthetic),
            "--out",
            str(r / "synthetic"),
            "--percentile",
            "1",
            *boot,
            *(["--reference-epochs", "1"] if args.tiny else []),
            "--no-progress",
        ],
        "utility": [
            "utility",
            "--run",
            str(r / "cvae"),
            "--synthetic",
            str(r / "synthetic"),
            *boot,
            "--out",
            str(r / "utility.json"),
            *(["--epochs", "1"] if args.tiny else []),
            "--no-progress",
        ],
    }


def run_all(args, cmds: dict[str, list[str]], anomaly_epochs: int, cvae_epochs: int) -> Runner:
    run = Runner()
    r = args.runs
    fitted = train_or_resume(run, r / "anomaly", cmds["anomaly_fit"], cmds["anomaly_resume"], anomaly_epochs)
    if fitted or args.rescore or "anomaly" not in _results(r / "anomaly"):
        run(*cmds["anomaly_score"])
    trained = train_or_resume(run, r / "cvae", cmds["cvae"], cmds["cvae_resume"], cvae_epochs)
    synthesized = trained or args.rescore or not (r / "synthetic" / "memorisation.json").exists()
    if synthesized:
        run(*cmds["synthesize"])
    if synthesized or not (r / "utility.json").exists():
        run(*cmds["utility"])
    return run


def _results(run_dir: Path) -> dict:
    path = run_dir / "results.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _with_ci(value, ci) -> dict:
    return {"value": value, "ci95": ci}


def anomaly_numbers(an: dict) -> dict:
    """The default score (chosen without test labels), every score, the trivial baselines; AUROC and
    AUPRC with 95 % intervals, and the prevalence (the AUPRC of a random score)."""
    ci = an.get("ci95") or {}
    scores = {
        n: {
            "auroc": _with_ci(m["auroc"], (ci.get(n) or {}).get("auroc")),
            "auprc": _with_ci(m["auprc"], (ci.get(n) or {}).get("auprc")),
        }
        for n, m in (an.get("metrics") or {}).items()
    }
    baselines = {
        n: {
            "direction": b.get("direction"),
            "auroc": _with_ci(b["auroc"], (b.get("ci95") or {}).get("auroc")),
            "auprc": _with_ci(b["auprc"], (b.get("ci95") or {}).get("auprc")),
        }
        for n, b in (an.get("trivial_baselines") or {}).items()
    }
    protocol = an.get("protocol") or {}
    return {
        "default_score": protocol.get("default"),
        "default_chosen_on": "validation normals + synthetic anomalies",
        "scores": scores,
        "trivial_baselines": baselines,
        "prevalence": an.get("prevalence"),
        "n_normal": an.get("n_normal"),
        "n_anomalous": an.get("n_anomalous"),
        "threshold": an.get("threshold"),
    }


def privacy_numbers(pr: dict) -> dict:
    mi = pr.get("membership_inference") or {}
    return {
        "memorisation_rate": _with_ci(pr["memorisation_rate"], (pr.get("ci95") or {}).get("memorisation_rate")),
        "n_synthetic": pr.get("n_synthetic"),
        "n_rejected": pr.get("n_rejected"),
        "percentile": pr.get("percentile"),
        "spaces": pr.get("spaces"),
        "membership_inference_auroc": {
            k: _with_ci(v["auroc"], v.get("ci95")) for k, v in mi.items() if isinstance(v, dict) and "auroc" in v
        },
    }


def utility_numbers(u: dict) -> dict:
    out = {}
    for name in ("synthetic_only", "real_plus_synthetic", "real_only"):
        m, ci = u[name], u[name].get("ci95") or {}
        out[name] = {
            "auc": _with_ci(m.get("auc"), ci.get("auc")),
            "accuracy": _with_ci(m.get("accuracy"), ci.get("accuracy")),
            "n_train": m.get("n_train"),
        }
    out["n_test"] = u["real_only"].get("n_test")
    return out


def collect(args, cmds: dict, executed: list[dict], anomaly_flags, cvae_flags) -> dict:
    r = args.runs
    shown = {k: "medivae " + " ".join(v) for k, v in cmds.items() if not k.endswith("_resume")}
    return {
        "data": args.data,
        "normal_label": args.normal_label,
        "commit": git_commit(),
        "bootstrap": args.bootstrap,
        "command": " ".join(["python benchmarks/applications.py", *sys.argv[1:]]),
        "commands": shown,
        "run_settings": {"anomaly": run_settings(r / "anomaly"), "cvae": run_settings(r / "cvae")},
        "executed": executed or "every run existed; nothing was rerun",
        "anomaly_flags": anomaly_flags,
        "cvae_flags": cvae_flags,
        "anomaly": anomaly_numbers(_results(r / "anomaly")["anomaly"]),
        "privacy": privacy_numbers(_results(r / "cvae")["privacy"]),
        "utility": utility_numbers(json.loads((r / "utility.json").read_text())),
    }


def _fmt(cell: dict, digits: int = 3, pct: bool = False) -> str:
    v, ci = cell.get("value"), cell.get("ci95")
    if v is None:
        return "n/a"
    k = 100 if pct else 1
    unit = " %" if pct else ""
    text = f"{k * v:.{digits}f}{unit}"
    return text + (f" [{k * ci[0]:.{digits}f}, {k * ci[1]:.{digits}f}]" if ci else "")


def markdown(res: dict) -> str:
    """The README table: value [95 % interval] for every number."""
    an, pr, ut = res["anomaly"], res["privacy"], res["utility"]
    d = an["default_score"]
    lines = ["| | AUROC [95 % CI] | AUPRC [95 % CI] |", "|---|---|---|"]
    order = sorted(an["scores"], key=lambda n: (n != d, -an["scores"][n]["auroc"]["value"]))
    for n in order:
        s = an["scores"][n]
        name = f"**{n}** (default, fixed on validation normals + synthetic anomalies)" if n == d else n
        lines.append(f"| anomaly: {name} | {_fmt(s['auroc'])} | {_fmt(s['auprc'])} |")
    for n, b in an["trivial_baselines"].items():
        lines.append(
            f"| baseline, no model: {n} ({b['direction']} = anomalous) | {_fmt(b['auroc'])} | {_fmt(b['auprc'])} |"
        )
    prev = an.get("prevalence")
    lines.append(
        f"\nTest split: {an['n_normal']} normal, {an['n_anomalous']} anomalous images"
        + (f" (prevalence {prev:.3f}, the AUPRC of a random score)." if prev is not None else ".")
    )
    lines += [
        "",
        "| | result [95 % CI] |",
        "|---|---|",
        f"| memorisation: {pr['n_synthetic']} cvae samples nearer a training image than percentile "
        f"{pr['percentile']:g} of reconstructed held-out images | "
        f"{_fmt(pr['memorisation_rate'], 1, pct=True)} rejected |",
    ]
    for k, v in pr["membership_inference_auroc"].items():
        lines.append(f"| membership inference AUROC by {k.replace('_', ' ')} (0.5: none) | {_fmt(v)} |")
    names = {
        "synthetic_only": "synthetic only (TSTR)",
        "real_plus_synthetic": "real + synthetic",
        "real_only": "real only (TRTR)",
    }
    for k, label in names.items():
        lines.append(
            f"| classifier trained on {label}, real test AUC / accuracy | {_fmt(ut[k]['auc'])} / "
            f"{_fmt(ut[k]['accuracy'])} |"
        )
    lines.append(
        f"\nBrackets: 95 % percentile bootstrap intervals ({res['bootstrap']} resamples). "
        f"Commit {res['commit'][:10]}; the commands are in the JSON file."
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", help="the source, e.g. ../shared/data/pneumoniamnist.npz")
    p.add_argument("--normal-label", default="normal")
    p.add_argument("--runs", type=Path, default=Path("runs/apps"), help="RUNS/anomaly, RUNS/cvae, RUNS/synthetic")
    p.add_argument("--seed", type=int, default=None, help="training seed (default: medivae's)")
    p.add_argument("--n-synthetic", type=int, default=1000)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--rescore", action="store_true", help="score, synthesize and test utility again")
    p.add_argument("--tiny", action="store_true", help="1 epoch, 32 px, tiny models: a smoke run only")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "applications.json")
    p.add_argument("--markdown", type=Path, default=None, metavar="FILE.json", help="print the README table")
    args = p.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return 0
    if not args.data:
        p.error("--data is required (unless --markdown)")

    from medivae.runtime.io import atomic_write_text

    anomaly_flags, cvae_flags = (TINY_ANOMALY, TINY_CVAE) if args.tiny else (ANOMALY_FLAGS, CVAE_FLAGS)
    cmds = steps(args, anomaly_flags, cvae_flags)
    run = run_all(args, cmds, int(flag(anomaly_flags, "--epochs")), int(flag(cvae_flags, "--epochs")))
    result = collect(args, cmds, run.executed, anomaly_flags, cvae_flags)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
