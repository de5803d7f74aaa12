"""medivae anomaly fit / anomaly score."""

from __future__ import annotations

from pathlib import Path

from medivae.commands.train import add_model_args, add_train_args


def cmd_fit(args) -> int:
    from medivae import api
    from medivae.commands.train import run_config

    args.labels = args.normal_label  # train, validate and test on normals only
    run = api.anomaly_fit(run_config(args), args.out, progress=not args.no_progress)
    print(
        f"anomaly model (normal = {args.normal_label!r}) written to {run}; score it with "
        f"'medivae anomaly score {run}'"
    )
    return 0


def cmd_score(args) -> int:
    from medivae import api
    from medivae.evaluation.bootstrap import fmt_ci

    r = api.anomaly_score(
        args.run,
        data=args.data,
        split=args.split,
        out=args.out,
        normal_label=args.normal_label,
        fpr=args.fpr,
        k=args.iwae_samples,
        gradient=args.gradient_maps,
        n_maps=args.n_maps,
        batch_size=args.batch_size,
        device=args.device,
        precision=args.precision,
        bootstrap=args.bootstrap,
    )
    print(
        f"scored {r['n_scored']} images of {r['data']} ({r['split']}); "
        f"files in {Path(r['files']['scores']).parent}"
    )
    if "prevalence" in r:
        print(f"  {r['n_anomalous']} anomalous of {r['n_normal'] + r['n_anomalous']} labelled images "
              f"(prevalence {r['prevalence']:.3f}: the AUPRC of a random score); 95% bootstrap intervals")
    for name, m in r.get("metrics", {}).items():
        ci = (r.get("ci95") or {}).get(name) or {}
        print(f"  {name:15s} AUROC {m['auroc']:.3f}{fmt_ci(ci.get('auroc'))}  "
              f"AUPRC {m['auprc']:.3f}{fmt_ci(ci.get('auprc'))}")
    for name, m in r.get("baselines", {}).items():
        print(f"  baseline {name} (no model): AUROC {m['auroc']:.3f}")
    for name, m in r.get("trivial_baselines", {}).items():
        ci = m.get("ci95") or {}
        print(f"  baseline {name} ({m['direction']} = anomalous, no model): AUROC {m['auroc']:.3f}"
              f"{fmt_ci(ci.get('auroc'))}  AUPRC {m['auprc']:.3f}{fmt_ci(ci.get('auprc'))}")
    if "protocol" in r:
        p = r["protocol"]
        print(f"  default score, chosen on validation normals vs synthetic anomalies only: {p['default']} "
              f"(validation AUROC {p['val_auroc'][p['default']]:.3f})")
    t = r["threshold"]
    line = (f"  conformal threshold {t['value']:.3f} on {t['score']} (rank {t['rank']} of {t['n_calibration']} "
            f"validation normals: a new normal is flagged with probability <= {t['target_fpr']:g})")
    if "tpr" in t:
        line += f": {r['split']} FPR {t['fpr']:.3f}, TPR {t['tpr']:.3f}"
    print(line)
    return 0


def add(sub) -> None:
    a = sub.add_parser("anomaly", help="anomaly detection with a VAE fitted on normal images only")
    s = a.add_subparsers(dest="anomaly_command", metavar="{fit,score}", parser_class=type(a))
    a.set_defaults(func=lambda args: a.print_help() or 2)

    f = s.add_parser("fit", help="train on the normal images of a source")
    g = f.add_argument_group("data")
    g.add_argument("--data", required=True, metavar="SOURCE", help="phantoms | FILE.npz | FOLDER | FILE.csv")
    g.add_argument("--normal-label", required=True, help="the class name of normal images, e.g. 0 or normal")
    g.add_argument("--val-fraction", type=float, default=0.1)
    g.add_argument("--test-fraction", type=float, default=0.1)
    g.add_argument("--resize-mode", default="pad", help="non-square images: pad (default) or crop")
    g.add_argument("--window", default=None, help="DICOM window: CENTER,WIDTH or a preset")
    f.add_argument("--out", required=True, type=Path, help="run folder to write")
    add_model_args(f)
    add_train_args(f)
    f.set_defaults(func=cmd_fit)

    c = s.add_parser("score", help="score images; write scores.csv, anomaly maps, ROC and results.json")
    c.add_argument("run", type=Path)
    c.add_argument("--data", default=None, metavar="SOURCE", help="default: the run's own source")
    c.add_argument("--split", default="test", help="train, val or test (default test)")
    c.add_argument("--out", type=Path, default=None, help="output folder (default RUN/anomaly)")
    c.add_argument("--normal-label", default=None, help="default: the label the run was fitted on")
    c.add_argument("--fpr", type=float, default=0.05,
                   help="false-positive rate the conformal threshold guarantees (needs >= 1/FPR - 1 validation "
                   "normals)")
    c.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                   help="bootstrap resamples for 95%% intervals of AUROC/AUPRC (default 1000; 0: off)")
    c.add_argument("--iwae-samples", type=int, default=16, help="posterior draws per image (default 16)")
    c.add_argument(
        "--gradient-maps", action="store_true", help="maps from |d(-ELBO)/dx| instead of residuals"
    )
    c.add_argument("--n-maps", type=int, default=16,
                   help="images drawn in overlays.png (default 16); maps.png shows at most 8 of them, with every map")
    c.add_argument("--batch-size", type=int, default=128)
    c.add_argument("--device", default="auto")
    c.add_argument(
        "--precision", choices=("fp32", "auto"), default="fp32",
        help="fp32 (default: exact scores) or auto: bf16 networks where native, ~1.8x faster on AVX-512 BF16",
    )
    c.set_defaults(func=cmd_score)
