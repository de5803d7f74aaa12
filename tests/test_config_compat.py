"""Run folders written before the family contract still open; a family medivae does not know is named
with the version that wrote the run; --resume refuses settings that differ from the run's."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
import torch

from medivae import api
from medivae.cli import main
from medivae.models import build_model, model_config
from medivae.runfolder.run import load_run
from medivae.runtime.errors import UserError
from medivae.train import checkpoint as ckpt

from tiny import tiny_run

# config.json["model"] as medivae 0.1.0 wrote it, before families had their own config classes
OLD_MODEL = {"name": "cvae", "image_size": 32, "channels": 1, "latent_dim": 4, "base_width": 4, "max_width": 16,
             "likelihood": "bernoulli", "gaussian_sigma": 0.1, "num_classes": 2, "beta": 1.0}


def _old_run(tmp_path, model: dict, written: dict | None = None):
    """A run folder whose best/ holds ``model``'s weights and, as config.json["model"], ``written``
    (default: ``model`` itself)."""
    cfg = tiny_run().to_dict()
    cfg.pop("medivae_version")
    cfg["model"], cfg["label_names"] = written or model, ["normal", "lesion"]
    run = tmp_path / "old"
    torch.manual_seed(0)
    net = build_model(model_config(model["name"], **{k: v for k, v in model.items() if k != "name"}))
    ckpt.save_checkpoint(run / "best", net, cfg)
    return run, net


def test_a_run_written_before_the_family_contract_still_loads(tmp_path):
    run, net = _old_run(tmp_path, OLD_MODEL)
    opened = load_run(run, device="cpu")
    assert opened.config.model.num_classes == 2 and "conditional" in opened.model.capabilities
    x, y = torch.rand(3, 1, 32, 32), torch.tensor([0, 1, 1])
    torch.testing.assert_close(opened.model.eval().reconstruct(x, y), net.eval().reconstruct(x, y))


def test_an_unknown_family_names_the_version_that_wrote_the_run(tmp_path, capsys):
    run, _ = _old_run(tmp_path, OLD_MODEL)
    cfg = json.loads((run / "best" / "config.json").read_text())
    cfg["model"]["name"], cfg["medivae_version"] = "wavelet_vae", "9.9.9"
    ckpt.save_checkpoint(run / "best", build_model(model_config("cvae", image_size=32, num_classes=2)), cfg)
    assert main(["sample", str(run), "-n", "2", "--out", str(tmp_path / "s.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "wavelet_vae" in err and "9.9.9" in err and "conv_vae" in err


def test_a_misspelled_model_key_is_refused_by_name(tmp_path):
    with pytest.raises(UserError, match="latent_dimm"):
        model_config("conv_vae", latent_dimm=8)
    run, _ = _old_run(tmp_path, OLD_MODEL, {**OLD_MODEL, "latnt_dim": 4})
    with pytest.raises(UserError, match="latnt_dim"):
        load_run(run, device="cpu")


def test_resume_refuses_changed_settings_and_allows_more_epochs(tmp_path, capsys):
    args = ["train", "--data", "phantoms:80", "--image-size", "32", "--model-arg", "base_width=4",
            "--model-arg", "max_width=16", "--latent-dim", "4", "--batch-size", "32", "--precision", "fp32",
            "--no-progress", "--out", str(tmp_path / "r")]
    assert main([*args, "--epochs", "1"]) == 0
    before = (tmp_path / "r" / "last" / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main([*args, "--epochs", "2", "--resume", "--lr", "0.1", "--latent-dim", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "train.lr" in err and "model.latent_dim" in err
    assert (tmp_path / "r" / "last" / "model.safetensors").read_bytes() == before  # nothing was trained
    assert main([*args, "--epochs", "2", "--resume"]) == 0  # the same flags, more epochs
    assert json.loads((tmp_path / "r" / "last" / "state.json").read_text())["epoch"] == 2


def test_resume_from_python_compares_the_whole_config(tmp_path):
    cfg = tiny_run("phantoms:80", epochs=1)
    api.train(cfg, tmp_path / "r", progress=False)
    other = tiny_run("phantoms:80", epochs=2, lr=0.5)
    with pytest.raises(UserError, match="train.lr"):
        api.train(other, tmp_path / "r", resume=True, progress=False)


def _legacy(cfg_dict: dict, **train) -> dict:
    """``cfg_dict`` as versions wrote it that kept the KL settings among every family's training settings."""
    d = json.loads(json.dumps(cfg_dict))
    for k in ("kl_schedule", "warmup_epochs", "free_bits"):
        d["model"].pop(k, None)
    d["train"].update({"kl_schedule": "constant", "warmup_epochs": 0.0, "free_bits": 0.0, **train})
    return d


def test_kl_settings_written_as_training_settings_move_into_the_family():
    from medivae.runfolder.config import RunConfig

    conv = tiny_run().to_dict()
    back = RunConfig.from_dict(_legacy(conv, kl_schedule="cyclical", warmup_epochs=2.0, free_bits=0.25))
    m = back.model
    assert (m.kl_schedule, m.warmup_epochs, m.free_bits) == ("cyclical", 2.0, 0.25)
    assert back.train == RunConfig.from_dict(conv).train  # nothing else changed
    hv = {**conv, "model": {"name": "hierarchical_vae", "image_size": 32, "channels": 1, "kl_balance": True}}
    old = RunConfig.from_dict(_legacy(hv)).model  # a constant schedule never balanced: off, as it ran
    assert (old.kl_schedule, old.kl_balance) == ("constant", False)
    warm = RunConfig.from_dict(_legacy(hv, kl_schedule="linear", warmup_epochs=0.5)).model
    assert (warm.kl_schedule, warm.warmup_epochs, warm.kl_balance) == ("linear", 0.5, True)
    vq = {**conv, "model": {"name": "vq_vae", "image_size": 32, "channels": 1}}
    assert RunConfig.from_dict(_legacy(vq, free_bits=0.5)).model == model_config("vq_vae", image_size=32)


def test_an_old_run_folder_with_training_kl_settings_opens_and_resumes(tmp_path):
    cfg = tiny_run("phantoms:80", epochs=1)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, kl_schedule="linear", warmup_epochs=3.0))
    run = api.train(cfg, tmp_path / "r", progress=False)
    for path in [run / "config.json", *run.glob("*/config.json")]:  # as an older version wrote them
        path.write_text(json.dumps(_legacy(json.loads(path.read_text()), kl_schedule="linear", warmup_epochs=3.0)))
        manifest = path.parent / ckpt.MANIFEST
        if manifest.exists():  # a checkpoint's manifest names its config.json's bytes
            m = json.loads(manifest.read_text())
            data = path.read_bytes()
            m["files"]["config.json"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            manifest.write_text(json.dumps(m))
    assert load_run(run, device="cpu").config.model == cfg.model  # the settings it trained with
    assert main(["train", "--config", str(run / "config.json"), "--out", str(run), "--resume", "--epochs", "2",
                 "--no-progress"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_beta"] < 1.0 for r in rows] == [True, True]  # the warm-up went on (3 epochs long)


def test_a_config_without_split_seed_splits_with_its_training_seed():
    """Before data.split_seed, the training seed split the data: an old config keeps that split."""
    from medivae.runfolder.config import RunConfig

    d = tiny_run(seed=5).to_dict()
    del d["data"]["split_seed"]
    cfg = RunConfig.from_dict(d)
    assert cfg.data.split_seed == cfg.train.seed == 5
    assert RunConfig.from_dict(tiny_run(seed=5).to_dict()).data.split_seed == 1767661200070  # today: the data's own
    with pytest.raises(UserError, match="split seed must be >= 0"):
        RunConfig.from_dict({**d, "data": {**d["data"], "split_seed": -1}})
