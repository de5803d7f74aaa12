"""Choosing without test labels: the kinds of synthetic anomaly, the default by its mean rank over them, the
leave-one-kind-out check, tuning and selection on disjoint halves, paired bootstrap intervals."""

from __future__ import annotations

import numpy as np
import pytest

from medivae.cli import main
from medivae.data.phantoms import make_phantoms
from medivae.evaluation.anomaly import selection as sel
from medivae.evaluation.anomaly.synthetic import KINDS, synthesize

from tiny import TINY


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_kind_changes_one_region_and_its_mask_is_what_changed(kind):
    normals = make_phantoms(30, 32, seed=3, lesion_fraction=0.0).images
    s = synthesize(kind, normals, seed=5)
    assert s.kind == kind and s.images.shape == normals.shape and s.images.dtype == np.uint8
    np.testing.assert_array_equal(s.masks, (s.images != normals).any(1))  # image i differs from normal i there only
    assert s.masks.any(axis=(1, 2)).all()  # every image is changed ...
    assert s.masks.mean() < 0.3  # ... in a region, not everywhere
    assert all(len(v) == 30 for v in s.params.values())
    np.testing.assert_array_equal(synthesize(kind, normals, seed=5).images, s.images)  # deterministic
    assert not np.array_equal(synthesize(kind, normals, seed=6).images, s.images)


def test_kinds_vary_in_sign_and_size():
    normals = make_phantoms(30, 32, seed=3, lesion_fraction=0.0).images
    blob, shift = synthesize("blob", normals, 1), synthesize("intensity_shift", normals, 1)
    assert (blob.params["contrast"] > 0).any() and (blob.params["contrast"] < 0).any()  # bright and dark
    assert (shift.params["gain"] > 1).any() and (shift.params["gain"] < 1).any()
    sizes = blob.masks.sum((1, 2))
    assert sizes.max() > 3 * sizes.min()


def _scores(aurocs: dict[str, dict[str, float]], n: int = 400, seed: int = 0):
    """Validation normals N(0, 1) and, per kind, anomalies N(d, 1) with d set so the AUROC is about the one
    asked for: ({score: (n,)}, {kind: {score: (n,)}})."""
    from scipy.stats import norm

    rng = np.random.default_rng(seed)
    names = list(next(iter(aurocs.values())))
    val = {s: rng.normal(size=n) for s in names}
    synthetic = {k: {s: rng.normal(size=n) + np.sqrt(2) * norm.ppf(a[s]) for s in names} for k, a in aurocs.items()}
    return val, synthetic


def test_the_default_is_the_best_mean_rank_not_the_best_on_one_kind():
    # "specialist" separates foreign patches perfectly and nothing else; "generalist" is good on every kind
    want = {"foreign_patch": {"specialist": 0.99, "generalist": 0.8, "weak": 0.6},
            "blob": {"specialist": 0.5, "generalist": 0.8, "weak": 0.6},
            "noise": {"specialist": 0.5, "generalist": 0.8, "weak": 0.6}}
    val, synthetic = _scores(want)
    r = sel.select_default(val, synthetic, n_boot=200)
    assert r["default"] == "generalist" and r["mean_rank"]["generalist"] < r["mean_rank"]["specialist"]
    assert max(r["val_auroc_by_kind"]["foreign_patch"], key=r["val_auroc_by_kind"]["foreign_patch"].get) == "specialist"
    per_kind = [a["generalist"] for a in r["val_auroc_by_kind"].values()]
    assert r["val_auroc"]["generalist"] == pytest.approx(np.mean(per_kind))
    assert r["runner_up"] == "specialist" and r["lead_over_runner_up"]["ci95"][0] > 0
    only_patches = sel.select_default(val, {"foreign_patch": synthetic["foreign_patch"]}, n_boot=0)
    assert only_patches["default"] == "specialist"  # what a single kind would have chosen


def test_leave_one_kind_out_chooses_without_the_kind_and_fixes_baseline_directions_elsewhere():
    want = {"foreign_patch": {"a": 0.9, "b": 0.7}, "blob": {"a": 0.9, "b": 0.7}, "noise": {"a": 0.55, "b": 0.8}}
    val, synthetic = _scores(want)
    rng = np.random.default_rng(1)
    # a trivial score brighter for patches and blobs, darker for noise: its direction differs on the kind left out
    bright = {"foreign_patch": 1.0, "blob": 1.0, "noise": -1.0}
    val_trivial = {"mean_intensity": rng.normal(size=400)}
    syn_trivial = {k: {"mean_intensity": rng.normal(size=400) + d} for k, d in bright.items()}
    r = sel.leave_one_kind_out(val, synthetic, val_trivial, syn_trivial)
    assert set(r) == set(want)
    by_kind = sel.kind_aurocs(val, synthetic, ["a", "b"])
    for kind, e in r.items():
        assert e["default"] == sel.ranked({k: a for k, a in by_kind.items() if k != kind})[0]
        assert e["auroc"] == by_kind[kind][e["default"]] and e["margin"] == e["auroc"] - e["baseline_auroc"]
    assert r["noise"]["default"] == "a" and r["noise"]["baseline_direction"] == "higher"  # fixed on the others
    assert r["noise"]["baseline_auroc"] < 0.5  # so it is the wrong way round on noise, and says so
    assert r["blob"]["baseline_direction"] == "higher" and r["blob"]["baseline_auroc"] > 0.7


def test_the_paired_bootstrap_draws_each_normal_with_the_anomalies_made_from_it(monkeypatch):
    """Normal i scores i, the anomaly made from it i + 0.5: in every resample the anomalies are the resampled
    normals' own, with the same multiplicities."""
    seen = []
    real = sel.synthetic_auroc

    def spy(val, synthetic):
        seen.append((np.sort(val), np.sort(synthetic)))
        return real(val, synthetic)

    monkeypatch.setattr(sel, "synthetic_auroc", spy)
    i = np.arange(40.0)
    val, kind = {"a": i, "b": 100 + i}, {"a": i + 0.5, "b": 100.5 + i}
    lo, hi = sel.paired_lead_ci(val, {"k1": kind, "k2": kind}, "a", "b", n_boot=50)
    assert lo <= hi and len(seen) == 50 * 2 * 2
    assert not all(np.array_equal(v, i) for v, _ in seen)  # resampled, not the full set
    for v, s in seen:
        np.testing.assert_array_equal(s, v + 0.5)


def test_tune_picks_the_best_mean_auroc_over_kinds_and_the_smaller_value_on_a_tie():
    def run(v):  # v = 3 separates kind a best, but fails on b; v = 2 separates both
        val = np.arange(10.0)
        return val, {"a": val + {1: 1, 2: 10, 3: 20}[v], "b": val + {1: 1, 2: 10, 3: 0}[v]}

    best, mean = sel.tune((1, 2, 3), run)
    assert best == 2 and mean == {1: pytest.approx(0.595), 2: 1.0, 3: 0.75}
    best, _ = sel.tune((3, 2), lambda v: (np.zeros(4), {"a": np.ones(4)}))
    assert best == 2  # every value separates perfectly: the smaller one


def test_split_halves_is_seeded_and_disjoint():
    a, b = sel.split_halves(11, seed=3)
    assert len(a) == 5 and len(b) == 6 and not set(a) & set(b) and set(a) | set(b) == set(range(11))
    assert np.array_equal(sel.split_halves(11, seed=3)[0], a) and not np.array_equal(sel.split_halves(11, 4)[0], a)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("selection") / "run"
    argv = ["anomaly", "fit", "--data", "phantoms:200", "--normal-label", "normal", "--out", str(run)]
    assert main([*argv, "--epochs", "1", "--seed", "7", *TINY]) == 0
    return run


def test_the_default_is_chosen_on_images_no_hyperparameter_was_tuned_on(run_dir, monkeypatch):
    """Every image the restoration's TV weight was tuned on is outside the set whose restoration scores the
    default is chosen by (and the anomalies go with the normal they were made from)."""
    from medivae.evaluation.anomaly import scorers
    from medivae.evaluation.anomaly.passes import Scoring
    from medivae.runfolder.run import load_run
    from medivae.workflows.anomaly import protocol
    from medivae.workflows.anomaly.sets import scoring_sets

    calls, tuning, chosen_by = [], [False], []
    real_restore, real_tune, real_select = scorers.restoration_scores, protocol.tune_scorers, sel.select_default

    def restore(p, tv):
        out = real_restore(p, tv)
        calls.append((tuning[0], {bytes(img) for img in p.images}, out[0]))
        return out

    def tune(*args, **kw):
        tuning[0] = True
        try:
            return real_tune(*args, **kw)
        finally:
            tuning[0] = False

    def select(*args, **kw):
        chosen_by.extend(a for a in args if isinstance(a, dict))
        return real_select(*args, **kw)

    monkeypatch.setattr(scorers, "restoration_scores", restore)
    monkeypatch.setattr(protocol, "tune_scorers", tune)
    monkeypatch.setattr(sel, "select_default", select)
    monkeypatch.setattr(protocol, "select_default", select, raising=False)  # however the protocol imports it
    run = load_run(run_dir, device="cpu")
    sets = scoring_sets(run.config, "normal", None, "test")
    protocol.run_protocol(Scoring(run.model, k=2, seed=run.config.train.seed), sets, None)

    def arrays(d):  # every restoration score array handed to the selection, nested dicts included
        for k, v in d.items():
            yield from arrays(v) if isinstance(v, dict) else ([v] if k == "restoration" else [])

    tuned = set().union(*(imgs for during, imgs, _ in calls if during))
    selected = [imgs for a in (x for d in chosen_by for x in arrays(d))
                for during, imgs, s in calls if not during and len(s) == len(a) and np.array_equal(s, a)]
    assert tuned and selected and len(selected) >= 2  # the normals and at least one kind of anomaly
    assert all(not imgs & tuned for imgs in selected)
