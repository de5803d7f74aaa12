"""Property-based fuzzing: every data file, configuration or command line gets a result or a
UserError (exit code 2 on the command line), never another exception."""

from __future__ import annotations

import io
import json
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
