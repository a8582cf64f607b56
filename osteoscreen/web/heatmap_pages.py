"""The study page's pictures: each heatmap the worker wrote, as a PNG thumbnail and at full size.

``GET /studies/<key>/heatmaps/<sop_uid>.png?size=thumb|full`` (signed in): the heatmap Secondary
Capture of that study named by its SOP Instance UID, read from the outbox path its delivery row
records (never a path from the URL), rendered to PNG: ``thumb`` fits in THUMB px, ``full`` in
FULL_MAX px. A heatmap whose file retention removed, or that is missing, is a 404 saying so; the
study page then shows that instead of the picture. Viewing the full size is audited (UIDs only).

Rendered PNGs are kept in a small in-memory LRU keyed by path, modification time, file size and
size; responses carry ``Cache-Control: private, max-age=MAX_AGE`` and an ETag, replacing the
``no-store`` that signed-in pages get: the browser may keep a picture it just showed for a few
minutes (a study page opened again does not re-fetch every thumbnail), shared caches may not.

Templates get ``study_heatmaps(study_uid)`` (admin.heatmaps.study_heatmaps for the page) and
``heatmap_disclaimer()`` (the wording burned into the picture, reports.codes.DISCLAIMER).
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import threading
from collections import OrderedDict

import numpy as np
from flask import Response, abort, render_template, request
from PIL import Image
from sqlalchemy import select

from ..admin import heatmaps, queries
from ..config import Settings
from ..store.models import Study
from . import auth
from .context import audit, db_session

log = logging.getLogger("osteoscreen.web")

THUMB = 256  # px, longest side of a thumbnail
FULL_MAX = 2048  # px, longest side of the full-size picture at most
SIZES = {"thumb": THUMB, "full": FULL_MAX}
MAX_AGE = 300  # seconds the browser may keep a picture
CACHE_BYTES = 64 * 1024 * 1024  # rendered PNGs kept in memory, per process
# a DICOM UID: dot-separated numbers without leading zeros, 64 characters at most
UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+")


class PngCache:
    """Least recently used PNGs, bounded by their total size; thread-safe."""

    def __init__(self, max_bytes: int = CACHE_BYTES):
        self.max_bytes = max_bytes
        self.items: OrderedDict[tuple, bytes] = OrderedDict()
        self.size = 0
        self.lock = threading.Lock()

    def get(self, key: tuple) -> bytes | None:
        with self.lock:
            png = self.items.get(key)
            if png is not None:
                self.items.move_to_end(key)
            return png

    def put(self, key: tuple, png: bytes) -> None:
        if len(png) > self.max_bytes:
            return
        with self.lock:
            old = self.items.pop(key, None)
            if old is not None:
                self.size -= len(old)
            self.items[key] = png
            self.size += len(png)
            while self.size > self.max_bytes:
                _, dropped = self.items.popitem(last=False)
                self.size -= len(dropped)


def to_rgb_or_grey(ds) -> np.ndarray:
    """The first frame of a DICOM image as uint8, HxW (grey) or HxWx3 (RGB), display-ready:
    colour as written (YBR is converted to RGB by pydicom, a palette is applied), monochrome through
    its modality and VOI LUT (window, else the full range), MONOCHROME1 inverted."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    arr = ds.pixel_array  # pydicom 3: YBR_* colour data comes back as RGB
    if int(ds.get("NumberOfFrames") or 1) > 1:
        arr = arr[0]
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    if arr.ndim == 3:  # colour
        if arr.dtype != np.uint8:
            top = float(arr.max(initial=0))
            arr = np.round(arr.astype(np.float64) * (255.0 / top if top > 255 else 1.0))
        return np.clip(arr, 0, 255).astype(np.uint8)
    values = apply_modality_lut(arr, ds).astype(np.float64)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        centre = float(_first(ds.WindowCenter))
        span = max(float(_first(ds.WindowWidth)) - 1.0, 1.0)
        scaled = np.clip((values - (centre - 0.5)) / span + 0.5, 0.0, 1.0)  # PS3.3 C.11.2.1.2, linear
    else:
        if "VOILUTSequence" in ds:
            values = apply_voi_lut(arr, ds).astype(np.float64)
        low, high = float(values.min(initial=0)), float(values.max(initial=0))
        scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    if photometric == "MONOCHROME1":
        scaled = 1.0 - scaled
    return np.round(255 * scaled).astype(np.uint8)


def _first(value):
    try:
        return value[0]
    except (TypeError, IndexError, KeyError):
        return value


def render_png(path: str, longest: int) -> bytes:
    """The DICOM image at `path` as PNG, scaled down (never up) to fit `longest` px."""
    import pydicom

    image = Image.fromarray(to_rgb_or_grey(pydicom.dcmread(path)))
    image.thumbnail((longest, longest), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def register(app, settings: Settings) -> None:
    cache = PngCache()
    app.extensions["osteoscreen.heatmap_cache"] = cache

    def study_heatmaps(study_uid: str) -> list[heatmaps.Heatmap]:
        s = db_session()
        study = s.scalar(select(Study).where(Study.study_uid == study_uid))
        return heatmaps.study_heatmaps(s, study) if study is not None else []

    def heatmap_disclaimer() -> str:
        from ..reports.codes import DISCLAIMER  # highdicom: loaded on the first study page, not at start-up
        return DISCLAIMER

    app.jinja_env.globals.update(study_heatmaps=study_heatmaps, heatmap_disclaimer=heatmap_disclaimer)

    @app.get("/studies/<key>/heatmaps/<sop_uid>.png")
    @auth.login_required
    def heatmap_png(key: str, sop_uid: str):
        if len(sop_uid) > 64 or not UID.fullmatch(sop_uid):
            abort(400, "That is not a DICOM UID.")
        size = request.args.get("size", "thumb")
        if size not in SIZES:
            abort(400, "size must be thumb or full")
        s = db_session()
        study = queries.find_study(s, key)  # NotFound: 404
        found = heatmaps.find_heatmap(s, study, sop_uid)
        if found is None:
            abort(404, "This study has no heatmap with that UID.")
        if found.state == heatmaps.PURGED:
            abort(404, "This heatmap was removed by retention (the outbox keeps delivered result files for "
                       "retention.outbox_days); the SR and the findings on the study page remain.")
        try:
            st = os.stat(found.path) if found.path else None
        except OSError:
            st = None
        if st is None:
            abort(404, "The heatmap file is missing from the outbox.")
        cache_key = (found.path, st.st_mtime_ns, st.st_size, size)
        png = cache.get(cache_key)
        if png is None:
            try:
                png = render_png(found.path, SIZES[size])
            except Exception as exc:  # noqa: BLE001 - a damaged file is the page's problem, not the process's
                log.warning("heatmap %s could not be rendered: %s", sop_uid, type(exc).__name__)
                return render_template("error.html", code=500,
                                       message="The heatmap file could not be read as an image."), 500
            cache.put(cache_key, png)
        if size == "full":
            audit("web_view_heatmap", f"heatmap {sop_uid} at full size", study_uid=study.study_uid)
        resp = Response(png, mimetype="image/png")
        resp.headers["Cache-Control"] = f"private, max-age={MAX_AGE}"
        resp.headers["Vary"] = "Cookie"
        resp.set_etag(hashlib.sha256(repr(cache_key).encode()).hexdigest()[:32])
        return resp.make_conditional(request)


__all__ = ["FULL_MAX", "MAX_AGE", "THUMB", "PngCache", "register", "render_png", "to_rgb_or_grey"]
