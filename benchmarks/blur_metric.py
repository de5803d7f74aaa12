"""Does the sample metric see blur? Real test images, as they are and blurred (Gaussian sigma 0.7, 1, 1.5 px),
scored against the real validation images in the dataset's reference extractor, as ``medivae evaluate`` scores
samples: FD, precision / recall / density / coverage, high-frequency power vs real. Also the same rows in the
extractor's content features alone (what medivae scored with before the detail block).

    python benchmarks/blur_metric.py --data ../shared/data/mednist/MedNIST.tar.gz --labels Hand --name hand
    python benchmarks/blur_metric.py --data ../shared/data/pneumoniamnist.npz --image-size 32 --name pneumonia

Each call adds (or replaces) one dataset in the JSON (default benchmarks/results/blur_metric.json), with the
commit, the extractor's training seconds and the load average; ``--markdown FILE.json`` prints the table.
The extractor is the shared one under $MEDIVAE_CACHE/reference, so a later ``medivae evaluate`` on the same data
reuses it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from common import ROOT, git_commit


def measure(args) -> dict:
    import numpy as np

    from medivae.data import load_dataset
    from medivae.data.imageset import ImageSet
    from medivae.evaluation.blur import blur_rows
    from medivae.runfolder.config import DataConfig
    from medivae.workflows.evaluate import MAX_REFERENCE, shared_reference

    labels = tuple(x for x in args.labels.split(",") if x)
    data = DataConfig(source=str(args.data), image_size=args.image_size, labels=labels)
    splits = load_dataset(data, progress=False)
    train = splits["train"]
    if args.kind == "ae":  # the unlabelled extractor, as for a source without labels
        train = ImageSet(train.images, np.full(len(train), -1), (), meta=train.meta)
    t = time.perf_counter()
    ref = shared_reference(data, train, args.reference_epochs, not args.no_progress, "cpu")
    seconds = time.perf_counter() - t
    val, test = np.asarray(splits["val"].images[:MAX_REFERENCE]), np.asarray(splits["test"].images)
    return {
        "source": str(args.data), "labels": list(labels), "image_size": args.image_size, "split_seed": data.split_seed,
        "extractor": ref.name, "reference_hash": ref.folder.name, "extractor_seconds": round(seconds, 1),
        "n_reference": len(val), "n_held_out": len(test),
        "rows": blur_rows(ref.features, val, test),
        "content_only_rows": blur_rows(ref.content_features, val, test),
    }


def markdown(result: dict) -> str:
    """The blur table of every dataset in the JSON: FD and its multiple of the floor, in the extractor's
    features and in its content features alone, beside the k-NN metrics and the high-frequency power."""
    head = ["data (extractor)", "real test images", "FD", "× floor", "precision / recall", "density / coverage",
            "HF power vs real", "FD, content features only", "× floor"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for d in result["datasets"].values():
        name = f"{Path(d['source']).name} {','.join(d['labels'])}".strip()
        name += f", {d['image_size']} px (`{d['extractor']}`)"
        f0, c0 = d["rows"][0]["fd"], d["content_only_rows"][0]["fd"]
        for r, c in zip(d["rows"], d["content_only_rows"], strict=True):
            what = "as they are (the floor)" if r["sigma"] == 0 else f"blurred, σ = {r['sigma']:g} px"
            lines.append(f"| {name} | {what} | {r['fd']:.2f} | {r['fd'] / f0:.1f} | {r['precision']:.2f} / "
                         f"{r['recall']:.2f} | {r['density']:.2f} / {r['coverage']:.2f} | {r['hf_power_ratio']:.2f} | "
                         f"{c['fd']:.2f} | {c['fd'] / c0:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--markdown"]:
        print(markdown(json.loads(Path(argv[1]).read_text())))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--name", required=True, help="the dataset's key in the JSON")
    p.add_argument("--labels", default="", help="class names to keep (comma-separated)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--kind", default="auto", choices=("auto", "ae"),
                   help="auto: cnn for labelled data, ae without labels; ae: drop the labels")
    p.add_argument("--reference-epochs", type=int, default=5)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "blur_metric.json")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    load = os.getloadavg()[0]
    result = measure(args)
    result.update(commit=git_commit(), load_average_at_start=round(load, 2),
                  load_average_at_end=round(os.getloadavg()[0], 2), cpu_count=os.cpu_count(),
                  command=" ".join(["python benchmarks/blur_metric.py", *argv]))
    everything = json.loads(args.out.read_text()) if args.out.exists() else {}
    everything.setdefault("datasets", {})[args.name] = result
    everything.update(commit=result["commit"], command="python benchmarks/blur_metric.py --data SOURCE --name NAME "
                      "(one dataset per call; each dataset records its own command, commit and load)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(everything, indent=2) + "\n")
    for label, key in (("detail + content", "rows"), ("content only", "content_only_rows")):
        print(f"{args.name} ({result['extractor']}), {label}:")
        for r in result[key]:
            print(f"  sigma {r['sigma']:.1f}: FD {r['fd']:8.2f}  P {r['precision']:.2f}  R {r['recall']:.2f}  "
                  f"D {r['density']:.2f}  C {r['coverage']:.2f}  HF power {r['hf_power_ratio']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
