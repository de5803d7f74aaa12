"""Smoke tests of benchmarks/applications.py and compare_families.py on built-in phantoms (1 epoch,
32 px): complete JSON whose every number sits inside its own interval, the commit and commands
recorded, and finished runs not trained again. Slow (a few minutes on 2 busy cores)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str, *argv) -> str:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), *map(str, argv)],
        check=True,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    return done.stdout


def _inside(cell: dict) -> bool:
    lo, hi = cell["ci95"]
    return lo <= cell["value"] <= hi


@pytest.mark.slow
def test_applications_end_to_end_on_phantoms(tmp_path):
    out = tmp_path / "applications.json"
    args = [
        "--data",
        "phantoms:300",
        "--runs",
        tmp_path / "runs",
        "--tiny",
        "--n-synthetic",
        "60",
        "--bootstrap",
        "100",
        "--out",
        out,
    ]
    _script("applications.py", *args)
    r = json.loads(out.read_text())
    assert len(r["commit"]) == 40 and len(r["executed"]) == 5  # fit, score, train, synthesize, utility
    assert r["commands"]["anomaly_fit"].startswith("medivae anomaly fit --data phantoms:300 --normal-label normal")
    assert r["run_settings"]["cvae"]["model"] == "cvae" and r["run_settings"]["anomaly"]["labels"] == ["normal"]
    an = r["anomaly"]
    assert an["default_score"] in an["scores"]
    assert {"png_size", "mean_intensity", "intensity_std"} <= set(an["trivial_baselines"])
    cells = [c for s in (*an["scores"].values(), *an["trivial_baselines"].values()) for c in (s["auroc"], s["auprc"])]
    cells += [r["privacy"]["memorisation_rate"], *r["privacy"]["membership_inference_auroc"].values()]
    cells += [
        r["utility"][k][m] for k in ("synthetic_only", "real_plus_synthetic", "real_only") for m in ("auc", "accuracy")
    ]
    assert all(_inside(c) for c in cells)
    table = _script("applications.py", "--markdown", out)
    assert f"**{an['default_score']}** (default" in table and "png_size" in table and "TSTR" in table
    _script("applications.py", *args)  # every run is finished: nothing runs again, the numbers stay
    again = json.loads(out.read_text())
    assert isinstance(again["executed"], str) and again["anomaly"] == an and again["utility"] == r["utility"]


@pytest.mark.slow
def test_compare_families_end_to_end_on_phantoms(tmp_path):
    out, md, html = tmp_path / "cmp.json", tmp_path / "cmp.md", tmp_path / "cmp.html"
    args = [
        "--data",
        "phantoms:300",
        "--runs",
        tmp_path / "runs",
        "--tiny",
        "--epochs",
        "1",
        "--threads",
        "1",
        "-k",
        "2",
        "--bootstrap",
        "100",
        "--out",
        out,
        "--md",
        md,
        "--html",
        html,
    ]
    _script("compare_families.py", *args)
    r = json.loads(out.read_text())
    assert r["compare"]["models"] == ["conv_vae", "beta_vae", "cvae"] and len(r["executed"]) == 6
    settings = r["run_settings"]
    assert [s["model"] for s in settings.values()] == ["conv_vae", "beta_vae", "cvae"]
    assert len({(s["source"], tuple(s["labels"]), s["seed"]) for s in settings.values()}) == 1  # one split
    rows = {row["metric"]: row["values"] for row in r["compare"]["rows"]}
    for metric in ("PSNR (dB)", "FD (reference features)", "precision", "recall"):
        assert all(_inside(c) for c in rows[metric]), metric
    assert all(c["vs_first"]["n_shared"] == r["compare"]["n_images"] for c in rows["PSNR (dB)"][1:])  # one split
    assert "beta_vae" in md.read_text() and html.read_text().startswith("<!DOCTYPE html>")
    _script("compare_families.py", *args)
    assert isinstance(json.loads(out.read_text())["executed"], str)
