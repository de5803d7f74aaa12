"""NIfTI: slicing axes, orientation, empty slices, normalisation, 4D, and volumes kept in one split."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medivae.cli import main
from medivae.data import load_dataset, load_source
from medivae.data.nifti import read_nifti
from medivae.data.windowing import Window, parse_normalize
from medivae.runfolder.config import DataConfig
from medivae.runtime.errors import UserError

PCT = parse_normalize("percentile")
NIBABEL_DATA = Path(os.path.dirname(nib.__file__)) / "tests" / "data"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDIVAE_CACHE", str(tmp_path / "cache"))


def save(path: Path, data: np.ndarray, affine=None) -> Path:
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.eye(4) if affine is None else affine), str(path))
    return path


def volume(x=6, y=5, z=4, empty=(0,)) -> np.ndarray:
    """Axial slice k holds 10 * k plus a marker at the anterior edge (high y); slices in ``empty`` are 0."""
    v = np.zeros((x, y, z), dtype=np.float32)
    for k in range(z):
        if k not in empty:
            v[:, :, k] = 10.0 * k
            v[0, y - 1, k] = 100.0
    return v


def test_axial_slices_skip_empty_ones_and_put_anterior_up(tmp_path):
    path = save(tmp_path / "v.nii.gz", volume())
    got = read_nifti(path, "v.nii.gz", "axial", None, parse_normalize("range:0,100"))
    assert got.frames.shape == (3, 1, 5, 6) and got.n_constant == 1  # (F, 1, y, x)
    # slice k=1: background 10 -> 25.5 -> 26 (round half to even of 25.5 is 26); marker at x=0, y=4 -> row 0
    assert got.frames[0, 0, 0, 0] == 255 and got.frames[0, 0, 4, 0] == 26
    assert got.frames[2, 0, 2, 2] == round(30 / 100 * 255)


def test_other_axes_and_window(tmp_path):
    path = save(tmp_path / "v.nii", volume(empty=()))
    assert read_nifti(path, "v.nii", "coronal", None, PCT).frames.shape == (5, 1, 4, 6)
    assert read_nifti(path, "v.nii", "sagittal", None, PCT).frames.shape == (6, 1, 4, 5)
    # LINEAR C=15 W=11 ramps over 9.5..19.5: slice 1 (10) -> (10 - 14.5) / 10 + 0.5 = 0.05 -> 13;
    # slices 2 and 3 (20, 30) turn white like their marker (100): uniform, so dropped
    win = read_nifti(path, "v.nii", "axial", Window(15.0, 11.0), PCT)
    assert win.n_constant == 2 and len(win.frames) == 2
    assert set(np.unique(win.frames[1]).tolist()) == {13, 255}


def test_orientation_is_canonical_whatever_the_stored_order(tmp_path):
    v = volume(empty=())
    ras = save(tmp_path / "ras.nii", v)
    flipped = np.diag([-1.0, 1.0, 1.0, 1.0])
    flipped[0, 3] = v.shape[0] - 1  # same voxel positions in space, x stored right-to-left (LAS)
    las = save(tmp_path / "las.nii", v[::-1], flipped)
    a = read_nifti(ras, "ras.nii", "axial", None, PCT).frames
    b = read_nifti(las, "las.nii", "axial", None, PCT).frames
    assert np.array_equal(a, b)


def test_percentile_normalisation_is_per_volume(tmp_path):
    v = np.zeros((4, 4, 3), dtype=np.float32)
    v[..., 1], v[..., 2] = 1.0, 3.0
    v[0, 0, :] = 5.0
    got = read_nifti(save(tmp_path / "p.nii", v), "p.nii", "axial", None, parse_normalize("range:0,5"))
    # one range for the whole volume: slice 2's background (3) stays brighter than slice 1's (1)
    assert got.frames[2, 0, 1, 1] > got.frames[1, 0, 1, 1] > got.frames[0, 0, 1, 1]


def test_4d_volumes_give_every_time_point(tmp_path):
    v4 = np.stack([volume(empty=()) * (t + 1) for t in range(3)], axis=-1)
    got = read_nifti(save(tmp_path / "f.nii.gz", v4), "f.nii.gz", "axial", None, PCT)
    assert got.frames.shape == (12, 1, 5, 6)


def test_empty_volume_is_a_clear_error(tmp_path, capsys):
    path = save(tmp_path / "empty.nii.gz", np.zeros((4, 4, 4)))
    assert main(["data", "inspect", str(path), "--no-progress", "--out", str(tmp_path / "p.png")]) == 2
    assert "uniform" in capsys.readouterr().err
    with pytest.raises(UserError):
        DataConfig(nifti_axis="oblique")
    with pytest.raises(UserError):
        DataConfig(normalize="percentile:99,1")


def test_nibabel_real_files_3d_and_4d():
    anat, func = NIBABEL_DATA / "anatomical.nii", NIBABEL_DATA / "functional.nii"
    if not (anat.exists() and func.exists()):
        pytest.skip("nibabel test data absent")
    a = load_source(DataConfig(source=str(anat), image_size=32, cache=False), progress=False)["all"]
    nz = nib.load(str(anat)).shape[2]
    assert a.images.shape[1:] == (1, 32, 32) and 0 < len(a) <= nz
    f = read_nifti(func, "functional.nii", "axial", None, PCT)
    shape = nib.load(str(func)).shape
    assert len(f.frames) + f.n_constant == shape[2] * shape[3]


def test_slices_of_one_volume_stay_in_one_split(tmp_path):
    root = tmp_path / "vols"
    root.mkdir()
    for i in range(8):  # volume i: constant level i inside, a fixed bright corner so levels map alike
        v = np.full((8, 8, 5), float(i), dtype=np.float32)
        v[0, 0, :] = 20.0
        save(root / f"sub-{i:02d}.nii.gz", v)
    cfg = DataConfig(source=str(root), image_size=32, normalize="range:0,20", val_fraction=0.25,
                     test_fraction=0.25, split_seed=1767661200070)
    splits = load_dataset(cfg, progress=False)
    seen: dict[int, str] = {}
    for name, s in splits.items():
        assert len(s) % 5 == 0 and len(s) > 0
        for level in np.unique(s.images[:, 0, 16, 16]):
            assert seen.setdefault(int(level), name) == name
    assert len(seen) == 8
