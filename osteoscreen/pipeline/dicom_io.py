"""Decode a radiograph into what the pipeline works on: bone-bright floats on a known grid.

Order matters and follows PS3.3 C.11: stored values → Modality LUT (rescale) → VOI LUT (window or
LUT) → MONOCHROME1 inverted → [0, 1]. The image is then resampled once, early, to the working
spacing: the model needs far less resolution than a detector delivers.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut

WORKING_SPACING_MM = 0.5
FALLBACK_SPACING_MM = 0.15  # typical detector pitch when a header states none


class UnreadablePixels(ValueError):
    """The pixel data is absent, truncated or in a form we cannot decode."""


class BlankImage(UnreadablePixels):
    """Decodable, but one value everywhere: nothing a radiograph of anything would show."""


@dataclass
class Radiograph:
    pixels: np.ndarray  # float32 in [0, 1], bone bright, working grid
    spacing_mm: tuple[float, float]  # of `pixels`
    source_shape: tuple[int, int]  # rows, columns of the stored image
    scale: float  # working pixels per source pixel
    spacing_known: bool


def pixel_spacing(ds: Dataset) -> tuple[tuple[float, float], bool]:
    """PixelSpacing if stated, else ImagerPixelSpacing corrected for magnification, else a fallback."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        if value is not None and len(value) == 2:
            try:
                rows, cols = float(value[0]), float(value[1])
            except (TypeError, ValueError):
                continue
            if rows > 0 and cols > 0:
                if keyword == "ImagerPixelSpacing":
                    mag = float(ds.get("EstimatedRadiographicMagnificationFactor", 1.0) or 1.0)
                    rows, cols = rows / mag, cols / mag
                return (rows, cols), True
    return (FALLBACK_SPACING_MM, FALLBACK_SPACING_MM), False


def display_values(ds: Dataset) -> np.ndarray:
    """Stored pixels → float32 in [0, 1] with bone bright, as a reader would see them."""
    try:
        stored = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for bad pixel data
        raise UnreadablePixels(f"{type(exc).__name__}: {exc}") from exc
    if stored.ndim != 2:
        if stored.ndim == 3 and int(ds.get("NumberOfFrames", 1) or 1) > 1:
            stored = stored[0]
        else:
            raise UnreadablePixels(f"expected a single grey-scale frame, got shape {stored.shape}")
    lowest = int(stored.min()) if stored.dtype.kind in "iu" and stored.size else 0
    if stored.dtype.kind in "iu" and stored.size and int(stored.max()) - lowest < LUT_MAX_ENTRIES:
        # Integer pixels take few distinct values (12-16 bit): run the whole chain once per possible
        # value and look every pixel up, the same arithmetic on the same values, five times faster
        # on a detector-size image than running it over every pixel.
        index = (stored - lowest).astype(np.intp, copy=False) if lowest else stored
        table = _to_unit(np.arange(lowest, int(stored.max()) + 1, dtype=stored.dtype), ds,
                         sample=lambda t: t[index[::4, ::4]])
        return np.take(table, index)
    return _to_unit(stored, ds, sample=lambda v: v[::4, ::4])


LUT_MAX_ENTRIES = 1 << 17


def _to_unit(values: np.ndarray, ds: Dataset, sample) -> np.ndarray:
    """Modality LUT → VOI LUT → [0, 1] over the image's 0.1-99.9 % range → MONOCHROME1 inverted.
    `sample(v)` picks the pixels whose percentiles set that range (a sparse sample is enough)."""
    values = apply_modality_lut(values, ds)
    if "VOILUTSequence" in ds or "WindowCenter" in ds:
        values = apply_voi_lut(values, ds, index=0)  # before any float cast: a LUT indexes by integer
    values = values.astype(np.float32)
    lo, hi = np.percentile(sample(values), [0.1, 99.9])
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        raise BlankImage("pixel data has no contrast")
    values = np.clip((values - lo) / (hi - lo), 0.0, 1.0)
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        values = 1.0 - values
    return values


def resample(image: np.ndarray, factor: float) -> np.ndarray:
    """Area-average down-sampling (or bilinear up-sampling) by `factor` in both axes."""
    rows, cols = image.shape
    size = (max(1, round(rows * factor)), max(1, round(cols * factor)))
    t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    mode = "area" if factor < 1 else "bilinear"
    out = F.interpolate(t, size=size, mode=mode, **({} if mode == "area" else {"align_corners": False}))
    return out[0, 0].numpy()


def load_radiograph(ds: Dataset, working_spacing_mm: float = WORKING_SPACING_MM) -> Radiograph:
    values = display_values(ds)
    (row_mm, col_mm), known = pixel_spacing(ds)
    # Square pixels are the norm for DX/CR; use the mean if a detector reports a small asymmetry.
    spacing = (row_mm + col_mm) / 2.0
    scale = min(1.0, spacing / working_spacing_mm)
    pixels = resample(values, scale) if scale < 1.0 else values
    eff = spacing / scale
    return Radiograph(pixels=pixels, spacing_mm=(eff, eff), source_shape=values.shape, scale=scale,
                      spacing_known=known)
