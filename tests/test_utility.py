"""Utility of synthetic data: metrics on constructed predictions, TSTR on a separable problem, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medivae.cli import main
from medivae.data.imageset import ImageSet
from medivae.evaluation import utility as ut
from medivae.workflows.synthesize import write_synthetic
from medivae.workflows.utility import load_synthetic

NAMES = ("dark", "bright")


def _separable(n: int, seed: int, size: int = 16) -> ImageSet:
    """Class 0 dark, class 1 bright, both noisy: any working classifier separates them."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    base = np.where(labels == 1, 170.0, 70.0)[:, None, None, None]
    images = np.clip(base + rng.normal(0, 25, (n, 1, size, size)), 0, 255).astype(np.uint8)
    return ImageSet(images, labels, NAMES)


def test_metrics_of_perfect_and_of_inverted_predictions():
    labels = np.array([0, 1, 1, 0, 1])
    perfect = np.eye(2)[labels] * 0.8 + 0.1
    m = ut.classification_metrics(perfect, labels, NAMES)
    assert m["auc"] == 1.0 and m["accuracy"] == 1.0 and m["recall"] == {"dark": 1.0, "bright": 1.0}
    inverted = ut.classification_metrics(perfect[:, ::-1], labels, NAMES)
    assert inverted["auc"] == 0.0 and inverted["accuracy"] == 0.0


def test_tstr_on_a_separable_problem_reaches_high_accuracy():
    r = ut.tstr(
        _separable(64, 1),
        _separable(96, 2),
        _separable(60, 3),
        epochs=8,
        seed=0,
        width=4,
        progress=False,
        batch_size=16,
    )
    assert set(r) == {"synthetic_only", "real_plus_synthetic", "real_only"}
    assert r["synthetic_only"]["accuracy"] >= 0.9 and r["synthetic_only"]["auc"] >= 0.95
    assert r["real_plus_synthetic"]["n_train"] == 64 + 96


def test_tstr_on_mislabelled_synthetic_data_is_worse_than_chance():
    flipped = _separable(96, 2)
    flipped.labels = 1 - flipped.labels
    r = ut.tstr(
        _separable(64, 1),
        flipped,
        _separable(60, 3),
        epochs=8,
        seed=0,
        width=4,
        progress=False,
        batch_size=16,
    )
    assert r["synthetic_only"]["auc"] < 0.5 < r["real_only"]["auc"]


@pytest.fixture
def real_npz(tmp_path):
    path = tmp_path / "real.npz"
    sizes = [("train", 64), ("val", 16), ("test", 40)]
    splits = {s: _separable(n, i, size=32) for i, (s, n) in enumerate(sizes)}
    np.savez(
        path,
        **{f"{s}_images": v.images[:, 0] for s, v in splits.items()},
        **{f"{s}_labels": v.labels[:, None] for s, v in splits.items()},
    )
    return path


def test_utility_cli_end_to_end(real_npz, tmp_path, capsys):
    syn = _separable(48, 9, size=32)
    names = ["0" if c == 0 else "1" for c in syn.labels]  # the npz's own label names
    write_synthetic(tmp_path / "syn", syn.images, names, ("0", "1"), "npz")
    out = tmp_path / "u.json"
    argv = ["utility", "--real", str(real_npz), "--synthetic", str(tmp_path / "syn"), "--out", str(out)]
    assert main([*argv, *"--epochs 2 --width 4 --batch-size 16 --no-progress --device cpu".split()]) == 0
    r = json.loads(out.read_text())
    assert r["n_synthetic"] == 48 and r["real_only"]["n_test"] == 40
    assert set(r["synthetic_only"]["recall"]) == {"0", "1"}
    assert "synthetic_only" in capsys.readouterr().out


def test_png_and_npz_folders_load_the_same(tmp_path):
    syn = _separable(6, 9, size=32)
    names = ["0", "1", "0", "1", "0", "1"]
    for fmt in ("png", "npz"):
        write_synthetic(tmp_path / fmt, syn.images, names, ("0", "1"), fmt)
    (a, la), (b, lb) = load_synthetic(tmp_path / "png"), load_synthetic(tmp_path / "npz")
    np.testing.assert_array_equal(a, syn.images)
    np.testing.assert_array_equal(b, syn.images)
    assert la == lb == names


def test_utility_bad_input_exits_2(real_npz, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["utility", "--real", str(real_npz), "--synthetic", str(empty)]) == 2
    assert "labels.csv" in capsys.readouterr().err
    syn = _separable(8, 9, size=32)
    write_synthetic(tmp_path / "odd", syn.images, ["tumour"] * 8, (), "png")
    assert main(["utility", "--real", str(real_npz), "--synthetic", str(tmp_path / "odd")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medivae: error:") and "tumour" in err


# --- the real data of a run: its own split and labels (issue 20, bug 1) -------------------------------------
def _run_on(source: str, labels: tuple[str, ...], folder):
    import dataclasses

    import torch

    from medivae.runfolder.run import Run
    from medivae.runtime.seeding import DEFAULT_SEED

    from tiny import tiny_run

    cfg = tiny_run(source, seed=DEFAULT_SEED)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, labels=labels))
    return Run(folder, cfg, None, torch.device("cpu"))  # splits() needs only the config


def test_utility_with_a_run_tests_on_no_image_the_run_trained_on(tmp_path):
    from medivae.workflows.utility import _source_splits, image_hashes, run_real_splits

    run = _run_on("phantoms:600", ("lesion",), tmp_path / "lesion")
    trained = set(image_hashes(run.splits()["train"].images))
    splits, info = run_real_splits([run])
    test = splits["test"]
    assert not trained & set(image_hashes(test.images))
    assert set(np.unique(test.labels)) == {0, 1} and info["labels_from_rest_of_source"] == ["normal"]
    lesion = test.label_names.index("lesion")
    own_test = run.splits()["test"]
    assert sorted(image_hashes(test.images[test.labels == lesion])) == sorted(image_hashes(own_test.images))
    # the bug: utility's own re-split of the source put training images of the run in its test set
    old, _ = _source_splits("phantoms:600", 32, 1, None, 0.1, 0.1)
    assert trained & set(image_hashes(old["test"].images))


def test_two_one_class_runs_share_no_image_between_any_training_set_and_the_test_set(tmp_path):
    from medivae.workflows.utility import image_hashes, run_real_splits

    runs = [_run_on("phantoms:300", (c,), tmp_path / c) for c in ("lesion", "normal")]
    splits, info = run_real_splits(runs)
    trained = set().union(*(set(image_hashes(r.splits()["train"].images)) for r in runs))
    assert not trained & set(image_hashes(splits["test"].images))
    assert info["labels_from_rest_of_source"] == []


def test_a_real_source_that_is_not_the_runs_is_refused(tmp_path):
    from medivae.runtime.errors import UserError
    from medivae.workflows.utility import _check_same_data

    run = _run_on("phantoms:600", ("lesion",), tmp_path / "lesion")
    _check_same_data([run], "phantoms:600")
    with pytest.raises(UserError, match="not the source the run"):
        _check_same_data([run], "phantoms:500")
    with pytest.raises(UserError, match="differ in"):
        _check_same_data([run, _run_on("phantoms:300", ("normal",), tmp_path / "n")], None)


def test_utility_cli_with_a_run(tmp_path, capsys):
    import dataclasses

    from medivae import api

    from tiny import tiny_run

    cfg = tiny_run("phantoms:160", epochs=1)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, labels=("lesion",)))
    run = api.train(cfg, tmp_path / "run", progress=False)
    syn = _separable(24, 9, size=32)
    write_synthetic(tmp_path / "syn", syn.images, ["normal" if c == 0 else "lesion" for c in syn.labels],
                    ("normal", "lesion"), "npz")
    out = tmp_path / "u.json"
    argv = ["utility", "--run", str(run), "--synthetic", str(tmp_path / "syn"), "--out", str(out)]
    tail = "--epochs 1 --width 4 --batch-size 16 --no-progress --device cpu --bootstrap 50".split()
    assert main([*argv, *tail]) == 0
    r = json.loads(out.read_text())
    assert r["real"] == "phantoms:160" and r["real_split"]["runs"] == [str(run)]
    lo, hi = r["real_only"]["ci95"]["accuracy"]
    assert lo <= r["real_only"]["accuracy"] <= hi
    assert " [" in capsys.readouterr().out
    assert main([*argv, "--real", "phantoms:150", "--force", *tail]) == 2  # u.json exists
    assert "not the source the run" in capsys.readouterr().err
