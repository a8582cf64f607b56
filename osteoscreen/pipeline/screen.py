"""Screen the images of one study: decode → locate sites → gate → model (one batch per calibration)
→ Grad-CAM → out-of-distribution gate → fuse the views of a site → prediction intervals. `screen_studies` does several studies with one
model call for all their sites (a worker's batch of jobs), each study's findings as if alone.

Pure: no network, no database. Takes pydicom datasets with their routing decision (region, view),
returns one ImageResult per image with a SiteFinding per expected site. The gates are described in
`quality` (metal: a classical plateau detector before the model, the model's implant head after
it); a header can route an image here but only its pixels make a site assessable.

Two-view lumbar studies: when the AP and the lateral view both give an assessable lumbar estimate,
both findings carry the fused estimate (mean of the two views' logits, then the calibrated softmax;
mean T-score) and name the other view in `fused_with`. Training reports the same fusion on its
hold-out (`training.train.fuse_lumbar_views`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from ..findings import (CLASSES, REASON_IMPLANT, REASON_LOW_LOCALISATION_CONFIDENCE, REASON_NOT_SCREENING_IMAGE,
                        REASON_OUT_OF_DISTRIBUTION, REASON_SCANNER_NOT_CALIBRATED, REASON_SITE_NOT_FOUND,
                        REASON_UNREADABLE_PIXELS, REASON_UNSUPPORTED_VIEW, ImageResult, SiteFinding)
from ..model.inference import LoadedModel, ScannerModels
from .covariates import read_covariates
from .crops import SITE_TYPES, normalise, paste_map, site_type, square_crop
from .dicom_io import BlankImage, UnreadablePixels, load_radiograph, resample
from .localize import locate_sites
from .quality import MetalDetector, anatomy_present
from .scene import scene_descriptors

MIN_LOCALISATION_CONFIDENCE = 0.5
IMPLANT_PROBABILITY_LIMIT = 0.5  # the model's implant head (trained on labelled crops)
DISPLAY_MAX_SIDE = 1024
HEATMAP_FEATHER = 0.12  # the heatmap fades out over this outer share of each crop (no hard square edges)
EXPECTED_SITES = {"hip": ("right_hip", "left_hip"), "lumbar": ("lumbar_spine",)}
# Names of the model's sub-region outputs → the DXA region they estimate, per site; the site's own
# estimate is the first region named here.
SITE_REGIONS = {"left_hip": ("total_hip", "femoral_neck"), "right_hip": ("total_hip", "femoral_neck")}


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


def header_laterality(ds: Dataset) -> str | None:
    """ImageLaterality (or series Laterality) when it names one side: a single-hip film. The localiser
    checks it against the femur's anatomy."""
    for keyword in ("ImageLaterality", "Laterality"):
        value = str(ds.get(keyword, "") or "").strip().upper()
        if value in ("L", "R"):
            return value
    return None


def _not_assessable(ds: Dataset, site: str, reason: str, box=None, confidence=None) -> SiteFinding:
    return SiteFinding(site=site, source_sop_instance_uid=str(ds.SOPInstanceUID),
                       source_sop_class_uid=str(ds.SOPClassUID), assessable=False, reason=reason,
                       box=box, confidence=confidence)


def _to_source(box, scale: float) -> tuple[int, int, int, int]:
    return tuple(int(round(v / scale)) for v in box)  # type: ignore[return-value]


@dataclass
class _Pending:
    """A site that passed the pre-model gates and waits for the batched model call."""

    result: ImageResult
    finding: SiteFinding
    crop: object
    covariates: list[float]
    site_type: int
    shape: tuple[int, int]
    model: LoadedModel  # the model under the calibration of this image's scanner
    scene: np.ndarray | None = None  # the whole image's descriptors, where the calibration reads them


@dataclass
class _Scored:
    """What fusion and the intervals need of a scored site."""

    log_probabilities: np.ndarray
    model: LoadedModel
    site_type: int


def _locate_and_gate(ds: Dataset, item: StudyImage, rad, result: ImageResult, sites, model: LoadedModel
                     ) -> list[_Pending]:
    located = {loc.site: loc for loc in locate_sites(rad.pixels, rad.spacing_mm, item.region, item.view,
                                                     patient_left_on_image_right=patient_left_on_image_right(ds),
                                                     image_laterality=header_laterality(ds))}
    if not anatomy_present([loc.confidence for loc in located.values()]):
        result.sites = [_not_assessable(ds, s, REASON_NOT_SCREENING_IMAGE) for s in sites]
        return []
    cov = read_covariates(ds).vector()
    metal = None
    pending = []
    for site in sites:
        loc = located.get(site)
        if loc is None:
            result.sites.append(_not_assessable(ds, site, REASON_SITE_NOT_FOUND))
            continue
        source_box = _to_source(loc.box, rad.scale)
        if loc.confidence < MIN_LOCALISATION_CONFIDENCE:
            result.sites.append(_not_assessable(ds, site, REASON_LOW_LOCALISATION_CONFIDENCE, source_box, loc.confidence))
            continue
        metal = metal or MetalDetector(rad.pixels, rad.spacing_mm[0])
        if metal.in_site(loc.box):
            result.sites.append(_not_assessable(ds, site, REASON_IMPLANT, source_box, loc.confidence))
            continue
        finding = SiteFinding(site=site, source_sop_instance_uid=result.sop_instance_uid,
                              source_sop_class_uid=result.sop_class_uid, assessable=True,
                              box=source_box, confidence=float(loc.confidence))
        result.sites.append(finding)
        crop = square_crop(rad.pixels, loc.box, mirrored=(site == "left_hip"))
        pending.append(_Pending(result, finding, crop, cov, site_type(site, item.view), rad.pixels.shape, model))
    if pending and model.calibration is not None and model.calibration.reads_scenes:
        scene = scene_descriptors(rad.pixels, rad.spacing_mm[0])  # once per image, for its sites
        for p in pending:
            p.scene = scene
    return pending


def _refuse(finding: SiteFinding, reason: str) -> None:
    finding.assessable, finding.reason = False, reason
    finding.category = finding.probabilities = finding.t_score = finding.regions = None


def _score(pending: list[_Pending], heatmaps: bool, feather: float) -> dict[int, _Scored]:
    """One batched model call per calibration among the pending sites (usually one); fills the
    findings, refuses out-of-distribution crops; returns what fusion and the intervals need of each
    scored site, by finding id."""
    groups: dict[int, list[_Pending]] = {}
    for p in pending:
        groups.setdefault(id(p.model), []).append(p)
    scored: dict[int, _Scored] = {}
    for members in groups.values():
        scored.update(_score_with(members, members[0].model, heatmaps, feather))
    return scored


def _score_with(pending: list[_Pending], model: LoadedModel, heatmaps: bool, feather: float) -> dict[int, _Scored]:
    pred = model.predict(np.stack([normalise(p.crop.pixels) for p in pending]),
                         np.array([p.covariates for p in pending], dtype=np.float32),
                         np.array([p.site_type for p in pending]),
                         images=[id(p.result) for p in pending],  # the two hips of one pelvis belong together
                         scenes=(np.stack([p.scene for p in pending]) if all(p.scene is not None for p in pending)
                                 else None))
    outside = pred.out_of_distribution()
    metal = (pred.implant_probability > IMPLANT_PROBABILITY_LIMIT if pred.implant_probability is not None
             else np.zeros(len(pending), dtype=bool))
    scored = {}
    for i, p in enumerate(pending):
        if pred.ood_distance is not None and pred.ood_threshold is not None and pred.ood_threshold[i] > 0:
            p.finding.ood_score = float(pred.ood_distance[i] / pred.ood_threshold[i])  # the drift watch's input
        if metal[i]:
            _refuse(p.finding, REASON_IMPLANT)
            continue
        if outside[i]:
            _refuse(p.finding, REASON_OUT_OF_DISTRIBUTION)
            continue
        probs = pred.probabilities[i]
        p.finding.probabilities = {c: round(float(v), 4) for c, v in zip(CLASSES, probs)}
        p.finding.category = CLASSES[int(np.argmax(probs))]
        p.finding.t_score = float(pred.t_scores[i])
        names = SITE_REGIONS.get(p.finding.site)
        if names and pred.region_t_scores:
            p.finding.regions = {names[0]: p.finding.t_score}
            p.finding.regions.update({r: float(v[i]) for r, v in pred.region_t_scores.items() if r in names})
        scored[id(p.finding)] = _Scored(np.log(np.clip(probs, 1e-6, 1.0)), model, p.site_type)
        if heatmaps:
            p.result.heatmap = np.maximum(p.result.heatmap, paste_map(pred.cams[i], p.crop, p.shape, feather))
    return scored


def fuse_views(results: list[ImageResult], scored: dict[int, _Scored]) -> None:
    """Give every assessable estimate of a site that several images of the study show (lumbar AP +
    lateral) the fused estimate: mean log-probabilities renormalised (= mean logits under one
    temperature), mean T-score."""
    by_site: dict[str, list[SiteFinding]] = {}
    for result in results:
        for f in result.sites:
            if f.assessable and id(f) in scored:
                by_site.setdefault(f.site, []).append(f)
    for findings in by_site.values():
        if len(findings) < 2:
            continue
        z = np.mean([scored[id(f)].log_probabilities for f in findings], axis=0)
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        t = float(np.mean([f.t_score for f in findings]))
        for f in findings:
            f.fused_with = [g.source_sop_instance_uid for g in findings if g is not f]
            f.probabilities = {c: round(float(v), 4) for c, v in zip(CLASSES, probs)}
            f.category = CLASSES[int(np.argmax(probs))]
            f.t_score = t


def attach_intervals(results: list[ImageResult], scored: dict[int, _Scored]) -> None:
    """Each scored estimate gets the prediction interval of the calibration it was scored under
    (Mondrian bin: its site type, or lumbar_fused for a fused estimate) and names that calibration."""
    for result in results:
        for f in result.sites:
            s = scored.get(id(f))
            if s is None or f.t_score is None:
                continue
            cal = s.model.calibration
            f.calibration = cal.summary() if (cal is not None and s.model.site_calibrated) else None
            if cal is None:
                continue
            bin_name = "lumbar_fused" if f.fused_with else SITE_TYPES[s.site_type]
            if f.fused_with and cal.probabilities == "predictive":  # the fused T-score's own distribution
                probs = cal.class_probabilities(np.array([f.t_score]), [bin_name])[0]
                if np.isfinite(probs).all():
                    f.probabilities = {c: round(float(v), 4) for c, v in zip(CLASSES, probs)}
                    f.category = CLASSES[int(np.argmax(probs))]
            low, high = cal.intervals(np.array([f.t_score]), [bin_name], s.model.interval_level)[0]
            if np.isfinite(low):
                f.t_score_interval, f.interval_level = (float(low), float(high)), s.model.interval_level


def _finish(result: ImageResult) -> None:
    if not any(f.assessable for f in result.sites):
        result.assessable = False
        result.reason = result.reason or (result.sites[0].reason if result.sites else REASON_SITE_NOT_FOUND)
    # bring the heatmap onto the display grid
    if result.heatmap is not None and result.display is not None and result.heatmap.shape != result.display.shape:
        factor = result.display.shape[0] / result.heatmap.shape[0]
        hm = resample(result.heatmap, factor)
        result.heatmap = np.pad(hm, [(0, max(0, a - b)) for a, b in zip(result.display.shape, hm.shape)])[
            :result.display.shape[0], :result.display.shape[1]]


def _prepare(images: list[StudyImage], model: LoadedModel | ScannerModels, heatmaps: bool
             ) -> tuple[list[ImageResult], list[_Pending]]:
    """Decode, locate and gate a study's images: one ImageResult per image, and the sites that wait
    for the model."""
    results: list[ImageResult] = []
    pending: list[_Pending] = []
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
        scanner_model = model.for_dataset(ds)
        if scanner_model is None:  # require_calibration and none for this scanner
            result.assessable, result.reason = False, REASON_SCANNER_NOT_CALIBRATED
            result.sites = [_not_assessable(ds, s, REASON_SCANNER_NOT_CALIBRATED) for s in sites]
            continue
        try:
            rad = load_radiograph(ds)
        except UnreadablePixels as exc:
            reason = REASON_NOT_SCREENING_IMAGE if isinstance(exc, BlankImage) else REASON_UNREADABLE_PIXELS
            result.assessable, result.reason = False, reason
            result.sites = [_not_assessable(ds, s, reason) for s in sites]
            continue
        if heatmaps:
            factor = min(1.0, DISPLAY_MAX_SIDE / max(rad.pixels.shape))
            result.display = resample(rad.pixels, factor) if factor < 1 else rad.pixels
            result.display_scale = rad.scale * factor
            result.heatmap = np.zeros(rad.pixels.shape, dtype=np.float32)
        pending += _locate_and_gate(ds, item, rad, result, sites, scanner_model)
    return results, pending


def _conclude(results: list[ImageResult], scored: dict[int, _Scored]) -> list[ImageResult]:
    fuse_views(results, scored)
    attach_intervals(results, scored)
    for result in results:
        _finish(result)
    return results


def screen_study(images: list[StudyImage], model: LoadedModel | ScannerModels, heatmaps: bool = True,
                 feather: float = HEATMAP_FEATHER) -> list[ImageResult]:
    """model: one model, or ScannerModels (a calibration per scanner). feather: the heatmap's fade
    towards each crop's border (0 keeps the raw Grad-CAM, as training.cam_check measures it)."""
    results, pending = _prepare(images, model, heatmaps)
    scored = _score(pending, heatmaps, feather) if pending else {}
    return _conclude(results, scored)


def screen_studies(studies: list[list[StudyImage]], model: LoadedModel | ScannerModels, heatmaps: bool = True,
                   feather: float = HEATMAP_FEATHER, return_exceptions: bool = False) -> list:
    """Several studies with one model call for all their sites (what a worker that claimed several
    jobs runs). Each study's results are those `screen_study` gives it alone: the network sees every
    crop independently (eval mode; Grad-CAM's gradient of one crop's score reaches only that crop),
    and view fusion stays within a study.

    return_exceptions: a study whose images cannot be screened gets its exception in its place in
    the returned list instead of raising, so the others still complete (a worker fails only that
    job). Should the shared model call itself fail, each study is scored alone to find the culprit."""
    prepared: list = []
    for images in studies:
        try:
            prepared.append(_prepare(images, model, heatmaps))
        except Exception as exc:
            if not return_exceptions:
                raise
            prepared.append(exc)
    batch = [p for prep in prepared if not isinstance(prep, Exception) for p in prep[1]]
    try:
        evidence = _score(batch, heatmaps, feather) if batch else {}
    except Exception:
        if not return_exceptions:
            raise
        evidence = None  # score study by study below
    out: list = []
    for prep in prepared:
        if isinstance(prep, Exception):
            out.append(prep)
            continue
        results, pending = prep
        try:
            own = evidence if evidence is not None else (_score(pending, heatmaps, feather) if pending else {})
            out.append(_conclude(results, own))
        except Exception as exc:
            if not return_exceptions:
                raise
            out.append(exc)
    return out


def screen_image(ds: Dataset, region: str, view: str, model: LoadedModel | ScannerModels, heatmaps: bool = True,
                 feather: float = HEATMAP_FEATHER) -> ImageResult:
    return screen_study([StudyImage(ds, region, view)], model, heatmaps, feather)[0]

