"""What the benchmark scripts record: a reused run or sampler is the one the record claims (commit, arguments),
and two benchmark calls writing one result file side by side keep both records. Fast: the scripts are imported
as modules and their trainings and measurements replaced by stand-ins."""

from __future__ import annotations

import argparse
import fcntl
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def bench(name: str):
    """A benchmark script as a module (benchmarks/ holds its ``common``), loaded afresh for each test."""
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(f"medivae_test_bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # a dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def lock_is_held(out: Path) -> bool:
    """Whether another open file holds the lock of result file ``out`` (common.json_lock's sidecar)."""
    with open(Path(tempfile.gettempdir()) / f"medivae_{out.stem}.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def finished_run(folder: Path, epochs: int, extra: dict | None = None) -> Path:
    """A run folder as trained_epochs / finished read it: config.json asking for ``epochs``, last/ holding them."""
    (folder / "last").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"train": {"epochs": epochs}, **(extra or {})}))
    (folder / "last" / "state.json").write_text(json.dumps({"epoch": epochs}))
    return folder


# --- writing one result file side by side ------------------------------------------------------------------------
def test_update_json_reads_and_writes_under_the_files_lock(tmp_path):
    common = bench("common")
    out = tmp_path / "review_update_json.json"
    seen = []

    def add(result):
        seen.append(lock_is_held(out))
        return {**result, "n": result.get("n", 0) + 1}

    common.update_json(out, add, {})
    common.update_json(out, add, {})
    assert json.loads(out.read_text()) == {"n": 2} and seen == [True, True]
    assert not lock_is_held(out)


def test_ldm_ceiling_keeps_a_record_another_call_adds_while_it_scores(tmp_path, monkeypatch):
    """The file is read again when the record is added, not before the minutes of scoring."""
    ceiling = bench("ldm_ceiling")
    out, run = tmp_path / "ceiling.json", tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": {"name": "ldm"}, "train": {"seed": 1}}))
    out.write_text(json.dumps({"benchmark": "ldm_ceiling", "records": {"pneumonia32": {"old": {"rows": {}}}}}))

    def score(data, run_dir, reference_epochs):  # another call adds its record meanwhile
        other = json.loads(out.read_text())
        other["records"]["pneumonia32"]["beside"] = {"rows": {}}
        out.write_text(json.dumps(other))
        return {"rows": {}}

    monkeypatch.setattr(ceiling, "score", score)
    monkeypatch.setattr(ceiling, "table", lambda result: "")
    ceiling.main(["--data", "pneumonia32", "--run", str(run), "--name", "new", "--out", str(out)])
    assert set(json.loads(out.read_text())["records"]["pneumonia32"]) == {"old", "beside", "new"}


def test_ldm_peer_adds_a_seed_under_the_files_lock(tmp_path, monkeypatch):
    peer = bench("ldm_peer")
    out = tmp_path / "review_ldm_peer_lock.json"
    held = []
    monkeypatch.setattr(peer, "summary", lambda runs: held.append(lock_is_held(out)) or {})
    peer.write(out, {"seed": 3, "commit": "abc", "command": "python benchmarks/ldm_peer.py --seed 3"})
    peer.write(out, {"seed": 4, "commit": "abc", "command": "python benchmarks/ldm_peer.py --seed 4"})
    assert held == [True, True] and set(json.loads(out.read_text())["runs"]) == {"3", "4"}


# --- ldm_peer: what a reused run or sample file was made with ----------------------------------------------------
def peer_args(peer, tmp_path, *extra):
    args = peer.parse(["--data", "phantoms:150", "--labels", "", "--image-size", "32", "--work", str(tmp_path),
                       *extra])
    args.commit, args.threads, args.work = "c0ffee0", 1, tmp_path / "seed1"
    return args


def test_ldm_peer_reuses_a_finished_medivae_run_only_with_the_same_settings(tmp_path):
    peer = bench("ldm_peer")
    args = peer_args(peer, tmp_path)
    run = finished_run(args.work / "medivae_run", 3)
    info = {"recipe": "ldm", "commit": "c0ffee0", "settings": peer.arm_settings(args), "plan": {"epochs": 3}}
    (args.work / "medivae_arm.json").write_text(json.dumps(info))
    assert peer.train_medivae("ldm", run, args) == info
    for other in (["--medivae", "conv_vae+diffusion"], ["--seconds", "1200"], ["--sampling-steps", "10"],
                  ["--precision", "fp32"]):
        with pytest.raises(SystemExit, match="use another --work"):
            other_args = peer_args(peer, tmp_path, *other)
            peer.train_medivae(other_args.medivae, run, other_args)


def test_ldm_peer_trains_both_arms_at_the_asked_precision(tmp_path, monkeypatch):
    peer = bench("ldm_peer")
    args = peer_args(peer, tmp_path, "--precision", "fp32", "--medivae-epochs", "2,1")
    calls = []
    monkeypatch.setattr(peer, "medivae", lambda *a: calls.append([str(x) for x in a]) or {"wall_seconds": 1.0})
    monkeypatch.setattr(peer, "epoch_seconds", lambda run: [1.0, 1.0, 1.0])
    args.work.mkdir(parents=True)
    rec = peer.train_medivae("ldm", args.work / "medivae_run", args)
    (train,) = calls
    assert train[train.index("--precision") + 1] == "fp32" and rec["settings"]["precision"] == "fp32"


def test_ldm_peer_reuses_monai_samples_only_with_the_same_settings(tmp_path, monkeypatch):
    import numpy as np

    peer = bench("ldm_peer")
    args = peer_args(peer, tmp_path)
    args.work.mkdir(parents=True)
    fresh = np.ones((2, 1, 4, 4), np.uint8)
    monkeypatch.setattr(peer.monai_ldm, "train_and_sample", lambda *a: (fresh, {"size": "cpu"}))
    first, _ = peer.monai_arm(np.zeros((4, 1, 4, 4), np.uint8), 10.0, 2, args)
    saved = np.load(args.work / f"monai_{args.monai_size}.npz")
    np.savez(args.work / f"monai_{args.monai_size}.npz", samples=fresh * 7, record=saved["record"])
    again, _ = peer.monai_arm(np.zeros((4, 1, 4, 4), np.uint8), 10.0, 2, args)
    assert (again == 7).all()  # the same settings: the saved samples
    args.sampling_steps = 10
    other, rec = peer.monai_arm(np.zeros((4, 1, 4, 4), np.uint8), 10.0, 2, args)
    assert (other == 1).all() and rec["settings"]["sampling_steps"] == 10  # other settings: trained again


# --- generation: a reused run's post-hoc samplers ------------------------------------------------------------------
def test_generation_fits_a_sampler_again_when_it_was_fitted_with_other_fit_args(tmp_path, monkeypatch):
    gen = bench("generation")
    fits = []
    old = {"wall_seconds": 5.0, "args": "--epochs 2"}  # a smoke run's short diffusion fit, in the reused run
    monkeypatch.setattr(gen, "train", lambda *a: {"train_seconds": 10.0, "fit_sampler": {"diffusion": dict(old)}})
    monkeypatch.setattr(gen, "fit", lambda run, s, fa: fits.append(list(fa)) or {"wall_seconds": 7.0,
                                                                              "args": " ".join(fa)})
    monkeypatch.setattr(gen, "measure_row", lambda *a: {"evaluate": {"model": {}}})
    args = argparse.Namespace(arm="conv_vae", data="phantoms32", seed=1, rows=["diffusion"], fit_args=[])
    rec = gen.model_arm(args, tmp_path, [])
    assert fits == [[]] and rec["fit_sampler"]["diffusion"]["args"] == ""
    assert rec["rows"]["diffusion"]["train_seconds"] == 17.0  # the training and the fit that was measured
    monkeypatch.setattr(gen, "train", lambda *a: {"train_seconds": 10.0, "fit_sampler": {"diffusion": dict(old)}})
    args.fit_args = ["--epochs", "2"]
    gen.model_arm(args, tmp_path, [])
    assert fits == [[]]  # fitted with these arguments: kept


def test_generation_records_the_fit_sampler_arguments(tmp_path, monkeypatch):
    gen = bench("generation")
    monkeypatch.setattr(gen, "medivae", lambda *a: {"wall_seconds": 1.0})
    assert gen.fit(tmp_path, "diffusion", ["--epochs", 2])["args"] == "--epochs 2"
    assert gen.fit(tmp_path, "gmm", ["--epochs", 2])["args"] == ""  # --fit-args are the diffusion sampler's


# --- defaults: a finished run's training record ------------------------------------------------------------------
def test_defaults_reports_a_finished_runs_own_training_not_an_empty_resume(tmp_path, monkeypatch):
    defaults = bench("defaults")
    out = finished_run(tmp_path / "run", 2)
    saved = {"commit": "c0ffee0", "seed": 5, "run": str(out), "cpu_seconds": 321.0, "train_args": "--model x"}
    (out / "defaults_train.json").write_text(json.dumps(saved))
    monkeypatch.setattr(defaults.subprocess, "run", lambda *a, **k: pytest.fail("a finished run trained again"))
    assert defaults.train("conv_vae", "phantoms32", 5, out, [], commit="c0ffee0") == saved


def test_defaults_records_what_a_fresh_training_ran(tmp_path, monkeypatch):
    defaults = bench("defaults")
    out = tmp_path / "run"
    monkeypatch.setattr(defaults.subprocess, "run", lambda *a, **k: finished_run(out, 2))
    rec = defaults.train("conv_vae", "phantoms32", 5, out, [], commit="c0ffee0")
    assert rec["commit"] == "c0ffee0" and rec["run"] == str(out) and "--model conv_vae" in rec["train_args"]
    assert json.loads((out / "defaults_train.json").read_text()) == rec


# --- anomaly_protocol: reused runs and scores; the baselines' rows ---------------------------------------------------
def scored_run(run: Path) -> Path:
    """A run folder as anomaly_protocol leaves it after fitting and scoring (no record of who made it)."""
    (run / "anomaly").mkdir(parents=True)
    (run / "results.json").write_text("{}")
    (run / "anomaly" / "scores.csv").write_text("index,is_anomaly,ssim\n")
    return run


def test_anomaly_protocol_refuses_a_run_it_did_not_fit_with_these_arguments(tmp_path, monkeypatch):
    proto = bench("anomaly_protocol")
    run = scored_run(tmp_path / "runs" / "seed0")
    monkeypatch.setattr(proto, "_medivae", lambda *a: pytest.fail(f"ran {a}"))
    argv = ["--data", "phantoms:100", "--normal-label", "0", "--runs", str(tmp_path / "runs"), "--seeds", "0",
            "--out", str(tmp_path / "out.json"), "--", "--epochs", "3"]
    with pytest.raises(SystemExit, match="nothing recorded"):  # a run of unknown origin
        proto.main(argv)
    wanted = {"commit": proto.git_commit(), "data": "phantoms:100", "normal_label": "0", "seed": 0,
              "fit_args": ["--epochs", "5"]}
    (run / proto.FIT_RECORD).write_text(json.dumps(wanted))
    with pytest.raises(SystemExit, match="use another --runs"):  # fitted with other arguments
        proto.main(argv)
    (run / proto.FIT_RECORD).write_text(json.dumps({**wanted, "fit_args": ["--epochs", "3"], "commit": "0ld"}))
    with pytest.raises(SystemExit, match="use another --runs"):  # fitted by other code
        proto.main(argv)


def test_anomaly_protocol_scores_again_what_other_code_scored(tmp_path, monkeypatch):
    proto = bench("anomaly_protocol")
    run = scored_run(tmp_path / "runs" / "seed0")
    (run / proto.FIT_RECORD).write_text(json.dumps({"commit": proto.git_commit(), "data": "phantoms:100",
                                                    "normal_label": "0", "seed": 0, "fit_args": []}))
    (run / proto.SCORE_RECORD).write_text(json.dumps({"commit": "0ld", "bootstrap": 1000}))
    calls = []

    class Ran(Exception):
        pass

    def medivae(*a):
        calls.append(a[:2])
        raise Ran

    monkeypatch.setattr(proto, "_medivae", medivae)
    with pytest.raises(Ran):
        proto.main(["--data", "phantoms:100", "--normal-label", "0", "--runs", str(tmp_path / "runs"),
                    "--seeds", "0", "--out", str(tmp_path / "out.json")])
    assert calls == [("anomaly", "score")]


def test_anomaly_markdown_baseline_rows_take_every_seed(tmp_path):
    """The baselines' cells say what their columns say: mean [min, max] over seeds, the union of the seeds'
    intervals, and the direction of every seed."""
    proto = bench("anomaly_protocol")

    def seed(auroc, ci, direction):
        return {"scores": {"ssim": {"auroc": 0.7, "auprc": 0.8, "ci95": {"auroc": [0.6, 0.8]}}},
                "trivial_baselines": {"png_size": {"direction": direction, "auroc": auroc, "auprc": 0.9,
                                                   "ci95": {"auroc": ci}}},
                "localisation": {}, "default": "ssim"}

    seeds = {"0": seed(0.80, [0.75, 0.85], "lower"), "1": seed(0.90, [0.86, 0.94], "higher")}
    check = {"auroc": {"ssim": 0.7, "baseline: png_size": 0.9}, "n_normal": 5, "n_anomalous": 6}
    summary = {**proto.across(seeds, 10), "validation_check": {"0": check}}
    text = proto.markdown({"summary": summary, "seeds": seeds})
    row = next(r for r in text.splitlines() if r.startswith("| baseline: png_size"))
    assert row == ("| baseline: png_size (higher or lower = anomalous; no model) | 0.850 [0.800, 0.900] | "
                   "[0.750, 0.940] | 0.900 [0.900, 0.900] | |")
    # the validation check's baselines take the better direction on the labels they are scored on: it says so
    assert "a baseline in whichever direction does better on these labels" in text


# --- the commit a record names -------------------------------------------------------------------------------------
def test_git_commit_names_uncommitted_changes_to_the_code_not_to_the_results(tmp_path):
    import subprocess

    common = bench("common")

    def git(*a):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *a], cwd=tmp_path, check=True,
                       capture_output=True)

    (tmp_path / "src").mkdir()
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "src" / "a.py").write_text("x = 1\n")
    (tmp_path / "benchmarks" / "results" / "r.json").write_text("{}\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "first")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert common.git_commit(tmp_path) == head
    (tmp_path / "benchmarks" / "results" / "r.json").write_text('{"records": 1}\n')  # a benchmark wrote numbers
    assert common.git_commit(tmp_path) == head
    (tmp_path / "src" / "a.py").write_text("x = 2\n")
    one = common.git_commit(tmp_path)
    (tmp_path / "src" / "a.py").write_text("x = 3\n")
    two = common.git_commit(tmp_path)
    assert one.startswith(f"{head}+dirty.") and two.startswith(f"{head}+dirty.") and one != two
    (tmp_path / "src" / "a.py").write_text("x = 1\n")
    (tmp_path / "benchmarks" / "new.py").write_text("y = 1\n")  # a new file not yet committed
    assert common.git_commit(tmp_path).startswith(f"{head}+dirty.")
    assert common.commit_key(two) == f"{head[:7]}+{two.partition('+')[2]}" and common.commit_key(head) == head[:7]


def test_the_results_pages_say_when_a_record_was_made_with_uncommitted_changes():
    spec = importlib.util.spec_from_file_location("medivae_test_gen_results", ROOT / "docs" / "gen_results.py")
    gen_results = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_results)
    sha = "0123456789abcdef0123456789abcdef01234567"
    assert gen_results.short(sha) == "`0123456`"
    assert gen_results.short(f"{sha}+dirty.89abcdef") == "`0123456` with uncommitted changes (`dirty.89abcdef`)"


def test_generation_real_rows_score_the_test_images_the_model_rows_score():
    """--max-images N: the floor and blur rows take the same N test images ``medivae evaluate`` takes."""
    import numpy as np

    from medivae.data import load_dataset
    from medivae.workflows.evaluate import _subset

    gen = bench("generation")
    cfg = gen.data_config("phantoms32")
    splits = load_dataset(cfg, progress=False)
    assert np.array_equal(gen.held_out_images(splits, 0, cfg.split_seed), splits["test"].images)
    some = gen.held_out_images(splits, 7, cfg.split_seed)
    evaluated = _subset(splits["test"], 7, cfg.split_seed, "evaluate-subset").images  # as evaluate subsets
    assert len(some) == 7 and np.array_equal(some, evaluated)


def test_generation_keeps_the_rows_an_earlier_call_measured_on_the_same_run(tmp_path):
    gen = bench("generation")
    out = tmp_path / "review_generation_rows.json"
    first = {"commit": "c0ffee0", "run": "/w/run", "command": "--rows prior", "rows": {"prior": {"fd": 1.0}}}
    gen.add_record(out, "d", "conv_vae", 7, first)
    gen.add_record(out, "d", "conv_vae", 7, {**first, "command": "--rows gmm", "rows": {"gmm": {"fd": 2.0}}})
    rec = json.loads(out.read_text())["records"]["d"]["conv_vae"]["7"]
    assert rec["rows"] == {"prior": {"fd": 1.0}, "gmm": {"fd": 2.0}} and rec["command"] == "--rows gmm"
    # another commit trained another run: its record replaces the old one whole
    gen.add_record(out, "d", "conv_vae", 7, {**first, "commit": "beef000", "rows": {"gmm": {"fd": 3.0}}})
    assert json.loads(out.read_text())["records"]["d"]["conv_vae"]["7"]["rows"] == {"gmm": {"fd": 3.0}}


def test_a_record_is_not_written_when_the_checkout_moved_during_the_run(tmp_path, monkeypatch):
    ceiling = bench("ldm_ceiling")
    common = sys.modules["common"]  # the module the scripts import still_at from
    out, run = tmp_path / "ceiling.json", tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": {"name": "ldm"}, "train": {"seed": 1}}))
    heads = iter(["a" * 40, "b" * 40])
    monkeypatch.setattr(ceiling, "git_commit", lambda: next(heads))  # at the start
    monkeypatch.setattr(common, "git_commit", lambda: next(heads))  # at the end: another commit
    monkeypatch.setattr(ceiling, "score", lambda *a: {"rows": {}})
    with pytest.raises(SystemExit, match="moved from a+ to b+"):
        ceiling.main(["--data", "pneumonia32", "--run", str(run), "--name", "new", "--out", str(out)])
    assert not out.exists()
