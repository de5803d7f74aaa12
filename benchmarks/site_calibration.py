"""The anomaly threshold and AUROC under a shift of the normals: validation threshold, ``--calibration``,
and ``medivae anomaly adapt``.

A model fitted on one site's normals is scored on images whose normals differ (on PneumoniaMNIST the test
normals differ from the training ones; ``medivae anomaly score`` reports it). The conformal threshold set on
the run's validation normals then flags more than the target share of the scored normals. This script
splits the scored split's normals at random into two halves: one half is handed to ``--calibration`` as a
folder of PNGs, the other half (with every anomalous image of the split) is scored, once with the threshold
from the validation normals and once with the threshold from the calibration half. It records the
false-positive rate on the held-out normals and the true-positive rate at each threshold, and the target.
With ``--adapt`` a third arm hands the same calibration half to ``medivae anomaly adapt`` (defaults: 10 more
epochs on the training normals plus half of that half; the other half sets the threshold) and scores the
adapted run on the same images. Every arm records the AUROC of each score and trivial baseline, so the arms
compare on identical images. Runs are copied first, so their own ``results.json`` is left as it was.

    python benchmarks/site_calibration.py --data ../shared/data/pneumoniamnist.npz --normal-label normal \\
        --runs RUNS --seeds 0 1 2 --splits 5 --out benchmarks/results/site_calibration.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from common import git_commit  # noqa: E402  (benchmarks/ is on sys.path)


def halves(data: Path, normal_code: int, split: str, seed: int, work: Path) -> tuple[Path, Path, int, int]:
    """(folder of calibration PNGs, .npz whose ``split`` holds the other normals + every anomaly, n_cal,
    n_held_out). The .npz keeps the source's other splits, so it loads as the same kind of source."""
    from PIL import Image

    from medivae.runtime.seeding import numpy_rng

    z = dict(np.load(data))
    images, labels = z[f"{split}_images"], z[f"{split}_labels"].reshape(-1)
    normal = np.flatnonzero(labels == normal_code)
    order = numpy_rng(seed, "site-calibration").permutation(normal)
    cal, held = np.sort(order[: len(order) // 2]), np.sort(order[len(order) // 2 :])
    folder = work / "calibration"
    folder.mkdir()
    for i in cal:
        Image.fromarray(images[i]).save(folder / f"{i:05d}.png")
    keep = np.sort(np.r_[held, np.flatnonzero(labels != normal_code)])
    z[f"{split}_images"], z[f"{split}_labels"] = images[keep], z[f"{split}_labels"][keep]
    scored = work / data.name  # the same file name: MedMNIST class names are recognised by it
    np.savez(scored, **z)
    return folder, scored, len(cal), len(held)


def score(run: Path, data: Path, out: Path, fpr: float, calibration: Path | None) -> dict:
    cmd = [sys.executable, "-m", "medivae", "anomaly", "score", str(run), "--data", str(data), "--out", str(out),
           "--fpr", str(fpr), "--bootstrap", "0", "--n-maps", "0", "--no-progress"]
    if calibration is not None:
        cmd += ["--calibration", str(calibration)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    a = json.loads((run / "results.json").read_text())["anomaly"]
    t = a["threshold"]
    auroc = {n: m["auroc"] for n, m in a["metrics"].items()}
    auroc.update({f"baseline_{n}": m["auroc"] for n, m in a["trivial_baselines"].items()})
    return {"fpr": t["fpr"], "tpr": t["tpr"], "value": t["value"], "n_calibration": t["n_calibration"],
            "auroc_combined": a["metrics"]["combined"]["auroc"], "default": a["protocol"]["default"],
            "auroc_default": auroc[a["protocol"]["default"]], "auroc": auroc,
            "calibration_vs_training_normals": (a["normal_shift"].get("calibration") or {}).get("auroc"),
            "scored_vs_training_normals": (a["normal_shift"].get("scored") or {}).get("auroc")}


def adapt(run: Path, normals: Path, out: Path) -> None:
    cmd = [sys.executable, "-m", "medivae", "anomaly", "adapt", str(run), "--normals", str(normals),
           "--out", str(out), "--no-progress"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, required=True, help="a MedMNIST-layout .npz with labels")
    p.add_argument("--normal-label", required=True, help="class index of the normal images in the .npz")
    p.add_argument("--runs", type=Path, required=True, help="RUNS/seed<N>: runs fitted with 'medivae anomaly fit'")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--splits", type=int, default=5, help="random halvings of the normals per run")
    p.add_argument("--split", default="test")
    p.add_argument("--fpr", type=float, default=0.05)
    p.add_argument("--adapt", action="store_true", help="also adapt each run on the calibration half and score it")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "site_calibration.json")
    args = p.parse_args(argv)
    from medivae.data.imageset import label_code
    from medivae.data.medmnist import known_label_names

    n_classes = int(np.load(args.data)["train_labels"].max()) + 1
    names = known_label_names(args.data) or tuple(str(i) for i in range(n_classes))
    code = label_code(names, args.normal_label)
    if code is None:
        p.error(f"--normal-label {args.normal_label!r} is not one of {list(names)}")
    rows = []
    for seed in args.seeds:
        for k in range(args.splits):
            with tempfile.TemporaryDirectory() as tmp:
                work = Path(tmp)
                folder, scored, n_cal, n_held = halves(args.data, code, args.split, 1000 * seed + k, work)
                run = work / "run"
                shutil.copytree(args.runs / f"seed{seed}", run, ignore=shutil.ignore_patterns("anomaly"))
                row = {"seed": seed, "halving": k, "n_calibration_normals": n_cal, "n_held_out_normals": n_held,
                       "validation": score(run, scored, work / "a", args.fpr, None),
                       "calibration": score(run, scored, work / "b", args.fpr, folder)}
                line = (f"seed {seed} halving {k}: held-out normals FPR {row['validation']['fpr']:.3f} (threshold "
                        f"from validation normals) -> {row['calibration']['fpr']:.3f} (from {n_cal} calibration "
                        f"normals); TPR {row['validation']['tpr']:.3f} -> {row['calibration']['tpr']:.3f}")
                if args.adapt:
                    adapt(run, folder, work / "adapted")
                    row["adapted"] = score(work / "adapted", scored, work / "c", args.fpr, None)
                    v, d = row["validation"], row["adapted"]
                    line += (f"; adapted: FPR {d['fpr']:.3f} TPR {d['tpr']:.3f} (threshold from "
                             f"{d['n_calibration']} held-out normals); default-score AUROC {v['default']} "
                             f"{v['auroc_default']:.3f} -> {d['default']} {d['auroc_default']:.3f}, PNG size "
                             f"{v['auroc']['baseline_png_size']:.3f}")
                rows.append(row)
                print(line, flush=True)

    def summary(key):
        v = np.array([r[key]["fpr"] for r in rows]), np.array([r[key]["tpr"] for r in rows])
        d = np.array([r[key]["auroc_default"] for r in rows])
        return {"fpr_mean": float(v[0].mean()), "fpr_min": float(v[0].min()), "fpr_max": float(v[0].max()),
                "tpr_mean": float(v[1].mean()), "tpr_min": float(v[1].min()), "tpr_max": float(v[1].max()),
                "auroc_default_mean": float(d.mean()), "auroc_default_min": float(d.min()),
                "auroc_default_max": float(d.max())}

    arms = ["validation", "calibration"] + (["adapted"] if args.adapt else [])
    png = np.array([r["validation"]["auroc"]["baseline_png_size"] for r in rows])

    result = {"data": str(args.data), "normal_label": args.normal_label, "split": args.split, "target_fpr": args.fpr,
              "runs": str(args.runs), "seeds": args.seeds, "splits": args.splits, "commit": git_commit(),
              "rows": rows, "summary": {**{a: summary(a) for a in arms}, "baseline_png_size": {
                  "auroc_mean": float(png.mean()), "auroc_min": float(png.min()), "auroc_max": float(png.max())}}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
