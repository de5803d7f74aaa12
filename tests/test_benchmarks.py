"""Smoke tests of benchmarks/bench_train.py --quick, speed_ablation.py, defaults.py, ldm_peer.py and generation.py:
they run end to end and write complete JSON.

Slow (bench_train about 40 s on an idle 2-core machine: two trainings, inference timings, a small scaling table;
ldm_peer three short runs per medivae recipe). No number is compared with a speed: timings depend on the machine
and its load.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_train_quick_writes_complete_json(shared_data, tmp_path):
    tar = shared_data / "mednist" / "MedNIST.tar.gz"
    baseline = shared_data.parent / "baselines" / "seed_article_vae.py"
    if not (tar.exists() and baseline.exists()):
        pytest.skip("MedNIST.tar.gz or the article's baseline script is absent")
    out = tmp_path / "train.json"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--quick", "--out", str(out)],
        check=True, capture_output=True, text=True, timeout=900,
    )
    r = json.loads(out.read_text())
    for arm in ("baseline", "medivae"):
        (run,) = r["runs"][arm]  # --quick: one run of each
        for key in ("images_per_s", "train_s", "wall_s", "cpu_s", "peak_rss_mb", "test_neg_elbo", "threads"):
            assert run[key] > 0, (arm, key)
    assert r["throughput_ratio"] == pytest.approx(
        r["runs"]["medivae"][0]["images_per_s"] / r["runs"]["baseline"][0]["images_per_s"], abs=0.01
    )
    # the same test images, the same quantity: an untrained-ish VAE after one short epoch lands near the
    # baseline, nowhere near a different unit (per pixel, bits) or a sum over the test set
    assert abs(r["test_neg_elbo_rel_diff"]) < 0.25
    inf = r["inference"]
    for key in ("sample", "reconstruct", "score_neg_elbo", "anomaly_score"):
        assert inf[f"{key}_images_per_s"] > 0 and inf[f"{key}_images_per_s_fp32"] > 0
    rows = {(row["image_size"], row["n_images"], row["storage"]) for row in r["scaling"]}
    assert {s for s, _, _ in rows} == {32, 64} and {st for _, _, st in rows} == {"ram", "memmap"}
    assert all(row["images_per_s"] > 0 and row["seconds_per_epoch"] > 0 for row in r["scaling"])
    assert r["data"]["train"] > 0 and r["data"]["test"] > 0
    roof = r["roofline"]
    # the article's network: 4 convolutions + 4 transposed convolutions + 3 linear layers at 64 px; a
    # forward pass is ~103 MFLOP per image and training ~3x that (FlopCounterMode), whatever the machine
    assert 2.5e8 < roof["train_flops_per_image"] < 3.5e8
    assert roof["gemm_gflops"]["fp32"] > 0 and roof["gemm_gflops"]["bf16"] > 0
    for arm in ("baseline", "medivae"):
        a = roof["arms"][arm]
        assert a["achieved_gflops"] == pytest.approx(
            r["runs"][arm][0]["images_per_s"] * roof["train_flops_per_image"] / 1e9, rel=0.01)
    assert roof["arms"]["baseline"]["precision"] == "fp32" and roof["arms"]["medivae"]["precision"] in ("bf16", "fp32")
    peak = roof["gemm_gflops"][roof["arms"]["medivae"]["precision"]]
    assert roof["ratio_if_at_gemm_peak"] == pytest.approx(
        peak * 1e9 / roof["train_flops_per_image"] / roof["arms"]["baseline"]["images_per_s_median"], abs=0.01)
    assert len(r["commit"]) == 40


@pytest.mark.slow
def test_speed_ablation_turns_each_setting_off(shared_data, tmp_path):
    tar = shared_data / "mednist" / "MedNIST.tar.gz"
    if not tar.exists():
        pytest.skip("MedNIST.tar.gz is absent")
    out = tmp_path / "ablation.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "speed_ablation.py"), "--n-images", "256", "--rounds", "1"]
    subprocess.run([*cmd, "--out", str(out)], check=True, capture_output=True, text=True, timeout=900)
    r = json.loads(out.read_text())
    assert set(r["runs"]) == {
        "default", "fp32", "contiguous", "malloc_default", "biases_trained", "plain_convs", "none", "compiled",
    }  # fmt: skip
    frozen = {v: runs[0]["frozen_tensors"] for v, runs in r["runs"].items()}
    assert frozen["default"] == 7 and frozen["biases_trained"] == 0 and frozen["none"] == 0  # 4 enc. + 3 dec.
    fast = {v: runs[0]["fast_path_convs"] for v, runs in r["runs"].items()}
    assert fast["default"] == 8 and fast["plain_convs"] == 0 and fast["none"] == 0  # 4 conv + 4 transposed
    assert all(runs[0]["images_per_s"] > 0 for runs in r["runs"].values())
    assert r["ratio_to_default"]["default"] == 1.0


@pytest.mark.slow
def test_defaults_benchmark_adds_one_record_per_call_and_tabulates_the_claims(tmp_path):
    """benchmarks/defaults.py on phantoms, two tiny arms for one epoch: each call adds its (data, split, arm,
    seed) record with the commit, CPU seconds, load average and the claim's metrics; --table compares them."""
    script, out = ROOT / "benchmarks" / "defaults.py", tmp_path / "d.json"
    tiny = "--epochs 2 --batch-size 32 --precision fp32 --threads 1"
    for arm, extra in (("conv_vae", "--latent-dim 4 --base-width 4"), ("vae_gan", "--latent-dim 4 --base-width 4")):
        subprocess.run([sys.executable, str(script), "--data", "phantoms32", "--arm", arm, "--split", "val",
                        "--train-args", f"{tiny} {extra}", "--work", str(tmp_path), "--out", str(out),
                        "--iwae-k", "2", "--n-samples", "16", "--commit", "abc123"],
                       check=True, capture_output=True, text=True, timeout=900)
    recs = json.loads(out.read_text())["records"]["phantoms32"]["val"]
    assert len(recs) == 2
    for name, by_seed in recs.items():
        (r,) = by_seed.values()
        assert r["commit"] == "abc123" and r["cpu_seconds"] > 0 and r["epochs"] == 2, name
        assert {"load_average_before", "load_average_after", "psnr_db", "hf_power_ratio"} <= set(r), name
        assert r["neg_iwae_bpd"] is None  # a Bernoulli likelihood has no bits/dim
    assert r["best_epoch"] == 2  # vae_gan: epoch 1 trains before the adversarial start and cannot be best
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import defaults
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    by_arm = {name.split("+")[0]: v for name, v in recs.items()}  # the arms' records under their plain names
    text = defaults.table({"records": {"phantoms32": {"val": by_arm}}}, "val")
    a, b = (next(iter(by_arm[m].values()))["hf_power_ratio"] for m in ("vae_gan", "conv_vae"))
    gain = abs(np.log(b)) - abs(np.log(a))  # fine detail as real images have: ratio 1
    verdict = "yes" if gain > 0 else "**no**"
    row = (f"| phantoms32 | vae_gan hf_power_ratio (nearer 1 is better) | {a:.3f} | {b:.3f} (conv_vae) | "
           f"{gain:+.3f} | 1 | {verdict} (1 seed) |")
    assert f"{row} abc123 |" in text


def test_defaults_table_judges_a_claim_by_the_paired_interval_over_seeds():
    """Three seeds: the verdict is "yes" only when the 95 % t interval of the paired gain is above 0, "level"
    when it holds 0; seeds one arm did not run are left out of both means."""
    from scipy import stats

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import defaults
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    def recs(values):
        return {str(i): {"psnr_db": v, "commit": "c0ffee0"} for i, v in enumerate(values)}

    for fam, base, want in (([30.0, 31.0, 32.0], [29.0, 29.5, 30.5], "yes"),
                            ([30.0, 28.0, 32.0], [29.0, 29.5, 30.5], "level"),
                            ([28.0, 28.5, 29.0], [29.0, 29.5, 30.5], "**no**")):
        records = {"d": {"test": {"vq_vae": recs(fam), "conv_vae": {**recs(base), "9": {"psnr_db": 99.0,
                                                                                     "commit": "c0ffee0"}}}}}
        row = next(r for r in defaults.table({"records": records}, "test").splitlines() if "vq_vae psnr_db" in r)
        gain = np.subtract(fam, base)
        half = stats.t.ppf(0.975, 2) * gain.std(ddof=1) / np.sqrt(3)
        assert f"| {np.mean(fam):.3f} | {np.mean(base):.3f} (conv_vae) |" in row
        assert f"{gain.mean():+.3f} [{gain.mean() - half:+.3f}, {gain.mean() + half:+.3f}] | 3 | {want} |" in row


def _ldm_peer(tmp_path, *args) -> dict:
    out = tmp_path / "ldm_peer.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "ldm_peer.py"), "--data", "phantoms:150", "--labels", "",
           "--image-size", "32", "--seconds", "6", "--sampling-steps", "3", "--bootstrap", "20",
           "--reference-epochs", "1", "--pilot-images", "64", "--work", str(tmp_path / "work"), "--out", str(out),
           "--grid", str(tmp_path / "grid.png"), *args]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=900)
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["ldm", "conv_vae+flow"])
def test_ldm_peer_scores_both_arms_at_equal_seconds_and_stages_seeds(tmp_path, recipe):
    pytest.importorskip("monai")
    pytest.importorskip("einops")  # MONAI's attention blocks need it
    from medivae.models import families

    if recipe.split("+")[0] not in families():
        pytest.skip(f"no {recipe} family in this medivae")
    first = _ldm_peer(tmp_path, "--medivae", recipe, "--seed", "1")  # epochs planned by the pilot
    _ldm_peer(tmp_path, "--medivae", recipe, "--seed", "2", "--medivae-epochs", "2,1" if recipe == "ldm" else "2")
    again = _ldm_peer(tmp_path, "--medivae", recipe, "--seed", "1")  # reuses seed 1's run and MONAI samples
    assert sorted(again["runs"]) == ["1", "2"] and again["summary"]["seeds"] == ["1", "2"]
    a, b = first["runs"]["1"], again["runs"]["1"]
    assert b["arms"]["monai"] == a["arms"]["monai"] and b["arms"]["medivae"]["train"] == a["arms"]["medivae"]["train"]
    assert b["rows"] == a["rows"]  # nothing retrained, the same samples drawn again, the same scores
    r = again["runs"]["2"]
    assert r["arms"]["medivae"]["plan"]["epochs"] == (3 if recipe == "ldm" else 2)
    med, mon, data = r["arms"]["medivae"], r["arms"]["monai"], r["data"]
    # MONAI gets exactly medivae's training seconds, split between its two stages; a stage stops only once
    # its clock has passed its share, and what stage 1 overran comes off stage 2
    assert mon["budget_seconds"] == pytest.approx(med["train_seconds"], abs=0.01)
    assert mon["autoencoder"]["seconds"] >= mon["autoencoder"]["budget"]
    assert mon["unet"]["budget"] == pytest.approx(max(mon["budget_seconds"] - mon["autoencoder"]["seconds"], 0),
                                                  abs=0.02)
    assert data["train"] + data["val"] + data["test"] == 150
    assert r["rows"]["medivae"]["n"] == r["rows"]["monai"]["n"] == data["test"]
    assert r["rows"]["floor"]["n"] == r["rows"]["blur_sigma1"]["n"] == data["val"]
    for row in r["rows"].values():
        for m in ("fd", "precision", "recall", "density", "coverage", "hf_power_ratio"):
            lo, hi = row["ci95"][m]
            assert lo <= hi and row[m] >= 0
    # a Gaussian blur takes power out of the high frequencies, whatever the features say
    assert r["rows"]["blur_sigma1"]["hf_power_ratio"] < 0.5 * r["rows"]["floor"]["hf_power_ratio"]
    assert r["versions"]["monai"] and len(r["commit"].partition("+")[0]) == 40 and r["threads"] >= 1
    from PIL import Image

    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape[1] > 3 * 4 * 32 and grid.std() > 10  # three 3 x 4 panels of 32 px images, not blank


@pytest.mark.slow
def test_generation_benchmark_stages_one_record_per_call_and_tabulates_the_seeds(tmp_path, monkeypatch):
    """benchmarks/generation.py on phantoms: the real arm and two seeds of a tiny conv_vae's GMM row. Each call
    adds one record and leaves the others as they were; the real arm's floor is the one medivae evaluate
    reports; --table shows the mean over the seeds and its t-interval, computed here from the JSON."""
    from scipy import stats

    monkeypatch.setenv("MEDIVAE_CACHE", str(tmp_path / "cache"))  # a fresh shared extractor, trained once
    out = tmp_path / "g.json"
    common = [sys.executable, str(ROOT / "benchmarks" / "generation.py"), "--data", "phantoms32", "--out", str(out),
              "--work", str(tmp_path / "work"), "--images", str(tmp_path / "img"), "--reference-epochs", "1",
              "--bootstrap", "20", "--commit", "abc123"]
    tiny = ["--rows", "gmm", "--n-synth", "32", "--n-timing", "16",
            "--train-args", "--epochs 1 --batch-size 32 --latent-dim 4 --base-width 4 --threads 1"]

    def call(*args) -> dict:
        subprocess.run([*common, *args], check=True, capture_output=True, text=True, timeout=900)
        return json.loads(out.read_text())["records"]["phantoms32"]

    real = call("--arm", "real")["real"]
    first = call("--arm", "conv_vae", "--seed-index", "0", *tiny)
    (arm,) = set(first) - {"real"}
    assert list(first[arm]) == ["1767661200070"] and first["real"] == real
    both = call("--arm", "conv_vae", "--seed-index", "1", *tiny)
    assert sorted(both[arm]) == ["1767661200070", "1767661200071"] and both["real"] == real
    assert both[arm]["1767661200070"] == first[arm]["1767661200070"]  # the first seed untouched
    rows = [r["rows"]["gmm"] for r in both[arm].values()]
    for r in both[arm].values():
        assert r["commit"] == "abc123" and r["cpu_seconds"] > 0 and r["epochs"] == 1
        assert {"load_average_before", "load_average_after", "fit_sampler", "train_seconds"} <= set(r)
    floor = next(iter(real.values()))["rows"]["floor"]["evaluate"]
    for row in rows:  # the same test images against the same validation images in the same extractor
        assert row["evaluate"]["floor"] == floor["model"]
        assert row["evaluate"]["reference_hash"] == floor["reference_hash"]
        assert row["sampling"]["images_per_s"] > 0 and row["train_seconds"] > 0
        assert 0 <= row["synthesize"]["memorisation_rate"] <= 1

    text = subprocess.run([*common, "--table"], check=True, capture_output=True, text=True).stdout
    fd = [r["evaluate"]["model"]["fd"] for r in rows]
    half = stats.t.ppf(0.975, 1) * np.std(fd, ddof=1) / np.sqrt(2)
    m = np.mean(fd)
    line = next(x for x in text.splitlines() if "GMM" in x)
    assert f"| {m:.4g} [{m - half:.4g}, {m + half:.4g}] |" in line and "| 2 |" in line
    lo, hi = floor["ci95"]["fd"]  # one record: the run's own bootstrap interval
    assert f"| {floor['model']['fd']:.4g} [{lo:.4g}, {hi:.4g}] |" in next(x for x in text.splitlines() if "floor" in x)


@pytest.mark.slow
def test_ldm_ceiling_scores_reconstructions_and_samples_without_the_test_split(tmp_path, monkeypatch):
    """benchmarks/ldm_ceiling.py on a tiny phantom ldm: one record per --name, each with the floor, the
    reconstructions and the samples (as many as validation images) against training images; a run one epoch
    into training reconstructs worse than real images score; --table shows the floor once per data set."""
    monkeypatch.setenv("MEDIVAE_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "medivae", "train", "--data", "phantoms:200", "--image-size", "32",
                    "--model", "ldm", "--epochs", "2", "--model-arg", "prior_epochs=1", "--model-arg",
                    "sampling_steps=3", "--batch-size", "32", "--threads", "1", "--out", str(run), "--no-progress"],
                   check=True, capture_output=True, text=True, timeout=900)
    out = tmp_path / "c.json"
    script = [sys.executable, str(ROOT / "benchmarks" / "ldm_ceiling.py"), "--out", str(out)]
    for name in ("first", "second"):
        subprocess.run([*script, "--data", "phantoms32", "--run", str(run), "--name", name,
                        "--reference-epochs", "1"], check=True, capture_output=True, text=True, timeout=900)
    recs = json.loads(out.read_text())["records"]["phantoms32"]
    assert sorted(recs) == ["first", "second"]
    rec = recs["first"]
    assert set(rec["rows"]) == {"floor", "reconstructions", "samples"}
    assert rec["reference"]["against"] == "train" and rec["reference"]["n_held_out"] == 20  # 10 % of 200
    assert rec["model"]["name"] == "ldm" and rec["train"]["epochs"] == 2
    assert rec["rows"]["reconstructions"]["fd"] > rec["rows"]["floor"]["fd"]
    assert np.isfinite(rec["rows"]["reconstructions"]["psnr_db"])
    text = subprocess.run([*script, "--table"], check=True, capture_output=True, text=True).stdout
    assert sum("| floor |" in line for line in text.splitlines()) == 1
    assert sum("| samples |" in line for line in text.splitlines()) == 2


@pytest.mark.slow
def test_bn_gap_sees_running_averages_that_do_not_fit_the_weights(tmp_path):
    """benchmarks/bn_gap.py: end to end on a tiny phantom run (one complete record), then its measures on a
    small conv_vae whose BatchNorm running means are moved by three running standard deviations (as a lagging
    average can be): evaluation mode scores far from the batches' own statistics, which never read the
    averages, and recomputing them over the training images undoes the move exactly."""
    run = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "medivae", "train", "--data", "phantoms:120", "--image-size", "32",
                    "--epochs", "1", "--latent-dim", "4", "--base-width", "8", "--batch-size", "32",
                    "--threads", "1", "--out", str(run), "--no-progress"],
                   check=True, capture_output=True, text=True, timeout=600)
    out = tmp_path / "g.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bn_gap.py"), "--run", str(run), "--out", str(out),
                    "--name", "tiny"], check=True, capture_output=True, text=True, timeout=600)
    rec = json.loads(out.read_text())["records"]["tiny"]
    assert rec["family"] == "conv_vae" and rec["n_val"] > 0 and rec["commit"]
    for mode in ("eval", "batch", "recalibrated"):
        m = rec["modes"][mode]
        assert m["neg_elbo"] == pytest.approx(m["rec"] + m["kl"], rel=1e-9)
    modes = rec["modes"]
    assert rec["eval_minus_batch"] == pytest.approx(modes["eval"]["neg_elbo"] - modes["batch"]["neg_elbo"])

    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bn_gap
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from medivae.models import build_model, model_config

    torch.manual_seed(0)
    model = build_model(model_config("conv_vae", image_size=32, latent_dim=4, base_width=8)).float()
    images = np.random.default_rng(0).integers(0, 256, (96, 1, 32, 32), dtype=np.uint8)
    fitted = bn_gap.recalibrated(model, images, 32, seed=1)
    moved = bn_gap.recalibrated(model, images, 32, seed=1)
    for name, buf in moved.named_buffers():
        if name.endswith("running_mean"):
            buf += 3.0 * moved.get_buffer(name.replace("running_mean", "running_var")).sqrt()
    fine = {mode: bn_gap.neg_elbo(fitted, images, mode, 0, 32)["neg_elbo"] for mode in (False, True)}
    off = {mode: bn_gap.neg_elbo(moved, images, mode, 0, 32)["neg_elbo"] for mode in (False, True)}
    assert off[True] == fine[True]  # batch statistics: the running averages are never read
    assert abs(off[False] - off[True]) > 10 * abs(fine[False] - fine[True])
    again = bn_gap.neg_elbo(bn_gap.recalibrated(moved, images, 32, seed=1), images, False, 0, 32)["neg_elbo"]
    assert again == fine[False]  # update_bn starts from zero: what the move did is gone
