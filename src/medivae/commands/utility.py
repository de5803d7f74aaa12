"""medivae utility: train-on-synthetic/test-on-real, real + synthetic, and real only."""

from __future__ import annotations

from medivae.commands.common import BOOTSTRAP, DEVICE, PROGRESS, number, path_arg, whole
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
        force=args.force,
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
        "utility", help="is synthetic data useful? TSTR vs real-only classifiers on real test data",
        parents=[DEVICE, PROGRESS, BOOTSTRAP],
    )
    p.add_argument(
        "--run", nargs="+", type=path_arg, default=None, metavar="RUN",
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
        type=path_arg,
        metavar="DIR",
        help="one or more 'medivae synthesize' folders (e.g. one per class)",
    )
    p.add_argument("--out", type=path_arg, default=None, help="JSON file (default: first DIR/utility.json)")
    p.add_argument("--force", action="store_true",
                   help="use synthetic sets utility would refuse (one class, another run's images, a folder given "
                   "twice) and replace an existing --out file")
    p.add_argument("--epochs", type=whole(1, 10_000), default=10, help="classifier epochs (default 10)")
    p.add_argument("--width", type=whole(1, 4096), default=32, help="classifier width (default 32)")
    p.add_argument("--batch-size", type=whole(1), default=128)
    p.add_argument("--val-fraction", type=number(0, 0.49), default=0.1)
    p.add_argument("--test-fraction", type=number(0, 0.49), default=0.1)
    p.add_argument("--seed", type=whole(0, 2**64 - 1), default=None,
                   help=f"default: the run's seed, else {DEFAULT_SEED}")
    p.set_defaults(func=cmd_utility)
