"""Command line: parses arguments, then calls the API. User mistakes end with one line and exit code 2."""

from __future__ import annotations

import argparse
import errno
import faulthandler
import importlib
import signal
import sys
import warnings

from medivae.runtime.errors import UserError
from medivae.runtime.version import __version__

# one module per command group under medivae.commands, each with add(subparsers)
COMMAND_MODULES = (
    "train", "generate", "traverse", "report", "evaluate", "anomaly", "synthesize", "utility", "data",
    "compare",
)


DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}  # the environment's, not medivae's


class Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        # no abbreviated flags: --resume must see exactly which settings were typed (commands/train.py)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # one line, exit 2 (argparse would print the usage block too)
        raise UserError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="medivae", description="Variational autoencoders for medical images.")
    p.add_argument("--version", action="version", version=f"medivae {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(f"medivae.commands.{name}").add(sub)
    return p


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"medivae: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    warnings.showwarning = _show_warning
    if argv is None and hasattr(signal, "SIGUSR1"):  # a process of its own (not called from Python)
        # `kill -USR1 PID` prints where every thread of a stuck run is (e.g. a torchrun worker) and goes on
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        parser = build_parser()
        argv = sys.argv[1:] if argv is None else list(argv)
        args = parser.parse_args(argv)
        args._argv = argv
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        result = args.func(args)
        return int(result or 0)
    except UserError as e:
        print(f"medivae: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in DISK_ERRORS:
            raise
        # a full disk, a file-size limit or a read-only mount met while writing: every writer is atomic
        # (runtime/io.py, train/checkpoint.py), so no file is left half-written
        where = f" ({e.filename})" if e.filename else ""
        print(f"medivae: error: cannot write{where}: {e.strerror or e}; free some space or write elsewhere, "
              "then run the command again (each file is written whole or not at all)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medivae: interrupted; nothing half-written is kept (a training run keeps its last completed "
              "checkpoint)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
