"""kill -9 at random moments, resume each time: the finished run is bitwise the uninterrupted one (CPU)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

EPOCHS = 5
TRAIN = [
    "train", "--data", "phantoms:200", "--image-size", "32", "--latent-dim", "4", "--base-width", "4",
    "--precision", "fp32", "--epochs", str(EPOCHS), "--batch-size", "32", "--device", "cpu",
    "--threads", "1", "--no-progress",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _launch(out: Path) -> subprocess.Popen:
    # --resume once the run folder exists; before that (killed during start-up) there is nothing to resume
    resume = ["--resume"] if (out / "config.json").exists() else []
    cmd = [sys.executable, "-m", "medivae", *TRAIN, "--out", str(out), *resume]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _epoch_saved(out: Path) -> int:
    for folder in ("last", "last.prev"):  # mid-swap, last/ is briefly absent
        try:
            return json.loads((out / folder / "state.json").read_text())["epoch"]
        except (OSError, ValueError, KeyError):
            continue
    return 0


def _kill_after(p: subprocess.Popen, out: Path, epoch: int, delay: float, timeout: float = 120) -> bool:
    """SIGKILL ``p`` ``delay`` s after epoch ``epoch`` is on disk (0: at launch). False if it ended first."""
    end = time.monotonic() + timeout
    while _epoch_saved(out) < epoch and p.poll() is None and time.monotonic() < end:
        time.sleep(0.002)
    time.sleep(delay)
    if p.poll() is not None:
        return False
    p.kill()
    p.wait()
    return True


def _weights(run: Path, folder: str) -> dict[str, torch.Tensor]:
    return load_file(str(run / folder / "model.safetensors"))


def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_weights(tmp_path):
    reference = _launch(tmp_path / "reference")  # runs alongside the interrupted one
    out = tmp_path / "killed"
    rng = random.Random(9)
    # (epoch on disk, then seconds): one kill anywhere in start-up, then kills inside training
    epochs = sorted(rng.sample(range(1, EPOCHS), 2))
    plan = [(0, rng.uniform(0.0, 3.0))] + [(e, rng.uniform(0.0, 0.2)) for e in epochs]
    resumed_from = []
    for epoch, delay in plan:
        resumed_from.append(_epoch_saved(out))
        p = _launch(out)
        if not _kill_after(p, out, epoch, delay):
            assert p.returncode == 0, p.stderr.read().decode()
    resumed_from.append(_epoch_saved(out))
    final = _launch(out)
    assert final.wait(timeout=300) == 0, final.stderr.read().decode()
    assert reference.wait(timeout=300) == 0, reference.stderr.read().decode()

    assert sum(e > 0 for e in resumed_from) >= 2, resumed_from  # later launches did pick up a checkpoint
    for folder in ("last", "best"):  # best/ too: it is written before last/, so a kill never leaves it stale
        a, b = _weights(tmp_path / "reference", folder), _weights(out, folder)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (folder, k)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (tmp_path / "reference" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == list(range(1, EPOCHS + 1))
    assert [m["val_loss"] for m in metrics] == [m["val_loss"] for m in ref]
    twins = {f"{n}.{s}" for n in ("last", "best") for s in ("tmp", "prev")}
    leftovers = [p.name for p in out.iterdir() if p.name in twins]
    assert not leftovers, leftovers


def test_a_kill_between_last_and_best_is_repaired_on_resume(tmp_path):
    """best/ is linked from last/ after last/ is written; a kill in between leaves best/ one epoch behind
    while last/ says its epoch was the best. Resuming (even with no epoch left) links it again."""
    import shutil

    from medivae import api

    from tiny import tiny_run

    run = tmp_path / "run"
    api.train(tiny_run("phantoms:100", epochs=1), run, progress=False)
    shutil.copytree(run / "best", tmp_path / "best_epoch1")
    api.train(tiny_run("phantoms:100", epochs=2), run, resume=True, progress=False)
    state = json.loads((run / "last" / "state.json").read_text())
    assert state["best_epoch"] == state["epoch"] == 2  # epoch 2 improved (the precondition)
    shutil.rmtree(run / "best")
    shutil.copytree(tmp_path / "best_epoch1", run / "best")  # as if killed before best/ was linked
    api.train(tiny_run("phantoms:100", epochs=2), run, resume=True, progress=False)
    assert json.loads((run / "best" / "state.json").read_text())["epoch"] == 2
    assert (run / "best" / "model.safetensors").read_bytes() == (run / "last" / "model.safetensors").read_bytes()
