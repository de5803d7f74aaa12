"""DICOM: windowing against hand-computed values and pydicom, photometry, frames, patients and splits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from medivae.cli import main
from medivae.data import load_dataset, load_source
from medivae.data.dicom import read_dicom
from medivae.data.readers import UnreadableFile
from medivae.data.windowing import PRESETS, Window, apply_window, parse_normalize, parse_window
from medivae.runfolder.config import DataConfig
from medivae.runtime.errors import UserError

NORM = parse_normalize("percentile")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDIVAE_CACHE", str(tmp_path / "cache"))


def pydicom_file(name: str) -> Path:
    p = get_testdata_file(name, download=False)  # never the network
    if p is None:
        pytest.skip(f"pydicom test file {name} is absent")
    return Path(p)


def write_dicom(path: Path, pixels: np.ndarray, *, photometric="MONOCHROME2", slope=None, intercept=None,
                window=None, patient="P1", signed=False) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.Modality = patient, "CT"
    arr = np.asarray(pixels)
    if arr.ndim == 3:
        ds.NumberOfFrames = len(arr)
    ds.Rows, ds.Columns = arr.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = int(signed)
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = arr.astype(np.int16 if signed else np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


# --- windowing ------------------------------------------------------------------------------


def test_linear_window_matches_hand_computed_values():
    # brain window C=40 W=80; DICOM LINEAR: y = ((x - 39.5) / 79 + 0.5) clipped to [0, 1], times 255
    x = np.array([-1000.0, 0.0, 20.0, 40.0, 79.5, 1000.0])
    # by hand: 0 -> 0.0; 20 -> 0.2532 * 255 = 64.56; 40 -> 0.5063 * 255 = 129.1; 79.5 -> 1.006 -> 1
    assert apply_window(x, PRESETS["brain"]).tolist() == [0, 0, 65, 129, 255, 255]


def test_linear_exact_and_sigmoid_windows():
    w = Window(0.0, 100.0)
    assert apply_window(np.array([-50.0, 0.0, 25.0, 50.0]), w, "LINEAR_EXACT").tolist() == [0, 128, 191, 255]
    # sigmoid: 255 / (1 + exp(-4 (x - c) / w)); at x = c -> 127.5; at x = c + w/4 -> 255 / (1 + e^-1) = 186.4
    assert apply_window(np.array([0.0, 25.0]), w, "SIGMOID").tolist() == [128, 186]


def test_window_parsing_presets_numbers_and_errors():
    assert parse_window("lung") == Window(-600.0, 1500.0, "lung")
    assert parse_window(" Bone ") == PRESETS["bone"]
    assert parse_window("40,400") == Window(40.0, 400.0)
    assert parse_window(None) is None
    for bad in ("40", "a,b", "40,0", "40,-5", "liver"):
        with pytest.raises(UserError):
            parse_window(bad)
    with pytest.raises(UserError):
        DataConfig(window="40;80")


def test_window_agrees_with_pydicom_apply_windowing_on_real_ct():
    from pydicom.pixels import apply_modality_lut, apply_windowing

    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    ds.WindowCenter, ds.WindowWidth = 0, 500  # CT_small spans -896..1167 HU, median 2
    hu = apply_modality_lut(ds.pixel_array, ds)
    ref = apply_windowing(hu.astype(np.float64), ds)
    # pydicom maps onto the rescaled stored-value range: signed 16 bits -> [-32768, 32767] * slope + intercept
    slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    lo, hi = -(2**15) * slope + intercept, (2**15 - 1) * slope + intercept
    ref8 = np.round((ref - lo) / (hi - lo) * 255)
    ours = apply_window(hu, Window(0, 500))
    assert 0 < (ours == 0).mean() < 1 and 0 < (ours == 255).mean() < 1  # the window cuts both ends
    assert np.abs(ours.astype(int) - ref8).max() <= 1


def test_real_ct_small_rescale_and_user_window():
    path = pydicom_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)  # by hand
    got = read_dicom(path, PRESETS["mediastinum"], NORM)
    expected = np.clip(np.round(((hu - 49.5) / 349 + 0.5) * 255), 0, 255)
    assert got.frames.shape == (1, 1, 128, 128)
    assert np.array_equal(got.frames[0, 0], expected.astype(np.uint8))
    assert got.window == "mediastinum C=50 W=350"


# --- photometry, rescale, frames (fixtures written at test time) -----------------------------


def test_monochrome1_is_inverted_after_rescale_and_file_window(tmp_path):
    stored = np.array([[0, 50], [100, 150]], dtype=np.uint16)
    path = write_dicom(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1", slope=2, intercept=-100,
                       window=(0, 201))
    # by hand: HU = 2 * stored - 100 = [[-100, 0], [100, 200]]; LINEAR C=0 W=201: y = (x + 0.5) / 200 + 0.5
    # -> [[0.0025, 0.5025], [1.0025, 1.5025]] -> clipped * 255 = [[0.64, 128.1], [255, 255]];
    # MONOCHROME1: 255 - y
    got = read_dicom(path, None, NORM)
    assert got.frames[0, 0].tolist() == [[254, 127], [0, 0]]
    assert got.window == "file C=0 W=201"
    m2 = write_dicom(tmp_path / "m2.dcm", stored, slope=2, intercept=-100, window=(0, 201))
    mono2 = read_dicom(m2, None, NORM)
    assert np.array_equal(mono2.frames, 255 - got.frames)


def test_user_window_overrides_the_files(tmp_path):
    path = write_dicom(tmp_path / "a.dcm", np.array([[0, 1000]]), slope=1, intercept=-1000, window=(0, 10))
    assert read_dicom(path, Window(-500, 1001), NORM).frames[0, 0].tolist() == [[0, 255]]
    # file window C=0 W=10 on HU [-1000, 0]: 0 -> (0 + 0.5) / 9 + 0.5 = 0.5556 -> 141.7
    assert read_dicom(path, None, NORM).frames[0, 0].tolist() == [[0, 142]]


def test_multiframe_gives_frames_and_drops_constant_ones(tmp_path):
    ramp = np.arange(16).reshape(4, 4)
    frames = np.stack([ramp * k for k in (1, 0, 3)]).astype(np.uint16)  # frame 1 is all 0
    got = read_dicom(write_dicom(tmp_path / "mf.dcm", frames), None, parse_normalize("range:0,45"))
    assert got.frames.shape == (2, 1, 4, 4) and got.n_constant == 1
    assert got.frames[1, 0, 3, 3] == 255 and got.frames[0, 0, 3, 3] == round(15 / 45 * 255)


def test_real_multiframe_rgb_and_palette_files():
    rt = read_dicom(pydicom_file("rtdose.dcm"), None, NORM)
    assert rt.frames.shape[0] == int(pydicom.dcmread(pydicom_file("rtdose.dcm")).NumberOfFrames)
    rgb = read_dicom(pydicom_file("SC_rgb_rle_2frame.dcm"), None, NORM)
    assert rgb.frames.shape == (2, 3, 100, 100) and rgb.window == "colour as stored"
    ds = pydicom.dcmread(pydicom_file("SC_rgb_rle_2frame.dcm"))
    assert np.array_equal(rgb.frames[0].transpose(1, 2, 0), ds.pixel_array[0])
    pal = read_dicom(pydicom_file("examples_palette.dcm"), None, NORM)
    assert pal.frames.shape[1] == 3 and pal.frames.dtype == np.uint8


def test_rgb_dicom_becomes_gray_through_one_preprocessing_path():
    cfg = DataConfig(source=str(pydicom_file("SC_rgb_rle_2frame.dcm")), image_size=32, cache=False)
    s = load_source(cfg, progress=False)["all"]
    assert s.images.shape == (2, 1, 32, 32)


def test_dicom_without_pixel_data_is_a_clear_error(capsys):
    path = pydicom_file("reportsi.dcm")
    with pytest.raises(UnreadableFile, match="without pixel data"):
        read_dicom(path, None, NORM)
    assert main(["data", "inspect", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medivae: error:") and "without pixel data" in err and err.count("\n") == 1


def test_unsupported_photometric_is_refused(tmp_path):
    path = write_dicom(tmp_path / "x.dcm", np.ones((2, 2)), photometric="MONOCHROME2")
    ds = pydicom.dcmread(path)
    ds.PhotometricInterpretation = "HSV"
    ds.save_as(path)
    with pytest.raises(UnreadableFile, match="HSV"):
        read_dicom(path, None, NORM)


# --- folders, patients, splits ---------------------------------------------------------------


def _patients(root: Path, n_patients=10, slices=5) -> None:
    """Patient k's slices have intensity level k, so an image tells us its patient."""
    for k in range(n_patients):
        for j in range(slices):
            img = np.full((8, 8), 100 * k, dtype=np.uint16)
            img[0, 0] = 2000  # the same range in every file, so levels map identically
            img[1, 1] = 0
            # PACS-like layout: no suffix, a folder per patient
            write_dicom(root / f"PAT{k:02d}" / f"IM{j:04d}", img, patient=f"SECRET-PATIENT-{k:02d}",
                        window=(1000, 2001))


def test_all_slices_of_a_patient_land_in_one_split_and_ids_stay_in_memory(tmp_path):
    root = tmp_path / "export"
    _patients(root)
    cfg = DataConfig(source=str(root), image_size=32, val_fraction=0.2, test_fraction=0.2, split_seed=1767661200070)
    splits = load_dataset(cfg, progress=False)
    assert sum(len(s) for s in splits.values()) == 50
    assert not splits["train"].label_names  # DICOM folders give no folder labels
    seen: dict[int, str] = {}
    for name, s in splits.items():
        assert len(s) % 5 == 0 and len(s) > 0
        for level in np.unique(s.images[:, 0, 16, 16]):
            assert seen.setdefault(int(level), name) == name  # a patient's level appears in one split only
    assert len(seen) == 10
    groups = [set(s.groups.tolist()) for s in splits.values()]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    for f in (tmp_path / "cache").rglob("*"):
        if f.is_file():
            assert b"SECRET-PATIENT" not in f.read_bytes()
    assert "SECRET" not in json.dumps(splits["train"].meta)


def test_corrupt_dicom_among_good_ones_is_skipped_and_reported(tmp_path):
    root = tmp_path / "series"
    for j in range(4):
        write_dicom(root / f"s{j}.dcm", np.arange(16).reshape(4, 4) + j, patient="P")
    (root / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"garbage")
    (root / "report.dcm").write_bytes(pydicom_file("reportsi.dcm").read_bytes())
    with pytest.warns(UserWarning, match="skipped 2 of 6 files"):
        s = load_source(DataConfig(source=str(root), image_size=32), progress=False)["all"]
    assert len(s) == 4
    reasons = " ".join(s.meta["skipped"])
    assert "broken.dcm" in reasons and "without pixel data" in reasons


def test_one_dicom_file_for_a_run_is_windowed_as_its_data_was(tmp_path):
    """``interpolate --from x.dcm`` reads the file as the run's source did: rescale + the run's window."""
    import dataclasses

    from medivae.runfolder.config import RunConfig
    from medivae.runfolder.run import load_image

    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 1000, size=(24, 24))
    path = write_dicom(tmp_path / "one.dcm", hu + 1024, slope=1, intercept=-1024)
    cfg = RunConfig()
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source=str(tmp_path), image_size=32,
                                                            window="lung", cache=False))
    got = load_image(path, cfg)[0, 0].numpy()
    source = load_source(cfg.data)["all"].images  # the folder source of the same file: uint8 (1, 1, 32, 32)
    via_source = np.asarray(source[0, 0]).astype(np.float32) / np.float32(255)
    np.testing.assert_array_equal(got, via_source)
    # the lung window [-1350, 150] HU: air (-1000 HU) sits near 0.23, bone clips at 1; min-max would give 0..1
    assert (got == 1).any() and 0.2 < got.min() < 0.3
    with pytest.raises(UserError, match="holds 3 images"):
        load_image(write_dicom(tmp_path / "three" / "x.dcm", np.stack([hu + 1024] * 3) + np.arange(3)[:, None, None]),
                   cfg)
