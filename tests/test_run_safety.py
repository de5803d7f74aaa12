"""Runs safe to share and to reproduce (issue 22): one writer per run folder, archive members judged by
their headers before they are read, and ``medivae train --config`` reproducing a run bit for bit."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medivae.cli import build_parser, main
from medivae.commands.train import config_from_file
from medivae.data import load_source
from medivae.runfolder.config import DataConfig
from medivae.runfolder.lock import LOCK_FILE, RunInUse, run_lock
from medivae.runtime.errors import UserError

TRAIN = [
    "train", "--data", "phantoms:80", "--image-size", "32", "--model-arg", "base_width=4",
    "--model-arg", "max_width=16", "--latent-dim", "4", "--precision", "fp32", "--epochs", "1",
    "--batch-size", "32", "--device", "cpu", "--threads", "1", "--no-progress",
]
HOLD = """
import sys, time
from medivae.runfolder.lock import run_lock
with run_lock(sys.argv[1], sys.argv[2], create=True):
    print("held", flush=True)
    time.sleep(600)
"""


def cli(capsys, argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


@contextmanager
def held_elsewhere(run: Path, command: str = "medivae train"):
    """Another process holding ``run``'s lock, as ``command`` would; killed on the way out."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(run), command], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        yield p
    finally:
        p.kill()
        p.wait()


def snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("safety") / "a"
    assert main([*TRAIN, "--out", str(out)]) == 0
    return out


# --- one writer per run folder -------------------------------------------------------------------------
def test_a_second_train_is_refused_with_the_holder_and_changes_nothing(run, capsys):
    with held_elsewhere(run) as holder:
        before = snapshot(run)
        for extra in ([], ["--resume", "--epochs", "2"], ["--latent-dim", "8"]):
            code, err = cli(capsys, [*TRAIN, "--out", run, *extra])
            assert code == 2 and err.count("\n") == 1, err
            if "--resume" in extra:
                assert f"{run} is in use by pid {holder.pid} (medivae train, since " in err
            else:  # the output folder is checked before any lock is taken
                assert f"{run} already holds a run; pass --resume" in err
        assert snapshot(run) == before


@pytest.mark.parametrize("argv", [
    ["evaluate", "{run}", "-k", "2", "--device", "cpu"],
    ["anomaly", "score", "{run}", "--device", "cpu"],
    ["synthesize", "{run}", "-n", "4", "--out", "{tmp}/synth", "--device", "cpu"],
    ["report", "{run}"],
    ["fit-sampler", "{run}", "--sampler", "gmm", "--device", "cpu"],
])
def test_writers_are_refused_while_train_writes(run, tmp_path, capsys, argv):
    argv = [a.format(run=run, tmp=tmp_path) for a in argv]
    with held_elsewhere(run) as holder:
        before = snapshot(run)
        code, err = cli(capsys, argv)
        assert snapshot(run) == before
    assert code == 2 and err.count("\n") == 1, err
    assert f"in use by pid {holder.pid} (medivae train, since " in err
    assert not any(tmp_path.iterdir())


def test_readers_never_block(run, tmp_path, capsys):
    with held_elsewhere(run):
        assert main(["sample", str(run), "-n", "4", "--out", str(tmp_path / "s.png"), "--device", "cpu"]) == 0
        assert main(["reconstruct", str(run), "-n", "4", "--out", str(tmp_path / "r.png"), "--device", "cpu"]) == 0
    assert np.asarray(Image.open(tmp_path / "s.png")).std() > 0  # a real grid, not a blank image


def test_a_lock_of_a_killed_process_does_not_block_the_next_run(tmp_path, capsys):
    out = tmp_path / "b"
    with held_elsewhere(out, "medivae train") as holder:
        pass  # SIGKILLed on the way out: the kernel drops its lock
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == holder.pid  # the stale record is still there
    code, err = cli(capsys, [*TRAIN, "--out", out])
    assert code == 0, err
    assert (out / "last" / "model.safetensors").is_file()
    assert (out / LOCK_FILE).read_text() == ""  # released: nobody holds it


def test_the_lock_is_reentrant_in_one_process_and_exclusive_across_processes(tmp_path):
    run = tmp_path / "r"
    with run_lock(run, "medivae train", create=True):
        with run_lock(run, "medivae report"):  # api.train writing its report
            pass
        holder = json.loads((run / LOCK_FILE).read_text())
        assert holder["command"] == "medivae train"
        probe = "import sys; from medivae.runfolder.lock import run_lock\nwith run_lock(sys.argv[1], 'x'): pass"
        r = subprocess.run([sys.executable, "-c", probe, str(run)], capture_output=True, text=True)
        assert r.returncode != 0 and f"in use by pid {holder['pid']} (medivae train" in r.stderr
    with run_lock(run, "medivae evaluate"):  # free again
        pass


def test_a_new_run_that_fails_before_writing_leaves_no_folder(tmp_path, capsys):
    code, err = cli(capsys, [*TRAIN[:1], "--data", tmp_path / "missing", *TRAIN[3:], "--out", tmp_path / "new"])
    assert code == 2 and "no such file" in err
    assert not (tmp_path / "new").exists()


def test_a_folder_that_is_not_a_run_gets_no_lock_file(tmp_path, capsys):
    code, _ = cli(capsys, ["evaluate", tmp_path, "--device", "cpu"])
    assert code == 2 and not (tmp_path / LOCK_FILE).exists()


def test_refused_is_a_user_error():
    assert issubclass(RunInUse, UserError)  # one line, exit code 2


# --- archive members judged before they are read ------------------------------------------------------
def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


GOOD = {f"export/{c}/{i}.png": _png(40 if c == "dark" else 200) for c in ("dark", "light") for i in range(4)}
BIG = "export/dark/huge.png"


def _zip(path: Path, big: bytes) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in GOOD.items():
            z.writestr(name, data)
        z.writestr(BIG, big)
    return path


def _tar(path: Path, big: bytes) -> Path:
    with tarfile.open(path, "w:gz") as t:
        for name, data in {**GOOD, BIG: big}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def never_read_big(monkeypatch):
    """``never_read_big()`` (once the archive is written): reading the big member's bytes fails the test,
    the proof that it was skipped from its header."""
    def guard(original, name_of):
        def wrapped(self, member, *a, **kw):
            assert name_of(member) != BIG, f"{BIG} was read"
            return original(self, member, *a, **kw)
        return wrapped

    def arm():
        name_of = lambda m: getattr(m, "filename", None) or getattr(m, "name", m)  # noqa: E731
        monkeypatch.setattr(zipfile.ZipFile, "open", guard(zipfile.ZipFile.open, name_of))
        monkeypatch.setattr(tarfile.TarFile, "extractfile", guard(tarfile.TarFile.extractfile, name_of))

    return arm


def _load(path: Path):
    with pytest.warns(UserWarning, match="skipped 1 of 9 files"):  # reported like any unreadable file
        return load_source(DataConfig(source=str(path), image_size=32, cache=False), progress=False)["all"]


@pytest.mark.parametrize("make, suffix", [(_zip, ".zip"), (_tar, ".tar.gz")])
def test_a_member_over_the_size_cap_is_skipped_unread(tmp_path, monkeypatch, never_read_big, make, suffix):
    monkeypatch.setenv("MEDIVAE_MAX_MEMBER_MB", "0.1")  # 100 kB; the big member is 300 kB of noise
    big = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    path = make(tmp_path / f"data{suffix}", big)
    never_read_big()
    s = _load(path)
    assert len(s) == len(GOOD) and s.label_names == ("dark", "light")
    assert s.meta["n_files"] == len(GOOD) + 1 and s.meta["n_skipped"] == 1
    assert s.meta["skipped"][0].startswith("huge.png: declares 0.3 MB, over the 0.1 MB cap")


def test_a_zip_bomb_member_is_skipped_by_its_ratio_unread(tmp_path, never_read_big):
    path = _zip(tmp_path / "bomb.zip", bytes(4 << 20))  # 4 MiB of zeros in ~4 kB: ratio > 1000
    never_read_big()
    s = _load(path)
    assert len(s) == len(GOOD) and s.meta["n_skipped"] == 1
    assert "zip bomb" in s.meta["skipped"][0]


def test_a_bad_cap_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDIVAE_MAX_MEMBER_MB", "lots")
    with pytest.raises(UserError, match="MEDIVAE_MAX_MEMBER_MB must be a positive number"):
        load_source(DataConfig(source=str(_zip(tmp_path / "d.zip", b"x")), image_size=32), progress=False)


# --- medivae train --config -----------------------------------------------------------------------------
def test_config_round_trip_reproduces_the_run_bitwise(run, tmp_path, capsys):
    out = tmp_path / "b"
    code, err = cli(capsys, ["train", "--config", run / "config.json", "--out", out, "--no-progress"])
    assert code == 0, err
    assert (out / "last" / "model.safetensors").read_bytes() == (run / "last" / "model.safetensors").read_bytes()
    assert json.loads((out / "config.json").read_text()) == json.loads((run / "config.json").read_text())
    sources = json.loads((out / "config_sources.json").read_text())
    assert set(sources["settings"].values()) == {"config file"} and sources["overridden"] == {}


def test_a_flag_overrides_the_file_and_the_sources_say_so(run, tmp_path, capsys):
    out = tmp_path / "c"
    code, err = cli(capsys, ["train", "--config", run / "config.json", "--out", out, "--lr", "0.002",
                             "--no-progress"])
    assert code == 0, err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train"]["lr"] == 0.002 and cfg["model"]["max_width"] == 16
    sources = json.loads((out / "config_sources.json").read_text())
    assert sources["config_file"] == str(run / "config.json")
    assert sources["settings"]["train.lr"] == "command line"
    assert sources["settings"]["train.batch_size"] == "config file"
    assert sources["overridden"] == {"train.lr": 0.001}


@pytest.mark.parametrize("edit, name", [
    (lambda d: d["train"].update(lrr=1), "lrr"),
    (lambda d: d.update(experiment="x"), "experiment"),
    (lambda d: d["model"].update(widht=3), "widht"),
])
def test_an_unknown_key_in_a_config_file_is_one_line_naming_it(run, tmp_path, capsys, edit, name):
    d = json.loads((run / "config.json").read_text())
    edit(d)
    path = tmp_path / "exp.json"
    path.write_text(json.dumps(d))
    code, err = cli(capsys, ["train", "--config", path, "--out", tmp_path / "x"])
    assert code == 2 and err.count("\n") == 1 and name in err and str(path) in err, err
    assert not (tmp_path / "x").exists()


def _resolve(argv: list[str]):
    parser = build_parser()
    args = parser.parse_args(argv)
    args._argv = argv
    return config_from_file(args)


def test_a_partial_file_takes_defaults_presets_and_geometry_from_data(tmp_path):
    path = tmp_path / "exp.json"
    path.write_text(json.dumps({"data": {"source": "phantoms:80", "image_size": 32},
                                "model": {"name": "beta_vae", "latent_dim": 4}}))
    cfg, sources, _ = _resolve(["train", "--config", str(path), "--out", str(tmp_path / "o"), "--seed", "3"])
    assert cfg.model.image_size == 32 and cfg.model.latent_dim == 4 and cfg.model.beta == 4.0
    assert cfg.train.seed == 3 and cfg.train.lr == 1e-3
    s = sources["settings"]
    assert s["train.seed"] == "command line" and s["model.beta"] == "beta_vae preset" and s["train.lr"] == "default"
    assert s["model.image_size"] == "config file"


def test_train_without_data_or_config_is_one_line(tmp_path, capsys):
    code, err = cli(capsys, ["train", "--out", tmp_path / "o"])
    assert code == 2 and "--data" in err and err.count("\n") == 1


def test_yaml_without_pyyaml_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml now raises ImportError
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  lr: 0.005\n")
    code, err = cli(capsys, ["train", "--config", path, "--out", tmp_path / "o"])
    assert code == 2 and "needs PyYAML" in err and err.count("\n") == 1


def test_yaml_config(tmp_path):
    pytest.importorskip("yaml")
    path = tmp_path / "exp.yaml"
    path.write_text("data:\n  source: phantoms:80\n  image_size: 32\ntrain:\n  lr: 0.005\n")
    cfg, sources, _ = _resolve(["train", "--config", str(path), "--out", str(tmp_path / "o")])
    assert cfg.train.lr == 0.005 and sources["settings"]["train.lr"] == "config file"


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGUSR1"), reason="no SIGUSR1 on this platform")
def test_sigusr1_prints_every_threads_stack_and_the_run_goes_on(tmp_path):
    """`kill -USR1` on a stuck-looking run (e.g. a torchrun worker) shows where it is without stopping it."""
    import os
    import signal
    import time

    out = tmp_path / "run"
    argv = [sys.executable, "-m", "medivae", "train", "--data", "phantoms:400", "--out", str(out), "--image-size", "32",
            "--model-arg", "latent_dim=4", "--model-arg", "base_width=4", "--model-arg", "max_width=16",
            "--epochs", "30", "--batch-size", "8", "--precision", "fp32", "--threads", "1", "--no-progress"]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + 120
    while not (out / "metrics.jsonl").exists() and p.poll() is None and time.monotonic() < end:
        time.sleep(0.05)  # the handler is registered before any training: epoch 1 written means it is in place
    assert p.poll() is None, p.communicate()[1][-2000:]
    os.kill(p.pid, signal.SIGUSR1)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-2000:]
    assert "most recent call first" in err and "medivae" in err.split("most recent call first", 1)[1]
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, 31))


def test_a_config_file_without_split_seed(tmp_path):
    """A hand-written file takes the default split seed, whatever its training seed (so seeds compare); a run's
    config.json written before split_seed existed keeps its training seed as split seed (its own split)."""
    from medivae.runtime.seeding import DEFAULT_SEED

    d = {"data": {"source": "phantoms:80", "image_size": 32}, "train": {"seed": 5}}
    path = tmp_path / "exp.json"
    path.write_text(json.dumps(d))
    argv = ["train", "--config", str(path), "--out", str(tmp_path / "o")]
    cfg, sources, _ = _resolve([*argv, "--seed", "6"])
    assert (cfg.data.split_seed, cfg.train.seed) == (DEFAULT_SEED, 6)
    assert sources["settings"]["data.split_seed"] == "default"
    path.write_text(json.dumps({**d, "medivae_version": "0.1.0"}))
    cfg, sources, _ = _resolve([*argv, "--seed", "6"])
    assert (cfg.data.split_seed, cfg.train.seed) == (5, 6) and sources["settings"]["data.split_seed"] == "config file"
    cfg, sources, _ = _resolve([*argv, "--split-seed", "9"])
    assert cfg.data.split_seed == 9 and sources["settings"]["data.split_seed"] == "command line"
