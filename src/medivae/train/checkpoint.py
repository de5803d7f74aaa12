"""Checkpoint folders: ``config.json`` + ``model.safetensors`` (every module of the family) + one
``optimizer[.NAME].safetensors`` / ``.json`` pair per optimizer (+ ``rng.safetensors``, ``state.json``)
+ ``manifest.json`` with the size and SHA-256 of every file. The optimizer named "model" (the only one of
a single-optimizer family) keeps the plain ``optimizer.*`` names, so every earlier checkpoint resumes.

Crash safety. A checkpoint is written whole into ``NAME.tmp`` (every file fsynced), then swapped in
with two renames: ``NAME -> NAME.prev``, ``NAME.tmp -> NAME``. A kill at any moment therefore leaves
``NAME`` or ``NAME.prev`` complete; readers fall back to ``NAME.prev`` and the next save first puts it
back (:func:`recover`), so the only good copy is never the one deleted. A failed write (disk full)
removes ``NAME.tmp`` and leaves ``NAME`` untouched.

Tamper safety. Loading reads each listed file once into memory, checks its size and hash against the
manifest, and parses exactly those bytes -- JSON or safetensors only, so nothing is ever unpickled.
Files the manifest does not list are never read. The manifest catches truncation and corruption
(copies between sites, full disks); it is not a signature -- someone who can rewrite the manifest can
swap the weights, but still cannot make medivae run code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensor_bytes
from safetensors.torch import save as tensor_bytes

from medivae.runtime.errors import UserError
from medivae.runtime.io import fsync_dir

MANIFEST = "manifest.json"
REQUIRED = ("config.json", "model.safetensors")
FORMAT = 2  # manifest entries {"size", "sha256"}; format 1 (walking skeleton) held the digest alone


# --- writing ------------------------------------------------------------------------------------------
def _twins(folder: Path) -> tuple[Path, Path]:
    return folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".prev")


def _write_file(path: Path, data: bytes) -> None:
    """Write and fsync through os.write, so a full disk surfaces here as OSError(ENOSPC)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode("utf-8")


def _tensor_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return tensor_bytes({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state -> (tensors for safetensors, JSON-able rest)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in list(tensors.items()) + list(meta.get("scalars", {}).items()):
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def optimizer_files(name: str) -> tuple[str, str]:
    """(tensor file, JSON file) of the optimizer called ``name``."""
    stem = "optimizer" if name == "model" else f"optimizer.{name}"
    return f"{stem}.safetensors", f"{stem}.json"


def _as_dict(optimizers) -> dict[str, torch.optim.Optimizer]:
    if optimizers is None:
        return {}
    return dict(optimizers) if isinstance(optimizers, dict) else {"model": optimizers}


def _contents(model, config, optimizers, state, extra_tensors) -> dict[str, bytes]:
    """Every file of the checkpoint, serialised in memory before anything touches the disk."""
    files = {"config.json": _json_bytes(config), "model.safetensors": _tensor_bytes(model.state_dict())}
    for name, opt in _as_dict(optimizers).items():
        tensor_file, json_file = optimizer_files(name)
        ot, ometa = optimizer_to_flat(opt)
        files[tensor_file] = _tensor_bytes(ot)
        files[json_file] = _json_bytes(ometa)
    if extra_tensors:
        files["rng.safetensors"] = _tensor_bytes(extra_tensors)
    if state is not None:
        files["state.json"] = _json_bytes(state)
    return files


def save_checkpoint(
    folder: Path,
    model: torch.nn.Module,
    config: dict,
    optimizer: torch.optim.Optimizer | dict[str, torch.optim.Optimizer] | None = None,
    state: dict | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write a complete checkpoint folder atomically (see module docstring). ``optimizer``: one
    optimizer (saved as "model") or {name: optimizer}."""
    folder = Path(folder)
    tmp, prev = _twins(folder)
    files = _contents(model, config, optimizer, state, extra_tensors)
    entries = {n: {"size": len(b), "sha256": hashlib.sha256(b).hexdigest()} for n, b in sorted(files.items())}
    files[MANIFEST] = _json_bytes({"format": FORMAT, "files": entries})
    try:
        recover(folder)
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a crash mid-write
        tmp.mkdir(parents=True)
        for name, data in files.items():  # the manifest last: a folder with a manifest is complete
            _write_file(tmp / name, data)
        fsync_dir(tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(_write_failure(folder, e)) from None
    _swap(tmp, folder, prev)


def link_copy(src: Path, folder: Path) -> None:
    """Make ``folder`` a checkpoint identical to the complete checkpoint ``src``, atomically like
    :func:`save_checkpoint`, with hard links instead of a second serialisation (a copy where links are
    not possible). Safe because a checkpoint file is never changed in place: a later save of ``src``
    writes new files and swaps folders, so the linked inodes keep their bytes."""
    src, folder = resolve(Path(src)), Path(folder)
    tmp, prev = _twins(folder)
    try:
        recover(folder)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        names = sorted(p.name for p in src.iterdir() if p.name != MANIFEST) + [MANIFEST]  # the manifest last
        for name in names:
            try:
                os.link(src / name, tmp / name)
            except OSError:
                shutil.copy2(src / name, tmp / name)
        fsync_dir(tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(_write_failure(folder, e)) from None
    _swap(tmp, folder, prev)


def _write_failure(folder: Path, e: OSError) -> str:
    kept = (
        f"the previous {folder.name}/ checkpoint is intact"
        if exists(folder)
        else f"no earlier {folder.name}/ checkpoint existed"
    )
    why = e.strerror or e
    return f"could not write checkpoint {folder} ({why}); {kept}. Free some space, then resume with --resume"


def _swap(tmp: Path, folder: Path, prev: Path) -> None:
    """NAME -> NAME.prev, NAME.tmp -> NAME, then drop NAME.prev. Every intermediate state is readable."""
    try:
        if folder.exists():
            os.replace(folder, prev)
        os.replace(tmp, folder)
        fsync_dir(folder.parent)
    except OSError as e:
        raise UserError(_write_failure(folder, e)) from None
    shutil.rmtree(prev, ignore_errors=True)


def recover(folder: Path) -> None:
    """Finish a swap that a crash interrupted: move a complete NAME.prev back to a missing NAME, or
    delete a stale NAME.prev next to a complete NAME. Idempotent; a kill inside it is harmless."""
    folder = Path(folder)
    _, prev = _twins(folder)
    if not prev.exists():
        return
    if not folder.exists() and (prev / MANIFEST).exists():
        os.replace(prev, folder)
        fsync_dir(folder.parent)
    elif (folder / MANIFEST).exists():
        shutil.rmtree(prev)


def exists(folder: Path) -> bool:
    """True when ``folder`` holds a checkpoint, or would after :func:`recover`."""
    folder = Path(folder)
    return folder.exists() or _twins(folder)[1].exists()


# --- reading ------------------------------------------------------------------------------------------
def resolve(folder: Path) -> Path:
    """The folder itself, or its ``.prev`` twin when a crash fell between the two renames."""
    folder = Path(folder)
    if (folder / MANIFEST).exists():
        return folder
    prev = _twins(folder)[1]
    if (prev / MANIFEST).exists():
        return prev
    raise UserError(f"{folder}: no checkpoint there (no {MANIFEST}); train first or check the path")


def _manifest(folder: Path) -> dict[str, dict]:
    """``{file name: {"size", "sha256"}}`` from the manifest, checked for shape and required files."""
    path = folder / MANIFEST
    try:
        files = json.loads(path.read_bytes())["files"]
        entries = {
            n: (e if isinstance(e, dict) else {"sha256": e, "size": None}) for n, e in files.items()
        }
        ok = all(isinstance(e.get("sha256"), str) for e in entries.values())
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError, OSError):
        ok = False
    if not ok:
        raise UserError(f"{path}: unreadable manifest; the checkpoint is corrupt")
    for name in entries:
        if name != Path(name).name or name in ("", ".", "..", MANIFEST):
            raise UserError(f"{path}: lists {name!r}, which is not a file of this folder; refusing to load")
    missing = [n for n in REQUIRED if n not in entries]
    if missing:
        raise UserError(f"{path}: does not list {', '.join(missing)}; incomplete or altered checkpoint")
    return entries


def _verified_bytes(folder: Path, name: str, entry: dict) -> bytes:
    path = folder / name
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: missing from the checkpoint (listed in {MANIFEST})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror or e})") from None
    size = entry.get("size")
    if isinstance(size, int) and len(data) != size:
        how = "truncated" if len(data) < size else "longer than recorded"
        raise UserError(f"{path}: {how} ({len(data)} bytes, {MANIFEST} says {size}); refusing to load")
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise UserError(f"{path}: contents do not match {MANIFEST} (altered or corrupt); refusing to load")
    return data


def read_verified(folder: Path) -> tuple[Path, dict[str, bytes]]:
    """(folder used, {name: bytes}) for every file the manifest lists, each checked before it is returned.
    Unlisted files are left unread (and named in a warning): nothing outside the manifest is trusted."""
    folder = resolve(folder)
    entries = _manifest(folder)
    blobs = {name: _verified_bytes(folder, name, e) for name, e in entries.items()}
    extra = sorted(p.name for p in folder.iterdir() if p.name not in entries and p.name != MANIFEST)
    if extra:
        warnings.warn(f"{folder}: ignoring {', '.join(extra)} (not in {MANIFEST}, never read)", stacklevel=2)
    return folder, blobs




def _json(folder: Path, blobs: dict[str, bytes], name: str) -> Any:
    try:
        return json.loads(blobs[name])
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{folder / name}: not valid JSON; the checkpoint is corrupt") from None


def _tensors(folder: Path, blobs: dict[str, bytes], name: str) -> dict[str, torch.Tensor]:
    try:
        return load_tensor_bytes(blobs[name])
    except (SafetensorError, ValueError, TypeError) as e:
        raise UserError(f"{folder / name}: not a valid safetensors file ({e})") from None


def read_config(folder: Path) -> dict:
    folder, blobs = read_verified(folder)
    cfg = _json(folder, blobs, "config.json")
    if not isinstance(cfg, dict):
        raise UserError(f"{folder / 'config.json'}: expected a JSON object")
    return cfg


def load_checkpoint(
    folder: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | dict[str, torch.optim.Optimizer] | None = None,
    map_location: str | torch.device = "cpu",
) -> dict:
    """Load weights (and optimizers: one, or {name: optimizer}) in place after verifying hashes;
    returns state.json (+ rng tensors)."""
    folder, blobs = read_verified(folder)
    weights = _tensors(folder, blobs, "model.safetensors")
    bad = next((k for k, t in weights.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if bad is not None:  # a hash proves the bytes are the ones written, not that they are weights
        raise UserError(f"{folder}: weight {bad} holds NaN or infinite values (a damaged or edited checkpoint); "
                        "use the run's other checkpoint or train again")
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"{folder}: weights do not fit this model ({first})") from None
    for name, opt in _as_dict(optimizer).items():
        files = optimizer_files(name)
        if not all(f in blobs for f in files):
            raise UserError(f"{folder}: no state for optimizer {name!r}; the checkpoint does not fit this model")
        try:
            opt.load_state_dict(_optimizer_state(folder, blobs, *files))
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise UserError(f"{folder}: optimizer {name!r} state does not fit this model ({e})") from None
    state = _json(folder, blobs, "state.json") if "state.json" in blobs else {}
    if not isinstance(state, dict):
        raise UserError(f"{folder / 'state.json'}: expected a JSON object")
    if "rng.safetensors" in blobs:
        state["rng"] = _tensors(folder, blobs, "rng.safetensors")
    return state


def _optimizer_state(folder: Path, blobs: dict[str, bytes], tensor_file: str, json_file: str) -> dict:
    tensors = _tensors(folder, blobs, tensor_file)
    try:
        return optimizer_from_flat(tensors, _json(folder, blobs, json_file))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{folder / json_file}: malformed optimizer state ({e})") from None
