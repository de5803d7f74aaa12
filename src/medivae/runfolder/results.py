"""A run folder's two record files, each read or written in one place. No torch: the report uses it.

``results.json``: one JSON object whose top-level keys belong to different tools ("evaluation",
"anomaly", "privacy", ...). :func:`merge_results` is its only writer: it replaces one key, keeps the
others, writes atomically, stores NaN/inf as ``null`` (strict JSON, which every reader can parse) and
never replaces a file it cannot read. :func:`read_results` is strict in the same way.

``metrics.jsonl``, the trainer's epoch log, is read by :func:`medivae.train.metrics.read_metrics`.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from medivae.runtime.errors import UserError
from medivae.runtime.io import atomic_write_text

RESULTS_FILE = "results.json"
ADAPTATION_FILE = "adaptation.json"  # an adapted anomaly run: which site normals it trained on (workflows/site.py)


def read_results(path: str | Path) -> dict:
    """The JSON object at ``path`` ({} if there is no file); a UserError if it cannot be read or is not one."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path}: exists but is not valid JSON; move it away and run again") from None
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror or e}); move it away and run again") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object; move it away and run again")
    return value


def merge_results(path: str | Path, key: str, block) -> dict:
    """Replace ``key`` in the results.json at ``path`` (created if absent), keeping every other key;
    atomic. Returns the block as written (NaN/inf as None, NumPy scalars as plain numbers)."""
    path = Path(path)
    existing = read_results(path)  # raises before anything is written
    existing[key] = _plain(block)
    atomic_write_text(path, json.dumps(existing, indent=2, allow_nan=False) + "\n")
    return existing[key]


def _plain(obj):
    """JSON-ready: NaN/inf -> None (strict JSON has no such numbers), NumPy/torch scalars -> Python."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if getattr(obj, "ndim", None) == 0 and hasattr(obj, "item"):  # np.float32(1.5), np.int64(3), 0-d arrays
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# --- the evaluation's two files, and the weights it was computed from ---------------------------------------
PER_IMAGE_FILE = "eval_per_image.npz"  # each metric per evaluated image; results.json names its SHA-256
STAGED_PER_IMAGE = ".eval_per_image.npz.staged"  # the next one, until results.json names it (evaluate)
MANIFEST = "manifest.json"  # a checkpoint folder's list of its files and their hashes (train/checkpoint.py)


def file_sha256(path: str | Path) -> str | None:
    """SHA-256 of a file's bytes, or None when it cannot be read."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def checkpoint_manifest(run_dir: str | Path, which: str) -> Path | None:
    """RUN/<which>/manifest.json as a reader opens it: the folder or its .prev twin (a kill between the two
    renames of a checkpoint swap), RUN/last/ when the run has no <which> at all; None without a checkpoint."""
    run_dir = Path(run_dir)
    for name in dict.fromkeys((which, "last")):
        folder, prev = run_dir / name, run_dir / f"{name}.prev"
        if folder.exists() or prev.exists():
            return next((f / MANIFEST for f in (folder, prev) if (f / MANIFEST).is_file()), None)
    return None


def checkpoint_sha256(run_dir: str | Path, which: str) -> str | None:
    """SHA-256 of the manifest of the run's ``which`` checkpoint: names those exact weights (None: no checkpoint)."""
    manifest = checkpoint_manifest(run_dir, which)
    return None if manifest is None else file_sha256(manifest)


def stale_evaluation(run_dir: str | Path, ev: dict) -> str | None:
    """Why results.json["evaluation"] no longer describes the run's weights (its checkpoint changed or is gone
    since, e.g. after ``train --resume``, or it has no record of them), or None when it does."""
    which = ev.get("checkpoint") if ev.get("checkpoint") in ("best", "last") else "best"
    recorded = ev.get("checkpoint_sha256")
    if not isinstance(recorded, str):
        return "it does not record which weights it evaluated (an evaluation by an earlier medivae)"
    now = checkpoint_sha256(run_dir, which)
    if now is None:
        return f"the {which}/ checkpoint it evaluated is gone"
    if now != recorded:
        return f"the {which}/ checkpoint has changed since (trained further?)"
    return None
