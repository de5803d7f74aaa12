"""What a source's data is, by content, wherever it is reached from.

The decoded cache (``Source.fingerprint``) keys on every file's path, size and mtime: cheap, and it notices
edits. Whatever must be the same for the same data on another path or machine (a symlink, a copied or moved
folder, another checkout) keys on :func:`content_identity` instead: the bytes of the one file (an ``.npz``,
an archive, a DICOM/NIfTI file) or, for a folder, each file's path relative to it, size and bytes. SHA-256s
are kept per (resolved path, size, mtime) in ``$MEDIVAE_CACHE/content_hashes.json``, so a folder of
thousands of DICOM files is read once, not at every evaluate.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from medivae.data.archive import limits
from medivae.data.cache import cache_root
from medivae.runtime.io import atomic_write_text

HASH_CACHE = "content_hashes.json"
CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


class HashCache:
    """SHA-256s by (resolved path, size, mtime_ns), read from and written back to one small JSON file. A
    missing, unreadable or corrupt file is an empty cache (it is written again); a read-only one is not
    written, and the files are simply hashed again next time."""

    def __init__(self, path: Path):
        self.path, self.changed = Path(path), False
        try:
            entries = json.loads(self.path.read_text())
        except (OSError, ValueError):
            entries = {}
        self.entries = entries if isinstance(entries, dict) else {}

    def sha256(self, path: Path) -> str | None:
        """The file's SHA-256, or None when it cannot be read (a CSV row naming a missing file)."""
        try:
            real = Path(path).resolve()
            st = real.stat()
            seen = self.entries.get(str(real))
            if isinstance(seen, list) and seen[:2] == [st.st_size, st.st_mtime_ns] and isinstance(seen[-1], str):
                return seen[-1]
            digest = sha256_file(real)
        except OSError:
            return None
        self.entries[str(real)] = [st.st_size, st.st_mtime_ns, digest]
        self.changed = True
        return digest

    def save(self) -> None:
        if not self.changed:
            return
        try:
            atomic_write_text(self.path, json.dumps(self.entries, sort_keys=True))
        except OSError:
            pass  # a read-only cache folder: hashing again next time is the only cost
        self.changed = False


def content_identity(src) -> str:
    """SHA-256 over what ``src`` (a resolved :class:`~medivae.data.sources.Source`) holds and how it is read:
    the same bytes under another path give the same identity, one changed pixel another."""
    hashes = HashCache(cache_root() / HASH_CACHE)
    what: dict = {"kind": src.kind, "label_names": list(src.label_names), "multi_label": src.multi_label}
    if src.kind == "folder":  # paths relative to the folder: class subfolders are labels, suffixes pick readers
        what["files"] = [[p.relative_to(src.path).as_posix(), _size(p), hashes.sha256(p)] for p in src.files]
        what["labels"] = list(src.labels)
    elif src.kind == "csv":  # the CSV's own bytes name paths; its rows, in order, are what it says
        what["rows"] = [[hashes.sha256(p), k, lab, g]
                        for p, k, lab, g in zip(src.files, src.kinds, src.labels, src.groups, strict=True)]
    else:  # npz (medmnist: its downloaded file), archive, one DICOM/NIfTI file
        what["sha256"] = hashes.sha256(src.path)
        what["file_kinds"] = list(src.kinds)
        if src.kind == "archive":  # another member-size cap reads other members
            what["limits"] = limits()
    hashes.save()
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def _size(p: Path) -> int | None:
    try:
        return p.stat().st_size
    except OSError:
        return None
