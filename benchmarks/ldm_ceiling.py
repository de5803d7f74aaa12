"""Where an ``ldm`` run's samples lose to real images: its autoencoder (the reconstructions are the best its
prior could ever decode) or its prior. Blind to the test split, so it can choose settings.

For one run folder (``--run``, any ``ldm`` run) on a staged data set (``--data``, as the other benchmarks name
them): the validation images as they are (the floor), their reconstructions (posterior means decoded, fp32),
and, when the run has a prior, as many of its samples as there are validation images (of their classes,
for a class-conditional run), each scored against a
fixed subset of TRAINING images (1,000, drawn with the data's split seed) in the data set's shared reference
extractor (``medivae evaluate``'s): FD, precision, recall, density, coverage and high-frequency power vs the
training images, with PSNR of the reconstructions. No test image is read, so a setting picked on these numbers
has not seen the test split (``medivae evaluate --split val`` compares with the test images; this does not).

Staged: each call adds (or replaces) the record ``--name`` under ``--data`` in ``--out``, with the commit of the
scoring code, the run's path and its config (what trained it), CPU seconds and the load average.

    python benchmarks/ldm_ceiling.py --data pneumonia32 --run RUN --name "default (10 epochs)"
    python benchmarks/ldm_ceiling.py --table
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from common import DATA, ROOT, SAMPLE_METRICS, commit_key, git_commit, load_average, still_at, update_json

N_REFERENCE = 1000


def score(data: str, run_dir: Path, reference_epochs: int) -> dict:
    """{row: metrics} of the floor, the reconstructions and the samples against training images."""
    import torch
    from generation import data_config  # the DataConfig ``medivae train`` makes of the data set's arguments

    from medivae.data import load_dataset
    from medivae.evaluation import sample_quality as sq
    from medivae.evaluation.sharpness import high_frequency_power
    from medivae.models.inference import reconstruct
    from medivae.runfolder.run import load_run
    from medivae.workflows.evaluate import _subset, generate_images, shared_reference

    cfg = data_config(data)
    splits = load_dataset(cfg, progress=False)
    ref = shared_reference(cfg, splits["train"], reference_epochs, False, "cpu")
    real = np.asarray(_subset(splits["train"], N_REFERENCE, cfg.split_seed, "ldm-ceiling-reference").images)
    val = np.asarray(splits["val"].images)
    run = load_run(run_dir, "best", device="cpu")
    to_u8 = lambda x: (x * 255).round().clamp(0, 255).to(torch.uint8).numpy()  # noqa: E731 (as evaluate saves)
    rec = to_u8(reconstruct(run.model, torch.from_numpy(val.astype(np.float32) / 255), None, precision="fp32"))
    rows = {"floor": val, "reconstructions": rec}
    if run.config.model.prior_epochs:  # a run without a prior (prior_epochs=0) only reconstructs
        rows["samples"] = to_u8(generate_images(run.model, len(val), splits["val"].labels, run.config.train.seed,
                                                run.latent_sampler("prior")))  # a conditional run: val's classes
    f_real, p_real = ref.features(real), float(high_frequency_power(real).mean())
    out = {}
    for name, x in rows.items():
        m = sq.compare(f_real, ref.features(x))
        out[name] = {**{k: round(float(m[k]), 4) for k in SAMPLE_METRICS if k in m},
                     "hf_power_ratio": round(float(high_frequency_power(x).mean()) / p_real, 4)}
    mse = float(np.mean((rec.astype(np.float64) - val) ** 2) / 255**2)
    out["reconstructions"]["psnr_db"] = round(10 * np.log10(1 / mse), 3)
    return {"reference": {"hash": ref.folder.name, "fd_name": f"FD-{ref.name}", "against": "train",
                          "n_reference": len(real), "n_held_out": len(val)}, "rows": out}


def table(result: dict) -> str:
    head = ["data", "run", "seed", "row", *SAMPLE_METRICS, "PSNR dB", "commit"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for data, recs in result.get("records", {}).items():
        for i, (name, rec) in enumerate(sorted(recs.items())):
            for row, m in rec["rows"].items():
                if row == "floor" and i:  # the same validation images in every record: shown once
                    continue
                label = "real validation images" if row == "floor" else name
                cells = [f"{m[k]:.3g}" if k in m else "–" for k in SAMPLE_METRICS]
                psnr = f"{m['psnr_db']:.2f}" if "psnr_db" in m else "–"
                seed = "–" if row == "floor" else str(rec["train"]["seed"])
                cells = [data, label, seed, row, *cells, psnr, commit_key(rec["commit"])]
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", choices=sorted(DATA), default="pneumonia32")
    p.add_argument("--run", type=Path, help="an ldm run folder")
    p.add_argument("--name", help="the record's name (what distinguishes the run)")
    p.add_argument("--reference-epochs", type=int, default=5, help="the shared extractor's (medivae's default)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ldm_ceiling.json")
    p.add_argument("--table", action="store_true", help="print the table of --out and stop")
    args = p.parse_args(argv)
    empty = {"benchmark": "ldm_ceiling", "records": {}}
    if args.table:
        print(table(json.loads(args.out.read_text()) if args.out.exists() else empty))
        return 0
    if not (args.run and args.name):
        p.error("--run and --name are needed (or --table)")
    config = json.loads((args.run / "config.json").read_text())
    if config["model"]["name"] != "ldm":
        p.error(f"{args.run} is a {config['model']['name']} run, not an ldm one")
    load, start, cpu, commit = load_average(), time.perf_counter(), time.process_time(), git_commit()
    rec = score(args.data, args.run, args.reference_epochs)
    still_at(commit)
    rec.update(commit=commit, run=str(args.run), model=config["model"], train=config["train"],
               command="python benchmarks/ldm_ceiling.py " + " ".join(sys.argv[1:] if argv is None else argv),
               seconds=round(time.perf_counter() - start, 1), cpu_seconds=round(time.process_time() - cpu, 1),
               load_average_before=load, load_average_after=load_average())

    def add(result: dict) -> dict:  # the file as it is now: a call beside this one may have added a record
        result["records"].setdefault(args.data, {})[args.name] = rec
        return result

    update_json(args.out, add, empty)
    print(table({"records": {args.data: {args.name: rec}}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
