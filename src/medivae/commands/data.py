"""medivae data inspect SOURCE: what training would see, before training on it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medivae.commands.common import FORCE, PROGRESS, path_arg, whole
from medivae.runtime.errors import UserError
from medivae.runtime.seeding import DEFAULT_SEED


def cmd_inspect(args) -> int:
    from medivae.commands.train import data_config
    from medivae.data.inspect import summarize

    if args.source and args.data and args.source != args.data:  # one of them was silently ignored
        raise UserError(f"two sources: SOURCE {args.source} and --data {args.data}; give one")
    args.data = args.source or args.data
    if not args.data:
        raise UserError("give a SOURCE: medivae data inspect SOURCE (anything --data accepts)")
    # the default preview.png is this command's own file, replaced on every run; a named --out needs --force
    out = summarize(data_config(args), args.out or Path("preview.png"), progress=not args.no_progress,
                    force=args.force or args.out is None)
    print(json.dumps(out, indent=2) if args.json else format_summary(out))
    return 0


def format_summary(s: dict) -> str:
    meta = s["meta"]
    total = sum(v["n"] for v in s["splits"].values())
    shape = "×".join(str(d) for d in s["shape"])
    counts = " · ".join(f"{k} {v['n']}" for k, v in s["splits"].items())
    lines = [
        f"source     {s['source']} ({meta.get('kind', 'built in')}; cache: {meta.get('cache', 'none')})",
        f"images     {total}: {counts}; each {shape} {s['dtype']}",
    ]
    for name, v in s["splits"].items():
        labels = ", ".join(f"{k} {n}" for k, n in v["labels"].items()) or "-"
        grouped = v["groups"] is not None and v["groups"] < v["n"]
        groups = f"; {v['groups']} groups (patients/volumes), none in another split" if grouped else ""
        lines.append(f"{name:<10} labels: {labels}{groups}")
    for name, v in s["splits"].items():
        st = v["intensity"]
        if st:
            lines.append(f"{name:<10} intensity (0-255): mean {st['mean']:.1f} std {st['std']:.1f} "
                         f"min {st['min']} p1 {st['p1']} p50 {st['p50']} p99 {st['p99']} max {st['max']} "
                         f"zero {st['fraction_zero']:.1%}")
    if meta.get("native_sizes"):
        sizes = ", ".join(f"{k} ×{n}" for k, n in meta["native_sizes"].items())
        more = " (more sizes not shown)" if meta.get("n_native_sizes", 0) > 5 else ""
        lines.append(f"native     {sizes}{more}")
    if meta.get("windows"):
        lines.append("intensity  " + ", ".join(f"{k} ×{n}" for k, n in meta["windows"].items()))
    if "n_skipped" in meta:
        lines.append(f"skipped    {meta['n_skipped']} of {meta['n_files']} files; "
                     f"{meta.get('n_constant_skipped', 0)} uniform frames/slices")
        lines += [f"           - {x}" for x in meta.get("skipped", [])[:10]]
    if s.get("preview"):
        lines.append(f"preview    {s['preview']}")
    return "\n".join(lines)


def _need_action(args) -> int:
    raise UserError("choose an action: medivae data inspect SOURCE")


def add(sub) -> None:
    from medivae.commands.train import add_data_args

    p = sub.add_parser("data", help="inspect a data source")
    p.set_defaults(func=_need_action)
    actions = p.add_subparsers(dest="action", metavar="ACTION", parser_class=type(p))
    i = actions.add_parser("inspect", help="counts, shapes, label histogram, intensities and a preview grid",
                           parents=[PROGRESS, FORCE])
    i.add_argument("source", metavar="SOURCE", nargs="?", help="anything --data accepts (or give --data)")
    add_data_args(i, required=False)
    i.add_argument("--image-size", type=int, default=64, help="32, 64, 128 or 256 (default 64)")
    i.add_argument("--channels", type=int, default=1, help="1 gray or 3 RGB (default 1)")
    i.add_argument("--seed", dest="split_seed", type=whole(0, 2**64 - 1), default=DEFAULT_SEED,
                   help=argparse.SUPPRESS)  # the old name of --split-seed
    i.add_argument("--out", type=path_arg, default=None,
                   help="preview grid, .png or .jpg (default preview.png, replaced on every run)")
    i.add_argument("--json", action="store_true", help="print the summary as JSON")
    i.set_defaults(func=cmd_inspect)

