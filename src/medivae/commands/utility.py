"""medivae utility: train-on-synthetic/test-on-real, real + synthetic, and real only."""

from __future__ import annotations

from pathlib import Path

from medivae.runtime.seeding import DEFAULT_SEED


def cmd_utility(args) -> int:
    from medivae import api
    from medivae.evaluation.bootstrap import fmt_ci

    r = api.utility(
        args.real,
        args.synthetic,
        out=args.out,
        epochs=args.epochs,
        seed=args.seed,
        width=args.width,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        device=args.device,
        progress=not args.no_progress,
        batch_size=args.batch_size,
        runs=args.run,
        bootstrap=args.bootstrap,
    )
    print(f"real test set of {r['real']}: {r['real_only']['n_test']} images; results in {r['file']}")
    for name in ("synthetic_only", "real_plus_synthetic", "real_only"):
        m = r[name]
        ci = m.get("ci95", {})
        auc = "n/a" if m["auc"] is None else f"{m['auc']:.3f}{fmt_ci(ci.get('auc'))}"
        rec = ", ".join(f"{k} {v:.2f}" for k, v in m["recall"].items())
        acc = f"{m['accuracy']:.3f}{fmt_ci(ci.get('accuracy'))}"
        print(f"  {name:20s} n_train {m['n_train']:6d}  AUC {auc}  accuracy {acc}  recall: {rec}")
    return 0


def add(sub) -> None:
    p = sub.add_parser(
        "utility", help="is synthetic data useful? TSTR vs real-only classifiers on real test data"
    )
    p.add_argument(
        "--run", nargs="+", type=Path, default=None, metavar="RUN",
        help="the VAE run(s) the synthetic images came from: the real data is their source with their exact "
        "split and labels, so no image a VAE trained on is tested on (recommended)",
    )
    p.add_argument(
        "--real", default=None, metavar="SOURCE",
        help="real labelled data split by utility itself (without --run; with --run it must be the run's source)",
    )
    p.add_argument(
        "--synthetic",
        required=True,
        nargs="+",
        type=Path,
        metavar="DIR",
        help="one or more 'medivae synthesize' folders (e.g. one per class)",
    )
    p.add_argument("--out", type=Path, default=None, help="JSON file (default: first DIR/utility.json)")
    p.add_argument("--epochs", type=int, default=10, help="classifier epochs (default 10)")
    p.add_argument("--width", type=int, default=32, help="classifier width (default 32)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--test-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=None, help=f"default: the run's seed, else {DEFAULT_SEED}")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                   help="bootstrap resamples of the real test images for 95%% intervals (default 1000; 0: off)")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_utility)
