"""``metrics.jsonl``: one JSON object per training epoch, written by the trainer. :func:`read_metrics` is
its only reader and is tolerant: a run killed mid-write or edited by hand still shows its good lines.
No torch: the report uses it."""

from __future__ import annotations

import json
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


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
