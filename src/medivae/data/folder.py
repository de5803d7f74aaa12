"""Folders and CSV lists of input files (2D images, DICOM, NIfTI); one 2D image made model-ready.

Class labels come from first-level subfolders (``root/<Class>/...``) or from a CSV of
``path,label[,group]``. Folders holding DICOM files get no folder labels: PACS exports nest
files in patient/study folders whose names would otherwise become class names and reach outputs.
"""

from __future__ import annotations

import csv
from pathlib import Path

# read_image lives in decode, below readers (which dispatches to it); it is re-exported here for callers
from medivae.data.decode import IMAGE_SUFFIXES, read_image
from medivae.data.readers import file_kind
from medivae.runtime.errors import UserError

__all__ = ["IMAGE_SUFFIXES", "list_folder", "read_csv_list", "read_image"]


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in rel.parts)


def list_folder(root: Path) -> tuple[list[Path], list[str], list[str]]:
    """(files, kind per file, label per file); label "" when the folder has no class subfolders."""
    files, kinds = [], []
    for p in sorted(root.rglob("*")):
        if _hidden(p.relative_to(root)) or not p.is_file():
            continue
        kind = file_kind(p)
        if kind is not None:
            files.append(p)
            kinds.append(kind)
    rel = [p.relative_to(root).parts for p in files]
    if files and "dicom" not in kinds and all(len(r) > 1 for r in rel):
        return files, kinds, [r[0] for r in rel]
    return files, kinds, ["" for _ in files]


def _expanduser(p: Path) -> Path:
    try:
        return p.expanduser()
    except RuntimeError:  # "~nobody/x": no such user; left as written, it is then reported missing
        return p


def read_csv_list(csv_path: Path) -> tuple[list[Path], list[str], list[str | None]]:
    """Rows of ``path,label[,group]`` (a header row starting with "path" is skipped); relative paths
    are taken from the CSV's folder. ``group`` (e.g. a patient key) keeps rows together when splitting."""
    files, labels, groups = [], [], []
    try:
        with csv_path.open(newline="") as f:
            for i, row in enumerate(csv.reader(f)):
                if not row or not row[0].strip() or (i == 0 and row[0].strip().lower() == "path"):
                    continue
                p = _expanduser(Path(row[0].strip()))
                files.append(p if p.is_absolute() else csv_path.parent / p)
                labels.append(row[1].strip() if len(row) > 1 else "")
                groups.append(row[2].strip() or None if len(row) > 2 else None)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{csv_path}: not a readable CSV of path,label ({e})") from None
    return files, labels, groups
