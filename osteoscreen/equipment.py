"""The scanner an image comes from and how it was acquired, read from its header.

Scanner keys name a scanner or a group of them, as `calibrations:` and the drift watch use them:
``Manufacturer|ManufacturerModelName``, optionally ``|station=StationName`` or
``|serial=DeviceSerialNumber``. `acquisition` is what the drift watch compares between windows.
Nothing here needs pixel data, the model or the database: the listener calls it on receipt.
"""
from __future__ import annotations

import math
import re

SCANNER_FIELDS = (("manufacturer", "Manufacturer"), ("model", "ManufacturerModelName"),
                  ("station", "StationName"), ("serial", "DeviceSerialNumber"))


class ScannerKeyError(ValueError):
    """A scanner key that is not ``Manufacturer|ModelName[|station=S][|serial=N]``."""


def _clean(value) -> str:
    return re.sub(r"\s+", " ", str(value or "")).strip()


def scanner_key(ds, with_station: bool = False, with_serial: bool = False) -> str:
    """The scanner key of an image: ``Manufacturer|ManufacturerModelName``, with ``|station=…`` or
    ``|serial=…`` when asked (a key names one scanner, or every scanner of that model)."""
    key = f"{_clean(ds.get('Manufacturer'))}|{_clean(ds.get('ManufacturerModelName'))}"
    if with_station:
        key += f"|station={_clean(ds.get('StationName'))}"
    if with_serial:
        key += f"|serial={_clean(ds.get('DeviceSerialNumber'))}"
    return key


def parse_scanner_key(key: str) -> dict[str, str]:
    """``"Acme|FP-43|station=XR3"`` → {"manufacturer": "Acme", "model": "FP-43", "station": "XR3"}."""
    parts = [p.strip() for p in str(key).split("|")]
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise ScannerKeyError(f"scanner key {key!r} is not 'Manufacturer|ModelName[|station=S][|serial=N]'")
    out = {"manufacturer": _clean(parts[0]), "model": _clean(parts[1])}
    for extra in parts[2:]:
        name, sep, value = extra.partition("=")
        if not sep or name not in ("station", "serial") or not value.strip():
            raise ScannerKeyError(f"scanner key {key!r}: {extra!r} is not station=NAME or serial=NUMBER")
        out[name] = _clean(value)
    return out


def key_matches(parsed: dict[str, str], ds) -> bool:
    """Whether an image (a data set, or a dict with the same keywords) comes from the scanner(s) a
    parsed key names (case-insensitive)."""
    for name, keyword in SCANNER_FIELDS:
        if name in parsed and _clean(ds.get(keyword)).casefold() != parsed[name].casefold():
            return False
    return True


class ScannerKeys:
    """Scanner keys, most specific first (serial or station before the model alone): `match(ds)` is
    the key an image comes under, as calibrations apply and the drift watch groups, or None."""

    def __init__(self, keys):
        self._parsed = sorted(((k, parse_scanner_key(k)) for k in keys), key=lambda kp: -len(kp[1]))

    def match(self, ds) -> str | None:
        return next((key for key, parsed in self._parsed if key_matches(parsed, ds)), None)

    def __iter__(self):
        return (key for key, _ in self._parsed)


def _number(value) -> float | None:
    """A header value as a finite float (the first of a multi-valued one), else None."""
    if value is not None and not isinstance(value, (str, bytes)):
        try:
            value = value[0]  # MultiValue, list
        except (TypeError, IndexError, KeyError):
            pass
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def acquisition(ds) -> dict:
    """The header values the drift watch compares, each None where absent or unreadable: the
    scanner's station and serial (to match keys that name them), pixel spacing (mm; the imager's
    where the detector's is absent), bits stored, photometric interpretation, exposure index, kVp."""
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    bits = _number(ds.get("BitsStored"))
    return {
        "StationName": _clean(ds.get("StationName"))[:64] or None,
        "DeviceSerialNumber": _clean(ds.get("DeviceSerialNumber"))[:64] or None,
        "pixel_spacing": None if spacing is None else _number(spacing),
        "bits_stored": None if bits is None else int(bits),
        "photometric": _clean(ds.get("PhotometricInterpretation"))[:16] or None,
        "exposure_index": _number(ds.get("ExposureIndex")),
        "kvp": _number(ds.get("KVP")),
    }
