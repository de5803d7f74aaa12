"""medivae report."""

from __future__ import annotations

from pathlib import Path


def cmd_report(args) -> int:
    from medivae import api

    print(api.report(args.run, args.out))
    return 0


def add(sub) -> None:
    p = sub.add_parser("report", help="a run's curves, figures and results as one self-contained HTML file")
    p.add_argument("run", type=Path, help="run folder")
    p.add_argument("--out", type=Path, default=None, help="HTML file to write (default RUN/report.html)")
    p.set_defaults(func=cmd_report)
