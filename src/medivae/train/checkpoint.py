"""Checkpoint folders: ``config.json`` + ``model.safetensors`` (+ ``optimizer.safetensors``,
``state.json``) + ``manifest.json`` with a SHA-256 of every file.

Written to ``NAME.tmp`` and swapped in with renames, so a crash at any moment leaves either the
old or the new folder complete (``NAME.prev`` is picked up if the crash fell between the renames).
Loading verifies the manifest first and reads only JSON and safetensors: nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from medivae.errors import UserError
from medivae.io import fsync_dir

MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: Path, obj: Any) -> None:
    with path.open("w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
    with path.open("rb+") as f:
        os.fsync(f.fileno())


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


def save_checkpoint(
    folder: Path,
    model: torch.nn.Module,
    config: dict,
    optimizer: torch.optim.Optimizer | None = None,
    state: dict | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write a complete checkpoint folder atomically (see module docstring)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    prev = folder.with_name(folder.name + ".prev")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        _write_json(tmp / "config.json", config)
        _save_tensors(tmp / "model.safetensors", model.state_dict())
        if optimizer is not None:
            ot, ometa = optimizer_to_flat(optimizer)
            _save_tensors(tmp / "optimizer.safetensors", ot)
            _write_json(tmp / "optimizer.json", ometa)
        if extra_tensors:
            _save_tensors(tmp / "rng.safetensors", extra_tensors)
        if state is not None:
            _write_json(tmp / "state.json", state)
        files = sorted(p.name for p in tmp.iterdir())
        _write_json(tmp / MANIFEST, {"files": {n: _sha256(tmp / n) for n in files}})
        fsync_dir(tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = f"; the previous {folder.name}/ is intact" if folder.exists() else ""
        raise UserError(f"could not write checkpoint {folder} ({e.strerror or e}){kept}") from None
    if prev.exists():
        shutil.rmtree(prev)
    if folder.exists():
        os.replace(folder, prev)
    os.replace(tmp, folder)
    fsync_dir(folder.parent)
    shutil.rmtree(prev, ignore_errors=True)


def resolve(folder: Path) -> Path:
    """The folder itself, or its ``.prev`` twin when a crash fell between the two renames."""
    folder = Path(folder)
    if (folder / MANIFEST).exists():
        return folder
    prev = folder.with_name(folder.name + ".prev")
    if (prev / MANIFEST).exists():
        return prev
    raise UserError(f"{folder}: no checkpoint there (no {MANIFEST}); train first or check the path")


def verify(folder: Path) -> Path:
    """Check every file against the manifest; refuse missing, extra-pickle, truncated or altered files."""
    folder = resolve(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        expected = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise UserError(f"{folder / MANIFEST}: unreadable manifest; the checkpoint is corrupt") from None
    for name, digest in expected.items():
        p = folder / name
        if not p.is_file():
            raise UserError(f"{p}: missing from checkpoint")
        if _sha256(p) != digest:
            raise UserError(f"{p}: hash does not match the manifest (truncated or altered); refusing to load")
    return folder


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a valid safetensors file ({e})") from None


def read_config(folder: Path) -> dict:
    folder = verify(folder)
    return json.loads((folder / "config.json").read_text())


def load_checkpoint(
    folder: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    map_location: str | torch.device = "cpu",
) -> dict:
    """Load weights (and optimizer) in place after verifying hashes; returns state.json (+ rng tensors)."""
    folder = verify(folder)
    weights = _load_tensors(folder / "model.safetensors")
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"{folder}: weights do not fit this model ({first})") from None
    if optimizer is not None and (folder / "optimizer.safetensors").exists():
        ot = _load_tensors(folder / "optimizer.safetensors")
        ometa = json.loads((folder / "optimizer.json").read_text())
        optimizer.load_state_dict(optimizer_from_flat(ot, ometa))
    state = json.loads((folder / "state.json").read_text()) if (folder / "state.json").exists() else {}
    if (folder / "rng.safetensors").exists():
        state["rng"] = _load_tensors(folder / "rng.safetensors")
    return state
