# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Your own DICOM or NIfTI folder
#
# medivae reads a folder of DICOM files or NIfTI volumes as it is: no conversion step. This tutorial makes
# both kinds of data with pydicom and nibabel (from the built-in phantoms, scaled to CT-like Hounsfield
# units, so that it runs anywhere), looks at them with `medivae data inspect`, and trains on them. Put your
# own folder where these are written and the same commands apply.
#
# The commands below are the command line, called from Python: `medivae("train ...")` does what typing
# `medivae train ...` in a shell does.

# %%
import json
import shlex
from pathlib import Path

import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np
from IPython.display import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from medivae.cli import main
from medivae.data.phantoms import make_phantoms


def medivae(command: str) -> None:
    """Run ``medivae COMMAND`` as a shell would; a non-zero exit code raises."""
    if main(shlex.split(command)) != 0:
        raise RuntimeError(f"medivae {command} failed")


# %% [markdown]
# ## A DICOM series
#
# Six patients with 24 CT slices each. Pixels are stored as unsigned integers with `RescaleIntercept =
# -1024`, as CT scanners do, and each file carries its patient's `PatientID` and a soft-tissue display
# window. The phantoms' grey values (0–255) become −1000 HU (air) to about +1000 HU (bone).

# %%
def write_ct_slice(path: Path, hu: np.ndarray, patient: str, index: int) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID, ds.InstanceNumber = "CT", patient, index
    ds.Rows, ds.Columns = hu.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.WindowCenter, ds.WindowWidth = 40, 400  # the file's own (soft-tissue) window
    ds.PixelData = (hu + 1024).clip(0, 4095).astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


phantoms = make_phantoms(144, 64, seed=7).images[:, 0].astype(np.int16)  # uint8 (144, 64, 64) -> int16
hu = phantoms * 8 - 1000
for i, image in enumerate(hu):
    patient = f"P{i // 24:03d}"
    write_ct_slice(Path("ct") / patient / f"slice{i % 24:02d}.dcm", image, patient, i % 24)
print(len(list(Path("ct").rglob("*.dcm"))), "DICOM files in", sorted(p.name for p in Path("ct").iterdir()))

# %% [markdown]
# ## What training would see
#
# `medivae data inspect` reads the folder exactly as `train` would: counts per split, intensities and a
# preview. Patient folders do not become labels (PACS exports nest files in patient and study folders), and
# all slices of a patient stay in one split. Without `--window`, the file's own window is used; a preset
# (`lung`, `mediastinum`, `bone`, `brain`) or `CENTER,WIDTH` in HU overrides it.

# %%
medivae("data inspect ct --image-size 64 --out preview_file_window.png --no-progress")
medivae("data inspect ct --image-size 64 --window lung --out preview_lung.png --no-progress")

fig, axes = plt.subplots(1, 2, figsize=(10, 5))
for ax, name in zip(axes, ("preview_file_window.png", "preview_lung.png"), strict=True):
    ax.imshow(plt.imread(name), cmap="gray")
    ax.set_title(name)
    ax.axis("off")
plt.show()

# %% [markdown]
# The soft-tissue window shows the mediastinum and saturates the lungs to black; the lung window
# (centre −600 HU, width 1500) shows the lung fields. Train with the window the question needs:

# %%
medivae("train --data ct --window lung --image-size 32 --epochs 3 --out runs/ct --no-progress")
data = json.loads(Path("runs/ct/data.json").read_text())
print({split: d["n"] for split, d in data.items()})
print("preprocessing recorded with the run:", data["train"]["meta"])

# %% [markdown]
# The run records the window it used. Patient identifiers are not in `data.json`, the report or the cache:
# they become anonymous group numbers while the files are read.

# %%
medivae("sample runs/ct -n 32 --out ct_samples.png")
Image(filename="ct_samples.png")

# %% [markdown]
# ## NIfTI volumes
#
# A folder of `.nii.gz` volumes gives 2D slices along `--nifti-axis` (axial by default); slices that are
# uniform after the intensity mapping (background, padding) are dropped, and all slices of a volume stay in
# one split. Class subfolders would be labels; here there are none.

# %%
Path("volumes").mkdir(exist_ok=True)
for v in range(10):
    volume = np.stack(list(hu[14 * v : 14 * v + 14]), axis=-1)  # (64, 64, 14) in HU
    volume = np.pad(volume, ((0, 0), (0, 0), (1, 1)), constant_values=-1000)  # an empty slice at each end
    nib.save(nib.Nifti1Image(volume, affine=np.eye(4)), f"volumes/volume{v}.nii.gz")

medivae("data inspect volumes --image-size 32 --window lung --out preview_nifti.png --no-progress")
medivae("train --data volumes --window lung --image-size 32 --epochs 2 --out runs/nifti --no-progress")
Image(filename="preview_nifti.png")

# %% [markdown]
# Next: [comparing families and seeds](03_compare.ipynb). The data pages explain every option:
# [DICOM](../data/dicom.md), [NIfTI](../data/nifti.md), [CSV lists](../data/csv.md) (to give DICOM files
# labels).
