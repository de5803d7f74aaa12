"""``medmnist:NAME[@SIZE]``: MedMNIST v2/MedMNIST+ files (Yang et al., Scientific Data 2023).

Files come from the official Zenodo record 10519652 and are kept in ``<cache>/medmnist/``
(``$MEDIVAE_CACHE``, default ``~/.cache/medivae``); a copy already in that folder or in
``~/.medmnist`` (the medmnist package's folder) is used without downloading.

Checksums, honestly: MedMNIST publishes MD5 sums only (``medmnist/info.py`` of MedMNIST v3,
copied below); we have no SHA-256 of the Zenodo files, because nothing here could download them.
A download must match the published MD5 or it is deleted. For local copies we also accept the
SHA-256 of re-saves we know (``KNOWN_RESAVES``); any other local copy is used with a warning,
because a user who put a file there deliberately knows more than our table.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.error
import urllib.request
import warnings
from pathlib import Path

from medivae.data.cache import cache_root
from medivae.runtime.errors import UserError

SIZES = (28, 64, 128, 224)
URL = "https://zenodo.org/records/10519652/files/{file}?download=1"

# name -> (class names, multi-label?, MD5 per size 28/64/128/224); from medmnist/info.py (MedMNIST v3)
ORGAN = ("bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver",
         "lung-left", "lung-right", "pancreas", "spleen")
DATASETS: dict[str, tuple[tuple[str, ...], bool, tuple[str, str, str, str]]] = {
    "pneumoniamnist": (("normal", "pneumonia"), False, (
        "28209eda62fecd6e6a2d98b1501bb15f", "8f4eceb4ccffa70c672198ea285246c6",
        "05b46931834c231683c68f40c47b2971", "d6a3c71de1b945ea11211b03746c1fe1")),
    "breastmnist": (("malignant", "normal, benign"), False, (
        "750601b1f35ba3300ea97c75c52ff8f6", "742edef2a1fd1524b2efff4bd7ba9364",
        "363e4b3f8d712e9b5de15470a2aaadf1", "b56378a6eefa9fed602bb16d192d4c8b")),
    "chestmnist": ((), True, (
        "02c8a6516a18b556561a56cbdd36c4a8", "9de6cd0b934ebb5b7426cfba5efbae16",
        "db107e5590b27930b62dbaf558aebee3", "45bd33e6f06c3e8cdb481c74a89152aa")),
    "octmnist": (("choroidal neovascularization", "diabetic macular edema", "drusen", "normal"), False, (
        "c68d92d5b585d8d81f7112f81e2d0842", "e229e9440236b774d9f0dfef9d07bdaf",
        "0a97e76651ace45c5d943ee3f65b63ae", "abc493b6d529d5de7569faaef2773ba3")),
    "organamnist": (ORGAN, False, (
        "68e3f8846a6bd62f0c9bf841c0d9eacc", "2dcccc29b88e6da5a01161ef20cda288",
        "eeae80d0a227a8d099027e1b3cfd3b60", "50747347e05c87dd3aaf92c49f9f3170")),
    "organcmnist": (ORGAN, False, (
        "b9ceb9546e10131b32923c5bbeaea2b1", "3ce34a8724ea6f548e6db4744d03b6a9",
        "773c1f009daa3fe5d9a2a201b2a7ed94", "050f5e875dc056f6768abf94ec9995d1")),
    "organsmnist": (ORGAN, False, (
        "9ab87b696fb54e2a387ebe992d6ed5f1", "53a6d115339d874c25e309a994ff46d3",
        "ded0c5fa01a95dc4978b956f613e9b8e", "b354719e553fbbb2513d5533f52a4cb1")),
    "pathmnist": (("adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
                   "normal colon mucosa", "cancer-associated stroma",
                   "colorectal adenocarcinoma epithelium"), False, (
        "a8b06965200029087d5bd730944a56c1", "55aa9c1e0525abe5a6b9d8343a507616",
        "ac42d08fb904d92c244187169d1fd1d9", "2c51a510bcdc9cf8ddb2af93af1eadec")),
    "dermamnist": (("actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
                    "benign keratosis-like lesions", "dermatofibroma", "melanoma", "melanocytic nevi",
                    "vascular lesions"), False, (
        "0744692d530f8e62ec473284d019b0c7", "b70a2f5635c6199aeaa28c31d7202e1f",
        "2defd784463fa5243564e855ed717de1", "8974907d8e169bef5f5b96bc506ae45d")),
    "retinamnist": (("0", "1", "2", "3", "4"), False, (
        "bd4c0672f1bba3e3a89f0e4e876791e4", "afda852cc34dcda56f86ad2b2457dbcc",
        "e48e916a24454daf90583d4e6efb1a18", "eae7e3b6f3fcbda4ae613ebdcbe35348")),
    "bloodmnist": (("basophil", "eosinophil", "erythroblast", "immature granulocytes", "lymphocyte",
                    "monocyte", "neutrophil", "platelet"), False, (
        "7053d0359d879ad8a5505303e11de1dc", "2b94928a2ae4916078ca51e05b6b800b",
        "adace1e0ed228fccda1f39692059dd4c", "b718ff6835fcbdb22ba9eacccd7b2601")),
    "tissuemnist": (("collecting duct, connecting tubule", "distal convoluted tubule",
                     "glomerular endothelial cells", "interstitial endothelial cells", "leukocytes",
                     "podocytes", "proximal tubule segments", "thick ascending limb"), False, (
        "ebe78ee8b05294063de985d821c1c34b", "123ece2eba09d0aa5d698fda57103344",
        "61b955355d7425a89687b06cca3ce0c2", "b077128c4a949f0a4eb01517f9037b9c")),
}
VOLUMES = ("organmnist3d", "nodulemnist3d", "adrenalmnist3d", "fracturemnist3d", "vesselmnist3d",
           "synapsemnist3d")

# SHA-256 of known re-saves (not the Zenodo bytes): file -> {sha256: what it is}
KNOWN_RESAVES = {
    "pneumoniamnist.npz": {
        "0feaa500f6fc004a983686240ea46fe7be599032ab8d303a2846e9df487ee18a":
            "project copy in ../shared/data: val/test as published, train reassembled from two re-saves",
    },
}


def known_label_names(path: Path) -> tuple[str, ...]:
    """Class names of a local MedMNIST file recognised by its name (``pneumoniamnist.npz``,
    ``pneumoniamnist_64.npz``); empty for other files, whose classes are then named "0", "1", ..."""
    stem = Path(path).name.lower().removesuffix(".npz")
    base = stem.rsplit("_", 1)[0] if stem.rsplit("_", 1)[-1].isdigit() else stem
    entry = DATASETS.get(base)
    return tuple(entry[0]) if entry and not entry[1] else ()


def parse_spec(spec: str) -> tuple[str, int]:
    """"medmnist:NAME[@SIZE]" -> (name, size)."""
    body = spec.split(":", 1)[1].strip().lower()
    name, _, size_text = body.partition("@")
    if name in VOLUMES:
        raise UserError(f"{spec}: {name} holds 3D volumes; medivae trains on 2D images "
                        f"(choose one of {sorted(DATASETS)})")
    if name not in DATASETS:
        raise UserError(f"{spec}: unknown MedMNIST dataset {name!r}; choose one of {sorted(DATASETS)}")
    try:
        size = int(size_text) if size_text else 28
    except ValueError:
        size = -1
    if size not in SIZES:
        raise UserError(f"{spec}: MedMNIST comes in sizes {list(SIZES)}; write e.g. medmnist:{name}@64")
    return name, size


def file_name(name: str, size: int) -> str:
    return f"{name}.npz" if size == 28 else f"{name}_{size}.npz"


def medmnist_dir() -> Path:
    return cache_root() / "medmnist"


def locate(spec: str, progress: bool = True) -> tuple[Path, tuple[str, ...], bool]:
    """(local .npz path, class names, multi-label?) for a medmnist: spec; downloads when needed."""
    name, size = parse_spec(spec)
    names, multi, md5s = DATASETS[name]
    fname = file_name(name, size)
    expected = md5s[SIZES.index(size)]
    for folder in (medmnist_dir(), Path.home() / ".medmnist"):
        path = folder / fname
        if path.is_file():
            _check_local(path, expected)
            return path, names, multi
    return _download(fname, expected, progress), names, multi


def _digests(path: Path) -> tuple[str, str]:
    md5, sha = hashlib.md5(), hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            md5.update(block)
            sha.update(block)
    return md5.hexdigest(), sha.hexdigest()


def _check_local(path: Path, expected_md5: str) -> None:
    """Hash a local copy once; a stamp (size, mtime, verdict) spares re-hashing multi-GB files each run."""
    st = path.stat()
    stamp = path.with_name(f".{path.name}.checked.json")
    try:
        seen = json.loads(stamp.read_text())
        if seen.get("size") == st.st_size and seen.get("mtime_ns") == st.st_mtime_ns:
            if seen.get("verdict") == "unknown":
                warnings.warn(f"{path}: not the published MedMNIST file (MD5 differs); using it as given",
                              stacklevel=3)
            return
    except (OSError, ValueError):
        pass
    md5, sha = _digests(path)
    known = KNOWN_RESAVES.get(path.name, {})
    verdict = "official" if md5 == expected_md5 else "resave" if sha in known else "unknown"
    if verdict == "unknown":
        warnings.warn(f"{path}: not the published MedMNIST file (MD5 {md5}, expected {expected_md5}); "
                      "using it as given", stacklevel=3)
    try:
        stamp.write_text(json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns, "verdict": verdict}))
    except OSError:
        pass  # a read-only folder: we simply hash again next time


def _fetch(url: str, dest: Path, progress: bool) -> None:
    """Stream ``url`` into ``dest``. The only network access in medivae; tests replace it."""
    from tqdm import tqdm

    with urllib.request.urlopen(url, timeout=60) as r, dest.open("wb") as f:
        total = int(r.headers.get("Content-Length") or 0) or None
        desc = f"downloading {dest.name}"
        with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress) as bar:
            for block in iter(lambda: r.read(1 << 20), b""):
                f.write(block)
                bar.update(len(block))


def _download(fname: str, expected_md5: str, progress: bool) -> Path:
    folder = medmnist_dir()
    dest = folder / fname
    url = URL.format(file=fname)
    tmp = dest.with_name(f".{fname}.part")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _fetch(url, tmp, progress)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        tmp.unlink(missing_ok=True)
        reason = getattr(e, "reason", None) or e
        raise UserError(
            f"{fname} is not available locally and could not be downloaded from {url} ({reason}); "
            f"download it elsewhere and put it at {dest} "
            f"(or point MEDIVAE_CACHE at a folder holding medmnist/{fname})"
        ) from None
    md5, _ = _digests(tmp)
    if md5 != expected_md5:
        tmp.unlink(missing_ok=True)
        raise UserError(f"download of {fname} is corrupt (MD5 {md5}, published {expected_md5}); try again")
    os.replace(tmp, dest)
    return dest
