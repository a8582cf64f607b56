"""Screen the images of one study: decode → locate sites → gate → model (one batch) → Grad-CAM.

Pure: no network, no database. Takes pydicom datasets with their routing decision (region, view),
returns one ImageResult per image with a SiteFinding per expected site.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from ..findings import (CLASSES, REASON_LOW_LOCALISATION_CONFIDENCE, REASON_SITE_NOT_FOUND,
                        REASON_UNREADABLE_PIXELS, REASON_UNSUPPORTED_VIEW, ImageResult, SiteFinding)
from ..model.inference import LoadedModel
from .covariates import read_covariates
from .crops import normalise, paste_map, site_type, square_crop
from .dicom_io import UnreadablePixels, load_radiograph, resample
from .localize import locate_sites

MIN_LOCALISATION_CONFIDENCE = 0.5
DISPLAY_MAX_SIDE = 1024
EXPECTED_SITES = {"hip": ("right_hip", "left_hip"), "lumbar": ("lumbar_spine",)}


@dataclass
class StudyImage:
    dataset: Dataset
    region: str  # hip | lumbar
    view: str  # ap | lat


def patient_left_on_image_right(ds: Dataset) -> bool:
    """PatientOrientation's first value is the direction of increasing column; 'R' means a flipped image."""
    orientation = ds.get("PatientOrientation")
    if orientation and len(orientation) >= 1 and str(orientation[0]).upper().startswith("R"):
        return False
    return True


def _not_assessable(ds: Dataset, site: str, reason: str, box=None, confidence=None) -> SiteFinding:
    return SiteFinding(site=site, source_sop_instance_uid=str(ds.SOPInstanceUID),
                       source_sop_class_uid=str(ds.SOPClassUID), assessable=False, reason=reason,
                       box=box, confidence=confidence)


def _to_source(box, scale: float) -> tuple[int, int, int, int]:
    return tuple(int(round(v / scale)) for v in box)  # type: ignore[return-value]


def screen_study(images: list[StudyImage], model: LoadedModel, heatmaps: bool = True) -> list[ImageResult]:
    results: list[ImageResult] = []
    pending = []  # (result, radiograph, finding, crop) for every site that goes to the model
    for item in images:
        ds = item.dataset
        result = ImageResult(sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
                             assessable=True)
        results.append(result)
        sites = EXPECTED_SITES.get(item.region, ())
        if not sites or item.view not in ("ap", "lat") or (item.region == "hip" and item.view != "ap"):
            result.assessable, result.reason = False, REASON_UNSUPPORTED_VIEW
            result.sites = [_not_assessable(ds, s, REASON_UNSUPPORTED_VIEW) for s in sites]
            continue
        try:
            rad = load_radiograph(ds)
        except UnreadablePixels:
            result.assessable, result.reason = False, REASON_UNREADABLE_PIXELS
            result.sites = [_not_assessable(ds, s, REASON_UNREADABLE_PIXELS) for s in sites]
            continue
        located = {loc.site: loc for loc in locate_sites(rad.pixels, rad.spacing_mm, item.region, item.view,
                                                         patient_left_on_image_right=patient_left_on_image_right(ds))}
        cov = read_covariates(ds).vector()
        for site in sites:
            loc = located.get(site)
            if loc is None:
                result.sites.append(_not_assessable(ds, site, REASON_SITE_NOT_FOUND))
                continue
            source_box = _to_source(loc.box, rad.scale)
            if loc.confidence < MIN_LOCALISATION_CONFIDENCE:
                result.sites.append(_not_assessable(ds, site, REASON_LOW_LOCALISATION_CONFIDENCE,
                                                     source_box, loc.confidence))
                continue
            finding = SiteFinding(site=site, source_sop_instance_uid=result.sop_instance_uid,
                                  source_sop_class_uid=result.sop_class_uid, assessable=True,
                                  box=source_box, confidence=float(loc.confidence))
            result.sites.append(finding)
            crop = square_crop(rad.pixels, loc.box, mirrored=(site == "left_hip"))
            pending.append((result, rad, finding, crop, cov, site_type(site, item.view)))
        if not any(f.assessable for f in result.sites):
            result.assessable = False
            result.reason = result.sites[0].reason if result.sites else REASON_SITE_NOT_FOUND
        if heatmaps:
            factor = min(1.0, DISPLAY_MAX_SIDE / max(rad.pixels.shape))
            result.display = resample(rad.pixels, factor) if factor < 1 else rad.pixels
            result.display_scale = rad.scale * factor
            result.heatmap = np.zeros(rad.pixels.shape, dtype=np.float32)
    if pending:
        pred = model.predict(np.stack([normalise(p[3].pixels) for p in pending]),
                             np.array([p[4] for p in pending], dtype=np.float32),
                             np.array([p[5] for p in pending]))
        for i, (result, rad, finding, crop, _, _) in enumerate(pending):
            probs = pred.probabilities[i]
            finding.probabilities = {c: round(float(p), 4) for c, p in zip(CLASSES, probs)}
            finding.category = CLASSES[int(np.argmax(probs))]
            finding.t_score = float(pred.t_scores[i])
            if heatmaps:
                result.heatmap = np.maximum(result.heatmap, paste_map(pred.cams[i], crop, rad.pixels.shape))
    for result in results:  # bring the heatmap onto the display grid
        if result.heatmap is not None and result.display is not None and result.heatmap.shape != result.display.shape:
            factor = result.display.shape[0] / result.heatmap.shape[0]
            hm = resample(result.heatmap, factor)
            result.heatmap = np.pad(hm, [(0, max(0, a - b)) for a, b in zip(result.display.shape, hm.shape)])[
                :result.display.shape[0], :result.display.shape[1]]
    return results


def screen_image(ds: Dataset, region: str, view: str, model: LoadedModel, heatmaps: bool = True) -> ImageResult:
    return screen_study([StudyImage(ds, region, view)], model, heatmaps)[0]

