"""Archives (.tar, .tar.gz/.tgz, .tar.bz2, .tar.xz, .zip) of an input folder, read without extracting.

Tar archives are read as a stream, member by member, so a compressed archive is decompressed
once and nothing is written to disk. Member paths play the role of folder paths: after dropping
the folders every member shares (e.g. MedNIST's ``resized/``), a first-level folder is the class.
"""

from __future__ import annotations

import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from medivae.errors import UserError

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


def is_archive(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(".zip") or any(name.endswith(s) for s in TAR_SUFFIXES)


def _wanted(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return bool(parts) and not any(p.startswith(".") or p == "__MACOSX" for p in parts)


def iter_members(path: Path) -> Iterator[tuple[str, bytes]]:
    """(member path, bytes) for each regular file, in archive order."""
    if path.name.lower().endswith(".zip"):
        yield from _zip_members(path)
    else:
        yield from _tar_members(path)


def _tar_members(path: Path) -> Iterator[tuple[str, bytes]]:
    try:
        with tarfile.open(path, mode="r|*") as tar:  # streaming: one pass over the compressed bytes
            for member in tar:
                if member.isfile() and _wanted(member.name):
                    f = tar.extractfile(member)
                    if f is not None:
                        yield member.name, f.read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise UserError(f"{path}: not a readable tar archive, or truncated ({type(e).__name__}: {e})") \
            from None


def _zip_members(path: Path) -> Iterator[tuple[str, bytes]]:
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if not info.is_dir() and _wanted(info.filename):
                    yield info.filename, z.read(info)
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise UserError(f"{path}: not a readable zip archive ({type(e).__name__}: {e})") from None


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
