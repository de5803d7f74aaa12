"""Atomic writes of files and of folders of files."""

from __future__ import annotations

import os
from pathlib import Path

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


def test_an_empty_folder_named_dot_is_filled_in_place(tmp_path, monkeypatch):
    """--out . in an empty working folder: the files land in it, the folder stays the same folder (the working
    directory is neither renamed nor deleted) and no staging folder is left, inside it or beside it."""
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    inode = here.stat().st_ino
    with staged_folder(".") as stage:
        (stage / "a.txt").write_text("new")
        (stage / "images").mkdir()
        (stage / "images" / "000000.png").write_bytes(b"png")
    assert os.getcwd() == str(here) and here.stat().st_ino == inode
    assert sorted(p.name for p in here.iterdir()) == ["a.txt", "images"] and (here / "a.txt").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["here"]
    with pytest.raises(KeyboardInterrupt):  # stopped: the empty folder is left empty
        with staged_folder(tmp_path / "empty") as stage:
            (stage / "a.txt").write_text("new")
            raise KeyboardInterrupt
    assert not (tmp_path / "empty").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(KeyboardInterrupt):
        with staged_folder(tmp_path / "empty" / ".") as stage:
            (stage / "a.txt").write_text("new")
            raise KeyboardInterrupt
    assert list((tmp_path / "empty").iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["empty",
                                                                                                        "here"]


def test_an_earlier_output_in_the_working_folder_is_replaced_in_place(tmp_path, monkeypatch):
    """--out . --force over an earlier output in the working folder: the folder is not renamed away (the process
    and the shell stay in it); a stop leaves the earlier files, a finished block only the new ones."""
    here = tmp_path / "here"
    here.mkdir()
    (here / "a.txt").write_text("first")
    (here / "b.txt").write_text("first")
    monkeypatch.chdir(here)
    with pytest.raises(KeyboardInterrupt):
        with staged_folder(".") as stage:
            (stage / "a.txt").write_text("second")
            raise KeyboardInterrupt
    assert {p.name: p.read_text() for p in here.iterdir()} == {"a.txt": "first", "b.txt": "first"}
    with staged_folder(".") as stage:
        (stage / "a.txt").write_text("second")
    assert os.getcwd() == str(here) and Path("a.txt").read_text() == "second"
    assert [p.name for p in here.iterdir()] == ["a.txt"] and [p.name for p in tmp_path.iterdir()] == ["here"]


def test_an_earlier_output_behind_a_link_is_replaced_where_the_link_points(tmp_path):
    """--out LINK --force, LINK a symbolic link to a folder holding an earlier output: the new files replace the
    earlier ones in the folder it points to; the link stays a link and nothing is left beside it."""
    target, link = tmp_path / "target", tmp_path / "link"
    target.mkdir()
    (target / "a.txt").write_text("first")
    link.symlink_to(target)
    with staged_folder(link) as stage:
        (stage / "a.txt").write_text("second")
    assert link.is_symlink() and (target / "a.txt").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "target"] and len(list(target.iterdir())) == 1


def test_an_earlier_output_is_replaced_whatever_a_killed_process_left_beside_it(tmp_path):
    """A process killed while replacing an output leaves its set-aside copy of the earlier one beside it; a later
    process, which may have the same pid (a container's), replaces the output all the same and leaves the
    stranger's folder alone."""
    final = tmp_path / "out"
    final.mkdir()
    (final / "a.txt").write_text("first")
    stale = tmp_path / f".out.{os.getpid()}.old"
    stale.mkdir()
    (stale / "a.txt").write_text("older")
    with staged_folder(final) as stage:
        (stage / "a.txt").write_text("second")
    assert {p.name: p.read_text() for p in final.iterdir()} == {"a.txt": "second"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [stale.name, "out"]
    with pytest.raises(KeyboardInterrupt):  # stopped: the earlier output is left as it was, nothing beside it
        with staged_folder(final) as stage:
            (stage / "a.txt").write_text("third")
            raise KeyboardInterrupt
    assert {p.name: p.read_text() for p in final.iterdir()} == {"a.txt": "second"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [stale.name, "out"]
