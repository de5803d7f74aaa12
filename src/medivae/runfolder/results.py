"""A run folder's two record files, each read or written in one place. No torch: the report uses it.

``results.json``: one JSON object whose top-level keys belong to different tools ("evaluation",
"anomaly", "privacy", ...). :func:`merge_results` is its only writer: it replaces one key, keeps the
others, writes atomically, stores NaN/inf as ``null`` (strict JSON, which every reader can parse) and
never replaces a file it cannot read. :func:`read_results` is strict in the same way.

``metrics.jsonl``, the trainer's epoch log, is read by :func:`medivae.train.metrics.read_metrics`.
"""

from __future__ import annotations

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
