"""Hostile input missed by tests/test_hostile_input.py and tests/test_fuzz.py: damaged run folders met by a
resume, outputs aimed into a run's own folders. Each ends in exit code 2, one line ``medivae: error: ...`` and
nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from medivae.cli import main

from tiny import refused, snapshot


@pytest.fixture
def run(evaluated_run, tmp_path) -> Path:
    """A private copy of the session's evaluated run, to change."""
    return Path(shutil.copytree(evaluated_run, tmp_path / "run"))


RESUME = ["--epochs", "3", "--no-progress", "--device", "cpu"]


@pytest.mark.parametrize("damage", ["model", "optimizer", "rng", "manifest"])
def test_a_resume_refused_for_a_damaged_last_checkpoint_changes_no_file(run, capsys, damage):
    """The checkpoint was read only after config.json (with the grown --epochs) and env.json were rewritten."""
    target = {"model": "model.safetensors", "optimizer": "optimizer.safetensors", "rng": "rng.safetensors",
              "manifest": "manifest.json"}[damage]
    (run / "last" / target).write_bytes(b"\0" * 10)
    before = snapshot(run)
    line = refused(capsys, ["train", "--resume", "--out", run, *RESUME])
    assert "last" in line
    assert snapshot(run) == before


def test_a_resume_without_last_but_with_best_does_not_start_over(run, capsys):
    """Without last/ the resume began a new run at epoch 1, replacing best/ and metrics.jsonl."""
    shutil.rmtree(run / "last")
    before = snapshot(run)
    line = refused(capsys, ["train", "--resume", "--out", run, *RESUME])
    assert "last/ is missing" in line
    assert snapshot(run) == before


@pytest.mark.parametrize("argv, out", [
    (["sample", "{run}", "-n", "4"], "last/mine.png"),
    (["sample", "{run}", "-n", "4"], "best/pngs"),
    (["encode", "{run}"], "best/codes.npz"),
    (["reconstruct", "{run}", "-n", "2"], "last/../best/r.png"),
    (["report", "{run}"], "best/report.html"),
    (["train", "--data", "phantoms:20", "--epochs", "1", "--no-progress"], "last/new-run"),
], ids=["sample-file", "sample-folder", "encode", "dotdot", "report", "train"])
def test_an_output_inside_a_checkpoint_folder_is_refused(run, capsys, argv, out):
    """The next checkpoint save swaps best/ or last/ whole and so deleted such a file, and every load until then
    warned about a file the manifest does not list."""
    before = snapshot(run)
    line = refused(capsys, [a.format(run=run) for a in argv] + ["--out", run / out])
    assert "checkpoint folder" in line
    assert snapshot(run) == before


def test_outputs_beside_the_checkpoints_and_folders_merely_named_best_are_written(run, tmp_path, capsys):
    assert main(["sample", str(run), "-n", "4", "--out", str(run / "mine.png")]) == 0
    (tmp_path / "config.json").write_text("{}")  # a folder named best/ beside a config.json of something else
    assert main(["sample", str(run), "-n", "4", "--out", str(tmp_path / "best" / "s.png")]) == 0
    assert (tmp_path / "best" / "s.png").is_file()


TRAIN = ["train", "--data", "phantoms:20", "--image-size", "32", "--latent-dim", "2", "--base-width", "4",
         "--epochs", "1", "--no-progress", "--device", "cpu"]


@pytest.mark.parametrize("env", [
    {"RANK": "1"},  # left in the shell: the run trained as a non-main rank, wrote nothing and exited 0
    {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "0"},
    {"RANK": "-1", "WORLD_SIZE": "2"},
    {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"},  # no MASTER_ADDR/PORT: init_process_group's traceback
], ids=["rank-1-alone", "world-0", "rank-negative", "no-master"])
def test_torchrun_variables_that_do_not_fit_together_are_one_line(tmp_path, capsys, monkeypatch, env):
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    line = refused(capsys, [*TRAIN, "--out", tmp_path / "run"])
    assert "torchrun" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key, value", [("image_size", 64), ("channels", 3)])
def test_a_config_file_whose_data_and_model_sizes_differ_is_one_line(evaluated_run, tmp_path, capsys, key, value):
    """The network was built for model.image_size and fed data.image_size: a shape error from torch after the
    data loaded, with a run folder started."""
    cfg = json.loads((evaluated_run / "config.json").read_text())
    cfg["model"][key] = value
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    line = refused(capsys, ["train", "--config", tmp_path / "cfg.json", "--epochs", "1", "--no-progress",
                            "--out", tmp_path / "run"])
    assert f"model.{key} = {value}" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("pair", ["image_size=64", "channels=3"])
@pytest.mark.parametrize("command", [["train"], ["anomaly", "fit", "--normal-label", "normal"]])
def test_model_arg_image_size_or_channels_points_to_its_flag(tmp_path, capsys, command, pair):
    """model_config() got multiple values for keyword argument: a TypeError traceback."""
    line = refused(capsys, [*command, "--data", "phantoms:20", "--model-arg", pair, "--out", tmp_path / "run"])
    assert "--" + pair.split("=")[0].replace("_", "-") in line
    assert not (tmp_path / "run").exists()


def test_data_inspect_with_two_different_sources_is_one_line(tmp_path, capsys, monkeypatch):
    """SOURCE won and --data was ignored without a word."""
    monkeypatch.chdir(tmp_path)
    line = refused(capsys, ["data", "inspect", "phantoms:20", "--data", "phantoms:30", "--no-progress"])
    assert "phantoms:20" in line and "phantoms:30" in line
    assert list(tmp_path.iterdir()) == []
    assert main(["data", "inspect", "phantoms:20", "--data", "phantoms:20", "--no-progress"]) == 0


@pytest.mark.parametrize("argv", [
    [*TRAIN, "--out", "{tmp}/new"],
    ["evaluate", "{run}", "--no-progress"],
    ["anomaly", "adapt", "{run}", "--normals", "phantoms:20", "--out", "{tmp}/adapted"],
], ids=["train", "evaluate", "anomaly-adapt"])
def test_a_thread_count_past_any_machine_is_one_line(run, tmp_path, capsys, argv):
    """--threads 100000 ran the process out of threads: RuntimeError: can't start new thread, then a segfault."""
    before = snapshot(run)
    line = refused(capsys, [a.format(tmp=tmp_path, run=run) for a in argv] + ["--threads", "100000"])
    assert "1024" in line
    assert snapshot(run) == before and not (tmp_path / "adapted").exists() and not (tmp_path / "new").exists()


def _synthetic_folder(folder: Path) -> Path:
    """A folder laid out as 'medivae synthesize' writes it (images/ + labels.csv), of two-class phantoms."""
    from PIL import Image

    from medivae.data.phantoms import make_phantoms

    phantoms = make_phantoms(20, 32, 0)
    (folder / "images").mkdir(parents=True)
    rows = ["path,label"]
    for i, (image, label) in enumerate(zip(phantoms.images, phantoms.labels, strict=True)):
        Image.fromarray(image[0]).save(folder / "images" / f"{i}.png")
        rows.append(f"images/{i}.png,{phantoms.label_names[label]}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder


@pytest.mark.parametrize("argv, name", [
    (["encode", "{run}"], "eval_per_image.npz"),
    (["utility", "--run", "{run}", "--synthetic", "{syn}", "--epochs", "1", "--no-progress"], "results.json"),
    (["utility", "--run", "{run}", "--synthetic", "{syn}", "--epochs", "1", "--no-progress"], "config.json"),
], ids=["encode-per-image", "utility-results", "utility-config"])
def test_an_output_never_replaces_a_run_folders_own_record(run, tmp_path, capsys, argv, name):
    """With --force, encode replaced the evaluation's per-image file and utility results.json or config.json: the
    run's evaluation (or the run itself) was gone."""
    syn = _synthetic_folder(tmp_path / "syn")
    before = snapshot(run)
    line = refused(capsys, [a.format(run=run, syn=syn) for a in argv] + ["--out", run / name, "--force"])
    assert f"own {name}" in line
    assert snapshot(run) == before


def test_the_record_files_listed_for_outputs_are_the_ones_the_run_folder_writes():
    from medivae.runfolder.results import ADAPTATION_FILE, PER_IMAGE_FILE, RESULTS_FILE
    from medivae.runtime.paths import RUN_RECORD_FILES
    from medivae.train.metrics import METRICS_FILE

    assert {ADAPTATION_FILE, PER_IMAGE_FILE, RESULTS_FILE, METRICS_FILE, "config.json"} <= RUN_RECORD_FILES
