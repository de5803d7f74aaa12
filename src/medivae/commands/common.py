"""What many commands share: typed argument values checked at parse time, and parent parsers for the flags
that several commands declare (``parents=[DEVICE, PROGRESS, ...]``).

A value that is not allowed ends in argparse's one line (``argument -n: must be >= 1, not 0``), through the
same checks the Python API runs (:mod:`medivae.runtime.schema`), before any file is read or written.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medivae.runtime.constants import BOOTSTRAP_RESAMPLES, MAX_THREADS
from medivae.runtime.errors import UserError
from medivae.runtime.schema import finite_number, one_of, whole_number


def _checked(convert, kind: str, check):
    """An argparse ``type``: ``convert`` the text (a ``kind`` or "expected a KIND" in one line), then ``check`` it
    (runtime/schema's checks: their UserError becomes argparse's one-line error)."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind}, not {text!r}") from None
        try:
            return check(value)
        except UserError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = kind
    return parse


def whole(low: int | None = None, high: int | None = None):
    """An argparse ``type``: a whole number in [low, high]."""
    return _checked(int, "whole number", lambda v: whole_number("", v, low, high))


def number(low: float | None = None, high: float | None = None, low_open: bool = False):
    """An argparse ``type``: a finite number in [low, high] (``low_open``: above ``low``)."""
    return _checked(float, "number", lambda v: finite_number("", v, low, high, low_open))


def choice(*allowed: str):
    """An argparse ``type``: one of ``allowed`` (argparse's own ``choices`` message would list them too, but this
    keeps the wording of the API's check)."""
    def parse(text: str) -> str:
        try:
            return one_of("", text, allowed)
        except UserError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = "choice"
    return parse


def path_arg(text: str) -> Path:
    """An argparse ``type`` for a file or folder: an empty string (the current folder to ``Path``) is refused."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; name a file or folder")
    return Path(text)


def device_name(text: str) -> str:
    """An argparse ``type``: auto, cpu, cuda, cuda:N or mps (whether it exists is checked when it is used)."""
    from medivae.runtime.device import check_device_name

    try:
        return check_device_name(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _parent() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(add_help=False)


DEVICE = _parent()
DEVICE.add_argument("--device", default="auto", type=device_name, help="auto (default), cpu, cuda, cuda:N, mps")

PROGRESS = _parent()
PROGRESS.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")

BOOTSTRAP = _parent()
BOOTSTRAP.add_argument("--bootstrap", type=whole(0), default=BOOTSTRAP_RESAMPLES, metavar="N",
                       help=f"bootstrap resamples for the 95%% intervals (default {BOOTSTRAP_RESAMPLES}; 0: none)")

FORCE = _parent()
FORCE.add_argument("--force", action="store_true", help="replace an existing output file")

THREADS = _parent()
THREADS.add_argument("--threads", type=whole(0, MAX_THREADS), default=0, help="CPU threads (default 0: torch's choice)")
