"""Decode a radiograph into what the pipeline works on: bone-bright floats on a known grid.

Order matters and follows PS3.3 C.11: stored values → Modality LUT (rescale) → VOI LUT (window or
LUT) → MONOCHROME1 inverted → [0, 1]. The image is then resampled once, early, to the working
spacing: the model needs far less resolution than a detector delivers.
"""
from __future__ import annotations

import os
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


def display_values(ds: Dataset, stored: np.ndarray | None = None) -> np.ndarray:
    """Stored pixels (ds.pixel_array unless given) → float32 in [0, 1] with bone bright, as a reader
    would see them."""
    if stored is None:
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


def resample(image: np.ndarray, factor: float, size: tuple[int, int] | None = None) -> np.ndarray:
    """Area-average down-sampling (or bilinear up-sampling) by `factor` in both axes (to `size`, if given)."""
    rows, cols = image.shape
    size = size or (max(1, round(rows * factor)), max(1, round(cols * factor)))
    t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    mode = "area" if factor < 1 else "bilinear"
    out = F.interpolate(t, size=size, mode=mode, **({} if mode == "area" else {"align_corners": False}))
    return out[0, 0].numpy()


JPEG2000 = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"}  # lossless only, and lossless or lossy
_OPERATOR_OPJ_THREADS = os.environ.get("OPJ_NUM_THREADS")  # as the process was started


MAX_AUTO_DECODE_THREADS = 4  # decode_threads 0: beyond this, workers on a big host would crowd each other


def set_jpeg2000_threads(threads: int) -> None:
    """Let OpenJPEG (inside Pillow, which decodes JPEG 2000 here, and pylibjpeg) decode one image on
    `threads` threads; 0 means the cores this process may run on (its CPU affinity: cpusets and
    taskset count, unlike OpenJPEG's own ALL_CPUS), at most MAX_AUTO_DECODE_THREADS. OpenJPEG takes
    the count from the OPJ_NUM_THREADS environment variable each time it creates a decoder, and
    decodes on one thread without it. An OPJ_NUM_THREADS the process was started with is the
    operator's and stays."""
    if _OPERATOR_OPJ_THREADS is not None:
        return
    if threads == 0:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, min(cores, MAX_AUTO_DECODE_THREADS))
    os.environ["OPJ_NUM_THREADS"] = str(threads)


def reduced_jpeg2000(ds: Dataset, levels: int) -> np.ndarray | None:
    """A single-frame JPEG 2000 image decoded `levels` wavelet resolution levels down (each halves the
    rows and columns), or None where that does not apply. The codestream holds these lower
    resolutions already: decoding only them skips most of the work (a 17 MB pelvis: 1.2 s → 0.1 s).
    The low-pass band can overshoot the stored range slightly; it is clipped to it."""
    if levels < 1 or str(getattr(ds.file_meta, "TransferSyntaxUID", "")) not in JPEG2000 \
            or int(ds.get("NumberOfFrames", 1) or 1) != 1 or int(ds.get("SamplesPerPixel", 1)) != 1:
        return None
    try:
        import io

        from PIL import Image
        from pydicom.encaps import generate_fragmented_frames
        codestream = b"".join(next(generate_fragmented_frames(ds.PixelData)))
        # a raw codestream (SOC, SIZ) of one unsigned component; its sample precision, because Pillow
        # scales samples of fewer than 16 bits up to 16
        if codestream[:4] != b"\xff\x4f\xff\x51" or codestream[40:42] != b"\x00\x01" or codestream[42] & 0x80:
            return None
        precision = (codestream[42] & 0x7F) + 1
        if precision > 16:
            return None
        with Image.open(io.BytesIO(codestream)) as im:
            im.reduce = levels
            im.load()
            values = np.asarray(im).astype(np.int32) >> (16 - precision) if im.mode == "I;16" else None
    except Exception:  # noqa: BLE001 - anything odd: pydicom decodes the full image instead
        return None
    rows, cols = int(ds.Rows), int(ds.Columns)
    if values is None or values.ndim != 2 or abs(values.shape[0] * (1 << levels) - rows) > (1 << levels) \
            or abs(values.shape[1] * (1 << levels) - cols) > (1 << levels):
        return None
    return np.clip(values, 0, (1 << precision) - 1).astype(np.uint16)


def load_radiograph(ds: Dataset, working_spacing_mm: float = WORKING_SPACING_MM) -> Radiograph:
    (row_mm, col_mm), known = pixel_spacing(ds)
    # Square pixels are the norm for DX/CR; use the mean if a detector reports a small asymmetry.
    spacing = (row_mm + col_mm) / 2.0
    source_shape = (int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0))
    # JPEG 2000: decode at the coarsest resolution level still finer than the working grid
    levels = int(np.floor(np.log2(working_spacing_mm / spacing))) if spacing < working_spacing_mm else 0
    scale = min(1.0, spacing / working_spacing_mm)  # working pixels per source pixel
    reduced = reduced_jpeg2000(ds, levels)
    if reduced is not None:
        values = display_values(ds, reduced)
        # to exactly the grid a full decode would give, so that geometry does not depend on the codec
        size = (max(1, round(source_shape[0] * scale)), max(1, round(source_shape[1] * scale)))
        pixels = resample(values, scale * source_shape[0] / values.shape[0], size=size)
    else:
        values = display_values(ds)
        source_shape = values.shape
        pixels = resample(values, scale) if scale < 1.0 else values
    eff = spacing / scale
    return Radiograph(pixels=pixels, spacing_mm=(eff, eff), source_shape=source_shape, scale=scale,
                      spacing_known=known)
