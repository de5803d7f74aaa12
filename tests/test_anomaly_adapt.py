"""medivae anomaly adapt: a fitted run trained further on normals from the site being scored."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from medivae.cli import main
from medivae.data.phantoms import make_phantoms
from medivae.workflows.site import ADAPTATION_FILE

from tiny import png_folder

SCORE = ["--iwae-samples", "2", "--n-maps", "0", "--device", "cpu", "--fpr", "0.2", "--bootstrap", "0", "--no-progress"]
ADAPT = ["--epochs", "2", "--no-progress", "--device", "cpu"]


def _site_normals(n: int = 24, seed: int = 31) -> np.ndarray:
    """Lesion-free phantoms whose borders are brighter: normals from a site that frames images differently."""
    images = make_phantoms(n, 32, seed=seed, lesion_fraction=0.0).images.astype(np.int16)
    images[..., :5] += 80
    images[..., -5:] += 80
    return np.clip(images, 0, 255).astype(np.uint8)


def _weights(run) -> dict[str, torch.Tensor]:
    return load_file(run / "best" / "model.safetensors")


@pytest.fixture(scope="module")
def adapted(normal_run, tmp_path_factory):
    """(original run, its weights before, site folder, adapted run)."""
    tmp = tmp_path_factory.mktemp("adapt")
    before = _weights(normal_run)
    site = png_folder(tmp / "site", _site_normals())
    out = tmp / "adapted"
    assert main(["anomaly", "adapt", str(normal_run), "--normals", str(site), "--out", str(out), *ADAPT]) == 0
    return normal_run, before, site, out


def test_adapt_holds_out_a_seeded_share_and_keeps_the_run(adapted, tmp_path):
    run, before, site, out = adapted
    rec = json.loads((out / ADAPTATION_FILE).read_text())
    used, held = set(rec["adapt"]), set(rec["held_out"])
    assert rec["n_normals"] == 24 and len(held) == 12 and used | held == set(range(24)) and not used & held
    assert rec["epochs"] == 2 and rec["normals"] == str(site)
    # the run it came from is untouched; the adapted weights moved away from it
    after = _weights(out)
    assert all(torch.equal(before[k], v) for k, v in _weights(run).items())
    assert set(after) == set(before) and any(not torch.equal(before[k], after[k]) for k in before)
    # its training set = the run's training normals + the adaptation normals
    summary = json.loads((out / "data.json").read_text())
    original = json.loads((run / "data.json").read_text())
    assert summary["train"]["n"] == original["train"]["n"] + 12
    assert summary["val"]["n"] == original["val"]["n"]
    assert (out / "report.html").exists() and (out / "reconstructions.png").exists()
    # the same seed and normals give the same adapted weights and the same split of the normals
    again = tmp_path / "again"
    assert main(["anomaly", "adapt", str(run), "--normals", str(site), "--out", str(again), *ADAPT]) == 0
    assert json.loads((again / ADAPTATION_FILE).read_text())["held_out"] == rec["held_out"]
    assert all(torch.equal(after[k], v) for k, v in _weights(again).items())


def test_adaptation_lowers_the_scores_of_the_site_normals(adapted, tmp_path):
    """The brighter borders are what the adapted model has seen: other normals of that site reconstruct
    better (lower SSIM dissimilarity) than with the run it came from."""
    from medivae.evaluation.anomaly.passes import ImagePass, Scoring
    from medivae.runfolder.run import load_run

    run, _, _, out = adapted
    unseen = _site_normals(16, seed=77)

    def dissimilarity(folder):
        return float(ImagePass(Scoring(load_run(folder, device="cpu").model), unseen).ssim[0].mean())

    assert dissimilarity(out) < dissimilarity(run)


def test_score_calibrates_on_the_held_out_site_normals(adapted, tmp_path, capsys):
    run, _, site, out = adapted
    assert main(["anomaly", "score", str(out), "--out", str(tmp_path / "s"), *SCORE]) == 0
    printed = capsys.readouterr().out
    a = json.loads((out / "results.json").read_text())["anomaly"]
    t = a["threshold"]
    assert t["calibrated_on"] == {"source": str(site), "normals": 12, "held_out_at_adaptation": True}
    assert t["n_calibration"] == 12 and f"of 12 normals of {site}" in printed
    assert a["adaptation"]["n_adapt"] == 12 and a["adaptation"]["n_held_out"] == 12
    # the training normals' statistics include the adaptation normals (the two-sample test's reference)
    n_train = json.loads((run / "data.json").read_text())["train"]["n"]
    assert a["normal_shift"]["val"]["n_reference"] == n_train + 12
    # the report says what the run was adapted on and where its threshold was set
    assert main(["report", str(out)]) == 0
    html = (out / "report.html").read_text()
    assert "This run was adapted to the scored site" in html and "on 12 site normals held out of the adaptation" in html
    # --calibration still wins over the held-out normals
    other = png_folder(tmp_path / "other", _site_normals(20, seed=5))
    assert main(["anomaly", "score", str(out), "--out", str(tmp_path / "o"), *SCORE, "--calibration", str(other)]) == 0
    t = json.loads((out / "results.json").read_text())["anomaly"]["threshold"]
    assert t["calibrated_on"] == {"source": str(other), "normals": 20}


def _one_line_error(capsys, rc) -> str:
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("medivae: error:") and err.count("\n") == 1, err
    return err


def test_scoring_the_site_normals_is_refused(adapted, tmp_path, capsys):
    _, _, site, out = adapted
    before = (out / "results.json").read_bytes() if (out / "results.json").exists() else None
    rc = main(["anomaly", "score", str(out), "--data", str(site), "--out", str(tmp_path / "s"), *SCORE])
    err = _one_line_error(capsys, rc)
    assert "2 of the 2 images to score are normals the run was adapted with" in err  # the folder's test split
    assert not (tmp_path / "s").exists()
    after = (out / "results.json").read_bytes() if (out / "results.json").exists() else None
    assert after == before


def test_changed_site_normals_are_refused_at_scoring(normal_run, tmp_path, capsys):
    site = png_folder(tmp_path / "site", _site_normals(10, seed=3))
    out = tmp_path / "adapted"
    assert main(["anomaly", "adapt", str(normal_run), "--normals", str(site), "--out", str(out), *ADAPT,
                 "--epochs", "1"]) == 0
    (site / "000.png").unlink()
    rc = main(["anomaly", "score", str(out), "--out", str(tmp_path / "s"), *SCORE])
    assert "have changed since" in _one_line_error(capsys, rc)


@pytest.mark.parametrize("case, message", [
    ("own", "not the run's own source"),
    ("overlap", "3 of its 13 normal images are also training or validation images of the run"),
    ("too_few", "leave 1 to adapt on"),
    ("same_out", "--out must be a new run folder"),
    ("existing_out", "already holds a run"),
    ("adapted", "is already an adapted run"),
    ("hold_out", "0 <= --hold-out < 1"),
])  # fmt: skip
def test_bad_adaptation_exits_2_and_writes_nothing(adapted, tmp_path, capsys, case, message):
    from medivae.data import load_dataset
    from medivae.runfolder.config import RunConfig

    run, _, site, done = adapted
    cfg = RunConfig.load(run / "config.json")
    train = load_dataset(cfg.data, progress=False)["train"].images
    images = _site_normals(10, seed=8)
    normals = {"own": "phantoms:200",
               "overlap": str(png_folder(tmp_path / "reused", np.concatenate([images, train[:3]]))),
               "too_few": str(png_folder(tmp_path / "two", images[:2]))}.get(case, str(site))  # fmt: skip
    source, out, extra = run, tmp_path / "out", []
    if case == "same_out":
        out = run
    elif case == "existing_out":
        out = done
    elif case == "adapted":
        source = done
    elif case == "too_few":
        extra = ["--hold-out", "0.5"]
    elif case == "hold_out":
        extra = ["--hold-out", "1"]
    def listing(folder):
        # every file and its modification time; the lock file is written by every locking command
        return sorted((str(p.relative_to(folder)), p.stat().st_mtime_ns) for p in folder.rglob("*")
                      if p.name != ".lock")

    before = listing(done), listing(run)
    rc = main(["anomaly", "adapt", str(source), "--normals", normals, "--out", str(out), *ADAPT, *extra])
    assert message in _one_line_error(capsys, rc)
    assert not (tmp_path / "out").exists()
    assert (listing(done), listing(run)) == before


def test_a_killed_adaptation_is_refused_by_score_and_redone_by_adapt(normal_run, tmp_path, capsys, monkeypatch):
    from medivae.train.trainer import Trainer

    from tiny import Killed

    site = png_folder(tmp_path / "site", _site_normals(12, seed=9))
    out = tmp_path / "adapted"
    argv = ["anomaly", "adapt", str(normal_run), "--normals", str(site), "--out", str(out), *ADAPT]
    real_save = Trainer.save

    def save_then_die(self, name):  # killed right after the first adaptation epoch's checkpoint
        real_save(self, name)
        if name == "last":
            raise Killed

    monkeypatch.setattr(Trainer, "save", save_then_die)
    with pytest.raises(Killed):
        main(argv)
    monkeypatch.setattr(Trainer, "save", real_save)
    assert (out / "last").exists() and json.loads((out / ADAPTATION_FILE).read_text())["complete"] is False
    capsys.readouterr()
    rc = main(["anomaly", "score", str(out), "--data", str(site), "--out", str(tmp_path / "s"), *SCORE])
    assert "did not finish" in _one_line_error(capsys, rc)
    rc = main(["train", "--resume", "--data", "phantoms:200", "--out", str(out), "--no-progress"])
    assert "is an adapted run" in _one_line_error(capsys, rc)
    assert main(argv) == 0  # the same command again: the unfinished folder is redone, not refused
    rec = json.loads((out / ADAPTATION_FILE).read_text())
    done = rec["continued_from_epoch"]  # the epoch count of the run's best/ checkpoint, which it goes on from
    assert done == json.loads((normal_run / "best" / "state.json").read_text())["epoch"] >= 1
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rec["complete"] is True and epochs == [done + 1, done + 2]


def test_repeated_and_relative_site_normals(normal_run, tmp_path, monkeypatch):
    """A copy of a site normal is kept once (never both trained on and held out), and a relative --normals
    path is recorded absolute, so the adapted run scores from another working directory."""
    images = _site_normals(10, seed=12)
    png_folder(tmp_path / "site", np.concatenate([images, images[:4]]))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "adapted"
    assert main(["anomaly", "adapt", str(normal_run), "--normals", "site", "--out", str(out), *ADAPT]) == 0
    rec = json.loads((out / ADAPTATION_FILE).read_text())
    assert rec["n_normals"] == 10 and rec["n_repeats_dropped"] == 4 and rec["normals"] == str(tmp_path / "site")
    monkeypatch.chdir(normal_run)
    assert main(["anomaly", "score", str(out), "--out", str(tmp_path / "s"), *SCORE, "--fpr", "0.4"]) == 0
    assert json.loads((out / "results.json").read_text())["anomaly"]["threshold"]["n_calibration"] == 5


def test_a_labelled_source_gives_its_normal_images_only(normal_run, tmp_path):
    root = png_folder(tmp_path / "labelled", _site_normals(9, seed=41), "normal")
    png_folder(root, make_phantoms(7, 32, seed=42, lesion_fraction=1.0).images, "lesion")
    out = tmp_path / "adapted"
    assert main(["anomaly", "adapt", str(normal_run), "--normals", str(root), "--out", str(out), *ADAPT]) == 0
    rec = json.loads((out / ADAPTATION_FILE).read_text())
    assert rec["n_normals"] == 9 and len(rec["adapt"]) + len(rec["held_out"]) == 9
    n_train = json.loads((normal_run / "data.json").read_text())["train"]["n"]
    assert json.loads((out / "data.json").read_text())["train"]["n"] == n_train + len(rec["adapt"])


def _moments(optimizers) -> list:
    """Adam's first moments in the order of the parameters (None where a parameter has no state: frozen)."""
    out = []
    for opt in optimizers.values():
        for group in opt.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    m = opt.state.get(p, {}).get("exp_avg")
                    out.append(None if m is None else m.clone())
    return out


def test_adaptation_goes_on_from_the_runs_optimizer_state_and_epoch_count(normal_run, tmp_path, monkeypatch):
    """Warm-ups and staged schedules (KL warm-up, a VAE-GAN's adversarial start) go on where the run left
    them: the trainer starts at the run's epoch count with its Adam moments, not from zero."""
    from medivae.train.checkpoint import load_checkpoint
    from medivae.train.trainer import Trainer

    seen = {}
    real_fit = Trainer.fit

    def fit(self, train, val):
        seen.update(epoch=self.state.epoch, epochs=self.cfg.train.epochs, moments=_moments(self.optimizers))
        return real_fit(self, train, val)

    monkeypatch.setattr(Trainer, "fit", fit)
    site = png_folder(tmp_path / "site", _site_normals(8, seed=2))
    out = tmp_path / "adapted"
    assert main(["anomaly", "adapt", str(normal_run), "--normals", str(site), "--out", str(out), *ADAPT]) == 0
    done = json.loads((normal_run / "best" / "state.json").read_text())["epoch"]
    assert (seen["epoch"], seen["epochs"]) == (done, done + 2)
    assert json.loads((out / "config.json").read_text())["train"]["epochs"] == done + 2
    # the moments are the run's own (a fresh Adam has none before its first step)
    from medivae.models import build_model
    from medivae.runfolder.config import RunConfig

    cfg = RunConfig.load(normal_run / "config.json")
    model = build_model(cfg.model)
    fresh = Trainer(cfg, model, torch.device("cpu"), tmp_path / "unused", progress=False)
    load_checkpoint(normal_run / "best", model, fresh.optimizers)
    saved = _moments(fresh.optimizers)
    assert len(saved) == len(seen["moments"]) > 0 and not any(m is None for m in saved)
    assert all(torch.equal(a, b) for a, b in zip(saved, seen["moments"], strict=True))
