"""Read a run folder into plain Python values: JSON files, metrics lines and figure paths. No torch."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from medivae.runfolder.results import RESULTS_FILE, read_results
from medivae.runtime.errors import UserError
from medivae.train.metrics import read_metrics

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SKIP_DIRS = ("last", "best", "last.prev", "best.prev", "tensorboard")
# keys that could lead back to a person; dropped from anything the report shows
PRIVATE_KEY_PARTS = ("patient", "subject", "accession", "study_uid", "series", "sop_instance", "groups")


@dataclass
class RunFiles:
    run_dir: Path
    config: dict | None = None
    data: dict | None = None
    env: dict | None = None
    results: dict = field(default_factory=dict)
    metrics: list[dict] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)  # relative to run_dir, sorted
    problems: list[str] = field(default_factory=list)  # unreadable files, shown in the report


def read_run(run_dir: str | Path) -> RunFiles:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run folder")
    run = RunFiles(run_dir)
    run.config = _read_json(run_dir / "config.json", run.problems)
    run.data = public(_read_json(run_dir / "data.json", run.problems))
    run.env = _read_json(run_dir / "env.json", run.problems)
    run.results = _read_results(run_dir / RESULTS_FILE, run.problems)
    run.metrics = read_metrics(run_dir, run.problems)
    run.images = find_images(run_dir)
    if run.config is None and not run.metrics and not run.results and not run.images:
        raise UserError(f"{run_dir}: not a medivae run folder (no config.json or metrics.jsonl)")
    return run


def _read_json(path: Path, problems: list[str]):
    if not path.exists():
        return None
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        problems.append(f"{path.name} could not be read ({type(e).__name__}: {e})")
        return None
    if not isinstance(value, dict):
        problems.append(f"{path.name} is not a JSON object")
        return None
    return value


def _read_results(path: Path, problems: list[str]) -> dict:
    try:
        return read_results(path)
    except UserError as e:  # the report still shows everything else, and says what it could not read
        problems.append(str(e))
        return {}


def find_images(run_dir: Path) -> list[Path]:
    """Figures in the run folder and one level of subfolders (checkpoint folders excluded)."""
    found = [p for p in run_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    for sub in sorted(run_dir.iterdir()):
        if sub.is_dir() and sub.name not in SKIP_DIRS and not sub.name.startswith("."):
            found += [p for p in sub.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    return sorted(p.relative_to(run_dir) for p in found)


def public(value):
    """``value`` with every key that could identify a patient removed, at any depth."""
    if isinstance(value, dict):
        return {k: public(v) for k, v in value.items() if not any(s in k.lower() for s in PRIVATE_KEY_PARTS)}
    if isinstance(value, list):
        return [public(v) for v in value]
    return value


def series(metrics: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) of one metric, skipping epochs where it is absent or not a number."""
    xs, ys = [], []
    for row in metrics:
        v = row.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(row["epoch"])
            ys.append(float(v))
    return xs, ys


def find_key(tree, match, depth: int = 0):
    """(key, value) of the first entry in a nested dict whose (key, value) satisfies ``match``."""
    if not isinstance(tree, dict) or depth > 4:
        return None
    for k, v in tree.items():
        if match(str(k).lower(), v):
            return k, v
    for v in tree.values():
        hit = find_key(v, match, depth + 1)
        if hit is not None:
            return hit
    return None


def is_numbers(v, min_len: int = 2) -> bool:
    return (
        isinstance(v, list)
        and len(v) >= min_len
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
    )
