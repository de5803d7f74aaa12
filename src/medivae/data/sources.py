"""Source specs a user can type, resolved to files, and decoded into a :class:`Collector`.

SOURCE is one of: ``FILE.npz`` (MedMNIST layout); ``medmnist:NAME[@SIZE]``; a folder of
PNG/JPEG/TIFF/BMP, DICOM or NIfTI files (class subfolders optional); a CSV of ``path,label[,group]``;
a ``.tar``/``.tar.gz``/``.zip`` archive of such a folder; or one DICOM or NIfTI file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from tqdm import tqdm

from medivae.data.archive import class_labels, is_archive, iter_members, limits
from medivae.data.collect import Built, Collector
from medivae.data.folder import list_folder, read_csv_list
from medivae.data.medmnist import known_label_names, locate
from medivae.data.npz import load_npz
from medivae.data.readers import IMAGE_SUFFIXES, ReadOptions, UnreadableFile, file_kind, read_file
from medivae.runtime.errors import UserError

SOURCE_HELP = (
    "'phantoms[:N]', FILE.npz (MedMNIST layout), medmnist:NAME[@SIZE], a folder of PNG/JPEG/TIFF/BMP, "
    "DICOM or NIfTI files (class subfolders optional), a CSV of path,label[,group], a .tar/.tar.gz/.zip "
    "of such a folder, or one DICOM/NIfTI file"
)


@dataclass
class Source:
    spec: str
    kind: str  # "npz", "folder", "csv", "file", "archive"
    path: Path
    files: list[Path] = field(default_factory=list)
    kinds: list[str | None] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    groups: list[str | None] = field(default_factory=list)
    label_names: tuple[str, ...] = ()
    multi_label: bool = False

    def fingerprint(self) -> str:
        """Hash of every input file's path, size and mtime: any change means decoding again."""
        h = hashlib.sha256()
        for p in [self.path, *self.files]:
            try:
                st = p.stat()
                h.update(json.dumps([str(p.resolve()), st.st_size, st.st_mtime_ns]).encode())
            except OSError:
                h.update(json.dumps([str(p), None]).encode())
        h.update(json.dumps([self.labels, self.groups, self.label_names]).encode())
        if self.kind == "archive":  # another member-size cap reads other members
            h.update(json.dumps(limits()).encode())
        return h.hexdigest()


def same_source(a, b) -> bool:
    """Whether two source specs name the same data: the same text, or paths to the same existing file/folder."""
    if str(a) == str(b):
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def resolve(spec: str, progress: bool = True) -> Source:
    if spec.lower().startswith("medmnist:"):
        path, names, multi = locate(spec, progress)
        return Source(spec, "npz", path, label_names=names, multi_label=multi)
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"{spec}: no such file or folder; SOURCE is {SOURCE_HELP}")
    if path.is_dir():
        files, kinds, labels = list_folder(path)
        if not files:
            raise UserError(f"{spec}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))}, "
                            ".nii/.nii.gz and DICOM files, in subfolders too)")
        return Source(spec, "folder", path, files, kinds, labels, [None] * len(files))
    name = path.name.lower()
    if name.endswith(".npz"):
        return Source(spec, "npz", path, label_names=known_label_names(path))
    if name.endswith(".csv"):
        files, labels, groups = read_csv_list(path)
        if not files:
            raise UserError(f"{spec}: the CSV lists no files; write one path,label row per image")
        kinds = [file_kind(p) if p.is_file() else None for p in files]
        return Source(spec, "csv", path, files, kinds, labels, groups)
    if is_archive(path):
        return Source(spec, "archive", path)
    kind = file_kind(path)
    if kind is None:
        raise UserError(f"{spec}: not a supported data source; SOURCE is {SOURCE_HELP}")
    return Source(spec, "file", path, [path], [kind], [""], [None])


def build(src: Source, cfg, sink, progress: bool = True) -> Built:
    """Decode every input of ``src`` at the model size into ``sink``."""
    names = src.label_names if src.kind == "npz" else ()
    col = Collector(src.spec, cfg.image_size, cfg.channels, cfg.resize_mode, sink, names)
    relabel = None
    if src.kind == "npz":
        _decode_npz(src, col)
    elif src.kind == "archive":
        relabel = _decode_archive(src, col, ReadOptions.from_config(cfg), progress)
    else:
        _decode_files(src, col, ReadOptions.from_config(cfg), progress)
    built = col.finish(relabel)
    built.meta = {"source": src.spec, "kind": src.kind, **built.meta}
    return built


def _decode_npz(src: Source, col: Collector) -> None:
    splits = load_npz(src.path, src.label_names)
    names = next(iter(splits.values())).label_names
    top = max((int(s.labels.max()) for s in splits.values() if len(s)), default=-1)
    if top >= len(names):
        raise UserError(f"{src.spec}: labels go up to {top} but only {len(names)} class names are known")
    col.fixed_names = names
    col.n_files = 1
    lookup = np.array([*col.fixed_names, ""], dtype=object)  # code -1 -> "" (unlabelled)
    for name, s in splits.items():
        if len(s) == 0:
            col.start_split(name)
            continue
        for a in range(0, len(s), 4096):
            codes = np.full(min(4096, len(s) - a), -1) if src.multi_label else s.labels[a : a + 4096]
            col.add(s.images[a : a + 4096], list(lookup[codes]), None, split=name)


def _decode_files(src: Source, col: Collector, opts: ReadOptions, progress: bool) -> None:
    rows = list(zip(src.files, src.kinds, src.labels, src.groups, strict=True))
    bar = tqdm(rows, desc=f"decoding {src.path.name}", unit="file", disable=not progress)
    for path, kind, label, group in bar:
        col.n_files += 1
        if kind is None:
            col.skip(path.name, "no such file" if not path.exists() else "not an image, DICOM or NIfTI file")
            continue
        try:
            fr = read_file(path, path.name, kind, opts)
        except UnreadableFile as e:
            col.skip(path.name, str(e))
            continue
        # slices/frames of one file, and files of one patient, share a group
        col.add(fr.images, label, group or fr.group or str(path), window=fr.window, n_constant=fr.n_constant)


def _decode_archive(src: Source, col: Collector, opts: ReadOptions, progress: bool):
    has_dicom = False
    bar = tqdm(desc=f"decoding {src.path.name}", unit="file", disable=not progress)
    for m in iter_members(src.path):
        name, data, base = m.name, m.data, PurePosixPath(m.name).name
        kind = file_kind(Path(base), sniff=False)
        if kind is None and data is not None and data[128:132] == b"DICM":
            kind = "dicom"
        if kind is None and (data is not None or PurePosixPath(base).suffix):
            continue  # README, checksums...: not an input (an unread one without a suffix may be DICOM)
        col.n_files += 1
        bar.update(1)
        if data is None:
            col.skip(base, m.skip)
            continue
        has_dicom |= kind == "dicom"
        try:
            fr = read_file(data, name, kind, opts)
        except UnreadableFile as e:
            col.skip(base, str(e))
            continue
        # the member path stands in for the label until all paths are known (see class_labels)
        col.add(fr.images, name, fr.group or name, window=fr.window, n_constant=fr.n_constant)
    bar.close()
    return lambda keys: class_labels(keys, has_dicom)
