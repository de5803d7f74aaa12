"""benchmarks/anomaly_protocol.py --ensemble: the ensemble over seeds and families puts every run's default
score on its own validation normals' scale before averaging (fake runs, no training)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import anomaly_protocol as ap  # noqa: E402

from medivae.evaluation.anomaly.detection import detection_metrics  # noqa: E402


def _run(folder: Path, default: str, scores: np.ndarray, y: np.ndarray, mu: float, sd: float) -> None:
    (folder / "anomaly").mkdir(parents=True)
    protocol = {"default": default, "val_normal_stats": {default: [mu, sd], "other": [0.0, 1.0]}}
    (folder / "results.json").write_text(json.dumps({"anomaly": {"protocol": protocol}}))
    with open(folder / "anomaly" / "scores.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "label", "is_anomaly", "flagged", default, "other"])
        for i, (s, a) in enumerate(zip(scores, y, strict=True)):
            w.writerow([i, int(a), int(a), 0, s, -s])


def _result(path: Path, runs: Path, family: str | None, seeds) -> Path:
    fit_args = ["--image-size", "32", "--compile"] + (["--model", family] if family else [])
    path.write_text(json.dumps({"runs": str(runs), "seeds": {str(s): {} for s in seeds}, "fit_args": fit_args}))
    return path


def test_ensemble_z_scores_each_run_on_its_own_validation_normals(tmp_path):
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(40), np.ones(60)].astype(bool)
    signal = y + rng.normal(0, 0.8, len(y))
    # family a: the signal on a unit scale; family b: the *negated noise* on a scale 1000x larger, which
    # would swamp the signal in a raw mean but weighs the same as any other run once z-scored
    noise = rng.normal(0, 1, len(y))
    _run(tmp_path / "a" / "seed0", "ssim", signal, y, 0.0, 1.0)
    _run(tmp_path / "a" / "seed1", "ssim", signal + 0.1, y, 0.1, 1.0)
    _run(tmp_path / "b" / "seed0", "restoration", 1000 * noise + 5, y, 5.0, 1000.0)
    results = [_result(tmp_path / "ra.json", tmp_path / "a", None, [0, 1]),
               _result(tmp_path / "rb.json", tmp_path / "b", "vae_gan", [0])]
    r = ap.family_ensemble(results, n_boot=50)
    expected = np.mean([signal, signal, noise], axis=0)
    assert r["all"]["auroc"] == pytest.approx(detection_metrics(expected, y)["auroc"], abs=1e-9)
    assert r["all"]["auroc"] > detection_metrics(np.mean([signal, signal + 0.1, 1000 * noise + 5], 0), y)["auroc"]
    assert set(r["per_family_seed_ensemble"]) == {"conv_vae", "vae_gan"}
    assert r["per_family_seed_ensemble"]["conv_vae"]["runs"] == 2
    assert [m["default"] for m in r["members"]] == ["ssim", "ssim", "restoration"]
    lo, hi = r["all"]["ci95"]["auroc"]
    assert lo <= r["all"]["auroc"] <= hi


def test_ensemble_refuses_runs_that_scored_other_images(tmp_path):
    y = np.r_[np.zeros(5), np.ones(5)].astype(bool)
    _run(tmp_path / "a" / "seed0", "ssim", np.arange(10.0), y, 0.0, 1.0)
    _run(tmp_path / "b" / "seed0", "ssim", np.arange(10.0), ~y, 0.0, 1.0)
    results = [_result(tmp_path / "ra.json", tmp_path / "a", None, [0]),
               _result(tmp_path / "rb.json", tmp_path / "b", "hierarchical_vae", [0])]
    with pytest.raises(SystemExit, match="other images"):
        ap.family_ensemble(results, n_boot=10)
