"""medivae report."""

from __future__ import annotations

from medivae.commands.common import FORCE, path_arg


def cmd_report(args) -> int:
    from medivae import api

    print(api.report(args.run, args.out, force=args.force))
    return 0


def add(sub) -> None:
    p = sub.add_parser("report", help="a run's curves, figures and results as one self-contained HTML file",
                       parents=[FORCE])
    p.add_argument("run", type=path_arg, help="run folder")
    p.add_argument("--out", type=path_arg, default=None, help="HTML file to write (default RUN/report.html)")
    p.set_defaults(func=cmd_report)
