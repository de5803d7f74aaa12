"""benchmarks/site_calibration.py: the scored split's normals are halved into a calibration folder and a scored
file that share no image, and every anomalous image stays scored (no training)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import site_calibration as sc  # noqa: E402


def test_halves_split_the_normals_and_keep_every_anomaly(tmp_path):
    rng = np.random.default_rng(0)
    data = {f"{s}_images": rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for s, n in
            (("train", 20), ("val", 8), ("test", 31))}  # fmt: skip
    for s, n in (("train", 20), ("val", 8), ("test", 31)):
        data[f"{s}_labels"] = (np.arange(n) % 3 == 0).astype(np.uint8).reshape(-1, 1)  # 1 = anomalous
    src = tmp_path / "pneumoniamnist.npz"
    np.savez(src, **data)
    work = tmp_path / "work"
    work.mkdir()
    folder, scored, n_cal, n_held = sc.halves(src, 0, "test", seed=3, work=work)
    test_x, test_y = data["test_images"], data["test_labels"].ravel()
    normals = {test_x[i].tobytes() for i in np.flatnonzero(test_y == 0)}
    cal = {np.asarray(Image.open(f)).tobytes() for f in sorted(folder.iterdir())}
    z = np.load(scored)
    kept_x, kept_y = z["test_images"], z["test_labels"].ravel()
    held = {x.tobytes() for x in kept_x[kept_y == 0]}
    assert scored.name == src.name  # MedMNIST class names are recognised by the file name
    assert (n_cal, n_held) == (len(cal), len(held)) and n_cal + n_held == len(normals) == 20 and n_cal == 10
    assert cal | held == normals and not cal & held
    assert sorted(x.tobytes() for x in kept_x[kept_y == 1]) == sorted(x.tobytes() for x in test_x[test_y == 1])
    for split in ("train", "val"):  # the other splits as they were
        assert np.array_equal(z[f"{split}_images"], data[f"{split}_images"])
    other = tmp_path / "other"
    other.mkdir()
    again = sc.halves(src, 0, "test", seed=4, work=other)[0]
    assert {p.name for p in again.iterdir()} != {p.name for p in folder.iterdir()}  # another seed, another halving
