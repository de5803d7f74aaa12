"""`medivae evaluate` end to end on a tiny phantoms run: results.json, merging, caching, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medivae import api
from medivae.cli import main

from tiny import tiny_run

ARGS = ["-k", "4", "--reference-epochs", "1", "--no-progress"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("evaluate") / "run"
    api.train(tiny_run("phantoms:120", epochs=1), out, progress=False)
    (out / "results.json").write_text(json.dumps({"report": {"kept": True}}))  # another tool's key
    return out


def test_evaluate_writes_results_and_keeps_other_keys(run_dir, capsys):
    assert main(["evaluate", str(run_dir), *ARGS]) == 0
    table = capsys.readouterr().out
    results = json.loads((run_dir / "results.json").read_text())
    assert results["report"] == {"kept": True}
    ev = results["evaluation"]
    assert ev["split"] == "test" and ev["n_images"] == ev["likelihood"]["n_images"] > 5
    lik = ev["likelihood"]
    assert lik["neg_iwae_nats"] <= lik["neg_iwae_nats_by_k"]["1"]
    assert lik["neg_elbo_bpd"] is None and "not a probability of 8-bit images" in table
    assert 0 <= ev["collapse"]["active_units"] <= ev["collapse"]["latent_dim"] == 4
    q = ev["sample_quality"]
    assert q["fd_name"] == "FD-cnn" and set(q["model"]) == set(q["floor"]) == {
        "fd", "precision", "recall", "density", "coverage"}
    assert "FD-cnn" in table and "FID" not in table.replace("FID (Inception)", "")
    assert 0 < ev["reconstruction"]["ssim"] <= 1


def test_second_call_reuses_the_reference_extractor_and_is_reproducible(run_dir):
    first = json.loads((run_dir / "results.json").read_text())["evaluation"]
    folders = sorted((run_dir / "reference").iterdir())
    ev = api.evaluate(run_dir, k=4, reference_epochs=1, progress=False)
    assert sorted((run_dir / "reference").iterdir()) == folders
    assert folders == [Path(first["sample_quality"]["reference_folder"])]
    for key in ("likelihood", "reconstruction", "collapse", "sample_quality"):
        assert ev[key] == first[key]


def test_table_shows_bits_per_dim_only_for_a_discrete_likelihood(run_dir):
    from medivae.evaluation.table import format_table

    ev = json.loads((run_dir / "results.json").read_text())["evaluation"]
    lik = ev["likelihood"]
    column = "nats/image  bits/dim"
    assert column not in format_table(ev)
    ev["likelihood"] = {**lik, "discrete_image_likelihood": True, "note": "", "neg_elbo_bpd": 4.25,
                        "neg_iwae_bpd": 4.125}
    ev["sample_quality"]["model"]["recall"] = None  # written as null when not finite
    table = format_table(ev)
    assert column in table and "4.1250" in table and "not a probability" not in table
    assert "n/a" in table


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--split", "holdout"], "unknown split"),
        (["-k", "0"], "k must be >= 1"),
        (["--data", "/no/such/folder"], "no such file"),
        (["--checkpoint", "middle"], "best or last"),
        (["--inception-weights", "/no/such.pth"], "no such Inception weights file"),
    ],
)
def test_bad_input_exits_2_with_one_line(run_dir, capsys, extra, message):
    assert main(["evaluate", str(run_dir), *ARGS, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("medivae: error:") and message in err and "\n" not in err


def test_missing_run_exits_2(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "nothing"), *ARGS]) == 2
    assert "no such run folder" in capsys.readouterr().err


def test_corrupt_results_json_is_reported_not_overwritten(run_dir, tmp_path, capsys):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "results.json").write_text("{broken")
    assert main(["evaluate", str(copy), *ARGS]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert (copy / "results.json").read_text() == "{broken"
