"""Archives (.tar, .tar.gz/.tgz, .tar.bz2, .tar.xz, .zip) of an input folder, read without extracting.

Tar archives are read as a stream, member by member, so a compressed archive is decompressed
once and nothing is written to disk. Member paths play the role of folder paths: after dropping
the folders every member shares (e.g. MedNIST's ``resized/``), a first-level folder is the class.

A member is judged by its header before a byte of it is read: one that declares more than
``max_member_bytes()`` (``$MEDIVAE_MAX_MEMBER_MB``, default 512 MB), or a zip member that claims to
inflate more than ``MAX_RATIO`` times (a zip bomb), comes out as a :class:`Member` with ``data=None``
and a ``skip`` reason, and is reported like any unreadable file. The declared size is also a hard
bound: ``tarfile`` and ``zipfile`` never return more bytes than the header states.
"""

from __future__ import annotations

import os
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from medivae.runtime.errors import UserError

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
MAX_MEMBER_MB = 512.0  # default cap on one member's declared (uncompressed) size
MAX_MEMBER_ENV = "MEDIVAE_MAX_MEMBER_MB"
MAX_RATIO = 1000.0  # zip: file_size / compress_size above this is a bomb (deflate tops out near 1032)
RATIO_FLOOR = 1 << 20  # members smaller than 1 MiB are never refused for their ratio alone


@dataclass(frozen=True)
class Member:
    """One regular file of an archive: its bytes, or (``data is None``) why it was not read."""

    name: str
    data: bytes | None
    skip: str = ""


def max_member_bytes() -> int:
    raw = os.environ.get(MAX_MEMBER_ENV, "").strip()
    try:
        mb = float(raw) if raw else MAX_MEMBER_MB
    except ValueError:
        mb = -1.0
    if not mb > 0:
        raise UserError(f"${MAX_MEMBER_ENV} must be a positive number of megabytes, not {raw!r}")
    return int(mb * 1e6)


def limits() -> dict[str, float]:
    """What decides which members are read (part of the decoded-data cache key)."""
    return {"max_member_bytes": max_member_bytes(), "max_ratio": MAX_RATIO}


def too_big(size: int, compressed: int | None = None) -> str:
    """Why a member declaring ``size`` bytes (``compressed`` in the archive, zip) must not be read, or ""."""
    cap = max_member_bytes()
    if size > cap:
        return f"declares {size / 1e6:,.1f} MB, over the {cap / 1e6:g} MB cap (${MAX_MEMBER_ENV}); not read"
    if compressed is not None and size >= RATIO_FLOOR and size > MAX_RATIO * max(compressed, 1):
        return (f"claims to inflate {size / max(compressed, 1):,.0f}x ({compressed} -> {size} bytes), "
                f"above {MAX_RATIO:g}x: a zip bomb; not read")
    return ""


def is_archive(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(".zip") or any(name.endswith(s) for s in TAR_SUFFIXES)


def _wanted(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return bool(parts) and not any(p.startswith(".") or p == "__MACOSX" for p in parts)


def iter_members(path: Path) -> Iterator[Member]:
    """Each regular file, in archive order; members over the limits are yielded unread."""
    if path.name.lower().endswith(".zip"):
        yield from _zip_members(path)
    else:
        yield from _tar_members(path)


def _tar_members(path: Path) -> Iterator[Member]:
    try:
        with tarfile.open(path, mode="r|*") as tar:  # streaming: one pass over the compressed bytes
            for member in tar:
                if not (member.isfile() and _wanted(member.name)):
                    continue
                why = too_big(member.size)  # a skipped member is streamed past, never held in memory
                f = None if why else tar.extractfile(member)
                if why or f is not None:
                    yield Member(member.name, None if why else f.read(), why)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise UserError(f"{path}: not a readable tar archive, or truncated ({type(e).__name__}: {e})") \
            from None


def _zip_members(path: Path) -> Iterator[Member]:
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if info.is_dir() or not _wanted(info.filename):
                    continue
                why = too_big(info.file_size, info.compress_size)
                yield Member(info.filename, None, why) if why else _zip_read(z, info)
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise UserError(f"{path}: not a readable zip archive ({type(e).__name__}: {e})") from None


def _zip_read(z: zipfile.ZipFile, info: zipfile.ZipInfo) -> Member:
    """A damaged member (bad CRC, bad deflate stream, unsupported method) is skipped, not the archive."""
    try:
        return Member(info.filename, z.read(info))
    except (zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError, EOFError) as e:
        return Member(info.filename, None, f"unreadable zip member ({type(e).__name__}: {e})")


def class_labels(names: list[str], has_dicom: bool) -> list[str]:
    """First folder below the common prefix of all member paths, or "" (flat archive, or DICOM)."""
    parts = [PurePosixPath(n).parts for n in names]
    if not parts or has_dicom:
        return ["" for _ in names]
    common = 0
    shortest = min(len(p) for p in parts)
    while common < shortest - 1 and len({p[common] for p in parts}) == 1:
        common += 1
    if all(len(p) > common + 1 for p in parts):
        return [p[common] for p in parts]
    return ["" for _ in names]
