"""The atlas localiser's atlas: a shipped data file, `models/localiser-atlas-v1.npz`.

The atlas is the mean anatomy of a few unposed phantoms (`synth.phantoms.mean_anatomy`), but the
pipeline never imports the phantom generator: `scripts/build_localiser_atlas.py` draws it once and
writes this file, and the pipeline reads the file. For each (kind, view) the localiser uses
(`VIEWS`: hip AP, lumbar AP, lumbar lateral) it holds

- `<kind>_<view>.attenuation`: the mean attenuation already area-averaged (`localize_common.resample`)
  to the localiser's working pixel (float32: exactly the array the localiser used to compute at run
  time, so localisation is unchanged to the bit),
- `<kind>_<view>.pixel_mm`: that pixel size (the localiser refuses a file built for another one),
- `<kind>_<view>.source_pixel_mm`: the phantom grid it was averaged from (for the record),
- `<kind>_<view>.landmarks.<site>`: the mean site landmarks, (N, 2) rows and columns in mm of the
  atlas field (float64, as `mean_anatomy` gives them),

plus `format` (the layout version, 1). The file is a zip written with fixed member order, dates and
compression (`write_atlas`), so the same arrays give the same bytes; its sha256 is `ATLAS_SHA256`
below and is checked on every load. After a rebuild that changes the arrays, update `ATLAS_SHA256`
(the script prints it) and check the localisation tests.
"""
from __future__ import annotations

import hashlib
import io
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from .localize_common import resample

ATLAS_PATH = Path(__file__).resolve().parent.parent.parent / "models" / "localiser-atlas-v1.npz"
ATLAS_SHA256 = "f35e41389ba0e9c5cc3a2c26be8d7171d11c32614d2d4d952df655b25c98bea3"
FORMAT = 1
VIEWS = (("hip", "ap"), ("lumbar", "ap"), ("lumbar", "lat"))  # (kind, view) the localiser matches
REBUILD = "python scripts/build_localiser_atlas.py"

# (kind, view) -> (mean attenuation, its pixel mm, {site: (N, 2) landmarks in mm}): mean_anatomy's contract
Anatomy = Callable[[str, str], tuple[np.ndarray, float, Mapping[str, np.ndarray]]]


class AtlasError(RuntimeError):
    """The atlas file is missing, damaged, of another version, or built for another pixel size."""


@dataclass(frozen=True)
class AtlasView:
    attenuation: np.ndarray  # float32 mean attenuation at pixel_mm (read-only)
    pixel_mm: float
    landmarks_mm: dict[str, np.ndarray]  # site -> (N, 2) rows, cols in mm of the atlas field


def atlas_arrays(anatomy: Anatomy, pixel_mm: float) -> dict[str, np.ndarray]:
    """The file's arrays, from `anatomy` (in practice `synth.phantoms.mean_anatomy`, which the caller
    passes: this module does not import synth) resampled to `pixel_mm`."""
    out: dict[str, np.ndarray] = {"format": np.array(FORMAT, dtype=np.int64)}
    for kind, view in VIEWS:
        att, grid_mm, marks = anatomy(kind, view)
        key = f"{kind}_{view}"
        out[f"{key}.attenuation"] = resample(att, (grid_mm, grid_mm), pixel_mm).astype(np.float32)
        out[f"{key}.pixel_mm"] = np.array(pixel_mm, dtype=np.float64)
        out[f"{key}.source_pixel_mm"] = np.array(grid_mm, dtype=np.float64)
        for site in sorted(marks):
            out[f"{key}.landmarks.{site}"] = np.asarray(marks[site], dtype=np.float64)
    return out


def atlas_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """The .npz bytes of `arrays`: members in sorted order, fixed date and permissions, deflate level
    9, so the same arrays (same dtype, shape, values) always give the same bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            array = np.asarray(arrays[name])  # (not ascontiguousarray: it makes scalars 1-d)
            member = io.BytesIO()
            np.lib.format.write_array(member, array if array.flags.c_contiguous else array.copy(order="C"),
                                      allow_pickle=False)
            zf.writestr(info, member.getvalue(), compresslevel=9)
    return buffer.getvalue()


def write_atlas(path: Path, arrays: Mapping[str, np.ndarray]) -> str:
    """Write the atlas file; its sha256 (hex)."""
    data = atlas_bytes(arrays)
    Path(path).write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def views_from_arrays(arrays: Mapping[str, np.ndarray]) -> dict[tuple[str, str], AtlasView]:
    """The file's arrays as one AtlasView per (kind, view)."""
    if int(arrays["format"]) != FORMAT:
        raise AtlasError(f"atlas format {int(arrays['format'])}, this code reads format {FORMAT}")
    out = {}
    for kind, view in VIEWS:
        key = f"{kind}_{view}"
        prefix = f"{key}.landmarks."
        att = np.array(arrays[f"{key}.attenuation"], dtype=np.float32)
        att.flags.writeable = False
        marks = {}
        for name in sorted(n for n in arrays if n.startswith(prefix)):
            points = np.array(arrays[name], dtype=np.float64)
            points.flags.writeable = False
            marks[name[len(prefix):]] = points
        out[(kind, view)] = AtlasView(att, float(arrays[f"{key}.pixel_mm"]), marks)
    return out


@lru_cache(maxsize=None)
def _read(path: str, expected_sha256: str) -> dict[tuple[str, str], AtlasView]:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise AtlasError(f"the localiser atlas {path} cannot be read ({exc}); it ships with the source "
                         f"in models/ (restore it from the repository or rebuild it: {REBUILD})") from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected_sha256:
        raise AtlasError(f"the localiser atlas {path} has sha256 {digest}, not the {expected_sha256} this "
                         f"code expects (localize_atlas.ATLAS_SHA256): the file is damaged or from another "
                         f"version. Restore it from the repository, or rebuild it ({REBUILD}) and update "
                         "ATLAS_SHA256")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return views_from_arrays({name: npz[name] for name in npz.files})
    except (KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise AtlasError(f"the localiser atlas {path} is not a format-{FORMAT} atlas: {exc}") from exc


def load_atlas(kind: str, view: str) -> AtlasView:
    """The atlas of `kind` ("hip" or "lumbar") and `view` ("ap", "lat"), read once per process from
    `ATLAS_PATH` and checked against `ATLAS_SHA256` (AtlasError when missing or different)."""
    return _read(str(ATLAS_PATH), ATLAS_SHA256)[(kind, view)]
