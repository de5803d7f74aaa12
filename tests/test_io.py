"""Atomic writes of files and of folders of files."""

from __future__ import annotations

import pytest

from medivae.runtime.io import relocated, staged_folder


def test_a_staged_folder_appears_whole_or_not_at_all(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(OSError):
        with staged_folder(final) as stage:
            (stage / "a.txt").write_text("first")
            raise OSError("disk full")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its staging copy
    with staged_folder(final) as stage:
        (stage / "a.txt").write_text("first")
        (stage / "b.txt").write_text("first")
    assert sorted(p.name for p in final.iterdir()) == ["a.txt", "b.txt"]
    with pytest.raises(KeyboardInterrupt):
        with staged_folder(final) as stage:
            (stage / "a.txt").write_text("second")
            raise KeyboardInterrupt
    assert {p.name: p.read_text() for p in final.iterdir()} == {"a.txt": "first", "b.txt": "first"}
    with staged_folder(final) as stage:  # a finished replacement: nothing of the earlier output stays
        (stage / "a.txt").write_text("third")
    assert {p.name: p.read_text() for p in final.iterdir()} == {"a.txt": "third"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_relocated_names_the_final_folder(tmp_path):
    stage, final = tmp_path / ".out.x.partial", tmp_path / "out"
    assert relocated({"csv": str(stage / "scores.csv"), "png": str(stage / "sub" / "m.png")}, stage, final) == {
        "csv": str(final / "scores.csv"), "png": str(final / "sub" / "m.png")}
