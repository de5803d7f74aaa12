"""Property-based fuzzing: every data file, configuration or command line gets a result or a
UserError (exit code 2 on the command line), never another exception."""

from __future__ import annotations

import io
import json
import shutil
import string
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from medivae import cli
from medivae.commands import train as train_cmd
from medivae.data import load_dataset
from medivae.models.conv_vae import ConvVAEConfig as ModelConfig
from medivae.runfolder.config import DataConfig, RunConfig, TrainConfig
from medivae.runtime.errors import UserError

FUZZ = settings(
    max_examples=60, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
pytestmark = pytest.mark.filterwarnings("ignore")  # skipped-file warnings and numpy cast warnings are fine


@pytest.fixture(autouse=True, scope="module")
def _no_home_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:  # nothing fuzzed ends up in ~/.cache
        mp.setenv("MEDIVAE_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def _load(source: Path):
    """load_dataset at 32 px: a dict of splits or a UserError; anything else fails the test."""
    try:
        cfg = DataConfig(source=str(source), image_size=32, cache=False, split_seed=0)
        splits = load_dataset(cfg, progress=False)
    except UserError as e:
        assert str(e) and "\n" not in str(e)
        event("UserError")
        return None
    event("loaded")
    for s in splits.values():
        assert s.images.dtype == np.uint8 and s.images.shape[1:] == (1, 32, 32)
        assert len(s.labels) == len(s.images)
    return splits


# --- .npz files ------------------------------------------------------------------------------------
MAGIC = [b"", b"PK\x03\x04", b"\x93NUMPY\x01\x00", b"\x80\x04\x95", b"\x89PNG\r\n\x1a\n"]


@FUZZ
@given(prefix=st.sampled_from(MAGIC), body=st.binary(max_size=600))
def test_random_bytes_as_npz(prefix, body):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.npz"
        path.write_bytes(prefix + body)
        _load(path)


@FUZZ
@given(members=st.dictionaries(st.sampled_from(["train_images.npy", "train_labels.npy", "x.npy", "a/b"]),
                               st.tuples(st.sampled_from(MAGIC), st.binary(max_size=200)), max_size=3))
def test_zip_with_random_members_as_npz(members):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.npz"
        with zipfile.ZipFile(path, "w") as z:
            for name, (prefix, body) in members.items():
                z.writestr(name, prefix + body)
        _load(path)


DTYPES = st.sampled_from([
    "u1", "i1", "u2", "i2", "i4", "i8", "u8", "f2", "f4", "f8", "c8", "?", "U3", "S2", "M8[D]",
])
ODD = hnp.arrays(DTYPES, hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=5)) | st.just(
    np.array([{"pickled": 1}], dtype=object)  # needs allow_pickle to read back
)
IMAGES = hnp.arrays(  # shaped like images, so the loader gets past the shape check
    st.sampled_from(["u1", "f4", "f8", "i8", "u2", "?"]),
    st.tuples(st.integers(0, 12), st.integers(1, 9), st.integers(1, 9))
    | st.tuples(st.integers(1, 6), st.integers(1, 7), st.integers(1, 7), st.sampled_from([1, 2, 3, 4])),
)


@st.composite
def medmnist_like(draw):
    """train/val/test images (mostly image-shaped) with labels of matching or mismatching length."""
    out = {}
    for split in ["train", *draw(st.sets(st.sampled_from(["val", "test"])))]:
        images = draw(IMAGES | IMAGES | ODD)
        out[f"{split}_images"] = images
        n = len(images) if images.ndim else 1
        shapes = st.sampled_from([(n,), (n, 1), (n, 3), (max(n - 1, 0),)])
        labels = hnp.arrays(st.sampled_from(["i8", "u1", "i2"]), shapes, elements=st.integers(0, 11)) | (
            hnp.arrays(st.sampled_from(["i8", "f4", "?", "U2"]), shapes)
        )
        choice = draw(st.sampled_from(["labels", "labels", "odd", "none"]))
        if choice != "none":
            out[f"{split}_labels"] = draw(labels if choice == "labels" else ODD)
    if draw(st.booleans()):
        out["other"] = draw(ODD)
    return out


@FUZZ
@given(arrays=medmnist_like())
def test_npz_with_odd_arrays(arrays):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.npz"
        np.savez(path, **arrays)
        _load(path)


# --- folders of images -------------------------------------------------------------------------------
MODES = {  # mode -> suffixes PIL can write it as
    "1": (".png", ".bmp"), "L": (".png", ".jpg", ".bmp", ".tif"), "P": (".png", ".bmp"),
    "RGB": (".png", ".jpg", ".bmp", ".tif"), "RGBA": (".png", ".tif"), "LA": (".png",),
    "I;16": (".png", ".tif"), "I": (".tif",), "F": (".tif",),
}


@st.composite
def image_file(draw):
    """(relative path, bytes): a real image in a random mode/size, or random bytes with an image suffix."""
    folder = draw(st.sampled_from(["", "a/", "b/", "a/deep/"]))
    if draw(st.booleans()):
        suffix = draw(st.sampled_from([".png", ".jpg", ".tif", ".bmp", ".PNG"]))
        return folder + f"junk{draw(st.integers(0, 99))}{suffix}", draw(st.binary(max_size=300))
    mode = draw(st.sampled_from(sorted(MODES)))
    suffix = draw(st.sampled_from(MODES[mode]))
    w, h = draw(st.integers(1, 70)), draw(st.integers(1, 70))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).convert(
        mode if mode in ("1", "L", "P", "RGB", "RGBA", "LA") else "L")
    if mode in ("I;16", "I", "F"):
        scale = draw(st.sampled_from([0.0, 1.0, 257.0, 1e6]))
        arr = np.asarray(img, dtype=np.float64) * scale
        img = Image.fromarray(arr.astype({"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]))
    buf = io.BytesIO()
    img.save(buf, format={".png": "PNG", ".jpg": "JPEG", ".tif": "TIFF", ".bmp": "BMP"}[suffix.lower()])
    return folder + f"img{draw(st.integers(0, 99))}{suffix}", buf.getvalue()


@FUZZ
@given(files=st.lists(image_file(), max_size=6))
def test_folder_of_odd_images(files):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "images"
        root.mkdir()
        for rel, data in files:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
        _load(root)


CSV_CELL = st.text(max_size=10) | st.sampled_from(
    ["a.png", "b.png", "sub/c.png", "missing.png", "/etc/passwd", "..", "", "path"]
)


@FUZZ
@given(rows=st.lists(st.lists(CSV_CELL, max_size=4), max_size=6), sep=st.sampled_from([",", ";", "\t"]))
def test_random_csv_list(rows, sep):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        (root / "sub").mkdir()
        for name in ("a.png", "b.png", "sub/c.png"):
            Image.new("L", (5, 9), 128).save(root / name)
        path = root / "list.csv"
        text = "\n".join(sep.join(row) for row in rows)
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        _load(path)


# --- configuration -----------------------------------------------------------------------------------
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


def _section(klass):
    names = [f for f in klass.__dataclass_fields__]
    return st.dictionaries(st.sampled_from(names) | st.text(max_size=6), JSON, max_size=3)


@FUZZ
@given(d=st.fixed_dictionaries({}, optional={
    "data": _section(DataConfig) | JSON, "model": _section(ModelConfig) | JSON,
    "train": _section(TrainConfig) | JSON, "label_names": JSON, "extra": JSON,
}))
def test_run_config_from_random_json(d):
    try:
        cfg = RunConfig.from_dict(json.loads(json.dumps(d)))
    except UserError as e:
        assert str(e) and "\n" not in str(e)
        event("UserError")
        return
    event("accepted")
    assert RunConfig.from_dict(cfg.to_dict()) == cfg  # whatever is accepted survives the JSON round trip


@FUZZ
@given(text=st.text(max_size=120))
def test_run_config_load_from_random_text(text):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "config.json"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            RunConfig.load(path)
        except UserError:
            pass


# --- command lines -----------------------------------------------------------------------------------
TOKENS = st.sampled_from([
    *cli.COMMAND_MODULES, "demo", "sample", "interpolate", "reconstruct",
    "--data", "--out", "--epochs", "--batch-size", "--lr", "--seed", "--precision", "--device",
    "--image-size", "--channels", "--latent-dim", "--base-width", "--beta", "--likelihood", "--model",
    "--kl-schedule", "--warmup-epochs", "--free-bits", "--val-fraction", "--test-fraction", "--labels",
    "--resize-mode", "--window", "--threads", "--resume", "--no-progress", "-n", "--steps", "--mode",
    "phantoms", "phantoms:20", "32", "64", "0", "-1", "1e9", "nan", "inf", "-inf", "fp16", "cpu", "linear",
    "cvae", "beta_vae", "nope", "",
])
ARGV = st.lists(TOKENS | st.text(alphabet=string.printable, max_size=8), max_size=10)


def _parse_only(parser):
    """Keep parsing and configuration building; skip the work (training, loading runs)."""
    parse = parser.parse_args

    def parse_args(argv=None, namespace=None):
        args = parse(argv, namespace)
        if getattr(args, "func", None) is train_cmd.cmd_train:
            args.func = lambda a: train_cmd.run_config(a) and 0
        elif getattr(args, "func", None) is not None:
            args.func = lambda a: 0
        return args

    parser.parse_args = parse_args
    return parser


@FUZZ
@given(argv=ARGV)
def test_command_lines(argv):
    build = cli.build_parser
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "build_parser", lambda: _parse_only(build()))
        try:
            code = cli.main(argv)
        except SystemExit as e:  # --help and --version exit 0 from inside argparse
            assert e.code == 0, argv
            return
    assert code in (0, 2), argv
    event(f"exit {code}")


# --- every command x hostile paths and values --------------------------------------------------------------
# Each probe is something a user can get wrong. Every one must end in exit code 2 with exactly one stderr line
# "medivae: error: ...", no traceback, before any real work (decoding data, generating phantoms, training), and
# leave the run folder as it was (its .lock aside).
class WorkStarted(BaseException):
    """Raised where real work would start: a probe got past every check."""


def _stop(*args, **kwargs):
    raise WorkStarted


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def matrix_world(evaluated_run, tmp_path_factory) -> dict:
    """The session's evaluated run (read only), a copy of it for `compare`, a synthetic folder for `utility`,
    a regular file and a non-empty folder that probes point at."""
    from medivae.workflows.synthesize import write_synthetic

    root = tmp_path_factory.mktemp("matrix")
    other = Path(shutil.copytree(evaluated_run, root / "other"))
    write_synthetic(root / "syn", np.zeros((4, 1, 32, 32), np.uint8), ["normal", "lesion"] * 2,
                    ("normal", "lesion"), "png")
    (root / "a-file").write_text("x")
    (root / "busy").mkdir()
    (root / "busy" / "notes.txt").write_text("x")
    (root / "empty").mkdir()
    return {"run": evaluated_run, "other": other, "syn": root / "syn", "root": root}


TRAIN_FLAGS = ["--image-size", "32", "--latent-dim", "4", "--base-width", "4", "--epochs", "1", "--batch-size",
               "32", "--precision", "fp32", "--device", "cpu", "--no-progress"]
# command -> (argv before --out, what --out is: "run", "folder", "file" or None (writes into RUN), its suffix)
COMMANDS = {
    "train": (["train", "--data", "phantoms:40", *TRAIN_FLAGS], "run", ""),
    "demo": (["demo", "--epochs", "1", "--no-progress"], "run", ""),
    "anomaly fit": (["anomaly", "fit", "--data", "phantoms:40", "--normal-label", "normal", *TRAIN_FLAGS], "run", ""),
    "anomaly adapt": (["anomaly", "adapt", "{run}", "--normals", "phantoms:30", "--no-progress"], "run", ""),
    "anomaly score": (["anomaly", "score", "{run}", "--no-progress"], "folder", ""),
    "sample": (["sample", "{run}", "-n", "4"], "file", ".png"),
    "fit-sampler": (["fit-sampler", "{run}", "--sampler", "gmm"], None, ""),
    "encode": (["encode", "{run}"], "file", ".npz"),
    "interpolate": (["interpolate", "{run}"], "file", ".png"),
    "reconstruct": (["reconstruct", "{run}", "-n", "2"], "file", ".png"),
    "traverse": (["traverse", "{run}"], "file", ".png"),
    "evaluate": (["evaluate", "{run}", "--no-progress"], None, ""),
    "report": (["report", "{run}"], "file", ".html"),
    "synthesize": (["synthesize", "{run}", "-n", "4", "--no-progress"], "folder", ""),
    "utility": (["utility", "--run", "{run}", "--synthetic", "{syn}", "--no-progress"], "file", ".json"),
    "compare": (["compare", "{run}", "{other}"], "file", ".md"),
    "data inspect": (["data", "inspect", "phantoms:40", "--no-progress"], "file", ".png"),
}
BAD_NUMBERS = ["nan", "inf", "-inf", "1e400", "abc", "", "-3", "0x10"]
BAD_WHOLE = ["1.5", "1e3"]  # numbers, but not whole ones
BAD_TEXT = {  # free-text options and a value each command must refuse before any work
    "--data": "no/such/source", "--precision": "fp8", "--likelihood": "poisson", "--model": "nope",
    "--kl-schedule": "sometimes", "--lr-schedule": "zigzag", "--resize-mode": "stretch", "--window": "nope",
    "--normalize": "nope", "--nifti-axis": "diagonal", "--augment": "rotate=9", "--prior": "laplace",
    "--labels": "no-such-label", "--split": "holdout", "--sampler": "nope", "--checkpoint": "worst",
    "--mode": "cubic", "--format": "tiff", "--label": "no-such-class", "--foreground": "magic",
    "--inception-weights": "no/such.pth", "--from": "no/such.png", "--image": "no/such.png",
    "--normals": "no/such/folder", "--calibration": "no/such/folder", "--normal-label": "no-such-label",
    "--real": "no/such/source", "--config": "no/such.json", "--device": "tpu",
}
MODEL_ARGS = ["max_width=wide", "max_width=-8", "max_width=64.5", "max_width=[1,2]", "name=vq_vae", "nope=1",
              "=3", "max_width"]
CONFIGS = ['{"train": {"batch_size": 12.5}}', '{"train": {"epochs": 1e400}}', '{"train": {"epochs": true}}',
           '{"train": {"epochs": "three"}}', "[]", "not json", '{"model": {"name": 3}}', '{"train": {"seed": -1}}',
           '{"data": {"labels": "normal"}}', '{"extra": 1}']


def _subparser(parser, words: list[str]):
    import argparse

    for word in words:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[word]
    return parser


def _numeric_flags(name: str) -> list[tuple[str, bool]]:
    """(flag, takes whole numbers only) for every numeric option of a command."""
    parser = _subparser(cli.build_parser(), name.split())
    out = []
    for a in parser._actions:
        kind = a.type if a.type in (int, float) else getattr(a.type, "__name__", None)
        if a.option_strings and kind in (int, float, "whole number", "number"):
            out.append((a.option_strings[-1], kind in (int, "whole number")))
    return out


def _options(name: str) -> set[str]:
    parser = _subparser(cli.build_parser(), name.split())
    return {s for a in parser._actions for s in a.option_strings}


def probes(name: str, w: dict) -> list[tuple[str, list[str]]]:
    """(what is probed, argv) for command ``name``: every probe must be refused."""
    template, out_kind, suffix = COMMANDS[name]
    base = [str(t).format(**w) for t in template]
    root = w["root"]
    good_out = {"run": [str(root / "new-run")], "folder": [str(root / "new-folder")],
                "file": [str(root / f"new{suffix}")], None: []}[out_kind]
    good = base + (["--out", *good_out] if good_out else [])
    out = []
    if out_kind is not None:  # hostile output paths
        for what, path in [("empty", ""), ("proc", f"/proc/medivae-fuzz{suffix}"), ("device", "/dev/null"),
                           ("nul", f"a\x00b{suffix}"), ("too long", "x" * 300 + suffix),
                           ("under a file", str(root / "a-file" / f"x{suffix}")),
                           ("busy folder", str(root / "busy")), ("a file", str(root / "a-file"))]:
            out.append((f"--out {what}", [*base, "--out", path]))
        if out_kind == "file":
            out.append(("--out existing file", [*base, "--out", str(root / "a-file")]))
            out.append(("--out wrong suffix", [*base, "--out", str(root / "x.exe")]))
    if "{run}" in template:  # hostile run folders
        i = template.index("{run}")
        for what, path in [("empty", ""), ("missing", str(root / "missing")), ("a file", str(root / "a-file")),
                           ("empty folder", str(root / "empty")), ("not a run", str(root / "busy")),
                           ("proc", "/proc"), ("nul", "r\x00n")]:
            out.append((f"RUN {what}", [*good[:i], path, *good[i + 1:]]))
    for flag, whole in _numeric_flags(name):
        for value in BAD_NUMBERS + (BAD_WHOLE if whole else []):
            out.append((f"{flag} {value!r}", [*good, flag, value]))
    for flag, value in BAD_TEXT.items():
        if flag in _options(name) and not (flag == "--data" and name == "data inspect"):
            out.append((f"{flag} {value!r}", [*good, flag, value]))
    if "--model-arg" in _options(name):
        out += [(f"--model-arg {m!r}", [*good, "--model-arg", m]) for m in MODEL_ARGS]
    return out


def _stats(folder: Path) -> dict[str, tuple[int, int, int]]:
    """(size, mtime in ns, inode) of every file (the lock file aside): any write changes one of them, even a
    rewrite with the same bytes, so this is stricter than comparing contents, and cheap enough per probe."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != ".lock":
            st = p.stat()
            out[str(p.relative_to(folder))] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return out


def _run_probe(argv: list[str], capsys, watched: list[Path], says: str = "") -> str | None:
    """None when ``argv`` is refused as it must be (naming ``says``), else what went wrong."""
    before = [_stats(f) for f in watched]
    try:
        code = cli.main(argv)
    except WorkStarted:
        return "work started before the input was refused"
    except SystemExit as e:
        return f"SystemExit {e.code}"
    except BaseException as e:  # noqa: BLE001  (a traceback is what this test is for)
        return f"traceback: {type(e).__name__}: {e}"
    err = capsys.readouterr().err
    if code != 2:
        return f"exit {code}"
    lines = err.splitlines()
    if len(lines) != 1 or not lines[0].startswith("medivae: error: ") or "Traceback" in err or says not in err:
        return f"stderr {err!r}"
    if [_stats(f) for f in watched] != before:
        return "changed the run folder"
    return None


@pytest.fixture
def no_work(monkeypatch):
    """Real work fails the probe: generating phantoms, decoding a source, fitting, a network's first step."""
    import medivae.data as data
    from medivae.train.trainer import Trainer

    for target, name in [(data, "make_phantoms"), (data, "build"), (Trainer, "fit"), (Trainer, "continue_from")]:
        monkeypatch.setattr(target, name, _stop)
    monkeypatch.setenv("MEDIVAE_PLUGINS", "")
    parser = cli.build_parser()  # built once: parsing leaves no state in it, and building is 20 ms a probe
    monkeypatch.setattr(cli, "build_parser", lambda: parser)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_refuses_hostile_paths_and_values(name, matrix_world, capsys, no_work, monkeypatch):
    monkeypatch.chdir(matrix_world["root"])  # anything written to "." would land here, not in the repository
    config = matrix_world["root"] / "bad.json"
    cases = probes(name, matrix_world)
    if name == "train":
        for i, text in enumerate(CONFIGS):
            config.with_name(f"bad{i}.json").write_text(text)
            cases.append((f"--config {text}", ["train", "--config", str(config.with_name(f"bad{i}.json")),
                                                "--out", str(matrix_world["root"] / "new-run")]))
    watched = [matrix_world["run"], matrix_world["other"], matrix_world["syn"]]
    contents = [_snapshot(f) for f in watched]
    failures = []
    for what, argv in cases:
        why = _run_probe(argv, capsys, watched)
        if why:
            failures.append(f"{what}: {why}")
    assert [_snapshot(f) for f in watched] == contents  # byte for byte
    for made in ("new-run", "new-folder", "new.png", "new.npz", "new.html", "new.json", "new.md"):
        assert not (matrix_world["root"] / made).exists(), f"{name} wrote {made}"
    print(f"{name}: {len(cases)} probes, {len(failures)} failures")
    assert not failures, f"{name}: {len(failures)} of {len(cases)} probes failed:\n" + "\n".join(failures)


# --- the long matrix (--runslow): random combinations of hostile values, paths and data -------------------
def _hostile_number(whole: bool):
    """Text no numeric option takes: negative, non-finite, not a number, and (whole-number options) a fraction."""
    bad = st.one_of(
        st.integers(max_value=-1).map(str),
        st.floats(max_value=-1e-9, allow_infinity=True).map(repr),
        st.sampled_from(["nan", "inf", "-inf", "1e400", "NaN", "", " ", "1,5", "0x1p3", "--"]),
        st.text(alphabet=string.ascii_letters + "_!@#", min_size=1, max_size=6),
    )
    return st.one_of(bad, st.floats(min_value=0.1, max_value=1e6).filter(lambda x: x != int(x)).map(repr)) \
        if whole else bad


def _hostile_path(w: dict, suffix: str):
    """Paths no output may be written to: empty, NUL, too long, /proc, a device, under a file, a busy folder."""
    text = st.text(alphabet=string.ascii_letters + string.digits, min_size=1, max_size=8)
    return st.one_of(
        st.just(""), st.just("/dev/null"), text.map(lambda t: f"/proc/{t}{suffix}"),
        text.map(lambda t: f"{t}\x00{t}{suffix}"), st.integers(256, 400).map(lambda n: "y" * n + suffix),
        text.map(lambda t: str(w["root"] / "a-file" / f"{t}{suffix}")), st.just(str(w["root"] / "busy")),
    )


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
@settings(max_examples=400, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_hostile_command_lines(data, matrix_world, capsys, no_work, monkeypatch):
    """One to three hostile values at once, on any command: still one line, still nothing written."""
    monkeypatch.chdir(matrix_world["root"])
    name = data.draw(st.sampled_from(list(COMMANDS)), label="command")
    template, out_kind, suffix = COMMANDS[name]
    argv = [str(t).format(**matrix_world) for t in template]
    numeric = _numeric_flags(name)
    least = 0 if out_kind is not None else 1  # something hostile: an output path, a value, or both
    picks = data.draw(st.lists(st.sampled_from(numeric), min_size=least, max_size=3, unique=True), label="flags") \
        if numeric else []
    for flag, whole in picks:
        argv += [flag, data.draw(_hostile_number(whole), label=flag)]
    if out_kind is not None:
        argv += ["--out", data.draw(_hostile_path(matrix_world, suffix), label="--out")]
    why = _run_probe(argv, capsys, [matrix_world["run"], matrix_world["other"], matrix_world["syn"]])
    event(why or "refused")
    assert why is None, f"{argv}: {why}"


@st.composite
def bad_float_images(draw):
    """Float images a loader must refuse: NaN or inf somewhere, or values in neither [0, 1] nor [0, 255]."""
    n = draw(st.integers(12, 30))
    images = draw(hnp.arrays(np.float32, (n, 8, 8), elements=st.floats(0, 1, width=32)))
    kind = draw(st.sampled_from(["nan", "inf", "range"]))
    i, y, x = draw(st.integers(0, n - 1)), draw(st.integers(0, 7)), draw(st.integers(0, 7))
    if kind == "range":
        images = images * draw(st.sampled_from([300.0, -1.0, 1e6]))
        images[i, y, x] = draw(st.sampled_from([-0.5, 256.0, 1e9]))
    else:
        images[i, y, x] = np.nan if kind == "nan" else draw(st.sampled_from([np.inf, -np.inf]))
    return images


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(images=bad_float_images(), command=st.sampled_from(["train", "evaluate", "reconstruct", "data inspect"]))
def test_bad_float_data_is_refused_by_every_reader(images, command, matrix_world, capsys, monkeypatch):
    from medivae.train.trainer import Trainer

    monkeypatch.setattr(Trainer, "fit", _stop)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "bad.npz"
        np.savez(path, train_images=images)
        run, out = str(matrix_world["run"]), str(Path(d) / "out")
        argv = {"train": ["train", "--data", str(path), *TRAIN_FLAGS, "--out", out],
                "evaluate": ["evaluate", run, "--data", str(path), "--no-progress"],
                "reconstruct": ["reconstruct", run, "--data", str(path), "--out", out + ".png"],
                "data inspect": ["data", "inspect", str(path), "--no-progress", "--out", out + ".png"]}[command]
        why = _run_probe(argv, capsys, [matrix_world["run"]], says=str(path))
        assert why is None, f"{command}: {why}"
        assert not Path(out).exists() and not Path(out + ".png").exists()


@pytest.mark.slow
def test_a_full_disk_mid_evaluation_is_one_line_and_leaves_the_run_as_it_was(evaluated_run, tmp_path):
    """``ulimit -f``: writes past a few kB fail (EFBIG) in a process of its own, after the whole evaluation."""
    import os
    import subprocess
    import sys

    import medivae

    from tiny import TINY_EVALUATE

    run = Path(shutil.copytree(evaluated_run, tmp_path / "run"))
    before = _snapshot(run)
    env = {**os.environ, "PYTHONPATH": str(Path(medivae.__file__).parents[1])}
    cmd = f"ulimit -f 2 && exec {sys.executable} -m medivae evaluate {run} " + " ".join(TINY_EVALUATE)
    done = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith("medivae: error: cannot write"), done.stderr
    assert _snapshot(run) == before
