"""From scene to detector: `render` lays out one view of one patient (the scene from the `scenes`
registry, pose, foreign bodies) and sums the attenuation on the coarse grid; `expose` puts it on a
detector through a scanner profile (scatter, log, compression, edge enhancement, metal clipping,
blur, up-sampling, quantum noise, grid lines, window, collimation, LUT, bits, photometric). Also the
localiser's atlas (`mean_anatomy`), `display_window`, and site boxes and masks in detector pixels
(`_box`, `upsample_mask`)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from . import implants as _implants
from .anatomy import BONE_MASK_MM, METAL_CLIP, MU_BONE, MU_METAL, MU_SOFT, Canvas, Patient, draw_patient
from .profiles import ScannerProfile, draw_profile, get_profile
from .scenes import FIELDS, SCENES

if TYPE_CHECKING:
    from .lumbar import StudyExtras


# ----------------------------------------------------------------------------------------------
# Rendering and exposure
# ----------------------------------------------------------------------------------------------
@dataclass
class Rendered:
    """The coarse attenuation image and per-site truth before exposure to a detector."""

    attenuation: np.ndarray  # coarse grid, log attenuation (bone bright)
    field_mm: tuple[float, float]
    sites: dict[str, tuple[np.ndarray, np.ndarray | None]] = field(default_factory=dict)  # field-mm points, mask
    metal: np.ndarray | None = None  # coarse grid, metal path (mm), None when the image has no metal
    regions: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # site → DXA region → field-mm points
    foreign_bodies: int = 0  # how many foreign bodies were placed
    bone: np.ndarray | None = None  # coarse grid, True where any bone lies in the beam (with masks=True)


def _field_box(points_mm: np.ndarray) -> tuple[float, float, float, float]:
    return (float(points_mm[:, 0].min()), float(points_mm[:, 1].min()),
            float(points_mm[:, 0].max()), float(points_mm[:, 1].max()))


def render(kind: str, view: str, patient: Patient, rng: np.random.Generator, *, masks: bool = False,
           pose: bool = True, field_mm: tuple[float, float] | None = None, extras: StudyExtras | None = None,
           foreign=()) -> Rendered:
    """Lay out one view of one patient and return its attenuation image on the coarse grid.

    `extras` (implants, lumbar findings) and `foreign` (implants.ForeignBody, placed clear of the site
    boxes) draw nothing from `rng`: without them the image is what it was before they existed."""
    (h0, h1), (w0, w1) = FIELDS[kind]
    drawn = (rng.uniform(h0, h1), rng.uniform(w0, w1))
    field_mm = field_mm or drawn
    if pose:
        angle, mag = math.radians(rng.uniform(-5, 5)), rng.uniform(1.0, 1.08)
        shift = (rng.uniform(-18, 18), rng.uniform(-15, 15))
    else:
        angle, mag, shift = 0.0, 1.06, (0.0, 0.0)
    if kind == "lumbar":  # fields are centred near L3/L4, lateral ones over the posterior elements
        shift = (shift[0] - (25.0 if view == "lat" else 0.0), shift[1] + 12.0)
    cv = Canvas(field_mm, angle, mag, shift, rng)
    sites = SCENES[(kind, view)](cv, patient, rng, masks, extras)
    truth = {s: (cv.to_field(pts), m) for s, (pts, m) in sites.items()}
    placed = _implants.place_foreign_bodies(cv, foreign, [_field_box(p) for p, _ in truth.values()]) if foreign else 0
    att = MU_SOFT * np.maximum(cv.soft, 0.0) + MU_BONE * (cv.cort + cv.trab)
    metal = None
    if cv.metal.any():
        metal = np.maximum(cv.metal, 0.0)
        att = att + MU_METAL * metal
    regions = {s: {name: cv.to_field(pts) for name, pts in r.items()} for s, r in cv.regions.items()}
    bone = (cv.cort + cv.trab) > BONE_MASK_MM if masks else None
    return Rendered(att.astype(np.float32), field_mm, truth, metal, regions, placed, bone)


def _wide_blur(image: np.ndarray, sigma_mm: float, step_mm: float, stride: int) -> np.ndarray:
    """A Gaussian blur of many millimetres, computed on a decimated copy and interpolated back."""
    small = ndimage.gaussian_filter(image[::stride, ::stride], sigma_mm / (stride * step_mm))
    return F.interpolate(torch.from_numpy(np.ascontiguousarray(small))[None, None], size=image.shape,
                         mode="bilinear", align_corners=False)[0, 0].numpy()


def _processing(att: np.ndarray, step_mm: float, rng,
                profile: ScannerProfile | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Scatter, log, dynamic-range compression and edge enhancement of random strength (within the
    profile's ranges) on the coarse grid; returns (presentation values, relative noise sigma per
    coarse pixel)."""
    prof = profile if profile is not None else draw_profile(rng)
    primary = np.exp(-att)
    signal = primary + rng.uniform(*prof.scatter) * _wide_blur(primary, 40.0, step_mm, 8)
    log = -np.log(np.maximum(signal, 1e-9))
    strength, kernel = rng.uniform(*prof.compression), rng.uniform(*prof.compression_mm)
    log = log - strength * (_wide_blur(log, kernel, step_mm, 4) - log.mean())
    strength, kernel = rng.uniform(*prof.edge), rng.uniform(*prof.edge_kernel_mm)
    log = log + strength * (log - ndimage.gaussian_filter(log, kernel / step_mm))
    sigma = 1.0 / np.sqrt(np.maximum(signal, 1e-9))
    return log.astype(np.float32), sigma.astype(np.float32)


def mean_anatomy(kind: str, view: str, count: int = 8) -> tuple[np.ndarray, float, dict[str, np.ndarray]]:
    """The localiser's atlas: mean attenuation of `count` unposed phantoms (T = -1.25, anatomy and
    body habitus varying) on one fixed field, its pixel size in mm, and the mean site landmarks
    (field mm, rows and columns). No metal, foreign bodies or lumbar findings: plain anatomy."""
    rng = np.random.default_rng(20240607)
    (h0, h1), (w0, w1) = FIELDS[kind]
    field_mm = ((h0 + h1) / 2, (w0 + w1) / 2)
    images, marks = [], {}
    for _ in range(count):
        patient = draw_patient(rng)
        patient.t_scores = dict.fromkeys(patient.t_scores, -1.25)
        r = render(kind, view, patient, rng, pose=False, field_mm=field_mm)
        images.append(r.attenuation)
        for site, (points, _) in r.sites.items():
            marks.setdefault(site, []).append(points)
    mean = np.mean(images, axis=0)
    return mean, field_mm[0] / mean.shape[0], {s: np.mean(p, axis=0) for s, p in marks.items()}


@dataclass
class Exposure:
    pixels: np.ndarray  # uint16 stored values
    bits_stored: int
    photometric: str
    spacing_mm: float
    profile: str = ""  # ScannerProfile.name
    window: tuple[float, float] | None = None  # (centre, width) over the collimated, metal-free field
    collimation: str = ""  # "", "black" or "white"
    grid_lines: bool = False


def _noise_box(blur_px: float) -> int:
    """Width of the box that colours the quantum noise for a detector blur of `blur_px` (Gaussian sigma,
    pixels): 0 (white) below 0.35, 2 (sigma 0.5) below 0.75, else 3 (sigma 0.82)."""
    return 0 if blur_px < 0.35 else 2 if blur_px < 0.75 else 3


def _detector_noise(shape, box: int, gen: torch.Generator) -> torch.Tensor:
    """Quantum noise at the detector pitch, coloured by a `box`-wide moving sum along both axes (a
    few whole-image additions). Its standard deviation is `box` (1 when white): scale it by 1/box."""
    if not box:
        return torch.randn(shape, generator=gen)
    noise = torch.randn((shape[0] + box - 1, shape[1] + box - 1), generator=gen)
    for axis, n in ((1, shape[1]), (0, shape[0])):
        total = noise.narrow(axis, 0, n) + noise.narrow(axis, 1, n)
        for k in range(2, box):
            total.add_(noise.narrow(axis, k, n))
        noise = total
    return noise


def _lut(profile: ScannerProfile, top: int, rng) -> np.ndarray:
    """Presentation index 0..65535 → stored value: offset + gain * shape(x), shape a power-law gamma
    or a film-like S-curve (logistic, normalised to 0..1 over the window)."""
    gamma = math.exp(rng.uniform(math.log(profile.gamma[0]), math.log(profile.gamma[1])))
    slope, centre = rng.uniform(*profile.scurve_slope), rng.uniform(*profile.scurve_centre)
    offset = rng.uniform(0.0, 0.06) * top
    gain = rng.uniform(0.75, 0.98) * (top - offset)
    x = np.linspace(0.0, 1.0, 65536)
    if profile.lut == "scurve":
        lo, hi = 1 / (1 + math.exp(slope * centre)), 1 / (1 + math.exp(-slope * (1 - centre)))
        shape = (1 / (1 + np.exp(-slope * (x - centre))) - lo) / (hi - lo)
    else:
        shape = x ** gamma
    return offset + gain * shape


def display_window(values: np.ndarray) -> tuple[float, float]:
    """(centre, width) over the 0.5-99.5 % range of stored values, as a modality's processing sets it."""
    lo, hi = np.percentile(values, [0.5, 99.5])
    return round(float(lo + hi) / 2.0, 1), round(max(float(hi - lo), 2.0), 1)


def expose(r: Rendered, rng: np.random.Generator, *, photometric: str | None = None,
           profile: ScannerProfile | str | None = None) -> tuple[Exposure, dict]:
    """Put the coarse image on a detector through a scanner profile (None: one of the training
    profiles drawn from `rng`): processing, up-sampling, noise, detector blur, grid lines, window,
    collimation, LUT, bits, photometric. Returns the exposure and the site boxes in detector pixels."""
    prof = draw_profile(rng) if profile is None else get_profile(profile)
    spacing = round(float(rng.uniform(*prof.spacing_mm)), 4)  # as the header will state it
    shape = tuple(int(round(f / spacing)) for f in r.field_mm)
    step = r.field_mm[0] / r.attenuation.shape[0]
    log, sigma = _processing(r.attenuation, step, rng, prof)
    dose = rng.uniform(*prof.dose) * (spacing / 0.15) ** 2  # photons per detector pixel, unattenuated
    metal = None if r.metal is None else r.metal > 0.3
    sample = log[::2, ::2] if metal is None else log[::2, ::2][~metal[::2, ::2]]  # windows ignore metal
    lo, hi = np.percentile(sample, [rng.uniform(*prof.window_lo_pct), rng.uniform(*prof.window_hi_pct)])
    hi = hi + rng.uniform(0.0, 0.15) * (hi - lo)
    if metal is not None:  # behind thick metal only scatter arrives: clipped above the window (white)
        clip = np.clip((MU_METAL * r.metal - METAL_CLIP[0]) / (METAL_CLIP[1] - METAL_CLIP[0]), 0.0, 1.0)
        log = log + clip * np.maximum(hi + 0.3 * (hi - lo) - log, 0.0)
    mtf_mm = rng.uniform(*prof.mtf_sigma_mm)  # detector blur: on the signal (coarse grid) and the noise
    log = ndimage.gaussian_filter(log, mtf_mm / step, truncate=3.0) if mtf_mm > 0 else log
    box = _noise_box(mtf_mm / spacing)
    coarse = torch.from_numpy(np.stack([log, sigma / (math.sqrt(dose) * max(box, 1))]))[None]
    fine = F.interpolate(coarse, size=shape, mode="bilinear", align_corners=False)[0]
    gen = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
    noise = _detector_noise(shape, box, gen)
    img = fine[0].add_(fine[1].mul_(noise))
    grid = rng.random() < prof.grid_p  # grid parameters are drawn always: same seed, same rest
    period, amplitude = rng.uniform(*prof.grid_period_mm), rng.uniform(*prof.grid_amplitude)
    phase = rng.uniform(0, 2 * math.pi)
    axis = {"rows": 0, "columns": 1}.get(prof.grid_axis, int(rng.integers(2)))
    if grid:  # point-sampled by the pixel pitch, the fine grid aliases into coarser stripes
        coords = (torch.arange(shape[axis], dtype=torch.float64) + 0.5) * spacing
        stripes = (amplitude * torch.cos(2 * math.pi * coords / period + phase)).float()
        img.add_(stripes[:, None] if axis == 0 else stripes[None, :])
    idx = img.sub_(float(lo)).mul_(65535.0 / float(hi - lo)).clamp_(0, 65535).to(torch.int32)
    boxes = {s: _box(pts, spacing, shape) for s, (pts, _) in r.sites.items()}
    collimation, field_sl = _collimate(idx, noise, max(box, 1), boxes, spacing, prof, rng)
    bits = int(rng.choice(list(prof.bits)))
    top = 2 ** bits - 1
    drawn = "MONOCHROME1" if rng.random() < prof.monochrome1_p else "MONOCHROME2"  # drawn always: same seed, same rest
    photometric = photometric or drawn
    lut = _lut(prof, top, rng)
    if photometric == "MONOCHROME1":
        lut = top - lut
    pixels = np.take(np.clip(np.round(lut), 0, top).astype(np.uint16), idx.numpy())
    window = None
    if collimation or metal is not None:  # a modality sets its window on the anatomy, not on borders or metal
        view = pixels[field_sl][::4, ::4]
        keep = np.ones(view.shape, bool)
        if metal is not None:
            rows = (np.arange(field_sl[0].start, field_sl[0].stop, 4) + 0.5) * metal.shape[0] / shape[0]
            cols = (np.arange(field_sl[1].start, field_sl[1].stop, 4) + 0.5) * metal.shape[1] / shape[1]
            keep = ~metal[np.minimum(rows, metal.shape[0] - 1).astype(np.intp)[:, None],
                          np.minimum(cols, metal.shape[1] - 1).astype(np.intp)[None, :]]
        window = display_window(view[keep] if keep.any() else view)
    return Exposure(pixels, bits, photometric, spacing, prof.name, window, collimation, bool(grid)), boxes


COLLIMATION_CLEARANCE_MM = 12.0  # borders keep this far from every site box


def _collimate(idx: torch.Tensor, noise: torch.Tensor, noise_sd: float, boxes: dict, spacing: float,
               prof: ScannerProfile, rng):
    """Collimation borders on the presentation index: outside a rectangle the image is near-white
    (unexposed but for scatter, with noise) or black (masked by the modality). The rectangle keeps
    clear of the site boxes. Returns ("" | "black" | "white", the collimated field's slices)."""
    rows, cols = idx.shape
    apply = rng.random() < prof.collimation_p  # all parameters are drawn always: same seed, same rest
    fractions = rng.uniform(*prof.collimation_frac, size=4)
    white = {"black": False, "white": True}.get(prof.collimation, bool(rng.random() < 0.5))
    level = rng.uniform(0.9, 0.97)
    clear = int(round(COLLIMATION_CLEARANCE_MM / spacing))
    top, left = int(fractions[0] * rows), int(fractions[1] * cols)
    bottom, right = rows - int(fractions[2] * rows), cols - int(fractions[3] * cols)
    for r0, c0, r1, c1 in boxes.values():
        top, left = min(top, max(r0 - clear, 0)), min(left, max(c0 - clear, 0))
        bottom, right = max(bottom, min(r1 + clear, rows)), max(right, min(c1 + clear, cols))
    field_sl = np.s_[top:bottom, left:right]
    if not apply or (top, left, bottom, right) == (0, 0, rows, cols):
        return "", np.s_[0:rows, 0:cols]
    for band in (np.s_[:top, :], np.s_[bottom:, :], np.s_[top:bottom, :left], np.s_[top:bottom, right:]):
        if white:
            values = noise[band].mul(0.01 * 65535.0 / noise_sd).add_(level * 65535.0)
            idx[band] = values.clamp_(0, 65535).to(torch.int32)
        else:
            idx[band] = 0
    return ("white" if white else "black"), field_sl


def _box(points_mm: np.ndarray, spacing: float, shape) -> tuple[int, int, int, int]:
    """Smallest pixel box (exclusive ends) around field-mm points, clipped to the image."""
    rows, cols = points_mm[:, 0] / spacing, points_mm[:, 1] / spacing
    return (max(0, int(math.floor(rows.min()))), max(0, int(math.floor(cols.min()))),
            min(shape[0], int(math.ceil(rows.max()))), min(shape[1], int(math.ceil(cols.max()))))


def upsample_mask(mask: np.ndarray, shape) -> np.ndarray:
    """Nearest-neighbour resize of a coarse boolean mask to the detector grid."""
    rows = np.minimum((np.arange(shape[0]) + 0.5) * mask.shape[0] / shape[0], mask.shape[0] - 1).astype(np.intp)
    cols = np.minimum((np.arange(shape[1]) + 0.5) * mask.shape[1] / shape[1], mask.shape[1] - 1).astype(np.intp)
    return mask[rows[:, None], cols[None, :]]
