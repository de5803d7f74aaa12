"""The classifier two-sample test of scored normals against training normals (evaluation/anomaly/shift.py)."""

from __future__ import annotations

import numpy as np
import pytest

from medivae.data.phantoms import make_phantoms
from medivae.evaluation.anomaly.shift import _pooled, normal_shift, two_sample_test

ARTICLE_SEED = 1767661200070


@pytest.fixture(scope="module")
def normals():
    """Lesion-free phantoms: 240 as the training normals, 120 more from the same generator."""
    x = make_phantoms(360, 32, seed=3, lesion_fraction=0.0).images
    return x[:240], x[240:]


def reframed(images: np.ndarray, gain: int = 40) -> np.ndarray:
    """The same anatomy framed differently: the left and right four columns brighter (arms in the field)."""
    out = images.astype(np.int16)
    out[..., :4] += gain
    out[..., -4:] += gain
    return np.clip(out, 0, 255).astype(np.uint8)


def test_normals_from_the_same_generator_are_alike(normals):
    ref, other = normals
    r = two_sample_test(ref, other, seed=0, n_boot=200)
    assert not r["differ"] and r["p_value"] > 0.01
    assert 0.3 < r["auroc"] < 0.7
    assert r["ci95"][0] <= r["auroc"] <= r["ci95"][1] and r["ci95"][0] < 0.5 < r["ci95"][1]
    assert r["n_held_out"] == 180  # scored on the half the classifier did not see
    assert (r["n_reference"], r["n_other"]) == (240, 120)


def test_differently_framed_normals_are_told_apart(normals):
    ref, other = normals
    r = two_sample_test(ref, reframed(other), seed=0, n_boot=200)
    assert r["differ"] and r["p_value"] < 1e-6
    assert r["auroc"] > 0.9 and r["ci95"][0] > 0.5


def test_the_auroc_grows_with_the_share_of_shifted_normals(normals):
    ref, other = normals
    auroc = []
    for share in (0.25, 0.5, 1.0):
        k = int(share * len(other))
        auroc.append(two_sample_test(ref, np.concatenate([reframed(other[:k]), other[k:]]), seed=0, n_boot=0)["auroc"])
    assert 0.55 < auroc[0] < auroc[1] < auroc[2]


def test_same_seed_same_result_and_the_article_seed_works(normals):
    ref, other = normals
    a = two_sample_test(ref, reframed(other), seed=ARTICLE_SEED, n_boot=50)
    b = two_sample_test(ref, reframed(other), seed=ARTICLE_SEED, n_boot=50)
    assert a == b and a["ci95"] is not None
    assert two_sample_test(ref, other, seed=0, n_boot=0)["ci95"] is None


def test_too_few_images_are_left_out(normals):
    ref, other = normals
    assert two_sample_test(ref, other[:1]) is None
    r = normal_shift(ref, {"val": other[:1], "test": other}, seed=0, n_boot=0)
    assert "val" not in r and r["test"]["n_other"] == 120 and r["reference"] == "training normals"


def test_large_images_are_area_averaged_to_32_px():
    x = np.zeros((2, 3, 128, 96), dtype=np.uint8)
    x[:, :, :64] = 200  # top half bright: the mean of each pooled block is kept
    p = _pooled(x)
    assert p.shape == (2, 3 * 32 * 24)
    grid = p.reshape(2, 3, 32, 24)
    assert np.all(grid[:, :, :16] == 200) and np.all(grid[:, :, 16:] == 0)
    small = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 1, 28, 28)
    assert np.array_equal(_pooled(small), small.reshape(2, -1).astype(np.float64))  # no resampling below 32 px


def test_shift_check_compares_only_sets_that_are_not_the_training_or_validation_normals(normals):
    from medivae.data.imageset import ImageSet
    from medivae.workflows.anomaly.sets import shift_check

    ref, other = normals
    mixed = ImageSet(np.concatenate([other, reframed(other)]), np.r_[np.zeros(120), np.ones(120)].astype(np.int64),
                     ("normal", "lesion"))
    sets = {"train": ImageSet(ref, np.zeros(240, np.int64), ("normal",)),
            "val": ImageSet(other[:60], np.zeros(60, np.int64), ("normal",)),
            "scored": mixed, "normal_code": 0, "same_source": True}
    r = shift_check(sets, "test", bootstrap=0, seed=0)
    assert r["scored_split"] == "test" and r["val"]["n_other"] == 60
    assert r["scored"]["n_other"] == 120 and not r["scored"]["differ"]  # only the normals are compared
    for split in ("train", "val"):  # the scored normals are the training or validation normals themselves
        assert "scored" not in shift_check(sets, split, bootstrap=0, seed=0)
    assert "scored" in shift_check({**sets, "same_source": False}, "val", bootstrap=0, seed=0)
    assert "scored" not in shift_check({**sets, "normal_code": None}, "test", bootstrap=0, seed=0)


def test_the_shift_line_names_the_remedies_only_when_the_scored_normals_differ():
    from medivae.commands.anomaly import shift_line

    def entry(differ):
        return {"auroc": 0.8 if differ else 0.5, "ci95": None, "differ": differ}

    alike = shift_line({"scored_split": "test", "val": entry(False), "scored": entry(False)})
    shifted = shift_line({"scored_split": "test", "val": entry(False), "scored": entry(True)})
    assert "--calibration" not in alike and "anomaly adapt" not in alike
    assert "differ from the training normals" in shifted
    assert "--calibration NORMALS" in shifted and "medivae anomaly adapt RUN --normals NORMALS" in shifted
    calibrated = shift_line({"scored_split": "test", "val": entry(False), "scored": entry(True),
                             "calibration": entry(True)})
    assert "threshold from the validation normals" not in calibrated and "anomaly adapt" in calibrated
