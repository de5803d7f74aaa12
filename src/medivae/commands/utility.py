"""medivae utility: train-on-synthetic/test-on-real, real + synthetic, and real only."""

from __future__ import annotations

from pathlib import Path

from medivae.seeding import DEFAULT_SEED


def cmd_utility(args) -> int:
    from medivae import api

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
    )
    print(f"real test set of {args.real}: {r['real_only']['n_test']} images; results in {r['file']}")
    for name in ("synthetic_only", "real_plus_synthetic", "real_only"):
        m = r[name]
        auc = "n/a" if m["auc"] is None else f"{m['auc']:.3f}"
        rec = ", ".join(f"{k} {v:.2f}" for k, v in m["recall"].items())
        print(
            f"  {name:20s} n_train {m['n_train']:6d}  AUC {auc}  accuracy {m['accuracy']:.3f}  recall: {rec}"
        )
    return 0


def add(sub) -> None:
    p = sub.add_parser(
        "utility", help="is synthetic data useful? TSTR vs real-only classifiers on real test data"
    )
    p.add_argument(
        "--real", required=True, metavar="SOURCE", help="real labelled data (its test split is used)"
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
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_utility)
