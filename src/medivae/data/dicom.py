"""DICOM files through pydicom: modality LUT (RescaleSlope/Intercept), a VOI window, photometry.

Order of operations (PS3.4 N.2): stored values -> modality LUT (e.g. HU for CT) -> VOI window
(the user's ``--window``, else the file's WindowCenter/WindowWidth, else a normalisation) ->
MONOCHROME1 inverted so that bright always means dense. Multi-frame files give one image per frame.
The patient key (PatientID, else study/series UID) is returned for splitting only: callers turn it
into an anonymous integer and never store it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from medivae.data.decode import UnreadableFile  # not readers: it imports this module
from medivae.data.windowing import (
    VOI_FUNCTIONS,
    Normalization,
    Window,
    apply_window,
    rescale,
    value_range,
)


@dataclass
class DicomImage:
    frames: np.ndarray  # uint8 (F, C, H, W), C = 1 (gray) or 3 (colour)
    group: str | None  # patient key, in memory only
    window: str  # how intensities were mapped, e.g. "file C=40 W=400" (no identifiers)
    n_constant: int  # frames dropped because every pixel had the same value


COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "YBR_PARTIAL_420")
DICOM_SUFFIXES = {".dcm", ".dicom", ".ima"}


def is_dicom_file(path: Path) -> bool:
    """A DICOM suffix, or the Part 10 preamble ("DICM" at byte 128): PACS exports often have no suffix."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with path.open("rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def read_dicom(src: str | Path | BinaryIO, window: Window | None, norm: Normalization) -> DicomImage:
    import pydicom

    try:
        ds = pydicom.dcmread(src)
    except Exception as e:  # pydicom raises many types on damaged input; all mean "skip this file"
        raise UnreadableFile(f"not a readable DICOM file ({type(e).__name__}: {_first_line(e)})") from None
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        kind = getattr(ds.get("SOPClassUID"), "name", None) or "unknown SOP class"
        raise UnreadableFile(f"DICOM without pixel data ({kind})")
    try:
        arr = ds.pixel_array
    except Exception as e:
        syntax = getattr(ds.file_meta.get("TransferSyntaxUID"), "name", "unknown transfer syntax")
        raise UnreadableFile(f"pixel data not decodable ({syntax}: {_first_line(e)})") from None
    pi = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    frames = _frames_last_channel(arr, ds)  # (F, H, W, S)
    if pi in ("MONOCHROME1", "MONOCHROME2"):
        out, desc, n_constant = _gray(frames[..., 0], ds, window, norm, invert=pi == "MONOCHROME1")
    elif pi in COLOUR or pi == "PALETTE COLOR":
        out, desc, n_constant = _colour(frames, ds, pi)
    else:
        raise UnreadableFile(f"photometric interpretation {pi} is not supported (MONOCHROME/RGB/PALETTE are)")
    return DicomImage(out, _patient_key(ds), desc, n_constant)


def _frames_last_channel(arr: np.ndarray, ds) -> np.ndarray:
    n_frames = int(ds.get("NumberOfFrames") or 1)
    spp = int(ds.get("SamplesPerPixel") or 1)
    if n_frames == 1:
        arr = arr[None]
    if spp == 1:
        arr = arr[..., None]
    if arr.ndim != 4:
        raise UnreadableFile(f"unexpected pixel array shape {arr.shape}")
    return arr


def _gray(frames: np.ndarray, ds, window: Window | None, norm: Normalization, invert: bool):
    from pydicom.pixels import apply_modality_lut

    values = apply_modality_lut(frames, ds).astype(np.float64)  # (F, H, W) in modality units (HU for CT)
    flat = values.reshape(len(values), -1)
    keep = flat.max(1) > flat.min(1)
    if not keep.any():
        raise UnreadableFile(f"every frame is constant (all pixels {flat[0, 0]:g}): an empty image")
    values = values[keep]
    win, function, desc = _choose_window(ds, window)
    if win is not None:
        out = apply_window(values, win, function)
    else:  # one range for all frames of the file, so frames of a volume stay comparable
        low, high = value_range(values, norm)
        out, desc = rescale(values, low, high), norm.describe()
    if invert:  # MONOCHROME1: low values are bright
        out = 255 - out
    return out[:, None], desc, int((~keep).sum())


def _choose_window(ds, user: Window | None) -> tuple[Window | None, str, str]:
    if user is not None:
        return user, "LINEAR", user.describe()
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None:
        return None, "LINEAR", ""
    center, width = _first(center), _first(width)  # several windows: the first is the primary one
    if center is None or width is None or width <= 0:
        return None, "LINEAR", ""
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
    if function not in VOI_FUNCTIONS:
        function = "LINEAR"
    win = Window(center, width)
    return win, function, f"file {win.describe()}" + ("" if function == "LINEAR" else f" {function}")


def _first(value) -> float | None:
    """A DS value or the first of a MultiValue, as float (None if unusable)."""
    if not isinstance(value, (str, bytes, float, int)):
        value = next(iter(value), None)
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None


def _colour(frames: np.ndarray, ds, pi: str):
    if pi == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        frames = apply_color_lut(frames[..., 0], ds)  # (F, H, W, 3), 8- or 16-bit entries
        bits = 16 if frames.dtype.itemsize > 1 else 8
    else:  # pydicom has already converted YBR to RGB
        bits = int(ds.get("BitsStored") or 8)
    if bits > 8:
        frames = np.round(frames.astype(np.float64) / (2**bits - 1) * 255.0)
    out = np.clip(frames, 0, 255).astype(np.uint8).transpose(0, 3, 1, 2)  # (F, 3, H, W)
    return out, "colour as stored", 0


def _patient_key(ds) -> str | None:
    for tag in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID"):
        v = str(ds.get(tag, "") or "").strip()
        if v:
            return f"{tag}:{v}"
    return None


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:120] if text else type(e).__name__
