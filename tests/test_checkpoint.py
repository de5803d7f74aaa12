"""Checkpoints: exact round trip; a crash at any point of a save, a full disk, tampering, truncation and
pickles hidden in a run folder never cost the previous checkpoint nor run foreign code."""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import pytest
import torch

from medivae import api
from medivae.cli import main
from medivae.models import build_model
from medivae.runtime.errors import UserError
from medivae.train import checkpoint as ckpt
from medivae.train.metrics import read_metrics

from tiny import tiny_model, tiny_run

SRC = Path(__file__).resolve().parents[1] / "src"


def _model(fill: float | None = None) -> torch.nn.Module:
    torch.manual_seed(0)
    m = build_model(tiny_model())
    if fill is not None:
        with torch.no_grad():
            for p in m.parameters():
                p.fill_(fill)
    return m


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    m = _model()
    ckpt.load_checkpoint(folder, m)
    return {k: v.clone() for k, v in m.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """One tiny finished run, copied by tests that damage it."""
    return api.train(tiny_run("phantoms:60", epochs=1), tmp_path_factory.mktemp("ck") / "run", progress=False)


@pytest.fixture
def run_copy(run_dir, tmp_path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


def _sample_cli(run: Path, tmp_path: Path, capsys) -> tuple[int, str]:
    code = main(["sample", str(run), "-n", "2", "--out", str(tmp_path / "s.png"), "--device", "cpu"])
    return code, capsys.readouterr().err


# --- round trip ---------------------------------------------------------------------------------------
def test_round_trip_restores_weights_and_optimizer_exactly(tmp_path):
    m = _model()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    x = torch.rand(4, 1, 32, 32)
    m(x, None, sample=False).recon_params.mean().backward()
    opt.step()
    ckpt.save_checkpoint(tmp_path / "c", m, {"a": 1}, optimizer=opt, state={"epoch": 3})
    m2 = _model(0.5)
    opt2 = torch.optim.Adam(m2.parameters(), lr=1.0)
    state = ckpt.load_checkpoint(tmp_path / "c", m2, opt2)
    assert state == {"epoch": 3}
    assert _same(m.state_dict(), m2.state_dict())
    assert opt2.param_groups[0]["lr"] == 1e-3
    pairs = [(p, p2) for p, p2 in zip(m.parameters(), m2.parameters(), strict=True) if p in opt.state]
    assert pairs
    for p, p2 in pairs:
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][k], opt2.state[p2][k])
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert set(manifest["files"]) == {p.name for p in (tmp_path / "c").iterdir()} - {"manifest.json"}


# --- crash at every point of a save -------------------------------------------------------------------
class Crash(BaseException):
    """Stands for SIGKILL: nothing after it runs, not even `except Exception` clean-up."""


class CrashAt:
    """Counts file-system mutations (mkdir, write, rename, unlink, rmdir) and dies at number ``k``;
    a write dies half way, leaving a short file, as a kill would."""

    NAMES = ("mkdir", "write", "replace", "unlink", "rmdir")

    def __init__(self, monkeypatch, k: int | None):
        self.k, self.n = k, 0
        for name in self.NAMES:
            monkeypatch.setattr(os, name, self._wrap(name, getattr(os, name)))

    def _wrap(self, name, real):
        def op(*args, **kw):
            self.n += 1
            if self.n == self.k:
                if name == "write":
                    fd, data = args
                    real(fd, bytes(data[: len(data) // 2]))
                raise Crash(name)
            return real(*args, **kw)

        return op


def _save(folder: Path, fill: float) -> None:
    ckpt.save_checkpoint(folder, _model(fill), {"fill": fill}, state={"fill": fill})


def test_a_crash_at_any_point_of_two_saves_keeps_a_complete_checkpoint(tmp_path, monkeypatch):
    _save(tmp_path / "probe", 1.0)
    with monkeypatch.context() as mp:
        counter = CrashAt(mp, None)
        _save(tmp_path / "probe", 2.0)
    per_save = counter.n  # mkdir, a write per file, two renames, the deletion of the old files
    assert per_save >= 10
    versions = {f: _weights_of_fill(tmp_path, f) for f in (1.0, 2.0, 3.0)}
    rng = random.Random(9)
    for k in range(1, per_save + 1):
        folder = tmp_path / f"k{k}" / "last"
        _save(folder, 1.0)
        with monkeypatch.context() as mp:
            CrashAt(mp, k)
            with pytest.raises(Crash):
                _save(folder, 2.0)
        got = _weights(folder)  # a reader after the kill sees the old or the new checkpoint, whole
        assert _same(got, versions[1.0]) or _same(got, versions[2.0]), k
        j = rng.randint(1, per_save)  # a second kill, in the save that follows, at a random point
        with monkeypatch.context() as mp:
            CrashAt(mp, j)
            with pytest.raises(Crash):
                _save(folder, 3.0)
        got = _weights(folder)
        assert any(_same(got, v) for v in versions.values()), (k, j)
        _save(folder, 3.0)  # and the next save after both kills succeeds and cleans up
        assert _same(_weights(folder), versions[3.0]), (k, j)
        assert sorted(p.name for p in folder.parent.iterdir()) == ["last"], (k, j)


# --- disk full ---------------------------------------------------------------------------------------
def _enospc(*args, **kw):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_during_a_save_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch):
    folder = tmp_path / "last"
    _save(folder, 1.0)
    monkeypatch.setattr(os, "write", _enospc)
    with pytest.raises(UserError) as e:
        _save(folder, 2.0)
    monkeypatch.undo()
    msg = str(e.value)
    assert "No space left on device" in msg and "previous last/ checkpoint is intact" in msg
    assert _same(_weights(folder), _weights_of_fill(tmp_path, 1.0))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("last")) == ["last"]


def _weights_of_fill(tmp_path: Path, fill: float) -> dict:
    _save(tmp_path / f"ref{fill}", fill)
    return _weights(tmp_path / f"ref{fill}")


def test_disk_full_in_training_stops_cleanly_and_resume_finishes(tmp_path, monkeypatch):
    cfg = tiny_run("phantoms:60", epochs=2)
    real_save = ckpt.save_checkpoint

    def save_fills_disk(folder, *a, **kw):
        if Path(folder).name == "last" and kw["state"]["epoch"] == 2:  # the disk fills up in epoch 2
            monkeypatch.setattr(os, "write", _enospc)
        real_save(folder, *a, **kw)

    monkeypatch.setattr(ckpt, "save_checkpoint", save_fills_disk)
    with pytest.raises(UserError, match="No space left on device.*previous last/ checkpoint is intact"):
        api.train(cfg, tmp_path / "cut", progress=False)
    monkeypatch.undo()
    assert json.loads((tmp_path / "cut" / "last" / "state.json").read_text())["epoch"] == 1
    api.train(cfg, tmp_path / "cut", resume=True, progress=False)
    assert json.loads((tmp_path / "cut" / "last" / "state.json").read_text())["epoch"] == 2
    assert [r["epoch"] for r in read_metrics(tmp_path / "cut")] == [1, 2]


def test_resume_after_a_kill_between_the_two_renames_continues_from_last_prev(run_copy):
    # the moment between the renames NAME -> NAME.prev and NAME.tmp -> NAME
    (run_copy / "last").rename(run_copy / "last.prev")
    (run_copy / "best").rename(run_copy / "best.prev")
    before = read_metrics(run_copy)
    api.train(tiny_run("phantoms:60", epochs=2), run_copy, resume=True, progress=False)
    after = read_metrics(run_copy)
    assert after[0] == before[0]  # epoch 1 was not trained again (its timing would differ)
    assert [m["epoch"] for m in after] == [1, 2]
    assert sorted(p.name for p in run_copy.iterdir() if p.is_dir()) == ["best", "last"]


# --- tampering and truncation --------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "unlist", "traverse"])
def test_damaged_checkpoint_is_refused_naming_the_file(run_copy, tmp_path, capsys, damage):
    target = run_copy / "best" / "model.safetensors"
    manifest_path = run_copy / "best" / "manifest.json"
    data = bytearray(target.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(bytes(data[: len(data) - 100]))
    elif damage == "delete":
        target.unlink()
    else:
        m = json.loads(manifest_path.read_text())
        entry = m["files"].pop("model.safetensors")
        if damage == "traverse":
            m["files"]["../model.safetensors"] = entry
        manifest_path.write_text(json.dumps(m))
    code, err = _sample_cli(run_copy, tmp_path, capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("medivae: error: ")
    expected = {
        "flip": "model.safetensors: contents do not match manifest.json",
        "truncate": "model.safetensors: truncated",
        "delete": "model.safetensors: missing from the checkpoint",
        "unlist": "does not list model.safetensors",
        "traverse": "'../model.safetensors', which is not a file of this folder",
    }[damage]
    assert expected in err
    assert not (tmp_path / "s.png").exists()


def test_intact_run_samples(run_copy, tmp_path, capsys):
    code, err = _sample_cli(run_copy, tmp_path, capsys)
    assert code == 0 and (tmp_path / "s.png").exists(), err


# --- pickles ------------------------------------------------------------------------------------------
class _Evil:
    """Unpickling this creates ``marker``: proof that code from the file ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_pickle_dropped_into_a_run_folder_is_never_loaded(run_copy, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    payload = pickle.dumps(_Evil(marker))
    pickle.loads(payload)  # the payload works: unpickling it does create the marker
    assert marker.exists()
    marker.unlink()
    for folder in ("last", "best"):
        for name in ("model.pt", "optimizer.pt", "model.ckpt", "data.pkl"):
            (run_copy / folder / name).write_bytes(payload)
    for name in ("model.pt", "checkpoint.pth", "rng.pkl"):
        (run_copy / name).write_bytes(payload)
    code, err = _sample_cli(run_copy, tmp_path, capsys)
    assert code == 0, err
    assert "ignoring data.pkl, model.ckpt, model.pt, optimizer.pt (not in manifest.json" in err
    api.train(tiny_run("phantoms:60", epochs=2), run_copy, resume=True, progress=False)
    assert not marker.exists()


def test_a_pickle_disguised_as_safetensors_with_a_matching_manifest_is_refused(run_copy, tmp_path, capsys):
    """Someone who rewrites the manifest can swap files, but a pickle still does not parse as safetensors."""
    marker = tmp_path / "PWNED"
    payload = pickle.dumps(_Evil(marker))
    for name in ("model.safetensors", "rng.safetensors"):
        (run_copy / "last" / name).write_bytes(payload)
    m = json.loads((run_copy / "last" / "manifest.json").read_text())
    for name in ("model.safetensors", "rng.safetensors"):
        m["files"][name] = {"size": len(payload), "sha256": ckpt.hashlib.sha256(payload).hexdigest()}
    (run_copy / "last" / "manifest.json").write_text(json.dumps(m))
    shutil.rmtree(run_copy / "best")
    code, err = _sample_cli(run_copy, tmp_path, capsys)
    assert code == 2 and "last/model.safetensors: not a valid safetensors file" in err
    with pytest.raises(UserError, match="not a valid safetensors file"):
        api.train(tiny_run("phantoms:60", epochs=2), run_copy, resume=True, progress=False)
    assert not marker.exists()


def test_source_never_unpickles():
    """torch.load only with weights_only=True; no pickle loads; numpy never with allow_pickle=True."""
    bad = []
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in m.group(1):
                bad.append(f"{path}: {m.group(0)}")
        for pattern in (r"pickle\.loads?\(", r"allow_pickle\s*=\s*True", r"import dill", r"joblib\.load"):
            bad += [f"{path}: {pattern}" for _ in re.finditer(pattern, text)]
    assert not bad, bad
