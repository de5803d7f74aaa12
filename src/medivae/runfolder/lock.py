"""One writer per run folder: an OS file lock on ``RUN/.lock``, held while a command writes the run.

The lock is ``flock`` on POSIX (``msvcrt.locking`` on Windows): the kernel drops it when the process
ends, however it ends, so a SIGKILLed run never leaves a stale lock. The file itself only says who
holds it (pid, command, start time) so that a refused writer can name the holder; its presence means
nothing. A refusal opens the file, fails to lock it, reads it and closes it: no byte of the run changes.

Re-entrant per process: ``api.train`` holds the lock and writes the report through a function that
takes it too. Under torchrun only rank 0 locks (the caller passes ``enabled``).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from medivae.runtime.errors import UserError
from medivae.runtime.paths import LOCK_FILE

_held: dict[str, int] = {}  # resolved run folder -> nesting depth, in this process

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
try:
    import msvcrt
except ImportError:
    msvcrt = None

_MSVCRT_BYTE = 0x7FFFFFF0  # lock a byte far past the holder text, so readers can still read it


class RunInUse(UserError):
    """Another process holds the run folder's lock."""


@contextmanager
def run_lock(run_dir: str | Path, command: str, create: bool = False, enabled: bool = True) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the ``with`` block, or raise :class:`RunInUse` at once (exit 2).

    ``create``: make the folder (a new run). Without it, a folder that does not exist or holds no run
    (no config.json, no .lock) is not locked: the command refuses it itself, and nothing is created.
    A folder created here and left holding nothing but the lock file is removed again on the way out."""
    run_dir = Path(run_dir)
    key = str(run_dir.resolve())
    if key in _held:  # this process holds it already (api.train writing its report)
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    if not enabled or not (create or _is_run(run_dir)):
        yield
        return
    made = create and not run_dir.exists()
    fd = _acquire(run_dir, command, create)
    _held[key] = 1
    try:
        yield
    finally:
        del _held[key]
        _release(fd, run_dir, made)


def _is_run(run_dir: Path) -> bool:
    return (run_dir / "config.json").is_file() or (run_dir / LOCK_FILE).is_file()


def _acquire(run_dir: Path, command: str, create: bool) -> int | None:
    """The locked descriptor of RUN/.lock with the holder written in, or None (not lockable here)."""
    path = run_dir / LOCK_FILE
    while True:
        if create:
            run_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o666)
        except FileNotFoundError:
            if create:
                continue  # removed by a holder that had created it (see _release): make it again
            return None
        except OSError as e:  # e.g. a read-only run folder: the command's own write will fail if it writes
            warnings.warn(f"{run_dir}: not locked ({e.strerror}); do not write this run from two processes",
                          stacklevel=4)
            return None
        if not _try_lock(fd, run_dir):
            holder = _read_holder(fd)
            os.close(fd)
            raise RunInUse(f"{run_dir} is in use by {holder}; wait for it to finish, or use another folder")
        if _same_file(fd, path):
            break
        os.close(fd)  # the file was removed and recreated between open and lock: lock the new one
    _write_holder(fd, command)
    return fd


def _try_lock(fd: int, run_dir: Path) -> bool:
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
    if msvcrt is not None:
        os.lseek(fd, _MSVCRT_BYTE, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    warnings.warn(f"{run_dir}: no file locking on {sys.platform}; do not write this run from two processes",
                  stacklevel=5)
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _write_holder(fd: int, command: str) -> None:
    info = {"pid": os.getpid(), "command": command, "host": socket.gethostname(),
            "since": datetime.now().astimezone().isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(info) + "\n").encode())


def _read_holder(fd: int) -> str:
    """``pid 4242 (medivae train, since 10:41)``; the holder may be between truncating and writing."""
    for _ in range(20):
        os.lseek(fd, 0, os.SEEK_SET)
        try:
            info = json.loads(os.read(fd, 4096).decode())
            return describe_holder(info)
        except (ValueError, UnicodeDecodeError, KeyError, TypeError):
            time.sleep(0.005)
    return "another process"


def describe_holder(info: dict) -> str:
    since = datetime.fromisoformat(info["since"])
    when = since.strftime("%H:%M") if since.date() == datetime.now(since.tzinfo).date() else \
        since.strftime("%Y-%m-%d %H:%M")
    host = info.get("host")
    where = f" on {host}" if host and host != socket.gethostname() else ""
    return f"pid {info['pid']}{where} ({info['command']}, since {when})"


def _release(fd: int | None, run_dir: Path, made: bool) -> None:
    if fd is None:
        return
    path = run_dir / LOCK_FILE
    try:
        os.ftruncate(fd, 0)  # the holder is gone; the empty file stays (removing it would race a waiter)
        if made and [p.name for p in run_dir.iterdir()] == [LOCK_FILE]:
            path.unlink()  # a new run that wrote nothing (e.g. a bad --data): leave no empty folder
            run_dir.rmdir()
    except OSError:
        pass
    finally:
        if fcntl is None and msvcrt is not None:  # Windows asks for an explicit unlock before closing
            try:
                os.lseek(fd, _MSVCRT_BYTE, os.SEEK_SET)
                msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
            except OSError:
                pass
        os.close(fd)  # closing the descriptor releases the flock
