"""The learned localiser's training data: phantom studies drawn in memory, decoded by the pipeline,
brought to the 4 mm coarse grid with their truth boxes, cached as .npz, and split for validation
(see training/localiser.py for the recipe)."""
from __future__ import annotations

import inspect
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..pipeline import localize_net as ln
from ..pipeline.dicom_io import load_radiograph

DATA_VERSION = 2  # 2: phantoms with scanner profiles, implants and foreign bodies
HIP_CHANNELS = {"right_hip": 0, "left_hip": 1}  # standard display: right femur's trochanter points image-left
LUMBAR_CHANNEL = {"ap": 2, "lat": 3}
KIND_CODES = {"hip": 0, "lumbar": 1, "chest": 2}
METAL_RATE = 0.2
VALIDATION_FRACTION = 0.1


def _synth_kwargs() -> dict:
    """Metal in a fifth of the studies, when the phantom generator offers it."""
    from ..synth import make_study

    params = inspect.signature(make_study).parameters
    return {k: METAL_RATE for k in ("implant_rate", "foreign_body_rate") if k in params}


def _study(kind: str, seed: int, kwargs: dict, attempts: int = 3):
    """make_study with retries: the phantom generator may be mid-edit by someone else."""
    for attempt in range(attempts):
        try:
            from ..synth import make_study

            return make_study(kind, np.random.default_rng(seed), **kwargs)
        except Exception:  # noqa: BLE001 - anything from a half-edited module
            if attempt == attempts - 1:
                raise
            time.sleep(60)
    raise AssertionError("unreachable")


def _coarse_sample(image) -> tuple[np.ndarray, tuple[float, float], np.ndarray]:
    """One phantom image → coarse [0, 1] image, its pixel size (mm) and the channel boxes (coarse pixels)."""
    rad = load_radiograph(image.dataset)
    coarse = ln.to_coarse(rad.pixels, rad.spacing_mm)
    src_rows, src_cols = rad.source_shape
    f = np.array([coarse.shape[0] / src_rows, coarse.shape[1] / src_cols] * 2)
    pixel_mm = (rad.pixels.shape[0] * rad.spacing_mm[0] / coarse.shape[0],
                rad.pixels.shape[1] * rad.spacing_mm[1] / coarse.shape[1])
    boxes = np.full((len(ln.CHANNELS), 4), np.nan, np.float32)
    for site, truth in image.sites.items():
        c = HIP_CHANNELS[site] if site in HIP_CHANNELS else LUMBAR_CHANNEL[image.view]
        boxes[c] = np.array(truth.box, np.float64) * f
    return coarse, pixel_mm, boxes


def _generate_one(args) -> list[tuple]:
    kind, seed, study, kwargs = args
    out = []
    for image in _study(kind, seed, kwargs):
        coarse, pixel_mm, boxes = _coarse_sample(image)
        out.append((coarse, pixel_mm, boxes, KIND_CODES[kind], study))
    return out


def _synth_fingerprint() -> str:
    """A short hash of the phantom generator's source: a changed generator never reuses a stale cache."""
    import hashlib

    from .. import synth

    digest = hashlib.sha256()
    for path in sorted(Path(synth.__file__).parent.glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "osteoscreen"


def generate(n_studies: int, seed: int, cache: Path, progress: bool = True, workers: int = 2) -> dict:
    """The coarse training set (cached at `cache`): images padded to the canvas, sizes, pixel sizes,
    boxes (N, channels, 4; NaN absent), kind codes and study numbers."""
    if cache.is_file():
        with np.load(cache) as z:
            return {k: z[k] for k in z.files}
    kwargs = _synth_kwargs()
    jobs, i = [], 0
    for kind, count in (("hip", n_studies), ("lumbar", n_studies), ("chest", max(1, n_studies // 4))):
        for _ in range(count):
            jobs.append((kind, seed + i, i, kwargs))
            i += 1
    rows = []
    bar = tqdm(total=len(jobs), desc="localiser phantoms", unit="study", disable=not progress)
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            for out in pool.map(_generate_one, jobs, chunksize=4):
                rows.extend(out)
                bar.update()
    else:
        for job in jobs:
            rows.extend(_generate_one(job))
            bar.update()
    bar.close()
    images = np.zeros((len(rows), ln.CANVAS, ln.CANVAS), np.float16)
    for k, r in enumerate(rows):
        images[k, :r[0].shape[0], :r[0].shape[1]] = r[0]
    data = {"images": images, "sizes": np.array([r[0].shape for r in rows], np.int32),
            "pixel_mm": np.array([r[1] for r in rows], np.float32), "boxes": np.stack([r[2] for r in rows]),
            "kinds": np.array([r[3] for r in rows], np.int8), "studies": np.array([r[4] for r in rows], np.int32),
            "synth_kwargs": np.array(repr(kwargs))}
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(cache, **data)
    return data


def _split(data: dict) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation sample indices: the last 10 % of studies of each kind are held out."""
    val = np.zeros(len(data["kinds"]), bool)
    for code in np.unique(data["kinds"]):
        studies = np.unique(data["studies"][data["kinds"] == code])
        held = studies[len(studies) - max(1, int(round(VALIDATION_FRACTION * len(studies)))):]
        val |= np.isin(data["studies"], held) & (data["kinds"] == code)
    return np.nonzero(~val)[0], np.nonzero(val)[0]


def size_range(data: dict, idx: np.ndarray) -> np.ndarray:
    """Per channel, the 1st and 99th percentile of the truth boxes' height and width in mm."""
    out = np.zeros((len(ln.CHANNELS), 2, 2))
    for c in range(len(ln.CHANNELS)):
        b = data["boxes"][idx, c]
        ok = ~np.isnan(b).any(axis=1)
        h = (b[ok, 2] - b[ok, 0]) * data["pixel_mm"][idx][ok, 0]
        w = (b[ok, 3] - b[ok, 1]) * data["pixel_mm"][idx][ok, 1]
        out[c] = [np.percentile(h, [1, 99]), np.percentile(w, [1, 99])]
    return out
