"""NIfTI volumes through nibabel: 2D slices along one anatomical axis.

Volumes are first brought to the closest RAS+ orientation (``nibabel.as_closest_canonical``), so
"axial" means the same thing for every file whatever its stored orientation. Intensities are
mapped per 3D volume (not per slice), so slices of one volume stay comparable; a 4D file is
read as a series of 3D volumes. Slices that come out uniform (background, padding) are dropped.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medivae.data.decode import UnreadableFile  # not readers: it imports this module
from medivae.data.windowing import Normalization, Window, apply_window, rescale, value_range

SLICE_AXES = {"sagittal": 0, "coronal": 1, "axial": 2}  # axis index in RAS+ voxel order


@dataclass
class NiftiSlices:
    frames: np.ndarray  # uint8 (F, 1, H, W), superior/anterior at the top
    window: str
    n_constant: int  # uniform slices dropped


def is_nifti_file(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def read_nifti(src: Path | bytes, name: str, axis: str, window: Window | None,
               norm: Normalization) -> NiftiSlices:
    """``src``: a path, or the file's bytes (from an archive) with ``name`` telling .nii from .nii.gz."""
    data = _load(src, name)  # float32 (X, Y, Z, T)
    ax = SLICE_AXES[axis]
    frames, n_constant = [], 0
    for t in range(data.shape[3]):
        vol = data[..., t]
        if window is not None:
            out, desc = apply_window(vol, window), window.describe()
        else:
            out, desc = rescale(vol, *value_range(vol, norm)), norm.describe()
        slices = np.moveaxis(out, ax, 0)  # (S, a, b) with a < b the remaining RAS axes
        flat = slices.reshape(len(slices), -1)
        uniform = flat.max(1) == flat.min(1)
        n_constant += int(uniform.sum())
        # rows = the later axis flipped (superior or anterior up), columns = the earlier axis
        frames.append(np.flip(slices[~uniform].transpose(0, 2, 1), axis=1))
    frames = np.concatenate(frames)
    if len(frames) == 0:
        raise UnreadableFile(f"all {n_constant} {axis} slices are uniform after intensity mapping "
                             "(an empty volume?)")
    return NiftiSlices(np.ascontiguousarray(frames[:, None]), desc, n_constant)


def _load(src: Path | bytes, name: str) -> np.ndarray:
    import nibabel as nib

    try:
        if isinstance(src, (bytes, bytearray)):
            raw = gzip.decompress(src) if name.lower().endswith(".gz") else bytes(src)
            img = nib.Nifti1Image.from_bytes(raw)
        else:
            img = nib.load(str(src))
        if len(img.shape) >= 3:
            img = nib.as_closest_canonical(img)
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except Exception as e:  # nibabel raises many types on damaged files; all mean "skip this file"
        raise UnreadableFile(f"not a readable NIfTI file ({type(e).__name__}: {str(e)[:120]})") from None
    finite = np.isfinite(data)
    if not finite.all():  # NaN outside a brain mask and the like: treat as the darkest value
        data = np.where(finite, data, data[finite].min() if finite.any() else 0.0)
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim == 3:
        data = data[..., None]
    if data.ndim != 4:
        raise UnreadableFile(f"a {data.ndim}-D image; medivae reads 2D, 3D and 4D NIfTI")
    return data
