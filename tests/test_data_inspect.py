"""medivae data inspect: counts, labels, intensity statistics and a preview grid, from the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from medivae.cli import main
from medivae.data.inspect import intensity_stats


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDIVAE_CACHE", str(tmp_path / "cache"))


def test_intensity_stats_match_numpy():
    x = np.random.default_rng(0).integers(0, 256, (50, 1, 8, 8), dtype=np.uint8)
    st = intensity_stats(x, chunk=7)
    assert st["mean"] == pytest.approx(x.mean()) and st["std"] == pytest.approx(x.std())
    median = int(np.percentile(x, 50, method="inverted_cdf"))
    assert (st["min"], st["max"], st["p50"]) == (x.min(), x.max(), median)
    assert st["fraction_zero"] == pytest.approx((x == 0).mean())


def test_inspect_prints_counts_and_writes_a_preview(tmp_path, capsys):
    for cls, level in (("normal", 60), ("lesion", 180)):
        (tmp_path / "d" / cls).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(np.full((12, 12), level, np.uint8)).save(tmp_path / "d" / cls / f"{i}.png")
    out = tmp_path / "preview.png"
    argv = ["data", "inspect", str(tmp_path / "d"), "--image-size", "32", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "images     20: train 16 · val 2 · test 2; each 1×32×32 uint8" in text
    assert "lesion 8, normal 8" in text
    img = np.asarray(Image.open(out))
    assert img.shape == (2 + 2 * 34, 2 + 8 * 34)  # two classes × 8 images of 32 px, 2 px gutters
    assert main([*argv, "--json"]) == 2  # the preview exists: replaced only with --force
    capsys.readouterr()
    assert main([*argv, "--json", "--force"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["splits"]["train"]["labels"] == {"lesion": 8, "normal": 8}
    assert summary["meta"]["cache"] == "hit"
    assert summary["splits"]["train"]["intensity"]["max"] == 180
