"""Source specs: folders, CSV lists, archives, .npz, medmnist: (never the network), bad input."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
import urllib.error
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import medivae.data.medmnist as medmnist
from medivae.cli import main
from medivae.data import load_dataset, load_source
from medivae.runfolder.config import DataConfig
from medivae.runtime.errors import UserError

FORMATS = ("png", "jpeg", "tif", "bmp")


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDIVAE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.medmnist from the machine

    def offline(url, dest, progress):
        raise AssertionError(f"tests must not download {url}")

    monkeypatch.setattr(medmnist, "_fetch", offline)


def make_folder(root: Path, per_class=6, size=(16, 16)) -> Path:
    """Class "dark" images are 40, "light" 200; formats rotate over PNG/JPEG/TIFF/BMP."""
    for cls, level in (("dark", 40), ("light", 200)):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            fmt = FORMATS[i % len(FORMATS)]
            Image.fromarray(np.full(size, level, np.uint8)).save(root / cls / f"{i:02d}.{fmt}")
    return root


def cfg(source, **kw) -> DataConfig:
    return DataConfig(source=str(source), **{"image_size": 32, **kw})


def test_folder_of_mixed_formats_with_class_subfolders(tmp_path):
    s = load_source(cfg(make_folder(tmp_path / "f")), progress=False)["all"]
    assert s.images.shape == (12, 1, 32, 32) and s.images.dtype == np.uint8
    assert s.label_names == ("dark", "light") and s.label_counts() == {"dark": 6, "light": 6}
    centre = s.images[:, 0, 16, 16].astype(int)
    assert np.all(np.abs(centre[s.labels == 0] - 40) <= 2)
    assert np.all(np.abs(centre[s.labels == 1] - 200) <= 2)


def test_non_square_images_pad_or_crop_and_mixed_sizes_are_reported(tmp_path):
    root = tmp_path / "ns"
    root.mkdir()
    Image.fromarray(np.full((20, 40), 255, np.uint8)).save(root / "wide.png")  # H=20, W=40
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(root / "square.png")
    with pytest.warns(UserWarning, match="2 sizes"):
        pad = load_source(cfg(root), progress=False)["all"]
    with pytest.warns(UserWarning, match="centre-cropped"):
        crop = load_source(cfg(root, resize_mode="crop"), progress=False)["all"]
    wide = 1  # sorted: square.png, wide.png
    assert pad.images[wide, 0, 0, 16] == 0 and pad.images[wide, 0, 16, 16] == 255  # bars above and below
    assert crop.images[wide].min() == 255


def test_csv_of_path_label_group_keeps_groups_together(tmp_path):
    root = make_folder(tmp_path / "f", per_class=16)  # 8 patients of 4 images, 4 per class
    files = sorted(root.rglob("*.*"))
    rows = ["path,label,patient"]
    rows += [f"{p.relative_to(root)},{p.parent.name},pt{i // 4}" for i, p in enumerate(files)]
    (root / "list.csv").write_text("\n".join(rows) + "\n")
    splits = load_dataset(cfg(root / "list.csv", val_fraction=0.25, test_fraction=0.25, split_seed=3),
                          progress=False)
    assert sum(len(s) for s in splits.values()) == 32
    groups = [set(s.groups.tolist()) for s in splits.values()]
    assert all(len(s) % 4 == 0 and len(s) for s in splits.values())  # 4 images per patient
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])


def _archive(root: Path, out: Path) -> Path:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    if out.suffix == ".zip":
        with zipfile.ZipFile(out, "w") as z:
            for p in files:
                z.write(p, f"export/{p.relative_to(root)}")
    else:
        with tarfile.open(out, "w:gz") as t:
            t.add(root, arcname="export/resized")
    return out


@pytest.mark.parametrize("suffix", [".tar.gz", ".zip"])
def test_archive_reads_like_the_extracted_folder(tmp_path, suffix):
    root = make_folder(tmp_path / "f")
    (root / "README.txt").write_text("not an image")
    arch = _archive(root, tmp_path / f"data{suffix}")
    a = load_source(cfg(arch, labels=("light",)), progress=False)["all"]
    f = load_source(cfg(root), progress=False)["all"]
    assert a.label_names == f.label_names == ("dark", "light")
    order_a, order_f = np.argsort(a.labels, kind="stable"), np.argsort(f.labels, kind="stable")
    assert np.array_equal(a.images[order_a][:, :, 16, 16], f.images[order_f][:, :, 16, 16])
    assert a.meta["n_files"] == 12  # the README is not an input
    light = load_dataset(cfg(arch, labels=("light",), split_seed=0), progress=False)
    assert sum(len(s) for s in light.values()) == 6


def test_mednist_archive_sample(mednist_sample, tmp_path):
    classes = sorted(p.name for p in mednist_sample.iterdir())[:2]
    out = tmp_path / "MedNIST.tar.gz"
    with tarfile.open(out, "w:gz") as t:
        for c in classes:
            for p in sorted((mednist_sample / c).glob("*.jpeg"))[:10]:
                t.add(p, arcname=f"resized/{c}/{p.name}")
    s = load_source(cfg(out), progress=False)["all"]
    assert s.label_names == tuple(classes) and len(s) == 20 and s.images.shape[1:] == (1, 32, 32)


def test_corrupt_files_are_skipped_counted_and_reported(tmp_path):
    root = make_folder(tmp_path / "f")
    (root / "dark" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    good = (root / "light" / "01.jpeg").read_bytes()
    (root / "light" / "truncated.jpeg").write_bytes(good[: len(good) // 3])
    with pytest.warns(UserWarning, match=r"skipped \d of 14 files"):
        s = load_source(cfg(root, cache=False), progress=False)["all"]
    assert s.meta["n_skipped"] >= 1 and len(s) == 14 - s.meta["n_skipped"]
    assert any("broken.png" in x for x in s.meta["skipped"])


def test_training_goes_on_past_a_corrupt_file(tmp_path):
    from medivae import api

    from tiny import tiny_run

    root = make_folder(tmp_path / "f", per_class=20)
    (root / "dark" / "broken.png").write_bytes(b"garbage")
    run = tiny_run(str(root), epochs=1)
    with pytest.warns(UserWarning, match="skipped 1 of 41 files"):
        out = api.train(run, tmp_path / "run", progress=False)
    summary = json.loads((out / "data.json").read_text())
    assert summary["train"]["meta"]["n_skipped"] == 1
    assert (out / "last").exists()


def test_npz_file_and_multilabel_npz(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)  # 10 a class: one for validation, one for test
    np.savez(tmp_path / "a.npz", train_images=imgs, train_labels=np.arange(20)[:, None] % 2)
    splits = load_dataset(cfg(tmp_path / "a.npz", split_seed=0), progress=False)
    assert sum(len(s) for s in splits.values()) == 20 and splits["train"].label_names == ("0", "1")
    np.savez(tmp_path / "m.npz", train_images=imgs, train_labels=rng.integers(0, 2, (20, 14)))
    with pytest.warns(UserWarning, match="multi-label"):
        s = load_source(cfg(tmp_path / "m.npz"), progress=False)["train"]
    assert (s.labels == -1).all()


# --- medmnist: ---------------------------------------------------------------------------------


def fake_npz() -> bytes:
    buf = io.BytesIO()
    imgs = np.random.default_rng(1).integers(0, 256, (8, 28, 28), dtype=np.uint8)
    labels = (np.arange(8) % 2)[:, None]
    np.savez(buf, train_images=imgs, train_labels=labels, val_images=imgs[:2], val_labels=labels[:2],
             test_images=imgs[:2], test_labels=labels[:2])
    return buf.getvalue()


def test_medmnist_downloads_verifies_and_reuses(tmp_path, monkeypatch):
    blob = fake_npz()
    names, multi, md5s = medmnist.DATASETS["breastmnist"]
    md5s = (md5s[0], hashlib.md5(blob).hexdigest(), *md5s[2:])  # the fake file is "published" at 64 px
    monkeypatch.setitem(medmnist.DATASETS, "breastmnist", (names, multi, md5s))
    calls = []

    def fetch(url, dest, progress):
        calls.append(url)
        dest.write_bytes(blob)

    monkeypatch.setattr(medmnist, "_fetch", fetch)
    s = load_source(cfg("medmnist:breastmnist@64"), progress=False)
    assert calls == ["https://zenodo.org/records/10519652/files/breastmnist_64.npz?download=1"]
    assert (tmp_path / "cache" / "medmnist" / "breastmnist_64.npz").read_bytes() == blob
    assert set(s) == {"train", "val", "test"} and s["train"].label_names == names
    load_source(cfg("medmnist:breastmnist@64", image_size=64), progress=False)
    assert len(calls) == 1  # the local copy is used


def test_medmnist_corrupt_download_is_deleted(tmp_path, monkeypatch):
    monkeypatch.setattr(medmnist, "_fetch", lambda url, dest, progress: dest.write_bytes(b"not the file"))
    with pytest.raises(UserError, match="corrupt"):
        load_source(cfg("medmnist:pneumoniamnist"), progress=False)
    assert not any((tmp_path / "cache" / "medmnist").iterdir())


def test_medmnist_offline_says_which_file_to_put_where(tmp_path, monkeypatch, capsys):
    def offline(url, dest, progress):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(medmnist, "_fetch", offline)
    assert main(["data", "inspect", "medmnist:pneumoniamnist@128", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "cache" / "medmnist" / "pneumoniamnist_128.npz") in err


def test_medmnist_local_copy_of_the_shared_resave(pneumonia_npz, tmp_path):
    dest = tmp_path / "cache" / "medmnist" / "pneumoniamnist.npz"
    dest.parent.mkdir(parents=True)
    shutil.copy(pneumonia_npz, dest)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a known re-save: no "not the published file" warning
        s = load_source(cfg("medmnist:pneumoniamnist"), progress=False)
    assert {k: len(v) for k, v in s.items()} == {"train": 4708, "val": 524, "test": 624}
    assert s["test"].label_counts() == {"normal": 234, "pneumonia": 390}


def test_medmnist_spec_errors():
    for spec, msg in (("medmnist:nosuch", "unknown MedMNIST"), ("medmnist:pneumoniamnist@100", "sizes"),
                      ("medmnist:organmnist3d", "3D")):
        with pytest.raises(UserError, match=msg):
            load_source(cfg(spec), progress=False)


# --- bad input -> one line, exit code 2 -------------------------------------------------------


def test_bad_inputs_exit_with_code_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    folder = make_folder(tmp_path / "f")
    cases = [
        (["data", "inspect", str(tmp_path / "empty")], "no images found"),
        (["data", "inspect", str(tmp_path / "missing")], "no such file"),
        (["data", "inspect", str(tmp_path / "notes.txt")], "not a supported data source"),
        (["data", "inspect", str(folder), "--window", "wide"], "bad window"),
        (["data", "inspect", str(folder), "--labels", "purple"], "unknown label"),
        (["train", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "run")], "no images found"),
    ]
    for argv, msg in cases:
        assert main([*argv, "--no-progress"]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("medivae: error:") and msg in err and err.count("\n") == 1, (argv, err)
