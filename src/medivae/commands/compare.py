"""medivae compare: runs evaluated on the same test split, side by side, with intervals and p-values."""

from __future__ import annotations

from medivae.commands.common import BOOTSTRAP, path_arg


def cmd_compare(args) -> int:
    from medivae import api
    from medivae.report.compare import to_markdown

    cmp = api.compare(args.runs, out=args.out, force=args.force, bootstrap=args.bootstrap)
    print(to_markdown(cmp))
    if args.out:
        print(f"written to {args.out}")
    return 0


def add(sub) -> None:
    p = sub.add_parser("compare", help="runs evaluated on the same test split, side by side, with 95%% intervals",
                       parents=[BOOTSTRAP])
    p.add_argument("runs", nargs="+", type=path_arg, metavar="RUN", help="run folders evaluated by 'medivae evaluate'")
    p.add_argument("--out", type=path_arg, default=None, help="FILE.html (self-contained) or FILE.md")
    p.add_argument("--force", action="store_true",
                   help="compare anyway what cannot be compared (other data or split, an evaluation of weights no "
                   "longer there, one run twice), and replace an existing --out file")
    p.set_defaults(func=cmd_compare)
