"""The reference extractor's key is what the data is: the same bytes on another path (a copy, a symlink, a moved
folder) share one extractor, a changed pixel does not; content hashes are cached and a corrupt cache survived."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from medivae.data import identity
from medivae.data.cache import cache_root
from medivae.evaluation.features import reference_key
from medivae.workflows.evaluate import reference_description

from tiny import tiny_run


def key(source) -> str:
    cfg = tiny_run()
    return reference_key(reference_description(dataclasses.replace(cfg.data, source=str(source))))


def images(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (12, 8, 8), dtype=np.uint8)  # (N, H, W)


def write_npz(path, imgs: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, train_images=imgs, train_labels=(np.arange(len(imgs)) % 2)[:, None])
    return path


def write_folder(root, imgs: np.ndarray):
    for i, im in enumerate(imgs):
        (root / ("a" if i % 2 else "b")).mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(root / ("a" if i % 2 else "b") / f"{i:02d}.png")
    return root


def symlink_or_skip(target, link):
    try:
        os.symlink(target, link)
    except (OSError, NotImplementedError):
        pytest.skip("this file system has no symlinks")
    return link


def test_the_same_npz_at_two_paths_and_through_a_symlink_has_one_key(tmp_path):
    first = write_npz(tmp_path / "here" / "d.npz", images())
    second = tmp_path / "elsewhere" / "copy.npz"
    second.parent.mkdir()
    shutil.copyfile(first, second)
    link = symlink_or_skip(first, tmp_path / "link.npz")
    assert key(first) == key(second) == key(link)
    changed = images()
    changed[3, 4, 5] ^= 1  # one pixel of one image
    assert key(write_npz(tmp_path / "other" / "d.npz", changed)) != key(first)


def test_the_same_folder_of_pngs_copied_moved_or_linked_has_one_key(tmp_path):
    first = write_folder(tmp_path / "data" / "pngs", images())
    copy = tmp_path / "machine2" / "checkout" / "pngs"
    shutil.copytree(first, copy)
    link = symlink_or_skip(first, tmp_path / "link")
    assert key(first) == key(copy) == key(link)
    png = copy / "a" / "01.png"
    im = np.asarray(Image.open(png)).copy()
    im[0, 0] ^= 1  # one pixel of one file
    Image.fromarray(im).save(png)
    assert key(copy) != key(first)
    shutil.copytree(first, tmp_path / "renamed")
    (tmp_path / "renamed" / "a").rename(tmp_path / "renamed" / "c")  # another class name: other labels
    assert key(tmp_path / "renamed") != key(first)


def test_content_hashes_are_cached_and_a_corrupt_cache_is_rewritten(tmp_path, monkeypatch):
    folder = write_folder(tmp_path / "pngs", images(1))
    calls = []
    real = identity.sha256_file
    monkeypatch.setattr(identity, "sha256_file", lambda p: calls.append(p) or real(p))
    cache = cache_root() / identity.HASH_CACHE
    first = key(folder)
    assert len(calls) == len(images(1))  # each file read once
    assert key(folder) == first and len(calls) == len(images(1))  # then taken from the cache
    (folder / "a" / "01.png").touch()  # a new mtime: that file alone is read again
    os.utime(folder / "a" / "01.png", ns=(0, 12345))
    assert key(folder) == first and len(calls) == len(images(1)) + 1
    for junk in ("{broken", "[1, 2]", '{"x": 3}'):
        cache.write_text(junk)
        before = len(calls)
        assert key(folder) == first and len(calls) == before + len(images(1))  # hashed again, no traceback
        assert str(folder.resolve() / "a" / "01.png") in cache.read_text()  # and written back whole


def test_the_extractor_is_fitted_the_same_under_any_thread_count_which_is_then_restored(tmp_path):
    """CPU kernels sum in another order per thread count; the extractor is fitted under one thread, so two
    machines with other core counts get the same weights, and the caller keeps its own thread count."""
    import torch

    from medivae.data import load_dataset
    from medivae.evaluation.features import load_or_fit_reference

    train = load_dataset(tiny_run("phantoms:200").data, progress=False)["train"]
    before, weights = torch.get_num_threads(), []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            ref = load_or_fit_reference(tmp_path / str(threads), train, {"source": "t"}, epochs=2, progress=False)
            assert torch.get_num_threads() == threads
            weights.append(hashlib.sha256(next(ref.folder.glob("*.safetensors")).read_bytes()).hexdigest())
    finally:
        torch.set_num_threads(before)
    assert weights[0] == weights[1]
