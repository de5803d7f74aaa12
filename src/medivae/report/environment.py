"""env.json: the software and hardware a run was trained with, recorded at train time for its report."""

from __future__ import annotations

import json
import platform
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from medivae.runtime.io import atomic_write_text

# versions read from package metadata, so recording them never imports torch
PACKAGES = ("medivae", "torch", "numpy", "scipy", "scikit-learn", "scikit-image", "matplotlib", "pillow")


def package_versions(names=PACKAGES) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def environment(**run_facts) -> dict:
    """Python, OS and package versions plus what the caller knows (device, seed, precision, threads)."""
    return {
        "recorded_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        **run_facts,
        "packages": package_versions(),
    }


def write_environment(run_dir: str | Path, **run_facts) -> Path:
    path = Path(run_dir) / "env.json"
    atomic_write_text(path, json.dumps(environment(**run_facts), indent=2, default=str) + "\n")
    return path
