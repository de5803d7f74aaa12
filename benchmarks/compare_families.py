"""conv_vae, beta_vae and cvae on the same data and split, ranked by ``medivae compare`` (issue 20).

Each model trains with ``medivae train`` on one source with one label filter and the default split seed,
so the three runs share their train / val / test split (and ``cvae`` gets the class labels it needs);
then ``medivae evaluate`` (bootstrap intervals on) and ``medivae compare`` on the three. Every number
comes from what those commands wrote; the same reference extractor serves all runs (one per dataset
under $MEDIVAE_CACHE/reference), so FD / precision / recall / density / coverage compare. A run folder
holding a finished run is not trained again; an interrupted one is resumed; an evaluated run is not
evaluated again unless it trained in this call or ``--reevaluate``. Writes the compare data, the commit
and the commands to benchmarks/results/compare_cxr.json, and the table as Markdown and HTML.

    python benchmarks/compare_families.py --data /tmp/mn/resized --labels CXR --runs runs/families --epochs 10
    # smoke run on built-in data:
    python benchmarks/compare_families.py --data phantoms:300 --runs /tmp/fam --tiny --out /tmp/fam/cmp.json \\
        --html /tmp/fam/cmp.html --md /tmp/fam/cmp.md

With ``--labels CXR`` MedNIST has one class, so ``cvae`` is conditioned on a constant label: it is the
conditional code path on the same images, not a model that can use class information.
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

MODELS = ("conv_vae", "beta_vae", "cvae")
TINY = ["--image-size", "32", "--latent-dim", "4", "--base-width", "8", "--batch-size", "32"]





def medivae(*argv) -> dict:
    """Run one medivae command in a fresh process; {"command", "seconds"}."""
    argv = [str(a) for a in argv]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "medivae", *argv], check=True, stdout=subprocess.DEVNULL)
    done = {"command": " ".join(["medivae", *argv]), "seconds": round(time.perf_counter() - start)}
    print(f"done ({done['seconds']} s): {done['command']}", flush=True)
    return done


def train_cmd(args, model: str) -> list[str]:
    labels = ["--labels", args.labels] if args.labels else []
    size = [] if args.tiny else ["--image-size", str(args.image_size)]
    return [
        "train",
        "--data",
        args.data,
        *labels,
        "--model",
        model,
        "--out",
        str(args.runs / model),
        "--epochs",
        str(args.epochs),
        *size,
        *(TINY if args.tiny else []),
        "--threads",
        str(args.threads),
        "--no-progress",
    ]


def evaluate_cmd(args, model: str) -> list[str]:
    extra = ["--reference-epochs", "1"] if args.tiny else []
    fg = ["--foreground", args.foreground] if args.foreground else []
    return [
        "evaluate",
        str(args.runs / model),
        "-k",
        str(args.k),
        "--max-images",
        str(args.max_images),
        "--bootstrap",
        str(args.bootstrap),
        "--threads",
        str(args.threads),
        *fg,
        *extra,
        "--no-progress",
    ]


def train_and_evaluate(args, model: str) -> list[dict]:
    """Train (or resume) and evaluate one model unless already done; the commands that ran."""
    out, ran = args.runs / model, []
    done = trained_epochs(out)
    if done < args.epochs:
        ran.append(medivae(*train_cmd(args, model), *(["--resume"] if done else [])))
    results = out / "results.json"
    evaluated = results.exists() and "evaluation" in json.loads(results.read_text())
    if ran or args.reevaluate or not evaluated:
        ran.append(medivae(*evaluate_cmd(args, model)))
    return ran


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="e.g. /tmp/mn/resized (MedNIST, a folder per class)")
    p.add_argument("--labels", default="", help="label filter shared by every run, e.g. CXR (default: all)")
    p.add_argument("--runs", type=Path, default=Path("runs/families"), help="RUNS/<model> for each model")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("-k", type=int, default=100, help="IWAE importance samples in evaluate (default 100)")
    p.add_argument("--max-images", type=int, default=1000, help="test images evaluated (0: all)")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--foreground", default=None, help="evaluate --foreground MASK (default: off)")
    p.add_argument("--reevaluate", action="store_true")
    p.add_argument("--tiny", action="store_true", help="32 px, tiny models: a smoke run only")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "compare_cxr.json")
    p.add_argument("--md", type=Path, default=ROOT / "benchmarks" / "results" / "compare_cxr.md")
    p.add_argument("--html", type=Path, default=ROOT / "benchmarks" / "results" / "compare_cxr.html")
    args = p.parse_args(argv)

    from medivae import api
    from medivae.report.compare import to_markdown
    from medivae.runtime.io import atomic_write_text

    executed = [c for m in MODELS for c in train_and_evaluate(args, m)]
    runs = [args.runs / m for m in MODELS]
    for path in (args.md, args.html, args.out):
        path.parent.mkdir(parents=True, exist_ok=True)
    cmp = api.compare(runs, out=args.html, bootstrap=args.bootstrap)  # reads results; no model runs
    atomic_write_text(args.md, to_markdown(cmp))
    compare = ["compare", *map(str, runs), "--bootstrap", str(args.bootstrap)]
    result = {
        "command": " ".join(["python benchmarks/compare_families.py", *(sys.argv[1:] if argv is None else argv)]),
        "commit": git_commit(),
        "data": args.data,
        "labels": args.labels,
        "models": list(MODELS),
        "commands": {
            **{f"train {m}": "medivae " + " ".join(train_cmd(args, m)) for m in MODELS},
            **{f"evaluate {m}": "medivae " + " ".join(evaluate_cmd(args, m)) for m in MODELS},
            "compare": "medivae " + " ".join([*compare, "--out", str(args.html)]),
        },
        "run_settings": {m: run_settings(args.runs / m) for m in MODELS},
        "executed": executed or "every run was trained and evaluated before; nothing was rerun",
        "files": {"markdown": str(args.md), "html": str(args.html)},
        "compare": cmp,
    }
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(to_markdown(cmp))
    print(f"written to {args.out}, {args.md}, {args.html}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
