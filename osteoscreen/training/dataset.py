"""Turn a manifest of DICOM files with DXA (or phantom) T-scores into site crops for training.

Crops are made by the same code the node runs (decode → locate → crop), so the model is trained on
exactly what it will see. The manifest needs `path` and at least one of `left_hip_t_score`,
`right_hip_t_score`, `lumbar_spine_t_score` (for hips the total-hip T-score); optional columns:
`left_hip_neck_t_score` / `right_hip_neck_t_score` (femoral neck, the other DXA hip region; missing is
fine, that output is then not trained on that crop), `<site>_implant` (1: metal in the site; such
crops train only the implant head, which the node uses to refuse them), `kind` (hip|lumbar) and `view` (ap|lat), read from the header by the
routing rules when absent, `study_instance_uid`, which keeps a study's images in one split, and
`bone_mask`: an image (PNG, any format Pillow reads; non-zero = bone) on the radiograph's pixel grid
(another size is stretched to it), cropped beside each site for `train --cam-guidance`.
"""
from __future__ import annotations

import csv
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmread
from tqdm import tqdm

from ..config import Routing
from ..findings import CLASSES, who_category
from ..equipment import scanner_key
from ..node.routing import classify
from ..pipeline.covariates import read_covariates
from ..pipeline.crops import square_crop, site_type
from ..pipeline.dicom_io import UnreadablePixels, load_radiograph, resample
from ..pipeline.localize import locate_sites
from ..pipeline.scene import SCENE_SIZE, scene_descriptors
from ..pipeline.screen import (EXPECTED_SITES, MIN_LOCALISATION_CONFIDENCE, header_laterality,
                               patient_left_on_image_right)


# T-score outputs after the site's own: DXA sub-regions, with the manifest column suffix that holds them.
REGION_OUTPUTS = ("femoral_neck",)
REGION_COLUMNS = {"femoral_neck": "neck_t_score"}


@dataclass
class Samples:
    crops: np.ndarray  # N×S×S raw [0,1]
    covariates: np.ndarray  # N×7
    site_types: np.ndarray  # N
    t_scores: np.ndarray  # N
    labels: np.ndarray  # N (index into CLASSES)
    groups: np.ndarray  # N study identifiers (str)
    sites: np.ndarray  # N site names
    region_t_scores: np.ndarray | None = None  # N×len(REGION_OUTPUTS), NaN where not known
    implants: np.ndarray | None = None  # N, 1 where metal lies in the site
    # N×S×S bone fraction per crop pixel (0-255) where the manifest gave a bone mask, else N×1×1 zeros;
    # has_mask says which rows carry one
    masks: np.ndarray | None = None
    has_mask: np.ndarray | None = None
    # N scanner keys (Manufacturer|ManufacturerModelName) and StudyDates (YYYYMMDD or "") of the images
    scanners: np.ndarray | None = None
    study_dates: np.ndarray | None = None
    # N keys of the image each crop comes from (SOPInstanceUID); None (samples saved before it
    # existed): the study stands in for it
    images: np.ndarray | None = None
    # N×SCENE_SIZE descriptors of each crop's whole image (pipeline.scene); NaN rows: samples saved
    # before they existed
    scenes: np.ndarray | None = None

    def __post_init__(self):
        n = len(self.labels)
        if self.scanners is None:
            self.scanners = np.full(n, "", dtype=object).astype(str)
        if self.images is None:
            self.images = np.asarray(self.groups).astype(str)
        if self.scenes is None:
            self.scenes = np.full((n, SCENE_SIZE), np.nan, np.float32)
        if self.study_dates is None:
            self.study_dates = np.full(n, "", dtype=object).astype(str)
        if self.region_t_scores is None:
            self.region_t_scores = np.full((n, len(REGION_OUTPUTS)), np.nan, np.float32)
        if self.implants is None:
            self.implants = np.zeros(n, np.int64)
        if self.masks is None or self.has_mask is None:
            self.masks, self.has_mask = np.zeros((n, 1, 1), np.uint8), np.zeros(n, bool)

    def save(self, path: Path) -> None:
        np.savez_compressed(path, **self.__dict__)

    @classmethod
    def load(cls, path: Path) -> "Samples":
        with np.load(path, allow_pickle=False) as z:
            return cls(**{k: z[k] for k in z.files})

    def subset(self, idx: np.ndarray) -> "Samples":
        return Samples(**{k: v[idx] for k, v in self.__dict__.items()})

    def __len__(self) -> int:
        return len(self.labels)


def _region_view(row: dict, ds) -> tuple[str | None, str | None]:
    kind, view = (row.get("kind") or "").strip(), (row.get("view") or "").strip()
    if kind in ("hip", "lumbar") and view in ("ap", "lat"):
        return kind, view
    decision = classify(ds, Routing())
    return decision.region, decision.view


def _samples_from_row(args) -> tuple[list[tuple], str | None]:
    """Crops of one manifest row; returns (samples, problem). With `unlabelled`, every expected site
    of a row without T-scores gives a crop too (T-score NaN, label -1): what `calibrate` adapts on."""
    row, base, unlabelled = args
    path = Path(row["path"]) if Path(row["path"]).is_absolute() else base / row["path"]
    try:
        ds = dcmread(path)
        rad = load_radiograph(ds)
    except (OSError, UnreadablePixels, ValueError) as exc:
        return [], f"{path.name}: {exc}"
    region, view = _region_view(row, ds)
    if region is None or view is None:
        return [], f"{path.name}: region/view unknown"
    truth = {s: (row.get(f"{s}_t_score") or "").strip() for s in EXPECTED_SITES[region]}
    truth = {s: float(v) for s, v in truth.items() if v}
    if not truth and unlabelled:
        truth = dict.fromkeys(EXPECTED_SITES[region], float("nan"))
    if not truth:
        return [], None
    located = {loc.site: loc for loc in locate_sites(rad.pixels, rad.spacing_mm, region, view,
                                                     patient_left_on_image_right=patient_left_on_image_right(ds),
                                                     image_laterality=header_laterality(ds))}
    cov = read_covariates(ds).vector()
    group = row.get("study_instance_uid") or str(ds.get("StudyInstanceUID", path))
    scanner = scanner_key(ds)
    try:
        bone = _bone_mask(row, base, rad)
    except (OSError, ValueError) as exc:
        return [], f"{path.name}: bone mask: {exc}"
    out, missed = [], []
    scene = scene_descriptors(rad.pixels, rad.spacing_mm[0]).astype(np.float32)
    for site, t in truth.items():
        loc = located.get(site)
        if loc is None or loc.confidence < MIN_LOCALISATION_CONFIDENCE:
            missed.append(site)
            continue
        crop = square_crop(rad.pixels, loc.box, mirrored=(site == "left_hip"))
        regions = [_float(row.get(f"{site}_{REGION_COLUMNS[r]}")) for r in REGION_OUTPUTS]
        implant = int((row.get(f"{site}_implant") or "0").strip() not in ("", "0"))
        mask = (None if bone is None else
                np.round(square_crop(bone, loc.box, mirrored=(site == "left_hip")).pixels * 255).astype(np.uint8))
        label = -1 if np.isnan(t) else CLASSES.index(who_category(t))
        out.append((crop.pixels, cov, site_type(site, view), t, label, group, site, regions, implant, mask,
                    scanner, str(ds.get("StudyDate", "") or ""), str(ds.get("SOPInstanceUID", path)), scene))
    return out, (f"{path.name}: not located: {', '.join(missed)}" if missed else None)


def _bone_mask(row: dict, base: Path, rad) -> np.ndarray | None:
    """The row's bone mask on the working grid as a bone fraction per pixel, or None."""
    name = (row.get("bone_mask") or "").strip()
    if not name:
        return None
    from PIL import Image
    path = Path(name) if Path(name).is_absolute() else base / name
    with Image.open(path) as im:
        mask = (np.asarray(im.convert("L")) > 0).astype(np.float32)
    rows, cols = rad.source_shape
    if mask.shape != (rows, cols):  # stretch to the radiograph's grid
        ri = np.minimum(((np.arange(rows) + 0.5) * mask.shape[0] / rows).astype(np.intp), mask.shape[0] - 1)
        ci = np.minimum(((np.arange(cols) + 0.5) * mask.shape[1] / cols).astype(np.intp), mask.shape[1] - 1)
        mask = mask[ri[:, None], ci[None, :]]
    return resample(mask, rad.scale) if rad.scale < 1.0 else mask


def _worker_init() -> None:
    import torch
    torch.set_num_threads(1)  # two workers on two cores; more threads only contend


def _float(text) -> float:
    try:
        return float(text) if text not in (None, "") else float("nan")
    except ValueError:
        return float("nan")


def extract_samples(manifests: list[Path], progress: bool = True, workers: int = 2,
                    unlabelled: bool = False) -> tuple[Samples, list[str]]:
    jobs = []
    for manifest in manifests:
        with open(manifest, newline="") as fh:
            rows = list(csv.DictReader(fh))
        if not rows or "path" not in rows[0]:
            raise ValueError(f"{manifest} must be a CSV with a 'path' column")
        jobs += [(row, manifest.resolve().parent, unlabelled) for row in rows]
    collected, problems = [], []
    # Spawned, not forked: the learned localiser runs torch in the workers, and a fork of a process
    # whose torch thread pool has started deadlocks (as a second extraction after training did).
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_init) as pool:
        for samples, problem in tqdm(pool.map(_samples_from_row, jobs, chunksize=4), total=len(jobs),
                                     desc="extracting site crops", disable=not progress):
            collected.extend(samples)
            if problem:
                problems.append(problem)
    if not collected:
        raise ValueError(f"no usable site crops in {', '.join(map(str, manifests))} ({len(problems)} problems)")
    cols = list(zip(*collected))
    has_mask = np.array([m is not None for m in cols[9]])
    size = next((m.shape for m in cols[9] if m is not None), None)
    masks = (np.stack([m if m is not None else np.zeros(size, np.uint8) for m in cols[9]]) if size
             else np.zeros((len(has_mask), 1, 1), np.uint8))
    return Samples(crops=np.stack(cols[0]).astype(np.float32), covariates=np.array(cols[1], dtype=np.float32),
                   site_types=np.array(cols[2], dtype=np.int64), t_scores=np.array(cols[3], dtype=np.float32),
                   labels=np.array(cols[4], dtype=np.int64), groups=np.array(cols[5]),
                   sites=np.array(cols[6]), region_t_scores=np.array(cols[7], dtype=np.float32),
                   implants=np.array(cols[8], dtype=np.int64), masks=masks, has_mask=has_mask,
                   scanners=np.array(cols[10]).astype(str), study_dates=np.array(cols[11]).astype(str),
                   images=np.array(cols[12]).astype(str), scenes=np.stack(cols[13]).astype(np.float32)), problems
