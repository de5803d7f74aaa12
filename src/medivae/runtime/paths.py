"""Output paths, checked in one place before a command does any work or takes any lock.

Every command and every function of the Python API that writes calls one of these first, so a path it
cannot write ends as one line (exit code 2) instead of a traceback after minutes of work, and nothing is
half-written: the refusal happens before the first byte.

- an output **file**: not empty, not a folder or a special file (a device, a pipe, /proc), a name with a
  suffix the command can write, a parent folder that can be written (missing folders on the way are created);
  an existing file is replaced only with ``--force``;
- an output **folder**: absent or empty (an earlier output of the same command only with ``--force``);
- a new **run folder**: absent, empty, or a run that never reached its first checkpoint;
- an existing **run folder** a command writes into: a folder holding ``config.json`` that can be written;
- none of them inside a run's checkpoint folder (``best/``, ``last/``): the next save replaces that folder whole.

Writable means a file can be created there: a probe file is made and removed at once (``os.access`` says yes
to root on a read-only mount and on /proc).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from medivae.runtime.constants import CHECKPOINTS
from medivae.runtime.errors import UserError

PROBE = ".medivae-write-test-"  # the prefix of the file probe_writable makes and removes at once
LOCK_FILE = ".lock"  # runfolder/lock.py's; a folder holding nothing else counts as empty
# what a run folder holds before its first checkpoint (api._open_run_folder): such a run can start again
RUN_START_FILES = {"config.json", "data.json", "env.json", "environment.json", "config_sources.json", LOCK_FILE}


def given(path, flag: str = "--out") -> Path:
    """``path`` as a Path; an empty string (which Path would read as the current folder), a NUL byte and a name
    too long for the file system are refused."""
    if path is None or (isinstance(path, str) and not path.strip()):
        raise UserError(f"{flag}: an empty path; name a file or folder")
    if "\x00" in str(path):
        raise UserError(f"{flag}: a path with a NUL byte; name a file or folder")
    try:
        p = Path(path).expanduser()
        p.exists()  # raises for a name the file system cannot hold
    except (OSError, RuntimeError) as e:  # RuntimeError: ~nobody, a user that does not exist
        raise UserError(f"{flag} {str(path)[:80]}: not a usable path ({getattr(e, 'strerror', None) or e})") from None
    return p


def probe_writable(folder: Path, what: str) -> None:
    """A UserError unless a file can be created in the existing folder ``folder``."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=PROBE, dir=folder)
    except OSError as e:
        raise UserError(f"{what}: cannot write in {folder} ({e.strerror or e}); choose a folder you can write "
                        "to") from None
    os.close(fd)
    os.unlink(tmp)


def _nearest_existing(p: Path) -> Path:
    p = p.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_parent(p: Path, flag: str) -> None:
    """The nearest existing folder above ``p`` is a folder that can be written (the rest is created)."""
    anchor = _nearest_existing(p.parent)
    if not anchor.is_dir():
        raise UserError(f"{flag} {p}: {anchor} is a file, not a folder")
    probe_writable(anchor, f"{flag} {p}")


# the checkpoints and the .prev twin train/checkpoint.py leaves while it swaps one in as a whole
CHECKPOINT_FOLDERS = (*CHECKPOINTS, *(f"{name}.prev" for name in CHECKPOINTS))


def _resolved(p: Path) -> Path | None:
    """``p`` through symlinks and "..", as a writer will go; None for a symlink loop (the writer's check says so)."""
    try:
        return p.resolve()
    except (OSError, RuntimeError):
        return None


def _not_in_checkpoint(p: Path, flag: str) -> None:
    """A UserError when ``p`` is (or is under) a run's checkpoint folder: a checkpoint is saved by writing a new
    folder and swapping it in, so a file put there is deleted by the run's next epoch, and until then every load
    warns that the folder holds a file its manifest does not list."""
    full = _resolved(p)
    if full is None:
        return
    for folder in (full, *full.parents):
        if folder.name in CHECKPOINT_FOLDERS and (folder / "manifest.json").is_file() and is_run(folder.parent):
            raise UserError(f"{flag} {p}: inside the checkpoint folder {folder} of a run, which the next save "
                            f"replaces whole; write it elsewhere (e.g. {folder.parent / p.name})")


# the files a run folder keeps its record in (runfolder/results.py, train/metrics.py): what reads them (compare,
# --resume, report) trusts them, so no command's output replaces one, --force or not
RUN_RECORD_FILES = (RUN_START_FILES - {LOCK_FILE}) | {"results.json", "metrics.jsonl", "eval_per_image.npz",
                                                      "adaptation.json"}


def _not_a_run_record(p: Path, flag: str) -> None:
    """A UserError when the output file ``p`` is one of a run folder's own records (``--out RUN/results.json``)."""
    full = _resolved(p)
    if full is not None and full.name in RUN_RECORD_FILES and is_run(full.parent):
        raise UserError(f"{flag} {p}: the run folder's own {full.name}, which medivae reads back; name another file")


def _special(p: Path) -> bool:
    return p.exists() and not (p.is_file() or p.is_dir())


def check_output_file(path, flag: str = "--out", force: bool = False, suffixes=None) -> Path:
    """An output file ``path`` the command may write (see the module docstring); ``suffixes``: the ones it can
    write (e.g. (".png", ".jpg")), None for any. Returns it as a Path."""
    p = given(path, flag)
    if suffixes is not None and p.suffix.lower() not in suffixes:
        names = " or ".join(f"FILE{s}" for s in suffixes)
        raise UserError(f"{flag} {p}: cannot write a {p.suffix or 'suffix-less'} file here; write {names}")
    _not_in_checkpoint(p, flag)
    _not_a_run_record(p, flag)
    if p.is_dir():
        raise UserError(f"{flag} {p}: is a folder; name a file (e.g. {p / ('out' + (suffixes or ('',))[0])})")
    if _special(p):
        raise UserError(f"{flag} {p}: is not an ordinary file (a device, pipe or socket); name a file")
    if p.exists() and not force:
        raise UserError(f"{flag} {p}: exists; pass --force to replace it, or choose another name")
    _check_parent(p, flag)
    return p


def _entries(folder: Path) -> set[str]:
    """What ``folder`` holds, without the lock file and the write probes of another process checking it (every
    torchrun rank checks the run folder)."""
    try:
        return {e.name for e in os.scandir(folder) if not e.name.startswith(PROBE)} - {LOCK_FILE}
    except OSError as e:
        raise UserError(f"{folder}: cannot be read ({e.strerror or e})") from None


def check_output_folder(path, flag: str = "--out", force: bool = False, marker: str | None = None) -> Path:
    """An output folder ``path``: absent or empty; one holding ``marker`` (an earlier output of the same command)
    only with ``force``. Returns it as a Path."""
    p = given(path, flag)
    _not_in_checkpoint(p, flag)
    if p.exists() and not p.is_dir():
        what = "a file" if p.is_file() else "a device, pipe or socket"
        raise UserError(f"{flag} {p}: is {what}, not a folder; name a new folder")
    if p.exists():
        entries = _entries(p)
        if entries and not (marker in entries and force):
            why = (f"holds an earlier output ({marker}); pass --force to write over it" if marker in entries
                   else "is not empty; name a new or empty folder")
            raise UserError(f"{flag} {p}: {why}")
        probe_writable(p, f"{flag} {p}")
    else:
        _check_parent(p, flag)
    return p


def check_new_run_folder(path, flag: str = "--out") -> Path:
    """A folder a new run may be written to: absent, empty, or a run that never reached its first checkpoint
    (only the files a run writes before it, which a new start replaces)."""
    p = given(path, flag)
    _not_in_checkpoint(p, flag)
    if p.exists() and not p.is_dir():
        raise UserError(f"{flag} {p}: is a file, not a folder; name a new run folder")
    if not p.exists():
        _check_parent(p, flag)
        return p
    entries = _entries(p)
    if {"last", "best", "last.prev", "best.prev"} & entries:
        raise UserError(f"{p} already holds a run; pass --resume to continue it or choose another --out")
    if entries - RUN_START_FILES:
        raise UserError(f"{flag} {p}: is not empty (holds {', '.join(sorted(entries)[:3])}"
                        f"{', ...' if len(entries) > 3 else ''}); name a new or empty folder")
    probe_writable(p, f"{flag} {p}")
    return p


def is_run(p: Path) -> bool:
    """A run folder holds config.json or a checkpoint folder (best/, last/, or a .prev twin of one)."""
    return (p / "config.json").is_file() or any((p / n).is_dir() for n in CHECKPOINT_FOLDERS)


def check_run_folder(path, command: str, write: bool = True) -> Path:
    """An existing run folder (:func:`is_run`) that ``command`` reads, and writes into when ``write``."""
    p = given(path, "RUN")
    if not p.exists():
        raise UserError(f"{p}: no such run folder")
    if not p.is_dir():
        raise UserError(f"{p}: is a file, not a run folder")
    if not is_run(p):
        raise UserError(f"{p}: not a medivae run folder (no config.json); give the --out folder of 'medivae train'")
    if write:
        try:
            probe_writable(p, f"{command} writes into {p}")
        except UserError as e:
            raise UserError(f"{e}; copy the run folder somewhere writable and run it there") from None
    return p
