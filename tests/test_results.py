"""results.json has one writer (atomic, strict) and metrics.jsonl one tolerant reader."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from medivae.runfolder.results import merge_results, read_results
from medivae.runtime.errors import UserError
from medivae.train.metrics import read_metrics


@pytest.mark.parametrize("content", [b"{broken", b"[1, 2]", b"\xff\xfe not utf-8"])
def test_unreadable_results_json_is_refused_and_left_byte_identical(tmp_path, content):
    path = tmp_path / "results.json"
    path.write_bytes(content)
    with pytest.raises(UserError, match="move it away"):
        merge_results(path, "anomaly", {"auroc": 0.9})
    with pytest.raises(UserError):
        read_results(path)
    assert path.read_bytes() == content
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left behind


def test_merge_keeps_the_other_keys_and_replaces_its_own(tmp_path):
    path = tmp_path / "results.json"
    assert read_results(path) == {}
    merge_results(path, "evaluation", {"n_images": 8})
    merge_results(path, "privacy", {"n_rejected": 1})
    merge_results(path, "evaluation", {"n_images": 16})
    assert json.loads(path.read_text()) == {"evaluation": {"n_images": 16}, "privacy": {"n_rejected": 1}}


def test_non_finite_numbers_become_null_and_numpy_scalars_plain(tmp_path):
    path = tmp_path / "results.json"
    block = {"a": float("nan"), "b": [1.0, float("inf"), -np.inf], "c": {"d": np.float32("nan")},
             "e": np.float32(0.5), "f": np.int64(3), "g": (2.0, float("-inf"))}
    written = merge_results(path, "x", block)
    expected = {"a": None, "b": [1.0, None, None], "c": {"d": None}, "e": 0.5, "f": 3, "g": [2.0, None]}
    assert written == expected
    assert json.loads(path.read_text()) == {"x": expected}  # strict JSON: no NaN token in the file
    assert "NaN" not in path.read_text() and "Infinity" not in path.read_text()


def test_read_metrics_skips_bad_lines_says_so_and_sorts_by_epoch(tmp_path):
    rows = [{"epoch": 2, "val_loss": 1.5}, {"epoch": 1, "val_loss": float("nan")}]
    lines = [json.dumps(rows[0]), "{cut off", "", json.dumps([1]), json.dumps({"epoch": "3"}), json.dumps(rows[1])]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    problems: list[str] = []
    got = read_metrics(tmp_path, problems)  # the run folder or the file itself
    assert [r["epoch"] for r in got] == [1, 2] and np.isnan(got[0]["val_loss"])
    assert problems == ["metrics.jsonl: 3 unreadable line(s) skipped"]
    assert [r["epoch"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
    assert read_metrics(tmp_path / "nothing") == []


def test_results_module_never_imports_torch():
    code = "import sys, medivae.runfolder.results; assert 'torch' not in sys.modules and 'numpy' not in sys.modules"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
