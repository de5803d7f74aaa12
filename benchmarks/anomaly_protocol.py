"""Anomaly detection on a source with a normal class, several seeds, every score vs trivial baselines.

For each seed: ``medivae anomaly fit`` on the normal training images (skipped when the run exists; it must
have been fitted by this script at this commit with the same data and arguments, or the call stops), then
``medivae anomaly score`` (default options, bootstrap intervals; again when scored by other code). Collects,
per seed, the AUROC / AUPRC
with 95 % intervals of every score, the default the run chose on validation normals + synthetic anomalies
(never on test), the trivial baselines (PNG size, mean intensity, intensity std) and localisation on the
synthetic anomalies; across seeds, the mean and range, and a seed ensemble (the mean over seeds of each
run's validation-standardised ``ensemble`` score, same test images). Writes JSON with the commit.

    python benchmarks/anomaly_protocol.py --data ../shared/data/pneumoniamnist.npz --normal-label normal \\
        --runs runs/pn21 --seeds 0 1 2 -- --image-size 32 --likelihood gaussian --epochs 25 --batch-size 64
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from common import git_commit, still_at  # noqa: E402  (benchmarks/ is on sys.path)


def _medivae(*argv) -> list[str]:
    cmd = [sys.executable, "-m", "medivae", *map(str, argv)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return ["medivae", *map(str, argv)]


FIT_RECORD = "protocol_fit.json"  # in RUN: what fitted the run (commit, data, normal label, seed, fit arguments)
SCORE_RECORD = "anomaly/protocol_score.json"  # in RUN: the commit and bootstrap of its scores.csv


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def check_reuse(run: Path, wanted: dict) -> None:
    """Stop unless the run in ``run`` was fitted by this protocol at the commit under test, on the same data,
    normal label, seed and fit arguments: the JSON states this call's commit and arguments, so a run fitted by
    other code or with other arguments must not stand in for them."""
    had = read_json(run / FIT_RECORD)
    if had != wanted:
        raise SystemExit(f"{run} was fitted with {had or 'nothing recorded'}, not {wanted}: use another --runs "
                         "(or remove that run)")


def read_scores(path: Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    skip = {"index", "label", "is_anomaly", "flagged"}
    names = [k for k in rows[0] if k not in skip]
    y = np.array([r["is_anomaly"] == "1" for r in rows])
    return {n: np.array([float(r[n]) for r in rows]) for n in names}, y


def seed_summary(anomaly: dict) -> dict:
    m, ci = anomaly.get("metrics", {}), anomaly.get("ci95", {})
    return {
        "default": anomaly["protocol"]["default"], "val_auroc": anomaly["protocol"]["val_auroc"],
        "scores": {n: {**v, "ci95": ci.get(n)} for n, v in m.items()},
        "trivial_baselines": anomaly["trivial_baselines"], "localisation": anomaly["localisation"],
        "restoration": anomaly["protocol"].get("restoration"), "latent_gmm": anomaly["protocol"].get("latent_gmm"),
        "prevalence": anomaly.get("prevalence"), "n_normal": anomaly.get("n_normal"),
        "n_anomalous": anomaly.get("n_anomalous"), "normal_shift": anomaly.get("normal_shift"),
        "val_auroc_by_kind": anomaly["protocol"].get("val_auroc_by_kind"),
        "leave_one_kind_out": anomaly["protocol"].get("leave_one_kind_out"),
        "default_beaten_by": anomaly.get("default_beaten_by"),
    }


def across(seeds: dict, n_boot: int) -> dict:
    names = sorted(set.intersection(*(set(s["scores"]) for s in seeds.values())))
    out = {n: {k: [float(np.mean(v)), float(np.min(v)), float(np.max(v))]
               for k, v in (("auroc", [s["scores"][n]["auroc"] for s in seeds.values()]),
                            ("auprc", [s["scores"][n]["auprc"] for s in seeds.values()]))} for n in names}
    base = {n: {k: [float(np.mean(v)), float(np.min(v)), float(np.max(v))]
                for k, v in (("auroc", [s["trivial_baselines"][n]["auroc"] for s in seeds.values()]),
                             ("auprc", [s["trivial_baselines"][n]["auprc"] for s in seeds.values()]))}
            for n in next(iter(seeds.values()))["trivial_baselines"]}
    return {"scores_mean_min_max": out, "trivial_baselines_mean_min_max": base, "n_boot": n_boot,
            "defaults": [s["default"] for s in seeds.values()]}


def val_check(run_dir: Path, data: str, normal_label: str, seed: int) -> dict | None:
    """AUROC on the source's own labelled VALIDATION anomalies (never test) of the scores that need no
    statistics of the normals beyond the model, of ``ssim_z`` (from the training normals) and of the trivial
    baselines: what a user who holds labelled validation data would see. None when the validation split has
    no anomalies."""
    from medivae.data import load_dataset
    from medivae.evaluation.anomaly.detection import detection_metrics, trivial_scores
    from medivae.evaluation.anomaly.normative import fit_ssim_norm, normative_ssim
    from medivae.evaluation.anomaly.passes import ImagePass, Scoring
    from medivae.evaluation.anomaly.scorers import score_pass
    from medivae.runfolder.config import DataConfig
    from medivae.runfolder.run import load_run

    run = load_run(run_dir, device="cpu")
    val = load_dataset(DataConfig(source=data, image_size=run.config.data.image_size, split_seed=seed),
                       progress=False)["val"]
    names = list(val.label_names)
    code = names.index(normal_label) if normal_label in names else int(normal_label)
    keep = val.labels >= 0
    images, y = val.images[keep], val.labels[keep] != code
    if y.all() or not y.any():
        return None
    ctx = Scoring(run.model, "cpu", k=16, seed=seed, normal_class=run.config.label_names.index(normal_label)
                  if normal_label in run.config.label_names else None)
    p = ImagePass(ctx, images, "validation images")
    out = {n: detection_metrics(v, y)["auroc"] for n, v in score_pass(p, None, {}, maps=False)[0].items()}
    train = load_dataset(run.config.data, progress=False)["train"]  # the run's own normals
    norm = fit_ssim_norm([ImagePass(ctx, train.images, "training normals").ssim[1]])
    out["ssim_z"] = detection_metrics(normative_ssim(p.ssim[1], norm)[0], y)["auroc"]
    for n, v in trivial_scores(images).items():
        out[f"baseline: {n}"] = max(detection_metrics(v, y)["auroc"], detection_metrics(-v, y)["auroc"])
    return {"auroc": out, "n_normal": int((~y).sum()), "n_anomalous": int(y.sum())}


def z_default(run_dir: Path) -> tuple[np.ndarray, np.ndarray, str]:
    """A scored run's default score on its scored split as a z-score of its own validation normals (mean and
    std recorded by the protocol; no test label read) -> (z (N,), is_anomaly (N,), default name)."""
    p = json.loads((run_dir / "results.json").read_text())["anomaly"]["protocol"]
    d = p["default"]
    mu, sd = p["val_normal_stats"][d]
    cols, y = read_scores(run_dir / "anomaly" / "scores.csv")
    return (cols[d] - mu) / sd, y, d


def family_ensemble(results: list[Path], n_boot: int) -> dict:
    """The ensemble over seeds and families: the mean over every run (family x seed) of its validation-chosen
    default score, each z-scored on its own validation normals. Fixed in advance: no weight, member or
    threshold is chosen, so no test label can change it. Also each family's own seed ensemble on that scale."""
    from medivae.evaluation.anomaly.detection import detection_metrics
    from medivae.evaluation.bootstrap import detection_ci

    members, per_family, allz, y = [], {}, [], None
    for path in results:
        r = json.loads(Path(path).read_text())
        fa = r["fit_args"]
        family = fa[fa.index("--model") + 1] if "--model" in fa[:-1] else "conv_vae"
        zs = []
        for seed in r["seeds"]:
            z, y_, d = z_default(Path(r["runs"]) / f"seed{seed}")
            if y is not None and not np.array_equal(y, y_):
                raise SystemExit(f"{path}: seed {seed} scored other images than the first run; no ensemble")
            y = y_
            zs.append(z)
            members.append({"family": family, "seed": int(seed), "default": d})
        e = np.mean(zs, axis=0)
        per_family[family] = {**detection_metrics(e, y), "ci95": detection_ci(y, e, n_boot, 0), "runs": len(zs)}
        allz += zs
    e = np.mean(allz, axis=0)
    return {"members": members, "all": {**detection_metrics(e, y), "ci95": detection_ci(y, e, n_boot, 0)},
            "per_family_seed_ensemble": per_family, "n_boot": n_boot, "results": [str(p) for p in results],
            "definition": "mean over runs (family x seed) of the run's default score, z-scored on that run's "
                          "validation normals; members fixed in advance"}


def ensemble_markdown(result: dict) -> str:
    """The README rows of :func:`family_ensemble`."""
    rows = ["| ensemble (z-scored validation-chosen defaults) | runs | test AUROC [95 % CI] | test AUPRC |",
            "|---|---|---|---|"]
    for name, e in [*((f"{f}, {e['runs']} seeds", e) for f, e in result["per_family_seed_ensemble"].items()),
                    (f"all families, {len(result['members'])} runs", result["all"])]:
        ci = e["ci95"]["auroc"]
        rows.append(f"| {name} | {e.get('runs', len(result['members']))} | {e['auroc']:.3f} [{ci[0]:.3f}, "
                    f"{ci[1]:.3f}] | {e['auprc']:.3f} |")
    return "\n".join(rows)


def markdown(result: dict) -> str:
    """The README table: mean [min, max] over seeds of test AUROC / AUPRC, and the union over seeds of the
    95 % bootstrap intervals of the AUROC; the score(s) chosen as default in bold."""
    sm, seeds = result["summary"], result["seeds"]
    lines = ["| score | test AUROC: mean [min, max] over seeds | AUROC 95 % CI (union over seeds) "
             "| test AUPRC: mean [min, max] | default in (seeds) |", "|---|---|---|---|---|"]

    def fmt(m):
        return f"{m[0]:.3f} [{m[1]:.3f}, {m[2]:.3f}]"

    def union(cis):
        cis = [c for c in cis if c]
        return f"[{min(c[0] for c in cis):.3f}, {max(c[1] for c in cis):.3f}]" if cis else ""

    means = sm["scores_mean_min_max"]
    for n in sorted(means, key=lambda n: -means[n]["auroc"][0]):
        k = sm["defaults"].count(n)
        ci = union([(s["scores"][n].get("ci95") or {}).get("auroc") for s in seeds.values()])
        lines.append(f"| {f'**{n}**' if k else n} | {fmt(means[n]['auroc'])} | {ci} | {fmt(means[n]['auprc'])} "
                     f"| {k or ''} |")
    for key, label in (("seed_ensemble_default", "seed ensemble of the default (mean over seeds)"),
                       ("seed_ensemble", "seed ensemble (mean of the runs' ensemble scores)")):
        if key in sm:
            e = sm[key]
            lines.append(f"| {label} | {e['auroc']:.3f} | {union([e['ci95']['auroc']])} | {e['auprc']:.3f} | |")
    for n, m in sm["trivial_baselines_mean_min_max"].items():
        b = [s["trivial_baselines"][n] for s in seeds.values()]  # every seed's: its direction is fixed per run
        direction = " or ".join(sorted({x["direction"] for x in b}))
        lines.append(f"| baseline: {n} ({direction} = anomalous; no model) | {fmt(m['auroc'])} | "
                     f"{union([x['ci95']['auroc'] for x in b])} | {fmt(m['auprc'])} | |")
    loc = [s["localisation"] for s in seeds.values()]
    for where, maps_key, base_key in (("phantom lesions (known masks)", ("phantoms", "maps"), ("phantoms", "baseline")),
                                      ("foreign-patch anomalies of validation normals", ("synthetic",),
                                       ("synthetic_baseline",))):
        def dig(d, keys):
            for k_ in keys:
                d = (d or {}).get(k_)
            return d or {}
        per_seed = [dig(lc, maps_key) for lc in loc]
        if not per_seed[0]:
            continue
        lines += ["", f"Pixel-level localisation on {where}, mean over seeds:", "",
                  "| map | pixel AUROC | pixel AUPRC | best Dice |", "|---|---|---|---|"]
        rows = [(n, [m[n] for m in per_seed]) for n in per_seed[0]]
        rows += [(f"baseline: blurred residual, {n} (σ {b[0]['sigma']})", b)
                 for n, b in ((n, [dig(lc, base_key)[n] for lc in loc]) for n in dig(loc[0], base_key))]
        for n, ms in rows:
            lines.append(f"| {n} | " + " | ".join(f"{np.mean([m[k_] for m in ms]):.3f}"
                                                   for k_ in ("auroc", "auprc", "best_dice")) + " |")
    shift = next(iter(seeds.values())).get("normal_shift") or {}
    found = [(k, shift[k]) for k in ("val", "scored") if k in shift]
    if found:
        lines += ["", "Normals against the training normals (classifier two-sample test, first seed; AUROC 0.5 = "
                  "alike): " + "; ".join(f"{'validation' if k == 'val' else shift.get('scored_split', k)} normals "
                                         f"{r['auroc']:.3f}" + (f" [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"
                                                                 if r.get("ci95") else "")
                                         + (" (differ)" if r["differ"] else "") for k, r in found)]
    lines += kind_markdown(seeds)
    checks = [c for c in sm.get("validation_check", {}).values() if c]
    if checks:
        lines += ["", f"Labelled validation anomalies ({checks[0]['n_normal']} normal, {checks[0]['n_anomalous']} "
                  "anomalous; a check, not used for any choice), AUROC mean [min, max] over seeds; a baseline "
                  "in whichever direction does better on these labels:", "",
                  "| score | validation AUROC |", "|---|---|"]
        for n in sorted(checks[0]["auroc"], key=lambda n: -np.mean([c["auroc"][n] for c in checks])):
            v = [c["auroc"][n] for c in checks]
            lines.append(f"| {n} | {fmt([np.mean(v), np.min(v), np.max(v)])} |")
    return "\n".join(lines)


def kind_markdown(seeds: dict) -> list[str]:
    """The leave-one-kind-out rows of every seed: the default chosen without a kind, its validation AUROC on
    that kind, and the best trivial baseline's (direction fixed on the other kinds)."""
    rows = [(seed, k, e) for seed, s in seeds.items() for k, e in (s.get("leave_one_kind_out") or {}).items()]
    if not rows:
        return []
    out = ["", "Leave one kind of synthetic anomaly out (validation normals, selection half):", "",
           "| seed | kind left out | default chosen without it | its AUROC on the kind | best trivial baseline "
           "| its AUROC | margin |", "|---|---|---|---|---|---|---|"]
    for seed, k, e in rows:
        out.append(f"| {seed} | {k} | {e['default']} | {e['auroc']:.3f} | {e['best_baseline']} "
                   f"({e['baseline_direction']}) | {e['baseline_auroc']:.3f} | {e['margin']:+.3f} |")
    return out


def main(argv=None) -> int:
    from medivae.runtime.io import atomic_write_text

    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", help="the source (required unless --markdown or --ensemble)")
    p.add_argument("--normal-label")
    p.add_argument("--runs", type=Path, help="folder for the runs: RUNS/seed<N>")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--rescore", action="store_true", help="score again even when RUN/anomaly exists")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "anomaly_protocol.json")
    p.add_argument("--markdown", action="store_true", help="print the README table of --out and exit")
    p.add_argument("--ensemble", type=Path, nargs="+", metavar="RESULT.json",
                   help="instead of running: the ensemble over the seeds and families of these results (written "
                        "by this script, runs still in place) -> --out")
    args = p.parse_args(argv)
    if args.markdown:
        r = json.loads(args.out.read_text())
        print(ensemble_markdown(r) if "members" in r else markdown(r))
        return 0
    if args.ensemble:
        r = {**family_ensemble(args.ensemble, args.bootstrap), "commit": git_commit()}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(r, indent=2, default=float) + "\n")
        print(ensemble_markdown(r))
        return 0
    if not (args.data and args.normal_label and args.runs):
        p.error("--data, --normal-label and --runs are required to run the protocol")
    commands, seeds, commit = [], {}, git_commit()
    for seed in args.seeds:
        run = args.runs / f"seed{seed}"
        fitted = {"commit": commit, "data": args.data, "normal_label": args.normal_label, "seed": seed,
                  "fit_args": extra}
        if not (run / "results.json").exists():
            commands.append(_medivae("anomaly", "fit", "--data", args.data, "--normal-label", args.normal_label,
                                     "--out", run, "--seed", seed, "--no-progress", *extra))
            atomic_write_text(run / FIT_RECORD, json.dumps(fitted, indent=2) + "\n")
        check_reuse(run, fitted)
        scored = {"commit": commit, "bootstrap": args.bootstrap}
        if args.rescore or not (run / "anomaly" / "scores.csv").exists() or read_json(run / SCORE_RECORD) != scored:
            commands.append(_medivae("anomaly", "score", run, "--bootstrap", args.bootstrap, "--no-progress"))
            atomic_write_text(run / SCORE_RECORD, json.dumps(scored, indent=2) + "\n")
        seeds[seed] = seed_summary(json.loads((run / "results.json").read_text())["anomaly"])
    from medivae.evaluation.anomaly.detection import detection_metrics
    from medivae.evaluation.bootstrap import detection_ci

    summary = across(seeds, args.bootstrap)
    cols = [read_scores(args.runs / f"seed{s}" / "anomaly" / "scores.csv") for s in args.seeds]
    y = cols[0][1]
    if all(np.array_equal(c[1], y) for c in cols):  # same test images in every run: a seed ensemble exists
        ens = np.mean([c[0]["ensemble"] for c in cols], axis=0)
        summary["seed_ensemble"] = {**detection_metrics(ens, y), "ci95": detection_ci(y, ens, args.bootstrap, 0),
                                    "definition": "mean over seeds of each run's 'ensemble' score"}
        defaults = {s_["default"] for s_ in seeds.values()}
        if len(defaults) == 1:  # every seed chose the same score on validation: average it over seeds
            d = defaults.pop()
            ens = np.mean([c[0][d] for c in cols], axis=0)
            summary["seed_ensemble_default"] = {**detection_metrics(ens, y),
                                                "ci95": detection_ci(y, ens, args.bootstrap, 0),
                                                "definition": f"mean over seeds of the default score {d!r}"}
    summary["validation_check"] = {s_: val_check(args.runs / f"seed{s_}", args.data, args.normal_label, s_)
                                   for s_ in args.seeds}
    still_at(commit)
    result = {"data": args.data, "normal_label": args.normal_label, "commit": commit, "runs": str(args.runs),
              "commands": [" ".join(c) for c in commands] or "runs existed; see README for the commands",
              "fit_args": extra, "seeds": seeds, "summary": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=2, default=float) + "\n")
    print(json.dumps(summary, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
