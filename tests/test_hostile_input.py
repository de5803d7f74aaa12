"""Hostile input, one test per failure a new user met: bad output paths, values that reached torch unchecked,
two files published separately, unbounded sizes, bad data accepted silently, comparisons of what cannot be
compared, checkpoints chosen by free text. Each ends in exit code 2, one line ``medivae: error: ...`` and
nothing written; tests/test_fuzz.py runs the same classes over every command."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import medivae
from medivae import api
from medivae.cli import main
from medivae.data.folder import read_csv_list
from medivae.runtime.errors import UserError
from medivae.workflows import evaluate as evaluate_module
from medivae.workflows.synthesize import write_synthetic

from tiny import TINY_EVALUATE, TINY_TRAIN, refused, snapshot


@pytest.fixture
def run(evaluated_run, tmp_path) -> Path:
    """A private copy of the session's evaluated run, to change."""
    return Path(shutil.copytree(evaluated_run, tmp_path / "run"))


def rehash(folder: Path, name: str) -> None:
    """Record ``folder/name``'s new size and SHA-256 in the checkpoint manifest, as someone editing it would."""
    manifest = json.loads((folder / "manifest.json").read_text())
    data = (folder / name).read_bytes()
    manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))


# --- 1. output paths ------------------------------------------------------------------------------------------
def _file_commands(run: Path, other: Path, syn: Path) -> dict[str, tuple[list, str]]:
    """command -> (argv without --out, the suffix its --out takes)."""
    return {
        "sample": (["sample", run, "-n", "4"], ".png"),
        "encode": (["encode", run], ".npz"),
        "reconstruct": (["reconstruct", run, "-n", "2"], ".png"),
        "interpolate": (["interpolate", run], ".png"),
        "traverse": (["traverse", run], ".png"),
        "report": (["report", run], ".html"),
        "compare": (["compare", run, other, "--bootstrap", "10"], ".md"),
        "utility": (["utility", "--run", run, "--synthetic", syn, "--epochs", "1"], ".json"),
        "data inspect": (["data", "inspect", "phantoms:20"], ".png"),
    }


@pytest.mark.parametrize("bad", ["", "proc", "folder", "exists", "under-a-file", "device", "suffix"])
def test_a_bad_output_file_is_refused_before_any_work(evaluated_run, tmp_path, capsys, bad):
    other = Path(shutil.copytree(evaluated_run, tmp_path / "other"))
    syn = tmp_path / "syn"
    write_synthetic(syn, np.zeros((4, 1, 32, 32), np.uint8), ["normal", "lesion"] * 2, ("normal", "lesion"), "png")
    (tmp_path / "a-file").write_text("x")
    before = snapshot(evaluated_run), snapshot(other)
    for name, (argv, suffix) in _file_commands(evaluated_run, other, syn).items():
        target = {"": "", "proc": f"/proc/medivae-probe{suffix}", "folder": str(tmp_path),
                  "exists": str(tmp_path / "a-file"), "under-a-file": str(tmp_path / "a-file" / f"x{suffix}"),
                  "device": "/dev/null", "suffix": str(tmp_path / "x.exe")}[bad]
        if bad == "exists":
            shutil.copy(tmp_path / "a-file", tmp_path / f"a-file{suffix}")
            target += suffix
        line = refused(capsys, [*argv, "--out", target])
        assert "--out" in line, (name, line)
    assert (snapshot(evaluated_run), snapshot(other)) == before
    assert not Path("/proc/medivae-probe.png").exists()


def test_an_existing_output_is_replaced_only_with_force(evaluated_run, tmp_path, capsys):
    out = tmp_path / "s.png"
    out.write_bytes(b"mine")
    assert "pass --force" in refused(capsys, ["sample", evaluated_run, "-n", "4", "--out", out])
    assert out.read_bytes() == b"mine"
    assert main(["sample", str(evaluated_run), "-n", "4", "--out", str(out), "--force"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_empty_out_writes_nothing_into_the_working_folder(evaluated_run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    refused(capsys, [*TINY_TRAIN, "--out", ""])
    refused(capsys, ["synthesize", evaluated_run, "-n", "4", "--out", ""])
    refused(capsys, ["anomaly", "fit", "--data", "phantoms:40", "--normal-label", "normal", "--out", ""])
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UserError, match="empty path"):
        api.sample(evaluated_run, 4, "")


def test_output_folders_must_be_absent_or_empty(evaluated_run, tmp_path, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert "not empty" in refused(capsys, [*TINY_TRAIN, "--out", busy])
    assert "not empty" in refused(capsys, ["synthesize", evaluated_run, "-n", "4", "--out", busy])
    assert "not empty" in refused(capsys, ["anomaly", "score", evaluated_run, "--out", busy])
    assert "not empty" in refused(capsys, ["sample", evaluated_run, "-n", "4", "--out", busy])
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]


READ_ONLY_DRIVER = """
import contextlib, io, json, sys
from medivae.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    out.append([code, err.getvalue()])
print(json.dumps(out))
"""


def read_only_cli(folder: Path, argvs: list[list]) -> list[tuple[int, str]]:
    """Run each argv through the CLI in one process that sees ``folder`` read-only: a read-only bind mount in a
    mount namespace of its own under root (root writes through permissions), permissions otherwise."""
    driver = [sys.executable, "-c", READ_ONLY_DRIVER, json.dumps([[str(a) for a in v] for v in argvs])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(medivae.__file__).parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    if os.geteuid() == 0:
        q = shlex.quote(str(folder))
        script = f"mount --bind {q} {q} && mount -o remount,bind,ro {q} && exec \"$@\""
        cmd = ["unshare", "-m", "sh", "-c", script, "sh", *driver]
        if not shutil.which("unshare") or subprocess.run(["unshare", "-m", "true"]).returncode:
            pytest.skip("root without mount namespaces: no read-only folder to test with")
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    else:
        mode = folder.stat().st_mode
        folder.chmod(0o555)
        try:
            done = subprocess.run(driver, capture_output=True, text=True, env=env, timeout=600)
        finally:
            folder.chmod(mode)
    assert done.returncode == 0, done.stderr
    return [tuple(x) for x in json.loads(done.stdout.splitlines()[-1])]


@pytest.mark.slow  # two processes of their own (~20 s)
def test_read_only_folders_are_refused_before_any_work(run, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "keep.txt").write_text("x")
    argvs = [["evaluate", run, *TINY_EVALUATE], ["fit-sampler", run, "--sampler", "gmm"],
             ["anomaly", "score", run], ["synthesize", run, "-n", "4", "--out", tmp_path / "syn"],
             ["train", "--resume", "--out", run, "--epochs", "2"]]
    before = snapshot(run)
    for code, err in read_only_cli(run, argvs):
        assert code == 2 and len(err.splitlines()) == 1 and "cannot write in" in err, err
    assert snapshot(run) == before and not (tmp_path / "syn").exists()
    argvs = [["sample", run, "-n", "4", "--out", ro / "s.png"], ["encode", run, "--out", ro / "e.npz"],
             ["compare", run, run, "--force", "--out", ro / "c.md"], [*TINY_TRAIN, "--out", ro / "new"]]
    for code, err in read_only_cli(ro, argvs):
        assert code == 2 and len(err.splitlines()) == 1 and "cannot write in" in err, err
    assert [p.name for p in ro.iterdir()] == ["keep.txt"]


# --- 3. values reach torch unchecked ------------------------------------------------------------------------
@pytest.mark.parametrize("extra, says", [
    (["--model-arg", "max_width=wide"], "model.max_width = 'wide'"),
    (["--model-arg", "max_width=-8"], "max width must be >= 1"),
    (["--model-arg", "max_width=64.5"], "model.max_width = 64.5"),
    (["--model-arg", "max_width=[1,2]"], "model.max_width = [1, 2]"),
    (["--model-arg", "name=vq_vae"], "--model vq_vae"),
    (["--threads", "-3"], "num_threads must be >= 0, not -3"),
    (["--grad-clip", "-1"], "grad_clip must be >= 0"),
    (["--warmup-epochs", "nan"], "warmup_epochs = nan"),
    (["--device", "nope"], "unknown device 'nope'"),
])
def test_bad_flags_are_refused_before_a_run_folder_exists(tmp_path, capsys, extra, says):
    out = tmp_path / "r"
    assert says in refused(capsys, [*TINY_TRAIN, *extra, "--out", out])
    assert not out.exists()


@pytest.mark.parametrize("text, says", [
    ('{"train": {"batch_size": 12.5}}', "train.batch_size = 12.5 is not allowed; expected a whole number"),
    ('{"train": {"epochs": 1e400}}', "train.epochs = inf"),
    ('{"train": {"epochs": true}}', "train.epochs = True"),
    ('{"train": {"epochs": "three"}}', "train.epochs = 'three'"),
    ('{"data": {"val_fraction": "0.1"}}', "data.val_fraction = '0.1'"),
])
def test_a_config_file_is_checked_by_type_before_a_run_folder_exists(tmp_path, capsys, text, says):
    cfg, out = tmp_path / "c.json", tmp_path / "r"
    cfg.write_text(text)
    assert says in refused(capsys, ["train", "--config", cfg, "--data", "phantoms:40", "--out", out])
    assert not out.exists()


@pytest.mark.parametrize("argv", [
    ["reconstruct", "{run}", "-n", "0", "--out", "{tmp}/r.png"],
    ["reconstruct", "{run}", "-n", "-3", "--out", "{tmp}/r.png"],
    ["compare", "{run}", "{run}", "--bootstrap", "-5"],
    ["evaluate", "{run}", "--bootstrap", "-5"],
    ["sample", "{run}", "--temperature", "inf", "--out", "{tmp}/s.png"],
    ["anomaly", "score", "{run}", "--fpr", "nan"],
    ["evaluate", "{run}", "--max-images", "3", "--no-progress"],  # too few for sample quality's k-NN metrics
])
def test_bad_command_values_are_refused(evaluated_run, tmp_path, capsys, argv):
    before = snapshot(evaluated_run)
    refused(capsys, [a.format(run=evaluated_run, tmp=tmp_path) for a in argv])
    assert snapshot(evaluated_run) == before and list(tmp_path.iterdir()) == []


def test_python_api_values_are_checked_too(evaluated_run, tmp_path):
    with pytest.raises(UserError, match="--bootstrap must be >= 0"):
        api.compare([evaluated_run, evaluated_run], bootstrap=-5, force=True)
    with pytest.raises(UserError, match="-n must be >= 1"):
        api.reconstruct_run(evaluated_run, None, tmp_path / "r.png", n=0)
    with pytest.raises(UserError, match="-n must be a whole number"):
        api.sample(evaluated_run, True, tmp_path / "s.png")


# --- 7. checkpoints chosen by free text ---------------------------------------------------------------------
def test_checkpoint_names_are_best_or_last_only(run, capsys):
    before = snapshot(run)
    for which in ("worst", "../other/best", ""):
        assert "best or last" in refused(capsys, ["fit-sampler", run, "--sampler", "gmm", "--checkpoint", which])
        assert "best or last" in refused(capsys, ["evaluate", run, "--checkpoint", which])
        with pytest.raises(UserError, match="best or last"):
            medivae.load(run, which=which)
    assert snapshot(run) == before


def test_an_edited_checkpoint_with_a_rehashed_manifest_is_one_line(run, capsys):
    state = json.loads((run / "last" / "state.json").read_text())
    (run / "last" / "state.json").write_text(json.dumps({**state, "epoch": "x"}))
    rehash(run / "last", "state.json")
    assert "state.json: epoch = 'x' is not valid" in refused(capsys, ["train", "--resume", "--out", run,
                                                                       "--epochs", "2"])
    weights = load_file(run / "best" / "model.safetensors")
    save_file({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in weights.items()},
              run / "best" / "model.safetensors")
    rehash(run / "best", "model.safetensors")
    assert "NaN or infinite" in refused(capsys, ["evaluate", run, *TINY_EVALUATE])


# --- 2. one publication step --------------------------------------------------------------------------------
def test_a_failed_results_write_leaves_the_earlier_evaluation_whole(run, evaluated_run, capsys, monkeypatch):
    before = snapshot(run)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(run / "results.json"))

    monkeypatch.setattr(evaluate_module, "merge_results", disk_full)
    line = refused(capsys, ["evaluate", run, *TINY_EVALUATE, "--max-images", "6"])
    assert "No space left on device" in line
    assert snapshot(run) == before  # the per-image file of the earlier evaluation was not replaced
    monkeypatch.undo()
    cmp = api.compare([evaluated_run, run], bootstrap=10)
    assert cmp["n_images"] == json.loads((run / "results.json").read_text())["evaluation"]["n_images"]


def test_a_kill_between_the_two_steps_leaves_a_pair_readers_agree_on(run, evaluated_run, capsys, monkeypatch):
    class Killed(BaseException):
        pass

    def killed(*args):
        raise Killed

    monkeypatch.setattr(evaluate_module, "os", types.SimpleNamespace(replace=killed))
    with pytest.raises(Killed):
        main(["evaluate", str(run), *TINY_EVALUATE, "--max-images", "6"])
    monkeypatch.undo()
    ev = json.loads((run / "results.json").read_text())["evaluation"]
    assert ev["n_images"] == 6 and (run / ".eval_per_image.npz.staged").is_file()
    cmp = api.compare([run, evaluated_run], bootstrap=10, force=True)  # the staged file is the one named
    assert cmp["n_images"] == 6
    (run / ".eval_per_image.npz.staged").unlink()  # now eval_per_image.npz is the earlier evaluation's
    assert "not the one results.json describes" in refused(capsys, ["compare", run, evaluated_run, "--force"])


def test_compare_flags_an_evaluation_of_weights_no_longer_there(run, evaluated_run, capsys):
    assert main(["train", "--resume", "--out", str(run), "--epochs", "2", "--no-progress"]) == 0
    capsys.readouterr()
    assert "out of date" in refused(capsys, ["compare", evaluated_run, run, "--bootstrap", "10"])
    cmp = api.compare([evaluated_run, run], bootstrap=10, force=True)
    assert any("out of date" in n for n in cmp["notes"])
    assert "This evaluation is out of date" in api.report(run).read_text()


# --- 6. compare and utility refuse the incomparable ---------------------------------------------------------
def test_compare_refuses_one_run_twice_and_what_is_not_an_evaluated_run(evaluated_run, tmp_path, capsys):
    assert "are the same run" in refused(capsys, ["compare", evaluated_run, evaluated_run])
    assert "are the same run" in refused(capsys, ["compare", evaluated_run, evaluated_run / "best" / ".."])
    (tmp_path / "notarun").mkdir()
    assert "not a medivae run folder" in refused(capsys, ["compare", evaluated_run, tmp_path / "notarun"])


def test_compare_refuses_a_damaged_per_image_file_in_one_line(run, evaluated_run, capsys):
    (run / "eval_per_image.npz").write_bytes(b"PK\x03\x04 not a zip")
    assert "not the one results.json describes" in refused(capsys, ["compare", evaluated_run, run])
    results = json.loads((run / "results.json").read_text())
    results["evaluation"]["per_image_sha256"] = hashlib.sha256(b"PK\x03\x04 not a zip").hexdigest()
    (run / "results.json").write_text(json.dumps(results))
    assert "not a readable per-image file" in refused(capsys, ["compare", evaluated_run, run])


def test_runs_with_other_likelihoods_compare_without_nats(run, evaluated_run, capsys):
    results = json.loads((run / "results.json").read_text())
    results["evaluation"]["model"]["likelihood"] = "gaussian"  # what a --likelihood gaussian run records
    (run / "results.json").write_text(json.dumps(results))
    cmp = api.compare([evaluated_run, run], bootstrap=10)
    rows = {r["metric"]: r["values"] for r in cmp["rows"]}
    assert all(c["value"] is None and "vs_first" not in c for c in rows["-ELBO (nats/image)"])
    assert rows["PSNR (dB)"][1]["vs_first"] is not None  # what is comparable still is
    assert any("likelihoods differ" in n for n in cmp["notes"])


@pytest.mark.parametrize("edit, says", [
    ({"model": {"likelihood": [1]}}, None),  # shown as it is: the likelihoods differ
    ({"sample_quality": {"sampler": [1]}}, None),
    ({"sample_quality": {"extractor_version": [2]}}, "sample_quality.extractor_version = [2]"),
    ({"ci95": [1]}, "ci95 = [1]"),
    ({"collapse": {"active_units": "x"}}, "collapse.active_units = 'x'"),
    ({"reconstruction": {"psnr_db": True}}, "reconstruction.psnr_db = True"),
])
def test_compare_reads_a_hand_edited_evaluation_without_a_traceback(run, evaluated_run, capsys, edit, says):
    """Each once ended in a TypeError, AttributeError or ValueError while the notes or the table were made."""
    results = json.loads((run / "results.json").read_text())
    for key, value in edit.items():
        ev = results["evaluation"]
        ev[key] = {**ev[key], **value} if isinstance(value, dict) and isinstance(ev.get(key), dict) else value
    (run / "results.json").write_text(json.dumps(results))
    argv = ["compare", evaluated_run, run, "--bootstrap", "10", "--out", run.parent / "c.md"]
    if says is None:
        assert main([str(a) for a in argv]) == 0
    else:
        assert says in refused(capsys, argv) and not (run.parent / "c.md").exists()


def test_compare_names_the_samplers_of_runs_whose_samples_came_from_different_ones(run, evaluated_run):
    results = json.loads((run / "results.json").read_text())
    results["evaluation"]["sample_quality"].update(sampler="diffusion", guidance=0.0, sampling_steps=50)
    (run / "results.json").write_text(json.dumps(results))  # what evaluate --sampler diffusion records
    notes = api.compare([evaluated_run, run], bootstrap=10)["notes"]
    assert any("different samplers" in n and f"{run} diffusion (guidance 0.0, 50 steps)" in n for n in notes), notes
    same = Path(shutil.copytree(evaluated_run, run.parent / "same"))
    assert not any("samplers" in n for n in api.compare([evaluated_run, same], bootstrap=10)["notes"])


@pytest.fixture
def two_class_synthetic(tmp_path) -> Path:
    folder = tmp_path / "syn"
    write_synthetic(folder, np.zeros((4, 1, 32, 32), np.uint8), ["normal", "lesion"] * 2, ("normal", "lesion"),
                    "png")
    return folder


def test_utility_refuses_what_it_cannot_use(evaluated_run, two_class_synthetic, tmp_path, capsys):
    base = ["utility", "--run", evaluated_run, "--epochs", "1", "--no-progress", "--out", tmp_path / "u.json"]
    assert "twice" in refused(capsys, [*base, "--synthetic", two_class_synthetic, tmp_path / "syn" / ".." / "syn"])
    one = tmp_path / "one"
    write_synthetic(one, np.zeros((4, 1, 32, 32), np.uint8), ["lesion"] * 4, ("normal", "lesion"), "png")
    assert "one class only" in refused(capsys, [*base, "--synthetic", one])
    (two_class_synthetic / "memorisation.json").write_text(json.dumps({"run": str(tmp_path / "another")}))
    assert "which is not among --run" in refused(capsys, [*base, "--synthetic", two_class_synthetic])
    assert not (tmp_path / "u.json").exists()


def test_synthetic_labels_with_commas_survive_the_csv(tmp_path):
    names = ("a,b", 'say "x"')
    write_synthetic(tmp_path / "s", np.zeros((2, 1, 32, 32), np.uint8), list(names), names, "png")
    assert read_csv_list(tmp_path / "s" / "labels.csv")[1] == list(names)


# --- 4. unbounded sizes -------------------------------------------------------------------------------------
def test_sizes_have_limits_checked_before_any_work(evaluated_run, tmp_path, capsys):
    assert "a grid holds at most 1024" in refused(capsys, ["sample", evaluated_run, "-n", "100000",
                                                           "--out", tmp_path / "s.png"])
    assert "must be >= 1 and <= 100000" in refused(capsys, ["sample", evaluated_run, "-n", "1000000",
                                                            "--out", tmp_path / "s"])
    assert "phantoms:N takes 10 to 100000" in refused(capsys, ["data", "inspect", "phantoms:99999999999",
                                                               "--out", tmp_path / "p.png"])
    assert list(tmp_path.iterdir()) == []


def test_a_sample_folder_stopped_midway_is_not_left_half_written(tmp_path, monkeypatch):
    """sample --out FOLDER writes one PNG per image, batch after batch: stopped in the second batch (Ctrl-C, a
    full disk), the folder is not left with the first batch's files (which would also make it refused as not
    empty when the command is run again), and an empty folder given as --out is left empty."""
    from medivae.workflows import generate as generate_module

    from tiny import tiny_run

    run = api.train(tiny_run("phantoms:40", epochs=1), tmp_path / "run", progress=False)
    real = generate_module.save_png
    written = []

    def save_then_stop(img, path, *a, **kw):
        if len(written) == 260:  # into the second batch of 256
            raise KeyboardInterrupt
        real(img, path, *a, **kw)
        written.append(path)

    monkeypatch.setattr(generate_module, "save_png", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        api.sample(run, 300, tmp_path / "many", seed=3)
    assert len(written) == 260 and not (tmp_path / "many").exists()
    (tmp_path / "empty").mkdir()
    written.clear()
    with pytest.raises(KeyboardInterrupt):
        api.sample(run, 300, tmp_path / "empty", seed=3)
    assert list((tmp_path / "empty").iterdir()) == []
    monkeypatch.setattr(generate_module, "save_png", real)
    out = api.sample(run, 300, tmp_path / "empty", seed=3)  # run again: the whole set
    assert len(list(out.iterdir())) == 300


def test_a_large_sample_set_is_written_as_files_one_batch_at_a_time(evaluated_run, tmp_path):
    out = api.sample(evaluated_run, 300, tmp_path / "many", seed=3)
    files = sorted(out.iterdir())
    assert len(files) == 300 and files[0].name == "000000.png"
    run = medivae.load(evaluated_run, device="cpu")
    batches = list(run.sample_batches(300, seed=3))
    assert [len(b) for b in batches] == [256, 44]
    whole = run.sample(300, seed=3)
    assert torch.equal(torch.cat(batches), whole)  # the same draws, batch by batch
    from PIL import Image

    last = np.asarray(Image.open(files[-1]))
    assert np.array_equal(last, (whole[-1, 0] * 255).round().clamp(0, 255).to(torch.uint8).numpy())


def test_sample_writes_real_jpeg(evaluated_run, tmp_path):
    out = api.sample(evaluated_run, 4, tmp_path / "s.jpg")
    assert out.read_bytes()[:3] == b"\xff\xd8\xff"


# --- 5. bad data accepted silently --------------------------------------------------------------------------
def _npz(path: Path, images: np.ndarray) -> Path:
    np.savez(path, train_images=images, train_labels=np.zeros((len(images), 1), np.int64))
    return path


def test_bad_data_is_one_line_naming_the_file_and_never_cached(evaluated_run, tmp_path, capsys):
    rng = np.random.default_rng(0)
    images = rng.random((40, 28, 28)).astype(np.float32)  # in [0, 1]
    one_nan = images.copy()
    one_nan[:, 3, 3] = np.nan  # one pixel per image once skipped the x255 scaling: near-black images
    cases = {"one_nan.npz": (one_nan, "NaN or infinite values in 40 of 40 images"),
             "all_nan.npz": (np.full((40, 28, 28), np.nan, np.float32), "NaN or infinite"),
             "range.npz": (images * 1000 - 3, "float values from"),
             "one.npz": (images[:1], "1 image is too few for the splits")}
    cache = Path(os.environ["MEDIVAE_CACHE"]) / "decoded"
    cached = set(cache.iterdir()) if cache.is_dir() else set()
    for name, (array, says) in cases.items():
        path = _npz(tmp_path / name, array)
        for argv in ([*TINY_TRAIN, "--data", path, "--out", tmp_path / "r"],
                     ["reconstruct", evaluated_run, "--data", path, "--out", tmp_path / "x.png"],
                     ["evaluate", evaluated_run, "--data", path, *TINY_EVALUATE]):
            line = refused(capsys, argv)
            assert str(path) in line and says in line, line
        if name != "one.npz":  # one image is good data: it may be cached; the others never are
            assert (set(cache.iterdir()) if cache.is_dir() else set()) == cached, name
    assert not (tmp_path / "r").exists() and not (tmp_path / "x.png").exists()


# --- 8. the minor ones --------------------------------------------------------------------------------------
def test_data_inspect_no_progress_draws_no_bar(tmp_path, capsys):
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / "d" / cls).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(np.full((20, 20), 20 * i, np.uint8)).save(tmp_path / "d" / cls / f"{i}.png")
    assert main(["data", "inspect", str(tmp_path / "d"), "--no-progress", "--no-cache",
                 "--out", str(tmp_path / "p.png")]) == 0
    assert capsys.readouterr().err == ""


def test_preprocessing_a_read_only_image_warns_nothing():
    """A single PIL image (read-only array) once reached torch.from_numpy, whose warning came before anomaly
    adapt's one-line error. torch warns once per process, so the check runs in a process of its own."""
    code = ("import numpy as np; from medivae.data.preprocess import prepare; "
            "a = np.zeros((1, 1, 20, 20), np.uint8); a.setflags(write=False); prepare(a, 32, 1)")
    env = {**os.environ, "PYTHONPATH": str(Path(medivae.__file__).parents[1])}
    done = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code], capture_output=True, text=True,
                          env=env)
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_resume_without_data_uses_the_runs_settings(run, capsys):
    assert main(["train", "--resume", "--out", str(run), "--epochs", "2", "--no-progress"]) == 0
    assert json.loads((run / "last" / "state.json").read_text())["epoch"] == 2
    assert json.loads((run / "config.json").read_text())["data"]["source"] == "phantoms:80"


# --- 9. fitted samplers: their files and what fit-sampler writes -------------------------------------------
@pytest.fixture(scope="module")
def fitted_run(evaluated_run, tmp_path_factory) -> Path:
    """A copy of the session's run with a gmm and a small diffusion sampler fitted to it."""
    from medivae.models.samplers import DiffusionFit

    run = Path(shutil.copytree(evaluated_run, tmp_path_factory.mktemp("fitted") / "run"))
    api.fit_sampler(run, "gmm", max_components=1, device="cpu", progress=False)
    api.fit_sampler(run, "diffusion", device="cpu", progress=False,
                    diffusion=DiffusionFit(width=8, timesteps=20, max_epochs=1))
    return run


def _edit(key, value):
    def edit(meta):
        target = meta
        for k in key[:-1]:
            target = target[k]
        target[key[-1]] = value
        return meta
    return edit


@pytest.mark.parametrize("kind, edit", [
    ("gmm", lambda meta: []),
    ("gmm", lambda meta: None),
    ("gmm", _edit(["classes"], [])),
    ("gmm", _edit(["classes"], [3])),
    ("gmm", _edit(["classes"], None)),
    ("gmm", _edit(["fit"], {})),
    ("diffusion", _edit(["spec", "width"], 9)),
    ("diffusion", _edit(["spec", "num_classes"], 3)),
    ("diffusion", _edit(["spec", "timesteps"], "many")),
    ("diffusion", lambda meta: {k: v for k, v in meta.items() if k != "spec"}),
], ids=["list", "null", "no-classes", "other-class", "classes-null", "no-fit", "width", "classes", "timesteps",
        "no-spec"])
def test_a_sampler_json_edited_out_of_step_with_its_tensors_is_one_line(fitted_run, tmp_path, capsys, kind, edit):
    """The tensors' hash in the JSON does not cover the JSON's own architecture and class fields: an edit of those
    once reached a KeyError or load_state_dict's many-line error."""
    run = Path(shutil.copytree(fitted_run, tmp_path / "run"))
    js = run / "samplers" / f"{kind}.json"
    js.write_text(json.dumps(edit(json.loads(js.read_text()))))
    line = refused(capsys, ["sample", run, "-n", "4", "--sampler", kind, "--device", "cpu", "--no-progress",
                            "--out", tmp_path / "s.png"])
    assert str(js) in line and f"fit-sampler {run} --sampler {kind}" in line, line
    assert not (tmp_path / "s.png").exists()


@pytest.mark.parametrize("damage, says", [
    ("samplers is a file", "is a file, not a folder"),
    ("gmm.json is a folder", "is not an ordinary file"),
    ("samples_gmm.png is a folder", "is not an ordinary file"),
    ("results samplers is a list", '"samplers" entry is not a JSON object'),
])
def test_fit_sampler_refuses_what_it_cannot_write_before_the_fit(fitted_run, tmp_path, capsys, monkeypatch,
                                                                 damage, says):
    """Each once failed with a traceback after the fit, with the sampler's files half replaced or results.json
    not updated."""
    from medivae.workflows import fit_sampler as fit_sampler_module

    run = Path(shutil.copytree(fitted_run, tmp_path / "run"))
    samplers = run / "samplers"
    if damage == "samplers is a file":
        shutil.rmtree(samplers)
        samplers.write_text("x")
    elif damage == "results samplers is a list":
        results = json.loads((run / "results.json").read_text())
        (run / "results.json").write_text(json.dumps({**results, "samplers": [1]}))
    else:
        (samplers / damage.split()[0]).unlink()
        (samplers / damage.split()[0]).mkdir()
    before = snapshot(run)
    monkeypatch.setattr(fit_sampler_module, "load_run", lambda *a, **kw: pytest.fail("the fit started"))
    assert says in refused(capsys, ["fit-sampler", run, "--sampler", "gmm", "--device", "cpu", "--no-progress"])
    assert snapshot(run) == before
