"""Helpers the benchmark scripts share: the commit a result was made at, and what a reused run holds.

The scripts run as files (``python benchmarks/NAME.py``), so this folder is on ``sys.path`` and they
import ``common`` directly.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    """HEAD of the checkout the benchmark runs from ("" outside git)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def trained_epochs(out: Path) -> int:
    """Epochs a run's last/ checkpoint holds (0 when there is none)."""
    state = Path(out) / "last" / "state.json"
    return json.loads(state.read_text())["epoch"] if state.exists() else 0


def run_settings(run_dir: Path) -> dict:
    """What trained a run (its config.json): a finished run is reused, so the JSON says what made it."""
    c = json.loads((Path(run_dir) / "config.json").read_text())
    m, t, d = c["model"], c["train"], c["data"]
    return {
        "source": d["source"],
        "labels": d["labels"],
        "model": m["name"],
        "image_size": m["image_size"],
        "latent_dim": m["latent_dim"],
        "likelihood": m["likelihood"],
        "beta": m["beta"],
        "epochs": t["epochs"],
        "epochs_trained": trained_epochs(run_dir),
        "batch_size": t["batch_size"],
        "seed": t["seed"],
    }
