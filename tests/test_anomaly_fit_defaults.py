"""`medivae anomaly fit` defaults: the model size follows the source's native size (no 28 -> 64 upsampling),
Gaussian likelihood for families that have one, 25 epochs, batch 64; a typed flag always wins."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

from medivae.cli import build_parser, main
from medivae.commands.anomaly import FIT_DEFAULTS, apply_fit_defaults, auto_image_size
from medivae.data.inspect import native_side

TINY = "--latent-dim 4 --base-width 4 --precision fp32 --no-progress --threads 1".split()


def _npz(path, side: int, n: int = 60):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (n, side, side), dtype=np.uint8)
    labels = (np.arange(n) % 2)[:, None]
    np.savez(path, train_images=imgs, train_labels=labels, val_images=imgs[:20], val_labels=labels[:20],
             test_images=imgs[:20], test_labels=labels[:20])
    return path


def test_auto_image_size_never_upsamples_past_the_next_supported_size_and_stops_at_64():
    assert [auto_image_size(n) for n in (20, 28, 32, 33, 64, 100, 512)] == [32, 32, 32, 64, 64, 64, 64]
    assert auto_image_size(None) == 64


def test_native_side_reads_the_header_only(tmp_path):
    assert native_side(str(_npz(tmp_path / "a.npz", 28))) == 28
    assert native_side(str(_npz(tmp_path / "b.npz", 48))) == 48
    assert native_side("medmnist:pneumoniamnist") == 28 and native_side("medmnist:pneumoniamnist@128") == 128
    assert native_side(str(tmp_path)) is None and native_side("phantoms:100") is None
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    assert native_side(str(tmp_path / "bad.npz")) is None  # the loader, not this probe, reports the error
    with zipfile.ZipFile(tmp_path / "other.npz", "w") as z:
        z.writestr("images.npy", b"")
    assert native_side(str(tmp_path / "other.npz")) is None


def _args(*argv):
    return build_parser().parse_args(["anomaly", "fit", "--normal-label", "0", "--out", "r", *argv])


def test_defaults_fill_only_what_was_not_typed(tmp_path):
    src = str(_npz(tmp_path / "a.npz", 28))
    a = _args("--data", src)
    apply_fit_defaults(a)
    assert (a.image_size, a.likelihood, a.epochs, a.batch_size) == (32, "gaussian", 25, 64)
    b = _args("--data", src, "--image-size", "64", "--likelihood", "bernoulli", "--epochs", "3", "--batch-size", "8")
    apply_fit_defaults(b)
    assert (b.image_size, b.likelihood, b.epochs, b.batch_size) == (64, "bernoulli", 3, 8)
    c = _args("--data", src, "--model", "vq_vae")  # no likelihood field: none is forced on it
    apply_fit_defaults(c)
    assert c.likelihood is None and c.image_size == 32
    d = _args("--data", src, "--model-arg", "likelihood=bernoulli")
    apply_fit_defaults(d)
    assert d.likelihood is None
    assert FIT_DEFAULTS["likelihood"] == "gaussian"


def test_fit_without_size_flags_trains_at_32_px_on_28_px_npz(tmp_path, capsys):
    src = _npz(tmp_path / "a.npz", 28)
    out = tmp_path / "run"
    assert main(["anomaly", "fit", "--data", str(src), "--normal-label", "0", "--out", str(out), "--epochs", "1",
                 *TINY]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["data"]["image_size"] == 32 and cfg["model"]["image_size"] == 32
    assert cfg["model"]["likelihood"] == "gaussian" and cfg["train"]["batch_size"] == 64


@pytest.mark.parametrize("flag", ["--image-size", "--epochs", "--batch-size"])
def test_help_states_the_anomaly_defaults(flag, capsys):
    with pytest.raises(SystemExit):
        main(["anomaly", "fit", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert {"--image-size": "at most 64", "--epochs": "default 25", "--batch-size": "default 64"}[flag] in text


def _png_folder(root, classes, n: int, side: int = 28, seed: int = 0):
    """root/<class>/<i>.png: n random side x side gray images per class."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for cls in classes:
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (side, side), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


def test_native_side_of_folders_reads_image_and_dicom_headers(tmp_path):
    from PIL import Image

    from test_dicom import write_dicom

    rng = np.random.default_rng(0)
    _png_folder(tmp_path / "png", ("normal", "tumour"), 5)
    (tmp_path / "png" / "normal" / "broken.png").write_bytes(b"not a png")  # skipped; the loader reports it
    assert native_side(str(tmp_path / "png")) == 28 and auto_image_size(28) == 32
    Image.fromarray(rng.integers(0, 256, (20, 40), dtype=np.uint8)).save(tmp_path / "png" / "tumour" / "wide.png")
    assert native_side(str(tmp_path / "png")) == 40  # the longer side of the largest sampled image
    (tmp_path / "dcm").mkdir()
    for i in range(3):
        write_dicom(tmp_path / "dcm" / f"{i}.dcm", rng.integers(0, 4000, (30, 30), dtype=np.uint16))
    assert native_side(str(tmp_path / "dcm")) == 30
    (tmp_path / "empty").mkdir()
    assert native_side(str(tmp_path / "empty")) is None


def test_fit_on_a_folder_of_28px_images_trains_at_32(tmp_path):
    _png_folder(tmp_path / "data", ("normal", "lesion"), 40, seed=1)
    out = tmp_path / "run"
    assert main(["anomaly", "fit", "--data", str(tmp_path / "data"), "--normal-label", "normal", "--out", str(out),
                 "--epochs", "1", *TINY]) == 0
    assert json.loads((out / "config.json").read_text())["data"]["image_size"] == 32
