"""anomaly score --calibration: the threshold set on normals from where the scored images come."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medivae.cli import main
from medivae.data.phantoms import make_phantoms
from medivae.evaluation.anomaly.calibration import conformal_rank

from tiny import TINY, png_folder

SCORE = ["--iwae-samples", "2", "--n-maps", "0", "--device", "cpu", "--fpr", "0.2", "--bootstrap", "0",
         "--no-progress"]


def _brighter_edges(images: np.ndarray) -> np.ndarray:
    out = images.astype(np.int16)
    out[..., :6] += 90
    out[..., -6:] += 90
    return np.clip(out, 0, 255).astype(np.uint8)


def _score(run, tmp_path, name, *extra):
    assert main(["anomaly", "score", str(run), "--out", str(tmp_path / "scored" / name), *SCORE, *extra]) == 0
    return json.loads((run / "results.json").read_text())["anomaly"]


def test_threshold_is_set_on_the_calibration_normals(normal_run, tmp_path, capsys):
    run = normal_run
    normals = make_phantoms(40, 32, seed=99, lesion_fraction=0.0).images
    plain = _score(run, tmp_path, "plain")
    err = capsys.readouterr().err
    assert "scoring" not in err and "MAP restoration" not in err  # --no-progress: no bars
    assert plain["threshold"]["calibrated_on"] == "validation normals"
    folder = png_folder(tmp_path / "site", normals)
    capsys.readouterr()
    r = _score(run, tmp_path, "site", "--calibration", str(folder))
    printed = capsys.readouterr().out
    t = r["threshold"]
    assert t["calibrated_on"] == {"source": str(folder), "normals": 40}
    assert t["n_calibration"] == 40 and t["rank"] == conformal_rank(40, 0.2)
    assert f"of {t['n_calibration']} normals of {folder}" in printed
    # the calibration normals are also checked against the training normals
    assert r["normal_shift"]["calibration"]["n_other"] == 40
    # and against the scored normals, which the bound is for: same generator, so no evidence of a difference
    vs = r["normal_shift"]["scored_vs_calibration"]
    assert (vs["n_reference"], vs["n_other"]) == (40, r["n_normal"]) and not vs["differ"]
    assert "vs the calibration normals" in printed and "no evidence that they differ" in printed
    # the scores themselves do not depend on where the threshold was set
    assert r["metrics"] == plain["metrics"]


def test_normals_that_score_higher_raise_the_threshold(normal_run, tmp_path):
    run = normal_run
    normals = make_phantoms(40, 32, seed=99, lesion_fraction=0.0).images
    low = _score(run, tmp_path, "a", "--calibration", str(png_folder(tmp_path / "same", normals)))
    edges = png_folder(tmp_path / "edges", _brighter_edges(normals))
    high = _score(run, tmp_path, "b", "--calibration", str(edges))
    assert high["threshold"]["value"] > low["threshold"]["value"]
    assert high["normal_shift"]["calibration"]["differ"] and not low["normal_shift"]["calibration"]["differ"]
    assert high["normal_shift"]["scored_vs_calibration"]["differ"]  # the scored normals are not brighter


def test_a_labelled_source_gives_its_normal_images_only(normal_run, tmp_path):
    run = normal_run
    normals = make_phantoms(30, 32, seed=5, lesion_fraction=0.0).images
    lesions = make_phantoms(30, 32, seed=6, lesion_fraction=1.0).images
    root = png_folder(tmp_path / "labelled", normals, "normal")
    png_folder(root, lesions, "lesion")
    r = _score(run, tmp_path, "labelled", "--calibration", str(root))
    assert r["threshold"]["calibrated_on"]["normals"] == 30


def test_a_conditional_model_scores_the_calibration_normals_as_its_normal_class(tmp_path):
    """Class folders sort "lesion" before "normal": the calibration images still get the run's own number for
    the normal class, so a labelled folder and a plain folder of the same normals give the same threshold."""
    run = tmp_path / "cvae"
    argv = ["anomaly", "fit", "--data", "phantoms:120", "--normal-label", "normal", "--out", str(run),
            "--model", "cvae", "--epochs", "1", "--seed", "3", *TINY]
    assert main(argv) == 0
    normals = make_phantoms(30, 32, seed=21, lesion_fraction=0.0).images
    labelled = png_folder(tmp_path / "labelled", normals, "normal")
    png_folder(labelled, make_phantoms(5, 32, seed=22, lesion_fraction=1.0).images, "lesion")
    a = _score(run, tmp_path, "a", "--calibration", str(labelled))["threshold"]
    b = _score(run, tmp_path, "b", "--calibration", str(png_folder(tmp_path / "plain", normals)))["threshold"]
    assert a["calibrated_on"]["normals"] == b["calibrated_on"]["normals"] == 30 and a["value"] == b["value"]


@pytest.mark.parametrize("case, message", [
    ("same", "--calibration must hold normals that are not scored"),
    ("own", "must not be the run's own source"),
    ("overlap", "2 of its 12 normal images are also training, validation or scored images"),
    ("other_labels", "do not include the normal label 'normal'"),
    ("too_few", "cannot bound the false-positive rate"),
])  # fmt: skip
def test_bad_calibration_exits_2_and_writes_nothing(normal_run, tmp_path, capsys, case, message):
    run = normal_run
    from medivae.runfolder.config import RunConfig
    from medivae.workflows.anomaly.sets import scoring_sets

    images = make_phantoms(12, 32, seed=4, lesion_fraction=0.0).images
    scored = str(png_folder(tmp_path / "scored", images))
    test_normals = scoring_sets(RunConfig.load(run / "config.json"), "normal", None, "test")["scored"]
    reused = np.concatenate([images[:10], test_normals.images[test_normals.labels == 0][:2]])
    source = {"same": scored, "own": "phantoms:200", "overlap": str(png_folder(tmp_path / "reused", reused)),
              "other_labels": str(png_folder(tmp_path / "cats", images, "cat")),
              "too_few": str(png_folder(tmp_path / "three", images[:3]))}[case]  # fmt: skip
    out = tmp_path / "scores"
    data = scored if case == "same" else "phantoms:200"
    rc = main(["anomaly", "score", str(run), "--out", str(out), *SCORE, "--data", data,
               "--calibration", source])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("medivae: error:") and message in err and err.count("\n") == 1
    assert not out.exists()
