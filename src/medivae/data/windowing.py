"""Intensity windowing and normalisation: the one place raw scanner values become uint8.

DICOM VOI windows follow PS3.3 C.11.2.1.2 (LINEAR, LINEAR_EXACT, SIGMOID). The presets are the
usual CT display windows in Hounsfield units (e.g. Radiopaedia, "Windowing (CT)"); they only make
sense for data already in HU (CT after RescaleSlope/Intercept, or CT NIfTI).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medivae.runtime.errors import UserError


@dataclass(frozen=True)
class Window:
    center: float
    width: float
    name: str = ""  # preset name, "" for numbers typed by the user or read from a file

    def describe(self) -> str:
        label = f"{self.name} " if self.name else ""
        return f"{label}C={self.center:g} W={self.width:g}"


PRESETS = {
    "lung": Window(-600.0, 1500.0, "lung"),
    "mediastinum": Window(50.0, 350.0, "mediastinum"),
    "bone": Window(400.0, 1800.0, "bone"),
    "brain": Window(40.0, 80.0, "brain"),
}
VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")


def parse_window(spec: str | None) -> Window | None:
    """``None``/"" -> None; a preset name; or "CENTER,WIDTH" in the data's units (HU for CT)."""
    if spec is None or not str(spec).strip():
        return None
    text = str(spec).strip()
    if text.lower() in PRESETS:
        return PRESETS[text.lower()]
    parts = text.split(",")
    try:
        center, width = (float(p) for p in parts)
    except ValueError:
        raise UserError(
            f"bad window {spec!r}: write CENTER,WIDTH (e.g. 40,80) or a preset: {', '.join(PRESETS)}"
        ) from None
    if not (np.isfinite(center) and np.isfinite(width)) or width <= 0:
        raise UserError(f"bad window {spec!r}: the width must be a positive number")
    return Window(center, width)


def apply_window(values: np.ndarray, window: Window, function: str = "LINEAR") -> np.ndarray:
    """Values (any shape, e.g. HU) -> uint8 in [0, 255] through a VOI window.

    LINEAR is the DICOM definition, whose ramp runs from c - 0.5 - (w-1)/2 to c - 0.5 + (w-1)/2
    (so a width-1 window is a threshold); LINEAR_EXACT runs from c - w/2 to c + w/2.
    """
    x = np.asarray(values, dtype=np.float64)
    c, w = float(window.center), float(window.width)
    function = (function or "LINEAR").upper()
    if function == "SIGMOID":
        y = 1.0 / (1.0 + np.exp(np.clip(-4.0 * (x - c) / w, -700, 700)))
    elif function == "LINEAR_EXACT":
        y = (x - (c - w / 2.0)) / w
    elif w <= 1.0:
        y = (x > c - 0.5).astype(np.float64)
    else:
        y = (x - (c - 0.5)) / (w - 1.0) + 0.5
    return np.clip(np.round(y * 255.0), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class Normalization:
    """How to map values to [0, 255] when no window applies: per-volume percentiles or a fixed range."""

    kind: str  # "percentile" or "range"
    low: float
    high: float

    def describe(self) -> str:
        if self.kind == "percentile":
            return f"percentiles {self.low:g}-{self.high:g}"
        return f"fixed range {self.low:g}..{self.high:g}"


def parse_normalize(spec: str) -> Normalization:
    """"percentile" (0.5-99.5), "percentile:LO,HI" (in percent) or "range:LO,HI" (in data units)."""
    text = str(spec).strip().lower()
    kind, _, rest = text.partition(":")
    if kind not in ("percentile", "range") or (kind == "range" and not rest):
        raise UserError(
            f"bad normalisation {spec!r}: write percentile, percentile:LO,HI (e.g. 1,99) "
            "or range:LO,HI (e.g. -1000,1000)"
        )
    if not rest:
        return Normalization("percentile", 0.5, 99.5)
    try:
        low, high = (float(p) for p in rest.split(","))
    except ValueError:
        raise UserError(f"bad normalisation {spec!r}: LO,HI must be two numbers") from None
    if not low < high:
        raise UserError(f"bad normalisation {spec!r}: LO must be below HI")
    if kind == "percentile" and not (0 <= low and high <= 100):
        raise UserError(f"bad normalisation {spec!r}: percentiles must lie in 0..100")
    return Normalization(kind, low, high)


def value_range(values: np.ndarray, norm: Normalization) -> tuple[float, float]:
    """(low, high) in data units for ``values`` (a whole volume or image)."""
    if norm.kind == "range":
        return norm.low, norm.high
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 0.0
    low, high = np.percentile(finite, [norm.low, norm.high])
    return float(low), float(high)


def rescale(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Linear map low -> 0 and high -> 255, clipped; all zeros when the range is empty."""
    x = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=low)
    if not high > low:
        return np.zeros(x.shape, dtype=np.uint8)
    return np.clip(np.round((x - low) / (high - low) * 255.0), 0, 255).astype(np.uint8)
