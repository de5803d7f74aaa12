"""A run folder's two record files, each read or written in one place. No torch: the report uses it.

``results.json``: one JSON object whose top-level keys belong to different tools ("evaluation",
"anomaly", "privacy", ...). :func:`merge_results` is its only writer: it replaces one key, keeps the
others, writes atomically, stores NaN/inf as ``null`` (strict JSON, which every reader can parse) and
never replaces a file it cannot read. :func:`read_results` is strict in the same way.

``metrics.jsonl``: one JSON object per training epoch, written by the trainer. :func:`read_metrics` is
its only reader and is tolerant: a run killed mid-write or edited by hand still shows its good lines.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from medivae.errors import UserError
from medivae.io import atomic_write_text

RESULTS_FILE = "results.json"
METRICS_FILE = "metrics.jsonl"


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


def read_metrics(path: str | Path, problems: list[str] | None = None) -> list[dict]:
    """The rows of a metrics.jsonl (``path`` is the file or the run folder holding it), sorted by epoch;
    [] if there is none. Lines that are not a JSON object with an integer ``epoch`` are skipped, and
    counted in ``problems`` when a list is given."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.exists():
        return []
    rows, bad = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(row, dict) and type(row.get("epoch")) is int:
            rows.append(row)
        else:
            bad += 1
    if bad and problems is not None:
        problems.append(f"{path.name}: {bad} unreadable line(s) skipped")
    return sorted(rows, key=lambda r: r["epoch"])
