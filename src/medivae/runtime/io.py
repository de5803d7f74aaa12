"""Atomic writes: a crash or a full disk never leaves a half-written file, or folder of files, behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, fsync and rename, with the usual
    permissions (mkstemp would leave 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def staged_folder(final) -> Iterator[Path]:
    """Write the files of output folder ``final`` into a hidden sibling, put in place only when the block ends
    without an error: an error, Ctrl-C or a full disk leaves ``final`` as it was (absent, empty or the earlier
    output being replaced), never a mix of old and new files. Paths written into the files themselves should
    name ``final`` (see :func:`relocated`). An existing empty folder, the working directory (``--out .``), a
    symbolic link to a folder or a mount point stays that folder (renaming it away would strand the process and
    the shell in a deleted folder, replace the link, or fail): its files are staged inside it and moved in place
    at the end (:func:`_fill_in_place`)."""
    final = Path(os.path.abspath(final))  # "." and ".." have no name to stage beside
    if final.is_dir() and (not any(final.iterdir()) or _is_cwd(final) or final.is_symlink() or final.is_mount()):
        yield from _fill_in_place(final)
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    old: Path | None = None  # where the earlier output waits until the new one is in place
    try:
        yield staged
        os.chmod(staged, 0o777 & ~_umask())
        if final.exists():
            # a fresh name: one left by a killed process (whose pid this one may have) cannot be renamed over
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
            os.replace(final, old)  # a folder may replace an empty one
        os.replace(staged, final)
    except BaseException:
        if old is not None and not final.exists():
            os.replace(old, final)
        shutil.rmtree(staged, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _is_cwd(folder: Path) -> bool:
    try:
        return folder.samefile(os.getcwd())
    except OSError:
        return False


def _fill_in_place(final: Path) -> Iterator[Path]:
    """:func:`staged_folder` of an existing folder that must stay where it is: staged in a hidden folder inside
    it; at the end the earlier entries move into another hidden folder (deleted last) and the new ones move up.
    An error or Ctrl-C leaves the earlier entries as they were (a kill mid-move may leave a mix)."""
    staged = Path(tempfile.mkdtemp(prefix=".staged.", suffix=".partial", dir=final))
    old: Path | None = None
    earlier: list[str] = []
    moved: list[Path] = []
    try:
        yield staged
        earlier = sorted(p.name for p in final.iterdir() if p != staged)
        if earlier:
            old = Path(tempfile.mkdtemp(prefix=".earlier.", suffix=".old", dir=final))
        for name in list(earlier):
            os.replace(final / name, old / name)
        for p in sorted(staged.iterdir()):
            os.replace(p, final / p.name)
            moved.append(final / p.name)
        staged.rmdir()
    except BaseException:
        for p in moved:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        for name in earlier:
            if old is not None and os.path.lexists(old / name):
                os.replace(old / name, final / name)
        for p in (staged, old):
            if p is not None:
                shutil.rmtree(p, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(final)


def relocated(paths: dict[str, str], staged: Path, final: Path) -> dict[str, str]:
    """{name: path under ``staged``} -> the same paths under ``final``, where :func:`staged_folder` puts them."""
    return {k: str(Path(final) / Path(v).relative_to(staged)) for k, v in paths.items()}
