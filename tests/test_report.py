"""The HTML run report: self-contained, complete for a finished run, honest about missing pieces,
and checked in a real headless Chromium (skipped when /usr/bin/chromium is absent)."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from medivae import api
from medivae.cli import main
from medivae.report import build_report, plots, write_report
from medivae.report.html import png_size
from medivae.runtime.errors import UserError

from chromium import CHROMIUM, IMAGE_CHECK, DevTools, errors
from tiny import tiny_run

DATA_URI = re.compile(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'")


@pytest.fixture(scope="module")
def tiny_run_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("report") / "run"
    api.train(tiny_run("phantoms:64", epochs=2), run, progress=False)
    return run


@pytest.fixture(scope="module")
def full_run_dir(tiny_run_dir, tmp_path_factory) -> Path:
    """The tiny run plus everything the other commands add: evaluation, anomaly, privacy, utility, figures."""
    run = tmp_path_factory.mktemp("full") / "run"
    shutil.copytree(tiny_run_dir, run)
    results = {
        "evaluation": {
            "likelihood": {"neg_elbo_nats": 700.5, "iwae_nats": 690.25, "k": 100},
            "collapse": {"kl_per_dim": [3.2, 0.004, 1.7, 0.0], "active_units": 2},
            "sample_quality": {"FD-classifier": {"model": 12.5, "real_test": 1.25}},
        },
        "anomaly": {"auroc": 0.875, "roc": {"fpr": [0.0, 0.25, 1.0], "tpr": [0.0, 0.75, 1.0]}},
        "privacy": {"rejected": 3, "memorisation_rate": 0.003},
        "utility": {"real_only": {"auc": 0.91, "accuracy": 0.85}, "tstr": {"auc": 0.88, "accuracy": 0.8}},
        "calibration": {"expected_calibration_error": 0.0421},
    }
    (run / "results.json").write_text(json.dumps(results))
    (run / "anomaly").mkdir()
    shutil.copy(run / "reconstructions.png", run / "anomaly" / "overlay_0.png")
    shutil.copy(run / "interpolation.png", run / "traversal_dim0.png")
    write_report(run)
    return run


def _embedded_images(html: str) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(b))) for b in DATA_URI.findall(html)]


def test_train_writes_a_self_contained_report(tiny_run_dir):
    html = (tiny_run_dir / "report.html").read_text()
    images = _embedded_images(html)
    # training curves + samples, interpolation, reconstructions; each one decodes to the run's picture
    assert len(images) == 4
    sizes = {im.size for im in images}
    for name in ("samples.png", "interpolation.png", "reconstructions.png"):
        assert Image.open(tiny_run_dir / name).size in sizes
    assert not re.search(r"https?://", html)
    assert not re.search(r"<script|<link|@import|url\(", html, re.I)
    cfg = json.loads((tiny_run_dir / "config.json").read_text())
    model = cfg["model"]
    for value in (cfg["train"]["seed"], cfg["data"]["source"], model["name"], model["latent_dim"]):
        assert f">{value}<" in html
    env = json.loads((tiny_run_dir / "env.json").read_text())
    assert env["seed"] == cfg["train"]["seed"] and env["device"] == "cpu"
    assert f">{env['packages']['torch']}<" in html
    assert "No evaluation yet" in html and "medivae evaluate" in html


def test_results_sections_render_known_and_unknown_keys(full_run_dir):
    html = (full_run_dir / "report.html").read_text()
    assert "No evaluation yet" not in html
    assert "Active units: 2 of 4" in html
    for text in ("690.2", "Anomaly detection", "overlay_0", "Privacy", "Utility", "tstr", "traversals"):
        assert text in html
    # a results key the report has never heard of still shows up, with its value
    assert "Calibration" in html and "0.0421" in html
    # curves, KL per dimension, ROC, 3 generation figures, traversal, anomaly overlay
    assert len(_embedded_images(html)) == 8


def test_missing_pieces_say_which_command_makes_them(tiny_run_dir, tmp_path):
    run = tmp_path / "bare run"
    run.mkdir()
    shutil.copy(tiny_run_dir / "config.json", run)
    (run / "data.json").write_text(json.dumps(
        {"train": {"n": 2, "labels": {"normal": 2}, "meta": {"source": "dicom", "patient_ids": ["PAT-0042"]}}}
    ))
    html = build_report(run)
    assert "No training metrics" in html and "No samples" in html and "No reconstructions" in html
    assert "No evaluation yet: run <code>medivae evaluate &#x27;" in html  # the path with a space is quoted
    assert "Environment not recorded" in html
    assert "PAT-0042" not in html and "patient ids" not in html
    assert not _embedded_images(html)


VQ_ROWS = [  # a family with its own term names, and an epoch-end statistic only the training split has
    {"epoch": e, "train_loss": 3.0 / e, "train_commitment": 0.5 / e, "train_perplexity": 20.0 + e,
     "train_codebook_usage": 0.5, "val_loss": 3.5 / e, "val_commitment": 0.6 / e, "lr": 1e-3,
     "nan_events": 0, "seconds": 2.0, "images_per_s": 50.0}
    for e in (1, 2, 3)
]
LEGACY_ROWS = [  # metrics.jsonl of a run from before the family contract
    {"epoch": e, "train_loss": 9.0 - e, "train_rec": 8.0 - e, "train_kl": 1.0, "val_loss": 9.5 - e,
     "val_rec": 8.5 - e, "val_kl": 1.0, "lr": 1e-3, "seconds": 2.0, "images_per_s": 50.0}
    for e in (1, 2)
]


def _panels(fig) -> dict[str, list[str]]:
    """{panel title: labels of its lines} of a curves figure."""
    return {ax.get_title(): [ln.get_label() for ln in ax.get_lines() if not ln.get_label().startswith("_")]
            for ax in fig.axes}


def test_training_curves_follow_the_logged_terms():
    assert [k for k, _ in plots.curve_panels(VQ_ROWS)] == ["loss", "commitment", "perplexity", "codebook_usage", "lr"]
    best = "best val (epoch 3)"
    assert _panels(plots.curves_figure(VQ_ROWS)) == {
        "loss": ["train", "validation", best],  # not called a negative ELBO: this family has no rec/kl terms
        "commitment": ["train", "validation", best],
        "perplexity": ["train", best],
        "codebook usage": ["train", best],  # a constant still gets its panel
        "learning rate": [best],
    }
    assert png_size(plots.training_curves(VQ_ROWS)) == (1650, 660)  # 5 panels: 3 columns, 2 rows
    # "loss" comes first wherever it appears in the rows
    assert plots.curve_terms([{"epoch": 1, "train_rec": 1.0, "val_loss": 2.0}]) == ["loss", "rec"]


def test_training_curves_of_an_older_run_look_as_before():
    titles = list(_panels(plots.curves_figure(LEGACY_ROWS)))
    assert titles == [
        "negative ELBO (nats / image)", "reconstruction term (nats / image)", "KL term (nats / image)",
        "learning rate",
    ]
    assert png_size(plots.training_curves(LEGACY_ROWS)) == (1100, 660)  # the 2x2 grid of before


def test_report_of_a_family_without_likelihood_or_gaussian_latent(tmp_path):
    run = tmp_path / "vq"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(
        {"model": {"name": "vq_vae", "image_size": 32, "channels": 1, "codebook_size": 64},
         "data": {"source": "phantoms:64", "image_size": 32}, "train": {"epochs": 3, "seed": 7}}
    ))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in VQ_ROWS))
    evaluation = {
        "model": {"name": "vq_vae", "likelihood": None, "latent_dim": None, "capabilities": []},
        "likelihood": None,
        "reconstruction": {"mse": 0.0125, "psnr_db": 19.03, "ssim": 0.61, "n_images": 8},
        "collapse": None,
        "sample_quality": None,
        "fid": None,
        "absent": {
            "likelihood": "vq_vae defines no image likelihood",
            "collapse": "vq_vae has no continuous Gaussian latent to traverse",
            "sample_quality": "vq_vae cannot draw samples",
        },
    }
    (run / "results.json").write_text(json.dumps({"evaluation": evaluation}))
    html = build_report(run)
    assert "Likelihood: not measured — vq_vae defines no image likelihood" in html
    assert "Posterior collapse: not measured — vq_vae has no continuous Gaussian latent" in html
    assert "Sample quality: not measured — vq_vae cannot draw samples" in html
    # no table, heading or row for what was not measured; what was measured is there
    assert "<h3>likelihood</h3>" not in html and html.count("<th>likelihood</th>") == 1  # model.likelihood
    assert "<th>collapse</th>" not in html and "<th>sample quality</th>" not in html
    assert "KL per latent dimension and active units" not in html and "<h3>absent</h3>" not in html
    assert "<h3>reconstruction</h3>" in html and "19.03" in html
    # no VAE-only facts, and no command suggested that this family cannot run
    assert "<li>model: vq_vae</li>" in html and "latent None" not in html and "None likelihood" not in html
    assert "best validation loss: 1.167 (epoch 3)" in html and "negative ELBO" not in html
    assert "Samples: not available — vq_vae lacks the sample capability" in html
    assert "medivae sample" not in html and "No reconstructions" in html
    (curves,) = _embedded_images(html)
    assert curves.size == (1650, 660) and "alt='training curves'" in html


def test_report_package_never_imports_torch(tiny_run_dir):
    code = (
        "import sys; from medivae.report import build_report; "
        f"build_report({str(tiny_run_dir)!r}); assert 'torch' not in sys.modules, 'torch imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_cli_report(tiny_run_dir, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["report", str(tiny_run_dir), "--out", str(out)]) == 0
    assert out.read_text().startswith("<!DOCTYPE html>")
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "no such run folder" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty)]) == 2


def test_tensorboard_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    with pytest.raises(UserError, match=r"pip install 'medivae\[tensorboard\]'"):
        api.train(tiny_run(epochs=1, tensorboard=True), tmp_path / "run", progress=False)


def test_tensorboard_logs_scalars_per_epoch(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = api.train(tiny_run("phantoms:64", epochs=2, tensorboard=True), tmp_path / "run", progress=False)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [(s.step, s.value) for s in events.Scalars("val/loss")]
    assert logged == [(m["epoch"], pytest.approx(m["val_loss"], rel=1e-6)) for m in metrics]


# --- the report in a real browser ------------------------------------------------------------------
def _open_in_chromium(page: Path, profile: Path) -> tuple[list, list[dict]]:
    """(alt text and decoded flag of every image, DevTools events) after the page's load event."""
    tools = DevTools(profile)
    try:
        session = tools.open_tab()
        events = tools.load(session, page.resolve().as_uri())
        return json.loads(tools.evaluate(session, IMAGE_CHECK)), events
    finally:
        tools.close()


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_report_opens_in_headless_chromium(full_run_dir, tmp_path):
    images, events = _open_in_chromium(full_run_dir / "report.html", tmp_path / "profile")
    assert len(images) == 8
    assert all(ok for _, ok in images), images
    assert any(e["method"] == "Page.loadEventFired" for e in events)
    assert errors(events) == []


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_browser_check_catches_a_broken_image(full_run_dir, tmp_path):
    """The browser check can fail: a corrupt embedded PNG is reported as not decoded."""
    html = (full_run_dir / "report.html").read_text()
    broken = tmp_path / "broken.html"
    broken.write_text(DATA_URI.sub("src='data:image/png;base64,AAAAAAAA'", html, count=1))
    images, _ = _open_in_chromium(broken, tmp_path / "profile")
    assert [ok for _, ok in images].count(False) == 1
