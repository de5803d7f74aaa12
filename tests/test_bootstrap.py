"""Bootstrap intervals: coverage on a known mean, agreement with scikit-learn, paired p-values, seeding."""

from __future__ import annotations

import numpy as np
import pytest

from medivae.evaluation import bootstrap as bs


def test_mean_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(200):
        lo, hi = bs.mean_ci(rng.normal(3.0, 1.0, 100), n_boot=400, seed=int(rng.integers(1 << 30)))
        hits += lo <= 3.0 <= hi
    assert 0.88 <= hits / 200 <= 0.99


def test_same_seed_same_interval_and_off_at_zero():
    v = np.random.default_rng(1).normal(size=50)
    assert bs.mean_ci(v, 200, seed=5) == bs.mean_ci(v, 200, seed=5)
    assert bs.mean_ci(v, 0) is None and bs.detection_ci([0, 1], [0.1, 0.2], 0) is None


def test_auroc_and_average_precision_match_scikit_learn_with_ties():
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(2)
    y = rng.random(300) < 0.2
    s = np.round(rng.normal(size=300) + y, 1)  # rounded: many ties
    assert bs.auroc(y, s) == pytest.approx(roc_auc_score(y, s))
    assert bs.average_precision(y, s) == pytest.approx(average_precision_score(y, s))


def test_detection_interval_contains_the_estimate_and_keeps_the_prevalence():
    rng = np.random.default_rng(3)
    y = np.r_[np.zeros(200, bool), np.ones(40, bool)]
    s = rng.normal(size=240) + 1.5 * y
    ci = bs.detection_ci(y, s, 500, seed=0)
    assert ci["auroc"][0] <= bs.auroc(y, s) <= ci["auroc"][1]
    assert ci["auprc"][0] <= bs.average_precision(y, s) <= ci["auprc"][1]


def test_paired_difference_of_identical_runs_has_p_one_and_of_shifted_runs_p_small():
    a = np.random.default_rng(4).normal(size=300)
    same = bs.paired_difference(a, a.copy(), 500)
    assert same["p_value"] == 1.0 and same["mean_difference"] == 0.0
    shifted = bs.paired_difference(a + 0.3, a + np.random.default_rng(5).normal(0, 0.1, 300), 500)
    assert shifted["p_value"] < 0.01 and shifted["ci95"][0] > 0
