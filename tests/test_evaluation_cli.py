"""`medivae evaluate` end to end on a tiny phantoms run: results.json, merging, caching, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medivae import api
from medivae.cli import main
from medivae.data.cache import cache_root

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
        "fd", "precision", "recall", "density", "coverage", "hf_power_ratio"}
    # two real sets carry the same fine detail; one epoch of a tiny VAE gives blurry samples
    assert 0.8 < q["floor"]["hf_power_ratio"] < 1.25 and q["model"]["hf_power_ratio"] < 0.5
    assert q["extractor_version"] == 2 and ev["split_seed"] == 1767661200070
    assert "FD-cnn" in table and "FID" not in table.replace("FID (Inception)", "")
    assert q["reference_split"] == "val" and "vs val" in table  # held-out reference: copies cannot win
    assert 0 < ev["reconstruction"]["ssim"] <= 1
    # 95 % bootstrap intervals next to the means (issue 20), per-image values saved for medivae compare
    for key, mean in (("psnr_db", ev["reconstruction"]["psnr_db"]), ("neg_elbo_nats", lik["neg_elbo_nats"])):
        lo, hi = ev["ci95"][key]
        assert lo <= mean <= hi, key
    assert " [" in table and lik["quantity"] == "-log p(x)" and lik["iwae_ess"]["k"] == 4
    assert "HF power vs real" in table
    for key in ("fd", "precision", "recall", "density", "coverage", "hf_power_ratio"):  # rows resampled
        for prefix, block in (("", q["model"]), ("floor_", q["floor"])):
            lo, hi = ev["ci95"][prefix + key]
            assert lo <= block[key] <= hi, prefix + key
    fd_line = next(line for line in table.splitlines() if line.strip().startswith("FD-cnn"))
    assert fd_line.count(" [") == 2  # model and floor each with an interval
    assert ev["reconstruction"]["foreground"] is None and "psnr_fg_db" not in ev["reconstruction"]
    per = np.load(ev["per_image_file"])
    assert len(per["image_hash"]) == len(per["psnr_db"]) == len(per["neg_elbo"]) == ev["n_images"]
    assert per["psnr_db"].mean() == pytest.approx(ev["reconstruction"]["psnr_db"])


def test_second_call_reuses_the_reference_extractor_and_is_reproducible(run_dir):
    first = json.loads((run_dir / "results.json").read_text())["evaluation"]
    root = cache_root() / "reference"  # shared by every run on the same data
    folders = sorted(root.iterdir())
    ev = api.evaluate(run_dir, k=4, reference_epochs=1, progress=False)
    assert sorted(root.iterdir()) == folders
    assert Path(first["sample_quality"]["reference_folder"]) in folders
    assert first["sample_quality"]["reference_hash"] == Path(first["sample_quality"]["reference_folder"]).name
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


def test_foreground_psnr_and_ssim_with_intervals(run_dir, capsys):
    ev = api.evaluate(run_dir, k=2, reference_epochs=1, progress=False, foreground="otsu", bootstrap=100)
    rec = ev["reconstruction"]
    assert rec["foreground"] == "otsu" and 0 < rec["fg_fraction"] < 1  # phantoms: a body on black
    for key in ("psnr_fg_db", "ssim_fg"):
        lo, hi = ev["ci95"][key]
        assert lo <= rec[key] <= hi, key
    per = np.load(ev["per_image_file"])
    assert per["psnr_fg_db"].shape == per["psnr_db"].shape
    assert rec["psnr_fg_db"] == pytest.approx(np.nanmean(per["psnr_fg_db"])) != rec["psnr_db"]
    from medivae.evaluation.table import format_table

    assert "foreground (otsu mask" in format_table(ev)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--split", "holdout"], "unknown split"),
        (["-k", "0"], "--iwae-k: must be >= 1"),
        (["--data", "/no/such/folder"], "no such file"),
        (["--checkpoint", "middle"], "best or last"),
        (["--inception-weights", "/no/such.pth"], "no such Inception weights file"),
        (["--foreground", "magic"], "unknown foreground mask"),
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


def test_the_reference_extractor_is_one_per_dataset_not_per_run(tmp_path):
    """Two runs on the same data share the extractor's key (so their FD / precision / recall compare), whatever
    their model or training seed; other data, another split seed or another label filter get another."""
    import dataclasses

    from medivae.evaluation.features import reference_key
    from medivae.workflows.evaluate import reference_description

    def key(cfg, split_seed=None):
        data = cfg.data if split_seed is None else dataclasses.replace(cfg.data, split_seed=split_seed)
        return reference_key(reference_description(data))

    a = tiny_run("phantoms:120")
    b = dataclasses.replace(a, model=dataclasses.replace(a.model, latent_dim=8))  # another model, same data
    assert key(a) == key(b) == key(tiny_run("phantoms:120", seed=5))  # another training seed, same data
    assert key(a) != key(tiny_run("phantoms:200"))
    assert key(a) != key(a, split_seed=2)
    assert key(a) != key(dataclasses.replace(a, data=dataclasses.replace(a.data, labels=("normal",))))
    npz = tmp_path / "d.npz"
    np.savez(npz, train_images=np.zeros((4, 8, 8), np.uint8), train_labels=np.zeros((4, 1)))
    other = tmp_path / "e.npz"
    np.savez(other, train_images=np.ones((5, 8, 8), np.uint8), train_labels=np.zeros((5, 1)))
    on = lambda p: dataclasses.replace(a, data=dataclasses.replace(a.data, source=str(p)))  # noqa: E731
    assert key(on(npz)) == key(on(npz)) != key(on(other))


def test_the_sample_quality_reference_is_held_out_data():
    from medivae.workflows.evaluate import reference_split

    splits = {"train": [0] * 100, "val": [0] * 10, "test": [0] * 10}
    assert reference_split(splits, "test") == "val" and reference_split(splits, "val") == "test"
    assert reference_split({**splits, "val": [0] * 2}, "test") == "train"  # too few for k-NN: says so


def test_results_of_the_first_extractor_still_print_and_render(run_dir, tmp_path):
    """An evaluation block written before the detail features (no extractor_version, no high-frequency power)
    still prints as a table and renders in the report, which says it is not comparable with today's."""
    import shutil

    from medivae.evaluation.table import format_table
    from medivae.report.render import build

    old = tmp_path / "old"
    shutil.copytree(run_dir, old)
    results = json.loads((old / "results.json").read_text())
    q = results["evaluation"]["sample_quality"]
    del q["extractor_version"]
    for block in (q["model"], q["floor"]):
        del block["hf_power_ratio"]
    (old / "results.json").write_text(json.dumps(results))
    table = format_table(results["evaluation"])
    assert "FD-cnn" in table and "HF power" not in table and "Laplacian" not in table
    html = build(old)
    assert "older reference extractor without fine-detail features" in html
