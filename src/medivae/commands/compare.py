"""medivae compare: runs evaluated on the same test split, side by side, with intervals and p-values."""

from __future__ import annotations

from pathlib import Path


def cmd_compare(args) -> int:
    from medivae import api
    from medivae.report.compare import to_markdown

    cmp = api.compare(args.runs, out=args.out, force=args.force, bootstrap=args.bootstrap)
    print(to_markdown(cmp))
    if args.out:
        print(f"written to {args.out}")
    return 0


def add(sub) -> None:
    p = sub.add_parser("compare", help="runs evaluated on the same test split, side by side, with 95%% intervals")
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run folders evaluated by 'medivae evaluate'")
    p.add_argument("--out", type=Path, default=None, help="FILE.html (self-contained) or FILE.md")
    p.add_argument("--force", action="store_true", help="compare runs evaluated on different data or splits")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                   help="bootstrap resamples for intervals and paired p-values (default 1000)")
    p.set_defaults(func=cmd_compare)
