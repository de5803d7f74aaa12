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


def _seed_run(tmp_path: Path, seed: int, *extra: str) -> Path:
    """A conv_vae on the fixture's data (phantoms:120 at 32 px) with training seed ``seed``, evaluated."""
    from tiny import TINY

    out = tmp_path / f"seed{seed}"
    assert main(["train", "--data", "phantoms:120", "--seed", str(seed), "--epochs", "1", "--out", str(out),
                 *TINY, *extra]) == 0
    assert main(["evaluate", str(out), *ARGS]) == 0
    return out


def test_two_training_seeds_share_test_images_and_compare_with_intervals(evaluated, tmp_path, capsys):
    """The fixture's run (seed 1767661200070) and another seed: the same split seed (the default), so the same
    test images and the same reference extractor, and compare prints both runs' metrics with intervals."""
    from medivae.runfolder.run import load_run

    other = _seed_run(tmp_path, 7)
    a, b = (load_run(r, device="cpu") for r in (evaluated, other))
    assert a.config.train.seed != b.config.train.seed
    assert np.array_equal(a.split("test").images, b.split("test").images)
    q = [json.loads((r / "results.json").read_text())["evaluation"]["sample_quality"] for r in (evaluated, other)]
    assert q[0]["reference_hash"] == q[1]["reference_hash"] and q[0]["model"]["fd"] != q[1]["model"]["fd"]
    capsys.readouterr()
    assert main(["compare", str(evaluated), str(other), "--bootstrap", "200"]) == 0
    printed = capsys.readouterr().out
    assert "note:" not in printed
    for metric in ("FD (reference features)", "high-frequency power vs real", "precision", "PSNR (dB)"):
        line = next(ln for ln in printed.splitlines() if ln.startswith(f"| {metric} |"))
        cells = line.strip("|").split("|")[1:]
        assert len(cells) == 2 and all(" [" in c for c in cells), line  # both runs, each with an interval


def test_results_from_an_older_extractor_are_marked_not_compared_silently(evaluated, tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(evaluated, old)
    results = json.loads((old / "results.json").read_text())
    q = results["evaluation"]["sample_quality"]
    del q["extractor_version"]  # as medivae wrote it before the detail features
    q["model"].pop("hf_power_ratio")
    q["reference_hash"] = "ae-0123456789ab"
    (old / "results.json").write_text(json.dumps(results))
    capsys.readouterr()
    assert main(["compare", str(evaluated), str(old), "--bootstrap", "50"]) == 0
    printed = capsys.readouterr().out
    assert f"note: {old} was scored by an older reference extractor" in printed
    assert f"rerun 'medivae evaluate {old}'" in printed
    fd = next(ln for ln in printed.splitlines() if ln.startswith("| FD (reference features) |"))
    assert fd.count("other extractor") == 1  # the old run's cell only
    psnr = next(ln for ln in printed.splitlines() if ln.startswith("| PSNR (dB) |"))
    assert "other extractor" not in psnr and "p=1" in psnr  # reconstructions compare as before


def test_a_run_made_before_split_seed_keeps_its_split_and_says_why_it_differs(evaluated, tmp_path, capsys):
    """Before data.split_seed, the training seed split the data (and drew the phantoms). A run folder without
    split_seed keeps that split; compare with a run of today names the split seeds as the reason."""
    from medivae.runfolder.run import load_run
    from medivae.train import checkpoint as ckpt

    run = _seed_run(tmp_path, 5, "--split-seed", "5")  # what medivae did for --seed 5 before split_seed
    before = load_run(run, device="cpu").split("test").images
    cfg = json.loads((run / "config.json").read_text())
    del cfg["data"]["split_seed"]
    (run / "config.json").write_text(json.dumps(cfg))
    ckpt.save_checkpoint(run / "best", load_run(run, device="cpu").model, cfg)  # as an older medivae saved it
    opened = load_run(run, device="cpu")
    assert opened.config.data.split_seed == 5
    assert np.array_equal(opened.split("test").images, before)
    assert not np.array_equal(load_run(evaluated, device="cpu").split("test").images, before)
    capsys.readouterr()
    assert main(["compare", str(evaluated), str(run)]) == 2
    err = capsys.readouterr().err
    assert "different test images (split seeds 1767661200070 vs 5" in err and err.count("\n") == 1
    assert f"{run} predate data.split_seed: the training seed split the data" in err


def test_runs_on_copies_of_the_same_data_at_two_paths_compare(tmp_path, capsys):
    """Two runs trained from two copies of one .npz (another folder, another machine's checkout): the same test
    images and the same reference extractor, so compare prints both instead of refusing them."""
    rng = np.random.default_rng(0)
    imgs, labels = rng.integers(0, 256, (60, 28, 28), dtype=np.uint8), (np.arange(60) % 2)[:, None]
    first = tmp_path / "tmp" / "shared" / "d.npz"
    first.parent.mkdir(parents=True)
    np.savez(first, train_images=imgs, train_labels=labels)
    second = tmp_path / "work" / "shared" / "d.npz"
    second.parent.mkdir(parents=True)
    shutil.copyfile(first, second)
    runs = []
    for i, source in enumerate((first, second)):
        run = tmp_path / f"run{i}"
        api.train(tiny_run(str(source), epochs=1), run, progress=False)
        assert main(["evaluate", str(run), *ARGS]) == 0
        runs.append(run)
    capsys.readouterr()
    assert main(["compare", *map(str, runs), "--bootstrap", "50"]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    q = [json.loads((r / "results.json").read_text())["evaluation"] for r in runs]
    assert q[0]["data"] != q[1]["data"] and q[0]["data_identity"] == q[1]["data_identity"]
    assert q[0]["sample_quality"]["reference_hash"] == q[1]["sample_quality"]["reference_hash"]
    assert "note:" not in printed
    fd = next(ln for ln in printed.splitlines() if ln.startswith("| FD (reference features) |"))
    assert "other extractor" not in fd and len(fd.strip("|").split("|")[1:]) == 2
