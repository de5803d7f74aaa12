"""Reference tables generated from the code at build time, so they cannot drift from it.

- ``cli_markdown()`` walks :func:`medivae.cli.build_parser` (every command and subcommand) and renders each
  parser's usage, description and options, group by group (``docs/reference/cli.md``).
- ``family_options(name)`` lists the fields of a registered family's config: the default of that registry
  entry (its preset applied) and the comment beside the field in the source (the family pages).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, tuple[argparse.ArgumentParser, str]]:
    """name -> (parser, one-line help) of a parser's subcommands, in the order they were added."""
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                out[name] = (sub, helps.get(name, ""))
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _option_row(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    names = ", ".join(f"`{s}`" for s in action.option_strings) or f"`{action.metavar or action.dest}`"
    if action.option_strings and action.nargs != 0:
        metavar = parser._get_formatter()._format_args(action, action.dest.upper())
        names += f" `{metavar}`"
    help_text = parser._get_formatter()._expand_help(action) if action.help else ""
    default = action.default
    shown = "" if default in (None, False, argparse.SUPPRESS, "", []) or action.nargs == 0 else f"`{default}`"
    return f"| {_cell(names)} | {_cell(shown)} | {_cell(help_text)} |"


def _parser_markdown(parser: argparse.ArgumentParser, title: str, summary: str, level: int) -> list[str]:
    lines = [f"{'#' * level} `{title}`", ""]
    if summary or parser.description:
        lines += [parser.description or summary, ""]
    lines += ["```text", parser.format_usage().strip(), "```", ""]
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.help != argparse.SUPPRESS
                   and not isinstance(a, (argparse._SubParsersAction, argparse._HelpAction))]
        if not actions:
            continue
        lines += [f"**{group.title}**", "", "| option | default | what it does |", "|---|---|---|"]
        lines += [_option_row(parser, a) for a in actions] + [""]
    return lines


def cli_markdown() -> str:
    """Markdown for every command of ``medivae``: a section per command, nested for subcommands."""
    from medivae.cli import build_parser

    os.environ.setdefault("COLUMNS", "100")  # usage lines wrap at the terminal width
    root = build_parser()
    lines = []
    for name, (parser, summary) in _subcommands(root).items():
        lines += _parser_markdown(parser, f"medivae {name}", summary, 2)
        for sub_name, (sub, sub_summary) in _subcommands(parser).items():
            lines += _parser_markdown(sub, f"medivae {name} {sub_name}", sub_summary, 3)
    return "\n".join(lines)


def _field_comments(klass: type) -> dict[str, str]:
    """``field: type = default  # comment`` lines of a dataclass and its bases -> {field: comment}."""
    comments = {}
    for cls in reversed(klass.__mro__[:-1]):
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):
            continue
        for m in re.finditer(r"^\s+(\w+)\s*:[^=\n]*=[^#\n]*#\s*(.+)$", source, re.M):
            comments[m.group(1)] = m.group(2).strip()
    return comments


def family_options(name: str) -> str:
    """A Markdown table of ``--model-arg`` keys of registry entry ``name``: key, default, comment."""
    from medivae.models import get_family

    family = get_family(name)
    cfg = family.make_config()
    notes = _field_comments(family.config)
    rows = ["| `--model-arg` key | default | note |", "|---|---|---|"]
    for f in dataclasses.fields(cfg):
        if f.name == "name":
            continue
        rows.append(f"| `{f.name}` | `{getattr(cfg, f.name)!r}` | {_cell(notes.get(f.name, ''))} |")
    return "\n".join(rows)


def capability_table() -> str:
    """Which registered family declares which capability, from models built small (32 px, two classes)."""
    import torch

    from medivae.models import build_model, families, model_config
    from medivae.models.family import CAPABILITIES, config_for_data

    torch.manual_seed(0)
    caps = {}
    for name in families():
        cfg = config_for_data(model_config(name, image_size=32), ("a", "b"), "phantoms")
        caps[name] = build_model(cfg).capabilities
    rows = ["| capability | meaning | " + " | ".join(f"`{n}`" for n in caps) + " |",
            "|---|---|" + "---|" * len(caps)]
    for cap, meaning in CAPABILITIES.items():
        rows.append(f"| `{cap}` | {meaning} | " + " | ".join("✓" if cap in c else "" for c in caps.values()) + " |")
    return "\n".join(rows)
