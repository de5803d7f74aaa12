"""`medivae compare`: identical runs agree, runs on other data are refused, the HTML is self-contained."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from medivae import api
from medivae.cli import main

from tiny import tiny_run

ARGS = ["-k", "4", "--reference-epochs", "1", "--no-progress", "--bootstrap", "200", "--device", "cpu"]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("compare") / "run"
    api.train(tiny_run("phantoms:120", epochs=1), out, progress=False)
    assert main(["evaluate", str(out), *ARGS]) == 0
    return out


def test_identical_runs_have_overlapping_intervals_and_p_one(evaluated, tmp_path, capsys):
    twin = tmp_path / "twin"
    shutil.copytree(evaluated, twin)
    out = tmp_path / "cmp.html"
    assert main(["compare", str(evaluated), str(twin), "--out", str(out), "--bootstrap", "200"]) == 0
    printed = capsys.readouterr().out
    assert "PSNR (dB)" in printed and "p=1" in printed
    cmp = api.compare([evaluated, twin], bootstrap=200)
    rows = {r["metric"]: r["values"] for r in cmp["rows"]}
    for metric in ("-ELBO (nats/image)", "PSNR (dB)", "SSIM"):
        a, b = rows[metric]
        assert a["ci95"][0] <= b["ci95"][1] and b["ci95"][0] <= a["ci95"][1], metric  # overlap
        assert b["vs_first"]["p_value"] == pytest.approx(1.0) and b["vs_first"]["mean_difference"] == 0
    assert rows["parameters"][0]["value"] > 0 and rows["training images/s (median epoch)"][0]["value"] > 0
    for metric in ("FD (reference features)", "precision", "recall", "density", "coverage"):
        a, b = rows[metric]  # the intervals evaluate saved (feature rows resampled), identical for twins
        assert a["ci95"] == b["ci95"] and a["ci95"][0] <= a["value"] <= a["ci95"][1], metric
    html = out.read_text()
    assert html.startswith("<!DOCTYPE html>") and "PSNR (dB)" in html
    assert "src='http" not in html and "href='http" not in html  # self-contained


def test_runs_on_different_data_are_refused_unless_forced(evaluated, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(evaluated, other)
    (other / "results.json").unlink()
    assert main(["evaluate", str(other), "--data", "phantoms:140", *ARGS]) == 0
    capsys.readouterr()
    assert main(["compare", str(evaluated), str(other)]) == 2
    err = capsys.readouterr().err
    assert "not evaluated on the same test set" in err and err.count("\n") == 1
    assert main(["compare", str(evaluated), str(other), "--force", "--bootstrap", "50"]) == 0


def test_a_run_without_evaluation_is_refused(evaluated, tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(evaluated, bare)
    (bare / "results.json").write_text(json.dumps({}))
    assert main(["compare", str(evaluated), str(bare)]) == 2
    assert "medivae evaluate" in capsys.readouterr().err


def test_a_zero_bootstrap_p_is_shown_as_a_bound():
    """No resample crossing 0 gives p = 0, which only says p < 2 / n_boot; the table must not print p=0."""
    from medivae.evaluation.bootstrap import paired_difference
    from medivae.report.compare import cell_text

    rng = np.random.default_rng(0)
    a = rng.normal(1.0, 0.1, 500)
    d = paired_difference(a, a - 1.0, n_boot=500)
    assert d["p_value"] == 0 and d["n_boot"] == 500
    text = cell_text({"value": 1.0, "vs_first": d})
    assert "p<0.004" in text and "p=0" not in text
    same = paired_difference(a, a + rng.normal(0, 0.1, 500), n_boot=500)
    assert "p=" in cell_text({"value": 1.0, "vs_first": same})
