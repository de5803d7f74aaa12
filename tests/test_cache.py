"""The decoded cache: the second load decodes nothing, keys follow the preprocessing, writes are atomic."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import medivae.data.sources as sources
from medivae.data import load_dataset, load_source
from medivae.runfolder.config import DataConfig


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MEDIVAE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def folder(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(12):
            arr = rng.integers(0, 256, (24, 20), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "imgs" / cls / f"{i:02d}.png")
    return tmp_path / "imgs"


def count_reads(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = sources.read_file

    def counting(src, name, kind, opts):
        calls.append(name)
        return real(src, name, kind, opts)

    monkeypatch.setattr(sources, "read_file", counting)
    return calls


def entries(cache_dir: Path) -> list[Path]:
    root = cache_dir / "decoded"
    return sorted(root.iterdir()) if root.exists() else []


def test_second_load_decodes_nothing_and_streams_from_disk(folder, monkeypatch):
    cfg = DataConfig(source=str(folder), image_size=32)
    first = load_source(cfg, progress=False)["all"]
    assert first.meta["cache"] == "built" and len(first) == 24

    def fail(*a, **k):
        raise AssertionError("decoded on a cache hit")

    monkeypatch.setattr(sources, "read_file", fail)
    second = load_source(cfg, progress=False)["all"]
    assert second.meta["cache"] == "hit"
    assert isinstance(second.images, np.memmap)
    assert np.array_equal(np.asarray(second.images), np.asarray(first.images))
    assert np.array_equal(second.labels, first.labels) and second.label_names == ("a", "b")


def test_changing_the_preprocessing_or_the_files_invalidates(folder, cache_dir, monkeypatch):
    calls = count_reads(monkeypatch)
    cfg = DataConfig(source=str(folder), image_size=32)
    load_source(cfg, progress=False)
    assert len(calls) == 24
    load_source(dataclasses.replace(cfg, labels=("a",), val_fraction=0.2), progress=False)  # not preprocessing
    assert len(calls) == 24
    for change in (dict(image_size=64), dict(resize_mode="crop"), dict(channels=3), dict(window="brain")):
        load_source(dataclasses.replace(cfg, **change), progress=False)
    assert len(calls) == 24 * 5
    assert len(entries(cache_dir)) == 5
    f = folder / "a" / "00.png"
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a changed file
    load_source(cfg, progress=False)
    assert len(calls) == 24 * 6


def test_cache_and_memory_give_identical_splits(folder):
    cfg = DataConfig(source=str(folder), image_size=32, val_fraction=0.2, test_fraction=0.2)
    cached = load_dataset(dataclasses.replace(cfg, split_seed=7), progress=False)
    plain = load_dataset(dataclasses.replace(cfg, cache=False, split_seed=7), progress=False)
    for name in ("train", "val", "test"):
        assert np.array_equal(np.asarray(cached[name].images), plain[name].images)
        assert np.array_equal(cached[name].labels, plain[name].labels)
    # a generated split of a cached source lives on disk too (datasets larger than RAM)
    assert isinstance(cached["train"].images, np.memmap) and "subsets" in str(cached["train"].images.filename)
    again = load_dataset(dataclasses.replace(cfg, split_seed=7), progress=False)
    assert again["train"].images.filename == cached["train"].images.filename


def test_interrupted_build_leaves_nothing_half_written(folder, cache_dir, monkeypatch):
    real = sources.read_file
    calls = []

    def interrupt(src, name, kind, opts):
        calls.append(name)
        if len(calls) == 10:
            raise KeyboardInterrupt
        return real(src, name, kind, opts)

    monkeypatch.setattr(sources, "read_file", interrupt)
    cfg = DataConfig(source=str(folder), image_size=32)
    with pytest.raises(KeyboardInterrupt):
        load_source(cfg, progress=False)
    assert entries(cache_dir) == []  # neither an entry nor its temporary folder
    monkeypatch.setattr(sources, "read_file", real)
    assert load_source(cfg, progress=False)["all"].meta["cache"] == "built"


def test_damaged_entry_is_rebuilt(folder, cache_dir):
    cfg = DataConfig(source=str(folder), image_size=32)
    ref = np.asarray(load_source(cfg, progress=False)["all"].images).copy()
    (images,) = list((cache_dir / "decoded").glob("*/images.npy"))
    with images.open("r+b") as f:
        f.truncate(images.stat().st_size // 2)
    with pytest.warns(UserWarning, match="damaged"):
        s = load_source(cfg, progress=False)["all"]
    assert s.meta["cache"] == "built" and np.array_equal(np.asarray(s.images), ref)


def test_cache_off_touches_no_disk(folder, cache_dir):
    s = load_source(DataConfig(source=str(folder), image_size=32, cache=False), progress=False)["all"]
    assert not isinstance(s.images, np.memmap) and not cache_dir.exists()
